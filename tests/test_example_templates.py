"""Sources with different templates: the manifest records each, example_templates.arrow says which example used
which, and marker checks, `prep inspect` highlighting, `prep stats` and `prep verify` follow the example's source."""

from __future__ import annotations

import filecmp
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import yaml

from prep.example_templates import EXAMPLE_TEMPLATES_FILE, manifest_templates, read_example_templates
from prep.inspect import iter_row_views
from prep.load import iter_rows, load_shards
from prep.pipeline import build_config, pack_shards
from prep.report import pack_summary
from prep.render import load_template, template_from_dict, template_sha256, template_to_dict
from prep.stats import shard_stats
from prep.tokenizer import check_markers, default_tokenizer
from prep.verify import verify_shards

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
QA_TOML = """name = "qa"
markers = ["<S>", "<Q>", "<A>"]
[system]
prefix = "<S>\\n"
after = "\\n"
[user]
prefix = "<Q>\\n"
after = "\\n"
[assistant]
prefix = "<A>\\n"
end = "</A>"
after = "\\n"
"""
# chats whose replies hold markdown headings: `###` is a marker of the markers template only
HEADINGS = [{"messages": [{"role": "user", "content": f"Plan {k}?"},
                          {"role": "assistant", "content": f"### Step {k}\nDo it.\n### Done"}]} for k in range(6)]
FIRST_TEXT = {"markers": ("###instruction###", "###human###", "###system###"), "chatml": "<|im_start|>",
              "qa": ("<Q>", "<S>")}


def _inputs(folder: Path) -> tuple[Path, Path]:
    """The chatml source (markdown headings in replies) and the custom TOML template, written into folder."""
    chats = folder / "headings.jsonl"
    chats.write_text("".join(json.dumps(r) + "\n" for r in HEADINGS), encoding="utf-8")
    (folder / "qa.toml").write_text(QA_TOML, encoding="utf-8")
    return chats, folder / "qa.toml"


def _recipe(folder: Path, **options) -> Path:
    chats, qa = _inputs(folder)
    sources = [{"path": str(EXAMPLES / "alpaca.json")},
               {"path": str(chats), "template": "chatml"},
               {"path": str(EXAMPLES / "sharegpt.jsonl"), "template": str(qa)}]
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"max_len": 1024, "sources": sources, **options}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Three sources, three templates (built-in markers, built-in chatml, a TOML file), packed together."""
    folder = tmp_path_factory.mktemp("mixed")
    report = pack_shards(build_config(recipe=str(_recipe(folder)), output=str(folder / "shards")))
    return folder, folder / "shards", report


def _decoded_examples(shards: Path) -> list[str]:
    tok = default_tokenizer()
    texts = []
    for row in iter_rows(load_shards(shards)):
        starts = np.cumsum([0, *row["seq_lengths"].tolist()])
        texts += [tok.decode(row["input_ids"][a:b].tolist()) for a, b in zip(starts[:-1], starts[1:])]
    return texts


def test_manifest_records_every_template_and_each_sources_template(mixed):
    folder, shards, report = mixed
    manifest = json.loads((shards / "manifest.json").read_text())
    specs = ["markers", "chatml", str(folder / "qa.toml")]
    assert [s["template"] for s in manifest["mixture"]["sources"]] == specs
    assert [t["template"] for t in manifest["templates"]] == specs
    assert [t["name"] for t in manifest["templates"]] == ["markers", "chatml", "qa"]
    tok = default_tokenizer()
    for entry, spec in zip(manifest["templates"], specs):
        template = load_template(spec, tok)
        assert entry["sha256"] == template_sha256(template)
        assert template_from_dict(entry["definition"]) == template
        assert [m["marker"] for m in entry["markers"]] == [c.marker for c in check_markers(template, tok)]
    assert manifest["template"]["name"] == "markers"
    assert manifest["templates"][0]["sha256"] == manifest["template"]["sha256"]
    assert manifest["example_templates"]["file"] == EXAMPLE_TEMPLATES_FILE


def test_each_example_is_tagged_with_its_sources_template(mixed):
    _, shards, _ = mixed
    manifest = json.loads((shards / "manifest.json").read_text())
    names = [t["name"] for t in manifest["templates"]]
    tags = read_example_templates(shards, manifest)
    rows = list(iter_rows(load_shards(shards)))
    assert len(tags) == len(rows) == manifest["counts"]["rows"]
    assert [len(tags[r]) for r in range(len(rows))] == [len(row["seq_lengths"]) for row in rows]
    flat = np.asarray(tags.combine_chunks().flatten())
    texts = _decoded_examples(shards)
    assert len(flat) == len(texts) == manifest["counts"]["examples"]
    assert sorted(set(flat.tolist())) == [0, 1, 2]
    for index, text in zip(flat.tolist(), texts):  # rows are shuffled: the tag follows the example
        assert text.startswith(FIRST_TEXT[names[index]]), (names[index], text[:40])
    rejects = [json.loads(line) for line in (shards / "rejects.jsonl").read_text().splitlines()]
    unwritten = Counter(r["path"] for r in rejects if r["stage"] == "pack")  # qa has no tool layout: its tool chat
    assert sum(unwritten.values()) == 1 and manifest["counts"]["rejected"]["template_dropped_tools"] == 1
    written = [s["counts"]["train"] - unwritten[s["paths"][0]] for s in manifest["mixture"]["sources"]]
    assert np.bincount(flat).tolist() == written  # max_len 1024: one example per conversation


def test_pack_prints_the_markers_of_every_template(mixed):
    from rich.console import Console

    _, _, report = mixed
    console = Console(record=True, width=200)
    console.print(pack_summary(report))
    out = console.export_text()
    for title in ("template markers: markers", "template markers: chatml", "template markers: "):
        assert title in out
    assert "<Q>" in out and "<|im_start|>" in out and "###response###" in out


def test_inspect_highlights_with_the_template_of_each_examples_source(mixed):
    folder, shards, _ = mixed
    (folder / "qa.toml").unlink()  # the shards carry the definition: the file is not needed to read them
    seen = set()
    for view in iter_row_views(shards):
        for example in view.examples:
            seen.add(example.template)
            markers = [p.text for p in example.pieces if p.marker]
            text = "".join(p.text for p in example.pieces)
            if example.template == "chatml":
                assert "### Step" in text and "###" not in markers  # a heading, not the markers template's end
                assert {"<|im_start|>user", "<|im_start|>assistant", "<|im_end|>"} <= set(markers)  # role markers whole
            elif example.template == "markers":
                assert markers[-2:] == ["###", "<|endoftext|>"] and set(FIRST_TEXT["markers"]) & set(markers)
            else:
                assert {"<Q>", "<A>", "</A>"} <= set(markers)
    assert seen == {"markers", "chatml", "qa"}
    assert [t.name for t in manifest_templates(load_shards(shards).manifest)] == ["markers", "chatml", "qa"]


def test_stats_count_each_template(mixed):
    _, shards, _ = mixed
    stats = shard_stats(shards)
    assert list(stats.by_template) == ["markers", "chatml", "qa"]
    assert sum(c["examples"] for c in stats.by_template.values()) == stats.counts["examples"]
    assert sum(c["tokens"] for c in stats.by_template.values()) == stats.counts["tokens"]
    assert sum(c["trained_tokens"] for c in stats.by_template.values()) == stats.counts["trained_tokens"]
    texts, tags = _decoded_examples(shards), np.asarray(read_example_templates(shards, stats.manifest)
                                                         .combine_chunks().flatten())
    assert stats.by_template["chatml"]["examples"] == sum("### Step" in t for t in texts) == int((tags == 1).sum())


def test_verify_checks_the_example_templates_file(mixed, tmp_path):
    import shutil

    _, shards, _ = mixed
    assert verify_shards(shards).ok
    broken = tmp_path / "broken"
    shutil.copytree(shards, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    column = read_example_templates(broken, manifest).combine_chunks()
    values = np.asarray(column.flatten()).copy()
    values[0] = 7  # a template the manifest does not list
    changed = pa.ListArray.from_arrays(column.offsets, pa.array(values, pa.int32()))
    table = pa.table({"templates": changed})
    with open(broken / EXAMPLE_TEMPLATES_FILE, "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    problems = {(p.file, p.check) for p in verify_shards(broken).problems}
    assert problems == {(EXAMPLE_TEMPLATES_FILE, "sha256"), (EXAMPLE_TEMPLATES_FILE, "templates")}
    (broken / EXAMPLE_TEMPLATES_FILE).unlink()
    assert [(p.file, p.check) for p in verify_shards(broken).problems] == [(EXAMPLE_TEMPLATES_FILE, "missing")]


def test_same_inputs_give_the_same_files(mixed, tmp_path):
    folder, shards, _ = mixed
    again = tmp_path / "again"
    (folder / "qa.toml").write_text(QA_TOML, encoding="utf-8")  # an earlier test removed it
    pack_shards(build_config(recipe=str(folder / "recipe.yaml"), output=str(again), batch_size=3))
    files = sorted(p.relative_to(shards) for p in shards.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all(filecmp.cmp(shards / f, again / f, shallow=False) for f in files)


def test_validation_split_tags_both_splits(tmp_path):
    out = tmp_path / "shards"
    pack_shards(build_config(recipe=str(_recipe(tmp_path, val_fraction=0.3)), output=str(out)))
    for split in ("train", "validation"):
        manifest = json.loads((out / split / "manifest.json").read_text())
        assert len(manifest["templates"]) == 3 and (out / split / EXAMPLE_TEMPLATES_FILE).is_file()
        assert verify_shards(out / split).ok
        flat = np.asarray(read_example_templates(out / split, manifest).combine_chunks().flatten())
        names = [t["name"] for t in manifest["templates"]]
        for index, text in zip(flat.tolist(), _decoded_examples(out / split)):
            assert text.startswith(FIRST_TEXT[names[index]])
    top = json.loads((out / "manifest.json").read_text())
    assert [s["template"] for s in top["sources"]] == ["markers", "chatml", str(tmp_path / "qa.toml")]


def test_one_template_writes_nothing_more(tmp_path):
    out = tmp_path / "plain"
    pack_shards(build_config(inputs=[str(EXAMPLES / "alpaca.json")], output=str(out), template="chatml"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert "templates" not in manifest and "example_templates" not in manifest
    assert not (out / EXAMPLE_TEMPLATES_FILE).exists()
    assert manifest["template"]["definition"] == template_to_dict(load_template("chatml"))
    assert read_example_templates(out, manifest) is None
    assert shard_stats(out).by_template == {}
    assert {v.template for view in iter_row_views(out) for v in view.examples} == {None}


def test_docstring_examples():
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module("prep.example_templates"))
    assert result.failed == 0 and result.attempted > 0


def test_a_mixed_folder_read_from_a_url_keeps_its_templates(mixed, tmp_path, monkeypatch):
    """Shards at a URL are read from a local copy: example_templates.arrow comes with them (checked by sha256)."""
    import shutil
    import threading
    from functools import partial
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Files(SimpleHTTPRequestHandler):  # a static web server: files by name, no folder listings
        def list_directory(self, path):
            self.send_error(404)

        def log_message(self, *args):
            pass

    _, shards, _ = mixed
    shutil.copytree(shards, tmp_path / "www" / "shards")
    monkeypatch.setenv("PREP_CACHE", str(tmp_path / "cache"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Files, directory=str(tmp_path / "www")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shards"
        assert verify_shards(url).ok
        assert shard_stats(url).by_template == shard_stats(shards).by_template
        remote = [[v.template for v in view.examples] for view in iter_row_views(url)]
        assert remote == [[v.template for v in view.examples] for view in iter_row_views(shards)]
    finally:
        server.shutdown()
        server.server_close()
