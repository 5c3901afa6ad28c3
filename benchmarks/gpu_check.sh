#!/usr/bin/env bash
# The GPU checks of `prep train` in one bounded run (at most 8 minutes on an H100/H200) that writes one JSON file.
#
# A GPU machine has torch, transformers, pyarrow, rich and pytest but no pydantic, no datasets and no ../shared,
# so its inputs are made first, on a machine with the dev install, from the repo root (.device/ is git-ignored):
#     python benchmarks/gpu_prepare.py        # -> .device/gpu-inputs.tar.gz (about 8 MiB)
# then on the GPU machine, from the repo root, with .device carried along:
#     bash benchmarks/gpu_check.sh            # -> $OUT (or /tmp/gpu-check): gpu_check.json, gpu_check.log
# Budget (benchmarks/gpu_check.py's header has it per step): unpacking ~2 s, 450 s of steps, each step in its own
# process with its own timeout; a step that fails or hangs is killed and recorded, the others still run, and
# gpu_check.json is rewritten after every step. The whole script is stopped at 480 s whatever happens.
# Exit code: 0 when every step that ran passed, 1 otherwise (or when the inputs are missing). Arguments are passed
# on to gpu_check.py: `bash benchmarks/gpu_check.sh --cpu-smoke` runs the same steps, tiny, on a CPU.
set -u -o pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-check}
inputs=${TMPDIR:-/tmp}/prep-gpu-inputs
archive=${PREP_GPU_INPUTS:-.device/gpu-inputs.tar.gz}  # another archive: PREP_GPU_INPUTS=path (the CPU test)
mkdir -p "$out"
if [ ! -f "$archive" ]; then
    echo "error: $archive not found: run \`python benchmarks/gpu_prepare.py\` on a machine with ../shared, and carry .device" >&2
    exit 1
fi
rm -rf "$inputs" && mkdir -p "$inputs" && tar -xzf "$archive" -C "$inputs" || { echo "error: cannot unpack $archive" >&2; exit 1; }
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PREP_SHARED_DATA=$inputs/data
timeout -k 10 480 python3 benchmarks/gpu_check.py --inputs "$inputs" --out "$out" --budget-s 450 "$@"
status=$?
[ $status -eq 124 ] && echo "error: gpu_check.py ran past 480 s and was stopped; $out/gpu_check.json holds the steps that finished" >&2
exit $status
