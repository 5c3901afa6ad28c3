#!/usr/bin/env bash
# The GPU checks of `prep train` in one run (about 5 minutes on an H100), for a session lent a GPU machine.
#
# The GPU machines have torch, transformers, pyarrow, rich and pytest but no pydantic, no datasets and no
# ../shared, so prepare on the CPU machine first, from the repo root (.device/ is git-ignored; nothing there
# is committed):
#   python benchmarks/train.py --save-shards .device/shards --max-len 2048   # prep pack: packed + padded
#   mkdir -p .device/data && cp -r ../shared/data/PROVENANCE.md ../shared/data/alpaca ../shared/data/tokenizers .device/data/
# then on the GPU machine (carry .device):   bash benchmarks/gpu_check.sh
# Results go to $OUT (or /tmp/gpu-check): train-*.json and the logs.
set -u -o pipefail
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PREP_SHARED_DATA=$PWD/.device/data
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
status=0
# Packed attention isolation on the GPU kernels (flex_attention; flash_attention_2 where flash-attn is installed)
# and the flex_attention training path (no CPU backward, so only here).
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_attention_isolation.py \
    "tests/test_train.py::test_checkpointing_compile_and_other_attention_paths_train_like_the_default[flex_attention]" \
    2>&1 | tee "$out/tests.log" || status=1
for attn in auto flex_attention; do
    timeout 400 python3 benchmarks/train.py --shards .device/shards/packed --padded-shards .device/shards/padded \
        --attn "$attn" --json "$out/train-$attn.json" 2>&1 | tee "$out/train-$attn.log" || status=1
done
exit $status
