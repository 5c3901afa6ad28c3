#!/usr/bin/env bash
# The end-to-end demo on the bundled examples: convert → pack → inspect → train → generate, on a CPU.
# Usage: bash examples/demo.sh [OUT_DIR]   (run from the repository root, with prep installed)
set -euo pipefail
out="${1:-demo-out}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
cd "$(dirname "$0")/.."
rm -rf "$out" && mkdir -p "$out"

echo "== 1. convert every bundled format to the unified form (bad records go to the rejects file)"
prep convert examples/*.json examples/*.jsonl examples/*.jsonl.gz examples/*.csv -o "$out/unified.jsonl"

echo "== 2. pack: markers template, embedded demo tokenizer, exact label masks, packed rows of 512 tokens"
prep pack "$out/unified.jsonl" -o "$out/shards" --max-len 512

echo "== 3. look at what the model will learn (trained tokens in green) and check every invariant"
prep inspect "$out/shards" --row 0
prep verify "$out/shards"

echo "== 4. train a tiny random-init Llama on the shards (CPU, ~30 s), then reload it and generate from a training prompt"
prep train "$out/shards" -o "$out/run" --max-steps 300 --batch-size 4 --lr 3e-3
python - "$out/run" <<'PY'
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
final = sys.argv[1]
tok, model = AutoTokenizer.from_pretrained(final), AutoModelForCausalLM.from_pretrained(final)
prompt = "###instruction###\nGive three tips for staying healthy.\n\n###response###\n"
ids = tok(prompt, return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=200, do_sample=False, pad_token_id=tok.pad_token_id,
                     eos_token_id=tok.eos_token_id)
reply = out[0, ids.shape[1]:]
print("generated:", repr(tok.decode(reply, skip_special_tokens=True)))
print("stopped at EOS:", bool(reply[-1] == tok.eos_token_id))
PY
echo "demo done: outputs in $out/"
