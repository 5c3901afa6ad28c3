"""Loading untrusted shards or tokenizers never executes code: no pickle anywhere on the read path, no remote
tokenizer code without `--trust-remote-code`, and trainer checkpoints read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest

from prep.errors import ConfigError
from prep.load import PackedDataset, iter_rows, load_shards
from prep.pipeline import pack_shards
from prep.tokenizer import default_tokenizer, load_tokenizer
from prep.verify import verify_shards
from schemas.pack_config import PackConfig

REPO = Path(__file__).resolve().parents[1]
EVIL_MODULE = "import pathlib\npathlib.Path({sentinel!r}).write_text('code ran')\n\nclass EvilTokenizer:\n    pass\n"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A small real shard folder (embedded tokenizer, a few Alpaca-style records)."""
    work = tmp_path_factory.mktemp("untrusted")
    source = work / "in.jsonl"
    source.write_text("".join(json.dumps({"instruction": f"Q{i}?", "output": f"A{i}."}) + "\n" for i in range(20)))
    pack_shards(PackConfig(inputs=[str(source)], output=str(work / "shards"), max_len=64))
    return work / "shards"


def _forbid(*_args, **_kwargs):
    """Stand-in for every unpickling entry point: reaching it fails the test."""
    raise AssertionError("pickle/torch.load called while reading shards")


@pytest.fixture
def no_pickle(monkeypatch):
    """Make pickle.load/loads, pickle.Unpickler and torch.load raise for the duration of a test."""
    import torch

    for name in ("load", "loads", "_load", "_loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, _forbid)
    monkeypatch.setattr(torch, "load", _forbid)


def test_loading_and_verifying_shards_never_unpickles(shards: Path, no_pickle):
    """load_shards, PackedDataset, iter_rows and verify_shards read a real folder with pickle disabled."""
    loaded = load_shards(shards)
    rows = list(iter_rows(loaded))
    assert len(rows) == loaded.num_rows > 0
    dataset = PackedDataset(loaded)
    assert len(dataset) == loaded.num_rows and len(dataset[0]["input_ids"]) > 0
    assert verify_shards(shards).ok


def _capture_from_pretrained(monkeypatch) -> list[dict]:
    """Replace AutoTokenizer.from_pretrained by a recorder returning the embedded tokenizer; return its call log."""
    from transformers import AutoTokenizer

    calls: list[dict] = []

    def fake(name, *args, **kwargs):
        calls.append({"name": name, **kwargs})
        return default_tokenizer()

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", fake)
    return calls


def test_load_tokenizer_refuses_remote_code_unless_asked(monkeypatch):
    """load_tokenizer passes trust_remote_code=False by default, True only when asked."""
    calls = _capture_from_pretrained(monkeypatch)
    load_tokenizer("some/hub-id")
    load_tokenizer("some/hub-id", trust_remote_code=True)
    assert [c["trust_remote_code"] for c in calls] == [False, True]


def test_pack_and_cli_default_to_no_remote_code(monkeypatch, tmp_path: Path):
    """`prep pack` without the flag loads its tokenizer with trust_remote_code=False."""
    calls = _capture_from_pretrained(monkeypatch)
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"instruction": "Q", "output": "A"}) + "\n")
    pack_shards(PackConfig(inputs=[str(source)], output=str(tmp_path / "s"), tokenizer="some/hub-id", max_len=64))
    # the tokenizer, then the check that the copy saved with the shards reloads as the same one: neither runs code
    assert [(c["name"] == "some/hub-id", c["trust_remote_code"]) for c in calls] == [(True, False), (False, False)]
    from typer.testing import CliRunner

    from prep.cli import app

    calls.clear()
    result = CliRunner().invoke(app, ["pack", str(source), "-o", str(tmp_path / "s2"), "--tokenizer", "x/y"])
    assert result.exit_code == 0, result.output
    assert [c["trust_remote_code"] for c in calls] == [False, False]


def _plant_evil_tokenizer(folder: Path, sentinel: Path, keep_class: bool) -> None:
    """Add an `auto_map` to tokenizer/tokenizer_config.json pointing at a module that writes `sentinel` on import."""
    tok_dir = folder / "tokenizer"
    (tok_dir / "tokenization_evil.py").write_text(EVIL_MODULE.format(sentinel=str(sentinel)))
    config_file = tok_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
    if not keep_class:
        config["tokenizer_class"] = "EvilTokenizer"
    config_file.write_text(json.dumps(config))


@pytest.mark.parametrize("keep_class", [False, True], ids=["remote-class-only", "local-class-too"])
def test_malicious_tokenizer_in_shard_folder_does_not_run(shards: Path, tmp_path: Path, keep_class: bool):
    """A shard folder whose tokenizer_config.json has an `auto_map` to planted code: verify and load_tokenizer
    never import it (refused with a ConfigError, or the built-in class is used)."""
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    sentinel = tmp_path / "PWNED"
    _plant_evil_tokenizer(folder, sentinel, keep_class)
    report = verify_shards(folder)
    if keep_class:
        tok = load_tokenizer(str(folder / "tokenizer"))
        assert type(tok).__module__.startswith("transformers.") and len(tok) == len(default_tokenizer())
    else:
        assert [p.check for p in report.problems] == ["tokenizer"]
        with pytest.raises(ConfigError, match="--trust-remote-code"):
            load_tokenizer(str(folder / "tokenizer"))
    assert not sentinel.exists()


def _calls(module: Path, attribute: str) -> list[ast.Call]:
    """Every call `x.attribute(...)` in a module's source."""
    tree = ast.parse(module.read_text(encoding="utf-8"))
    return [n for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == attribute]


def _keyword(call: ast.Call, name: str):
    """The constant value of a keyword argument, or a marker string when absent or not a constant."""
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expression>"
    return "<absent>"


def test_every_torch_load_is_weights_only():
    """Checkpoints (prep/train.py) and anything else in prep/ use torch.load(weights_only=True), never pickle."""
    found = {}
    for module in sorted((REPO / "prep").glob("*.py")):
        for call in _calls(module, "load"):
            if isinstance(call.func.value, ast.Name) and call.func.value.id == "torch":
                found[f"{module.name}:{call.lineno}"] = _keyword(call, "weights_only")
        source = module.read_text(encoding="utf-8")
        assert "import pickle" not in source and "pickle.load" not in source, module.name
    assert found and set(found.values()) == {True}, found


def test_torch_checkpoint_with_code_is_refused(tmp_path: Path):
    """What weights_only=True buys: a checkpoint whose pickle would run code is refused, and the code never runs."""
    import torch

    sentinel = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (Path.write_text, (sentinel, "code ran"))

    path = tmp_path / "state.pt"
    torch.save({"step": 1, "evil": Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, map_location="cpu", weights_only=True)
    assert not sentinel.exists()


def test_library_tokenizer_loads_pass_trust_remote_code_explicitly():
    """Every from_pretrained call in the read/pack path names trust_remote_code (never transformers' default,
    which prompts on a terminal for a folder with an auto_map)."""
    calls = {f"{m.name}:{c.lineno}": _keyword(c, "trust_remote_code")
             for m in (REPO / "prep" / "tokenizer.py", REPO / "prep" / "verify.py", REPO / "prep" / "load.py")
             for c in _calls(m, "from_pretrained")}
    assert calls and "<absent>" not in calls.values() and True not in calls.values(), calls


def test_trainer_tokenizer_and_model_loads_refuse_remote_code():
    """prep/train.py passes the TrainConfig flag (default False, `--trust-remote-code` to change) to every
    from_pretrained call, so a shard folder with an auto_map never prompts or runs code by default."""
    from prep.train import TrainConfig

    values = [_keyword(c, "trust_remote_code") for c in _calls(REPO / "prep" / "train.py", "from_pretrained")]
    assert values and all(v == "<expression>" for v in values), values
    assert "trust_remote_code=config.trust_remote_code" in (REPO / "prep" / "train.py").read_text()
    assert TrainConfig().trust_remote_code is False
