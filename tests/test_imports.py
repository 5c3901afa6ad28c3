"""prep.load, prep.train and prep.models work with only torch, transformers, pyarrow, numpy and rich:
imported (and a 2-step training run done) in a subprocess where pydantic and datasets (and fsspec and the store
packages) cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from _shards import REPO, build_shards

BLOCKED = textwrap.dedent(
    """
    import json, sys
    sys.modules["pydantic"] = None  # any `import pydantic` now raises ImportError
    sys.modules["datasets"] = None
    for store in ("fsspec", "s3fs", "gcsfs", "adlfs"):  # needed only once a URL is used (prep.remote)
        sys.modules[store] = None
    import prep
    import prep.load, prep.models, prep.train
    from prep.train import TrainConfig, train_model
    assert prep.train_model is train_model and prep.load_shards is prep.load.load_shards
    config = TrainConfig(shards=sys.argv[1], out_dir=sys.argv[2], max_steps=2, batch_size=2, progress=False)
    metrics = train_model(config)
    banned = {"pydantic", "datasets", "schemas", "typer"}
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in banned and sys.modules[m] is not None)
    print(json.dumps({"step": metrics["step"], "loaded": loaded}))
    """
)


def test_load_and_train_need_neither_pydantic_nor_datasets(tmp_path):
    shards = build_shards(tmp_path / "shards", n_examples=12, max_len=512, num_shards=1, tokenizer_name="bytes")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED, str(shards), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"step": 2, "loaded": []}
