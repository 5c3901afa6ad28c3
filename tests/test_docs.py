"""Every fenced code block of README.md and docs/*.md is run or checked here, or classified with its reason.

`HANDLED` is the one table: a block is found by its file and its first line, and says how it is handled:
- `run`: the block is executed as written (shell commands in a temporary folder holding a copy of examples/, with
  the `prep` of this interpreter's environment, offline; files it shows are written and fed to their command;
  Python is exec'd), changed only by the substitutions listed in its entry, each with its reason;
- `check`: the block is a synopsis, a layout tree or a manifest sketch, compared with the real command, repository
  or output;
- `elsewhere`: another test runs exactly this (named; the name must exist);
- `not run`: with the reason (a GPU, a diagram); its syntax is still checked where it has one (bash -n, compile).
A block in no entry fails `test_every_block_is_handled`, and an entry that matches no block fails too, so a new or
changed block has to be handled when it is written.

Substitutions shared by every shell block (`offline`): a hub id given to `--tokenizer` becomes the same tokenizer
from ../shared/data/tokenizers (tests download nothing); `--model HUB_ID` becomes `--model-config tiny` (no model
weights offline: the random-init tiny model; loading `--model FOLDER` is run by the `prep train` block); every
`prep train` stops after one step (`--max-steps 1 --no-progress`) unless the block sets its own steps.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent  # the environment's `prep` (and python) come first on PATH
HUB_TOKENIZERS = {"Qwen/Qwen2.5-0.5B-Instruct": "qwen2.5-0.5b-instruct"}  # hub id -> ../shared/data/tokenizers/


@dataclass(frozen=True)
class Block:
    """One fenced code block: where it is, its language tag and its text."""

    doc: str
    line: int
    lang: str
    text: str

    @property
    def key(self) -> tuple[str, str]:
        return self.doc, next(x.strip() for x in self.text.splitlines() if x.strip())

    @property
    def key2(self) -> tuple[str, str]:
        """The first line and the name the second line starts with: for blocks whose first lines are alike."""
        lines = [x.strip() for x in self.text.splitlines() if x.strip()] + [""]
        return self.doc, f"{lines[0]}\n{lines[1].partition('  ')[0]}"

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def doc_blocks() -> list[Block]:
    """Every fenced block (``` or ~~~, any indentation) of README.md and docs/*.md, in order."""
    found = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            m = re.match(r"^\s*(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
            if not m:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith(m.group(1)))
            found.append(Block(str(path.relative_to(REPO)), i + 1, m.group(2).lower(), "\n".join(lines[i + 1:end])))
            i = end + 1
    return found


@dataclass(frozen=True)
class Handling:
    how: str  # run | check | elsewhere | not run
    reason: str  # what is run or checked, or why not
    target: str = ""  # run/check: the function below; elsewhere: tests/FILE.py::TEST


R, D = "README.md", "docs/contract.md"
HANDLED: dict[tuple[str, str], Handling] = {
    (R, "raw files ──prep convert──▶ unified JSONL ──prep pack──▶ shards/ (Arrow + manifest) ──prep train──▶ model"):
        Handling("not run", "a diagram"),
    (R, "make demo    # installs prep, then runs convert → pack → inspect → verify → train → generate on examples/ (CPU)"):
        Handling("run", "`make -n` shows both targets; the script `make demo` runs after installing (examples/demo.sh) "
                 "runs with 3 training steps instead of 300 and 20 generated tokens; `make test` is this suite", "run_make"),
    (R, "prep convert examples/*.json examples/transcripts.jsonl.gz -o unified.jsonl   # validate + unify; rejects beside it"):
        Handling("run", "every command but `prep train --model HUB_ID` (model weights: not offline; the "
                 "`prep train` block trains), offline substitutions", "run_using_prep"),
    (R, "prep convert INPUT... -o OUTPUT [--format auto|alpaca|sharegpt|openai|prompt_completion|transcript|unified]"):
        Handling("check", "synopsis: its flags are exactly `prep convert`'s options; `prep schema` runs", "check_convert_synopsis"),
    (R, "prep pack INPUT... -o SHARDS [--tokenizer DIR|HUB_ID] [--template markers|chatml|tokenizer|FILE.toml]"):
        Handling("check", "synopsis: its flags are exactly `prep pack`'s options", "check_pack_synopsis"),
    (R, 'name = "alpaca-classic"'):
        Handling("run", "written to t.toml, `prep pack --template t.toml`; the manifest's template is the file's",
                 "run_template_toml"),
    (R, "shards/"):
        Handling("check", "layout tree: every name exists in a packed folder (example_templates.arrow in a mixed-template "
                 "one) and every file of a packed folder is named", "check_shard_tree"),
    (R, '{"id": "glaive-age-1", "source": {"path": "glaive.jsonl", "line": 1, "format": "sharegpt"}, "messages": ['):
        Handling("run", "one unified record: `prep convert` gives it back unchanged, `prep pack` trains its call",
                 "run_unified_json"),
    (R, "prep convert runs.jsonl -o agent.jsonl --field messages=trajectory.steps --field tools=functions \\"):
        Handling("run", "on runs.jsonl = examples/openai.jsonl rewritten as such a dump: the same conversations",
                 "run_field_mapping"),
    (R, "prep train shards/ -o out/                                  # tiny random-init Llama, CPU ok (the demo)"):
        Handling("run", "on the demo shards; `--model path/or/hub-id` is the model the first line saved, which "
                 "saves a checkpoint every step for the resume line to continue to step 2; torchrun (8 processes): "
                 "tests/test_ddp.py::test_torchrun_fsdp_matches_ddp runs DDP and FSDP2 under torchrun", "run_train"),
    (R, "prep export SHARDS --to megatron|mds|parquet -o OUT [--mds-shard-size 64MiB] [--overwrite]"):
        Handling("check", "synopsis: its flags are exactly `prep export`'s options, `--to` its formats",
                 "check_export_synopsis"),
    (R, "from megatron.core.datasets.indexed_dataset import IndexedDataset"):
        Handling("elsewhere", "read from the README by its snippet name and run on an export",
                 "tests/test_export.py::test_readme_snippets"),
    (R, "from megatron.bridge.data.packing.config import PackedSequenceSpecs"):
        Handling("not run", "needs megatron.bridge, whose import pulls its model zoo and Transformer Engine; "
                 "the files it reads are checked by tests/test_export.py"),
    (R, "from streaming import StreamingDataset"):
        Handling("elsewhere", "read from the README by its snippet name, run in streaming's side venv",
                 "tests/test_export.py::test_readme_snippets"),
    (R, "from datasets import load_dataset"):
        Handling("elsewhere", "read from the README by its snippet name and run on an export",
                 "tests/test_export.py::test_readme_snippets"),
    (R, "from prep.load import PackedDataset, cu_seqlens_pair, load_shards"):
        Handling("elsewhere", "read from the README by its snippet name and run on padded shards",
                 "tests/test_export.py::test_readme_snippets"),
    (R, "prep pack --recipe examples/recipe.yaml -o shards          # flags given on the command line win over the file"):
        Handling("run", "both commands; training stops after one step and evaluates", "run_recipe_commands"),
    (R, "template: markers          # any `prep pack` option: tokenizer (unset = demo), max_len, train_on, overflow, seed, ..."):
        Handling("run", "written beside copies of the examples it names (chats/ holds sharegpt.jsonl, runs.jsonl is "
                 "openai.jsonl under trajectory.steps), `prep pack --recipe`", "run_recipe_yaml"),
    (R, "prep convert 's3://my-bucket/raw/*.json*' -o s3://my-bucket/sft/unified.jsonl"):
        Handling("elsewhere", "needs an S3 store: every command runs against moto's S3 server on 127.0.0.1",
                 "tests/test_remote.py::test_convert_pack_verify_train_from_and_to_s3"),
    (R, "prep pack hf://datasets/prep-test/mix --subset alpaca --split train -o s3://my-bucket/shards --max-len 1024"):
        Handling("elsewhere", "needs the Hub and S3: a local Hub server and moto's S3 on 127.0.0.1 (the third command: "
                 "tests/test_hub.py::test_rejects_keep_the_hub_file_and_line)",
                 "tests/test_hub.py::test_online_pack_from_the_hub_to_s3_then_train_and_a_moved_branch_is_not_up_to_date"),
    (R, "python benchmarks/gpu_prepare.py     # here, with the dev install: .device/gpu-inputs.tar.gz (7.4 MiB, git-ignored)"):
        Handling("not run", "needs a GPU machine; the same steps on a CPU (gpu_prepare.py --smoke, gpu_check.py "
                 "--cpu-smoke) run in tests/test_gpu_check.py::test_cpu_smoke_writes_one_json_of_every_step"),
    (R, "pyproject.toml        package prep-sft: import packages prep/ and schemas/, console script `prep`, extras [dev],"):
        Handling("check", "layout tree: every path exists, every module of prep/ and schemas/ is named", "check_repo_tree"),
    (D, "shards/"):
        Handling("check", "layout tree, as the README's", "check_shard_tree"),
    (D, "{"):
        Handling("check", "manifest sketch: its keys are the keys of real manifests (plain and mixed-template packs), "
                 "and every key of a real manifest and its counts is in it", "check_manifest_sketch"),
    (D, '"templates": [{"template": "<value given: name or file>", "name", "sha256", "definition", "markers": [...]}, ...]'):
        Handling("check", "the keys of a mixed-template manifest's `templates` and `example_templates`",
                 "check_templates_sketch"),
    (D, "shards/\ntrain/"):
        Handling("check", "split layout: the names of a folder packed with a validation split, dataset_dict.json's "
                 "content", "check_split_tree"),
    (D, '{"format": "prep-export", "format_version": 1, "prep_version": "0.1.0", "to": "megatron",'):
        Handling("check", "export manifest sketch: its keys against a real export manifest, and back",
                 "check_export_sketch"),
}


def handling_of(block: Block) -> Handling | None:
    """The table entry of a block: by its first line, or by `key2` where the first line is ambiguous."""
    return HANDLED.get(block.key2) or HANDLED.get(block.key)


# --------------------------------------------------------------------------------------------------
# The table covers every block, and nothing else


def test_every_block_is_handled():
    """A block neither run, checked nor classified fails here (add it to HANDLED, with its reason)."""
    missing = [f"{b.where} [{b.lang or 'none'}] {b.key[1]!r}" for b in doc_blocks() if handling_of(b) is None]
    assert not missing, "code blocks with no entry in tests/test_docs.py HANDLED:\n" + "\n".join(missing)


def test_every_entry_matches_a_block():
    """An entry whose block changed or went away is stale: update the entry with the block."""
    keys = {b.key for b in doc_blocks()} | {b.key2 for b in doc_blocks()}
    stale = [k for k in HANDLED if k not in keys]
    assert not stale, f"HANDLED entries that match no block: {stale}"


def test_blocks_are_found_in_every_language():
    """The parser sees every fence: as many blocks as opening fences, with their tags."""
    blocks = doc_blocks()
    fences = sum(len(re.findall(r"^\s*```", p.read_text(encoding="utf-8"), re.M)) for p in DOCS)
    assert len(blocks) * 2 == fences
    assert {"bash", "toml", "yaml", "json", "python", ""} <= {b.lang for b in blocks}


@pytest.mark.parametrize("block", doc_blocks(), ids=lambda b: b.where)
def test_block(block, request):
    """Run or check the block as its entry says; an elsewhere test must exist; a not-run block must still parse."""
    handling = handling_of(block)
    if handling is None:
        pytest.fail(f"{block.where}: no entry in HANDLED (see test_every_block_is_handled)")
    assert handling.how in ("run", "check", "elsewhere", "not run") and handling.reason
    for target in re.findall(r"tests/\w+\.py::\w+", f"{handling.target} {handling.reason}"):
        file, name = target.split("::")
        assert re.search(rf"^def {name}\(", (REPO / file).read_text(encoding="utf-8"), re.M), f"{target} is gone"
    if handling.how in ("run", "check"):
        globals()[handling.target](block, request.getfixturevalue("docs_env"))
    elif "snippet" in handling.reason:  # the named test reads the block by the marker line above it
        above = (REPO / block.doc).read_text(encoding="utf-8").splitlines()[block.line - 2]
        assert re.fullmatch(r"<!-- snippet: \w+ -->", above), f"{block.where}: no snippet marker above the block"
    if handling.how != "run":
        parses(block)


def parses(block: Block) -> None:
    """The syntax check of a block by its language tag (run blocks are checked by running them)."""
    if block.lang in ("bash", "sh", "console"):
        done = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
        assert done.returncode == 0, f"{block.where}: {done.stderr}"
    elif block.lang == "python":
        compile(block.text, block.where, "exec")
    elif block.lang == "toml":
        tomllib.loads(block.text)
    elif block.lang == "yaml":
        yaml.safe_load(block.text)
    elif block.lang in ("json", "jsonl"):
        for record in [block.text] if block.lang == "json" else block.text.splitlines():
            json.loads(record)


# --------------------------------------------------------------------------------------------------
# The shared environment: examples/ copied, packed folders made once


class DocsEnv:
    """A temporary folder with a copy of examples/, and the packed folders several blocks are checked against."""

    def __init__(self, root: Path, shared_data: Path):
        self.root = root
        self.shared = shared_data
        shutil.copytree(REPO / "examples", root / "examples")
        self.env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", HF_HUB_OFFLINE="1",
                        HF_DATASETS_OFFLINE="1", COLUMNS="200", OMP_NUM_THREADS="1")  # two shared cores

    def folder(self, name: str) -> Path:
        """A fresh folder holding a link to the examples, for one block's commands."""
        path = self.root / name
        path.mkdir()
        (path / "examples").symlink_to(self.root / "examples")
        return path

    def sh(self, command: str, cwd: Path, where: str = "") -> subprocess.CompletedProcess:
        """Run one command line with bash (-e, pipefail); it must exit 0."""
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=cwd, env=self.env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{where}: `{command}` exited {done.returncode}:\n{done.stderr[-3000:]}"
        return done

    @functools.cached_property
    def demo(self) -> subprocess.CompletedProcess:
        """examples/demo.sh (what `make demo` runs once installed), with 3 training steps instead of 300 and 20
        generated tokens instead of 200, run on the copy of the examples into demo-out/."""
        script = (REPO / "examples" / "demo.sh").read_text(encoding="utf-8")
        script, n = re.subn(r"--max-steps 300\b", "--max-steps 3", script)
        script, m = re.subn(r"max_new_tokens=200\b", "max_new_tokens=20", script)
        assert n == m == 1, "examples/demo.sh: its training or generation length changed: update DocsEnv.demo"
        (self.root / "demo.sh").write_text(script.replace('cd "$(dirname "$0")/.."', f'cd "{self.root}"'),
                                           encoding="utf-8")
        return self.sh("bash demo.sh demo-out", self.root, "examples/demo.sh")

    @property
    def demo_shards(self) -> Path:
        """The demo's shards: the bundled examples packed with the demo tokenizer at max-len 512."""
        assert self.demo.returncode == 0  # the demo runs once, on first use
        return self.root / "demo-out" / "shards"

    @functools.cached_property
    def mixed_shards(self) -> Path:
        """A recipe of two weighted sources with different templates, no split: mixture, templates and
        example_templates.arrow in one shard folder."""
        (self.root / "examples" / "mixed.yaml").write_text(
            "max_len: 512\nsources:\n  - {path: alpaca.json, weight: 2.0}\n"
            "  - {path: openai.jsonl, template: chatml, weight: 0.5}\n", encoding="utf-8")
        self.sh("prep pack --recipe examples/mixed.yaml -o mixed-shards", self.root, "mixed_shards")
        return self.root / "mixed-shards"

    @functools.cached_property
    def recipe_shards(self) -> Path:
        """The README's recipe block packed (a validation split): set by `run_recipe_yaml`, or made here."""
        block = next(b for b in doc_blocks() if getattr(handling_of(b), "target", "") == "run_recipe_yaml")
        return recipe_yaml_pack(block, self)


@pytest.fixture(scope="module")
def docs_env(tmp_path_factory, shared_data) -> DocsEnv:
    return DocsEnv(tmp_path_factory.mktemp("docs"), shared_data)


def commands(text: str) -> list[str]:
    """The command lines of a shell block: continuation lines joined, blank and comment lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def substitute(text: str, subs: list[tuple[str, str]], where: str) -> str:
    """Apply the block's own substitutions (regex, multi-line); each must still match the block."""
    for pattern, replacement in subs:
        text, n = re.subn(pattern, replacement, text, flags=re.M)
        assert n, f"{where}: substitution {pattern!r} matches nothing: update it with the block"
    return text


def offline(command: str, env: DocsEnv) -> str:
    """The shared substitutions: local tokenizers for hub ids, no model download, one training step."""
    for hub, local in HUB_TOKENIZERS.items():
        command = command.replace(f"--tokenizer {hub}", f"--tokenizer {env.shared / 'tokenizers' / local}")
        command = command.replace(f"--model {hub}", "--model-config tiny")
    if re.match(r"\s*prep train ", command):
        command = re.sub(r"\s+(#.*)?$", "", command)
        command += " --no-progress" + ("" if "--max-steps" in command else " --max-steps 1")
    return command


def run_shell(block: Block, env: DocsEnv, cwd: Path, subs: list[tuple[str, str]] = (),
              skip: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Every command of a shell block, in order, in `cwd`; lines holding a `skip` key are left out (its value:
    why, and where they run)."""
    done = []
    for command in commands(substitute(block.text, list(subs), block.where)):
        if any(s in command for s in (skip or {})):
            continue
        done.append(env.sh(offline(command, env), cwd, block.where))
    return done


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------------------------------
# Shell blocks


def run_make(block: Block, env: DocsEnv) -> None:
    """`make -n demo test` plans both targets; the demo script runs (3 training steps instead of 300)."""
    assert [c.split("#")[0].split() for c in commands(block.text)] == [["make", "demo"], ["make", "test"]]
    plan = subprocess.run(["make", "-n", "demo", "test", "VENV=.venv-docs-dry-run"], cwd=REPO, capture_output=True,
                          text=True, env=env.env)
    assert plan.returncode == 0 and "bash examples/demo.sh" in plan.stdout and "pytest" in plan.stdout, plan.stderr
    done = env.demo
    assert "generated:" in done.stdout and "demo done" in done.stdout, done.stdout[-2000:]
    assert "ok" in done.stdout and (env.root / "demo-out" / "run" / "model.safetensors").is_file()


def run_using_prep(block: Block, env: DocsEnv) -> None:
    """convert → pack (the Qwen tokenizer, its chat template) → inspect → verify → export, as written (the train
    line needs model weights: left out, see HANDLED)."""
    cwd = env.folder("using")
    done = run_shell(block, env, cwd, skip={"prep train shards/ -o run/ --model": "no model weights offline; "
                                            "training the shards: the `prep train` block"})
    assert "wrote" in done[0].stdout and (cwd / "unified.rejects.jsonl").is_file()
    packed = manifest(cwd / "shards")
    assert packed["tokenizer"]["name"].endswith("qwen2.5-0.5b-instruct") and packed["template"]["name"] == "tokenizer"
    assert "row 0 of" in done[2].stdout and "ok" in done[3].stdout
    assert manifest(cwd / "out")["format"] == "prep-export"


def run_template_toml(block: Block, env: DocsEnv) -> None:
    """The custom template file as shown, through `prep pack --template`; the manifest keeps it as data."""
    cwd = env.folder("template")
    (cwd / "t.toml").write_text(block.text + "\n", encoding="utf-8")
    done = env.sh("prep pack examples/alpaca.json -o shards --max-len 512 --template t.toml", cwd, block.where)
    template = manifest(cwd / "shards")["template"]
    data = tomllib.loads(block.text)
    assert template["name"] == data["name"]
    for key, value in data.items():
        if isinstance(value, dict):
            assert {k: template["definition"][key][k] for k in value} == value, key
        else:
            assert template["definition"][key] == value, key
    shown = env.sh("prep inspect shards --row 0", cwd, block.where).stdout
    assert "### Instruction:" in shown and "### Response:" in shown and "### End" in shown
    assert "### Response:" in done.stdout  # the marker table names the file's markers


def run_unified_json(block: Block, env: DocsEnv) -> None:
    """The unified record shown converts to itself, and packs with its call trained."""
    cwd = env.folder("unified")
    record = json.loads(block.text)
    (cwd / "agent.jsonl").write_text(json.dumps(record) + "\n", encoding="utf-8")
    env.sh("prep convert agent.jsonl -o again.jsonl", cwd, block.where)
    assert [json.loads(x) for x in (cwd / "again.jsonl").read_text(encoding="utf-8").splitlines()] == [record]
    assert (cwd / "again.rejects.jsonl").read_text(encoding="utf-8") == ""
    env.sh("prep pack again.jsonl -o shards --max-len 512", cwd, block.where)
    counts = manifest(cwd / "shards")["counts"]
    assert (counts["examples"], counts["tool_calls"], counts["tool_results"], counts["rejected"]) == (1, 1, 1, {})


def trajectory_dump(source: Path, target: Path, rename: bool) -> None:
    """Records of a messages file rewritten as an agent-trajectory dump: messages under trajectory.steps, tools
    under functions, and with `rename` each message's role/content as speaker/text."""
    keys = {"role": "speaker", "content": "text"} if rename else {}
    out = []
    for line in source.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        steps = [{keys.get(k, k): v for k, v in m.items()} for m in record.pop("messages")]
        dump = {"trajectory": {"steps": steps}, **({"functions": record.pop("tools")} if "tools" in record else {})}
        out.append(json.dumps(dump | record))
    target.write_text("\n".join(out) + "\n", encoding="utf-8")


def run_field_mapping(block: Block, env: DocsEnv) -> None:
    """--field on a trajectory dump gives the conversations of the file it was made from."""
    cwd = env.folder("fields")
    trajectory_dump(cwd / "examples" / "openai.jsonl", cwd / "runs.jsonl", rename=True)
    run_shell(block, env, cwd)
    env.sh("prep convert examples/openai.jsonl -o plain.jsonl", cwd, block.where)

    def conversations(name: str) -> list:
        rows = [json.loads(x) for x in (cwd / name).read_text(encoding="utf-8").splitlines()]
        return [(r["id"], r["messages"], r.get("tools")) for r in rows]

    assert conversations("agent.jsonl") == conversations("plain.jsonl") and len(conversations("plain.jsonl")) > 3
    assert any(tools for _, _, tools in conversations("agent.jsonl"))


def run_train(block: Block, env: DocsEnv) -> None:
    """Each `prep train` line on the demo shards; the resume line continues a checkpointed run."""
    cwd = env.folder("train")
    (cwd / "shards").symlink_to(env.demo_shards)
    subs = [(r"^(prep train shards/ -o out/) +#", r"\1 --save-every 1  #"),  # a checkpoint for the resume line
            (r"-o out/ --model path/or/hub-id", "-o tuned/ --model out/"),  # a local folder: the model line 1 saved
            (r"--save-every 200 --resume", "--save-every 1 --resume --max-steps 2")]
    done = run_shell(block, env, cwd, subs, skip={"torchrun": "tests/test_ddp.py::test_torchrun_fsdp_matches_ddp"})
    assert len(done) == 3
    assert (cwd / "tuned" / "model.safetensors").is_file() and list((cwd / "out" / "checkpoints").iterdir())
    steps = [json.loads(x)["step"] for x in (cwd / "out" / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    assert steps[-1] == 2


def run_recipe_commands(block: Block, env: DocsEnv) -> None:
    """The bundled recipe packs into train/validation; training evaluates on the validation split."""
    cwd = env.folder("recipe")
    run_shell(block, env, cwd)
    assert manifest(cwd / "shards")["format"] == "prep-shards-splits"
    metrics = [json.loads(x) for x in (cwd / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in m and "val_ppl" in m for m in metrics)


def recipe_yaml_pack(block: Block, env: DocsEnv) -> Path:
    """The recipe shown, beside the inputs it names, packed by `prep pack --recipe`."""
    cwd = env.root / "recipe-yaml"
    if (cwd / "shards" / "manifest.json").is_file():
        return cwd / "shards"
    cwd.mkdir()
    (cwd / "chats").mkdir()
    for name in ("alpaca.json", "openai.jsonl"):
        shutil.copy(env.root / "examples" / name, cwd / name)
    shutil.copy(env.root / "examples" / "sharegpt.jsonl", cwd / "chats" / "sharegpt.jsonl")
    trajectory_dump(env.root / "examples" / "openai.jsonl", cwd / "runs.jsonl", rename=False)
    (cwd / "recipe.yaml").write_text(block.text + "\n", encoding="utf-8")
    env.sh("prep pack --recipe recipe.yaml -o shards", cwd, block.where)
    return cwd / "shards"


def run_recipe_yaml(block: Block, env: DocsEnv) -> None:
    """Every source of the recipe shown is read, with its weight, template, split and field mapping."""
    data = yaml.safe_load(block.text)
    top = manifest(env.recipe_shards)
    assert top["format"] == "prep-shards-splits" and top["splits"]
    sources = top["sources"]
    assert [s["weight"] for s in sources] == [s.get("weight", 1.0) for s in data["sources"]]
    assert all(s["counts"]["accepted"] > 0 for s in sources), sources  # runs.jsonl too, through its fields
    assert [s["template"] for s in sources] == [s.get("template", data["template"]) for s in data["sources"]]
    train = manifest(env.recipe_shards / "train")
    assert train["max_len"] == data["max_len"] and (env.recipe_shards / "train" / "example_templates.arrow").is_file()


# --------------------------------------------------------------------------------------------------
# Synopses, layout trees and sketches, against the real thing


def command_options(name: str) -> dict[str, object]:
    """Every option name of `prep NAME` → its click parameter."""
    import typer

    from prep.cli import app

    command = typer.main.get_command(app).commands[name]
    return {o: p for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}


def check_synopsis(block: Block, name: str) -> None:
    """The flags a synopsis shows are options of the command, and it shows every option (one name of each)."""
    statements = re.split(r"\n(?=\S)", block.text)  # an indented line continues the statement above
    text = next(s for s in statements if s.startswith(f"prep {name} "))
    shown = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", text))
    options = command_options(name)
    assert shown <= set(options), f"{block.where}: not options of prep {name}: {sorted(shown - set(options))}"
    missing = {min(p.opts) for p in options.values() if not shown & {*p.opts, *p.secondary_opts}}
    assert not missing, f"{block.where}: options of prep {name} the synopsis leaves out: {sorted(missing)}"


def check_convert_synopsis(block: Block, env: DocsEnv) -> None:
    check_synopsis(block, "convert")
    assert "prep schema" in block.text
    schema = json.loads(env.sh("prep schema", env.root, block.where).stdout)
    assert "messages" in schema["properties"]


def check_pack_synopsis(block: Block, env: DocsEnv) -> None:
    check_synopsis(block, "pack")


def check_export_synopsis(block: Block, env: DocsEnv) -> None:
    from typing import get_args

    from schemas.export_config import ExportFormat

    check_synopsis(block, "export")
    shown = re.search(r"--to ([\w|]+)", block.text).group(1).split("|")
    assert sorted(shown) == sorted(get_args(ExportFormat))


def tree_names(block: Block) -> list[tuple[str, str]]:
    """(path, description) of a layout tree: names before a run of two spaces, indentation = nesting; lines
    indented past the names are continuations."""
    entries, parents = [], {}
    for line in block.text.splitlines():
        indent = len(line) - len(line.lstrip())
        if not line.strip() or indent > 4:
            continue
        head, _, description = line.strip().partition("  ")
        parent = "".join(parents[i] for i in sorted(parents) if i < indent)
        for name in head.replace(",", " ").split():
            entries.append((parent + name, description.strip()))
        if head.endswith("/"):
            parents = {i: v for i, v in parents.items() if i < indent} | {indent: head}
    return entries


def check_shard_tree(block: Block, env: DocsEnv) -> None:
    """Every name of the tree is in a packed folder, and every file of one is named."""
    names = [(p.removeprefix("shards/"), d) for p, d in tree_names(block) if p != "shards/"]
    plain, mixed = env.demo_shards, env.mixed_shards
    shard = re.compile(r"data-\d{5}-of-\d{5}\.arrow")
    for name, description in names:
        folder = mixed if "only when" in description.lower() else plain
        if re.fullmatch(r"data-\d{5}-of-[\dN]{5}\.arrow", name):
            assert any(shard.fullmatch(p.name) for p in folder.iterdir()), name
        else:
            assert (folder / name.rstrip("/")).exists(), f"{block.where}: {name} is not in a packed folder"
    named = {n.rstrip("/") for n, _ in names}
    for folder in (plain, mixed):
        unnamed = [p.name for p in folder.iterdir() if p.name not in named and not shard.fullmatch(p.name)]
        assert not unnamed, f"{block.where}: files of a packed folder the tree does not name: {unnamed}"


def check_split_tree(block: Block, env: DocsEnv) -> None:
    """The layout of a folder packed with a validation split."""
    folder = env.recipe_shards
    names = [p.removeprefix("shards/").rstrip("/") for p, _ in tree_names(block) if p != "shards/"]
    assert sorted(names) == sorted(p.name for p in folder.iterdir())
    shown = json.loads(re.search(r"dataset_dict\.json\s+(\{.*?\})", block.text).group(1))
    assert json.loads((folder / "dataset_dict.json").read_text()) == shown
    assert manifest(folder)["format"] == re.search(r'format "([\w-]+)"', block.text).group(1)
    for split in ("train", "validation"):
        assert manifest(folder / split)["format"] == "prep-shards"


def keys_of(value: object) -> set[str]:
    """Every dict key, at any depth."""
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in keys_of(v)}
    if isinstance(value, list):
        return {k for v in value for k in keys_of(v)}
    return set()


def sketch_keys(text: str) -> set[str]:
    """The keys a JSON-like sketch names: `"key":` and the bare names of `{"a", "b", ...}` key lists."""
    values = re.compile(r"\[[^\[\]{}]*\]")  # a list of values (no objects in it): its items are not keys
    while values.search(text):
        text = values.sub("LIST", text)
    return set(re.findall(r'"(\w+)"\s*:', text)) | set(re.findall(r'[{,]\s*"(\w+)"(?=\s*[,}])', text))


SKETCH_ONLY = {"reason": "stands for each rejection reason",
               "commit": "only for Hub inputs: tests/test_hub.py::test_pack_from_the_hub_records_the_commit_and_matches_a_local_pack"}


def check_manifest_sketch(block: Block, env: DocsEnv) -> None:
    """The manifest sketch names real keys, and every top-level key and count of a real manifest."""
    plain, mixed = manifest(env.demo_shards), manifest(env.mixed_shards)
    real = keys_of(plain) | keys_of(mixed) | keys_of(mixed["mixture"]["sources"][0]["counts"])
    shown = sketch_keys(block.text)
    extra = shown - real - set(SKETCH_ONLY)
    assert not extra, f"{block.where}: keys no manifest has: {sorted(extra)}"
    expected = (set(plain) | set(plain["counts"]) | set(plain["tokenizer"]) | set(plain["packing"])
                | set(mixed["mixture"]["sources"][0]) - {"counts"}) - {"templates", "example_templates", "markers"}
    assert not expected - shown, f"{block.where}: manifest keys the sketch leaves out: {sorted(expected - shown)}"


def check_templates_sketch(block: Block, env: DocsEnv) -> None:
    """The multi-template keys: `templates` entries and `example_templates`."""
    mixed = manifest(env.mixed_shards)
    shown = sketch_keys(block.text)
    assert set(mixed["templates"][0]) | set(mixed["example_templates"]) | {"templates", "example_templates"} == shown
    assert [t["name"] for t in mixed["templates"]] == ["markers", "chatml"]


def check_export_sketch(block: Block, env: DocsEnv) -> None:
    """The export manifest sketch against a real export's manifest."""
    from prep.export import export_shards
    from schemas.export_config import ExportConfig

    out = env.root / "export-parquet"
    if not out.exists():
        export_shards(ExportConfig(shards=str(env.demo_shards), to="parquet", output=str(out)))
    real = manifest(out)
    shown = sketch_keys(block.text)
    top = set(real) - {real["to"]}
    assert not top - shown, f"{block.where}: export manifest keys the sketch leaves out: {sorted(top - shown)}"
    assert shown - {"<to>"} <= keys_of(real), f"{block.where}: keys no export manifest has: {sorted(shown - keys_of(real))}"
    assert (real["format"], real["format_version"]) == ("prep-export", 1)


def check_repo_tree(block: Block, env: DocsEnv) -> None:
    """Every path of the repository layout exists, and every module of prep/ and schemas/ is named."""
    paths = [p for p, _ in tree_names(block)]
    absent = [p for p in paths if not (REPO / p.rstrip("/")).exists()]
    assert not absent, f"{block.where}: paths the repository does not have: {absent}"
    modules = {p.relative_to(REPO).as_posix() for d in ("prep", "schemas") for p in (REPO / d).rglob("*.py")
               if p.name not in ("__init__.py", "__main__.py") or p.parent.name == "export"}
    unnamed = sorted(modules - set(paths))
    assert not unnamed, f"{block.where}: modules the layout does not name: {unnamed}"


# --------------------------------------------------------------------------------------------------
# docs/contract.md's list of the modules that touch disk


DISK = re.compile(
    r"\bopen\(|\.(write_text|write_bytes|read_text|read_bytes|mkdir|unlink|touch|rmdir|iterdir|glob|rglob)\("
    r"|memory_map\(|\bos\.(replace|rename|remove|open|makedirs|scandir|listdir|preadv|pwrite|fsync)\b|\bshutil\."
    r"|\btempfile\.|save_pretrained\(|from_pretrained\(|torch\.(save|load)\(|\b(save|load)_file\(|savefig\("
    r"|\bfsspec\b|hf_hub_download|snapshot_download|\bpq\.(write_table|ParquetWriter|ParquetFile|read_table)"
    r"|\bipc\.(open_|new_)")


def touches_disk(path: Path) -> bool:
    """Whether a module's code (not its docstring examples or comments) opens, writes, maps, lists or deletes files."""
    code = [line for line in path.read_text(encoding="utf-8").splitlines()
            if not line.strip().startswith((">>>", "...", "#"))]
    return any(DISK.search(line) for line in code)


def test_contract_names_exactly_the_modules_that_touch_disk():
    """docs/contract.md lists the modules that touch disk; the code agrees (a grep for file operations)."""
    text = (REPO / "docs" / "contract.md").read_text(encoding="utf-8")
    claim = re.search(r"Only these modules touch disk(.*?)The other modules", text, re.S)
    assert claim, "docs/contract.md: the sentence naming the modules that touch disk is gone"
    named = set()
    for pattern in re.findall(r"`([\w/*]+\.py)`", claim.group(1)):
        named |= {p.relative_to(REPO / "prep").as_posix() for p in (REPO / "prep").glob(pattern)}
    touching = {p.relative_to(REPO / "prep").as_posix() for p in (REPO / "prep").rglob("*.py") if touches_disk(p)}
    assert named == touching, f"named but in memory: {sorted(named - touching)}; touch disk, not named: " \
                              f"{sorted(touching - named)}"
    assert not any(touches_disk(p) for p in (REPO / "schemas").glob("*.py"))
