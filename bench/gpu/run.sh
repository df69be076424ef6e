#!/usr/bin/env bash
# Every GPU measurement in one prepared call (issue 27 point 8, issue 26 point 3), under 7 min:
#   1. bench.gpu.mfu: elmtrain's loop on a ~1B Llama-shaped model in bf16, ddp and fsdp on one GPU
#   2. bench.gpu.serve: `elmtrain serve` tokens/s at 1 and 32 clients
#   3. bench.train: elmtrain's loop against transformers' Trainer (fp32 and bf16, with MFU)
#   4. bench.gpu.mfu --rows compile: the same 1B model, torch.compile'd, if time is left
# Results (JSON) and logs go to $OUT (default /tmp/bench-gpu): env.txt, run.log, mfu.json,
# serve.json, train.json, mfu-compile.json, logs.tar.gz. Run from the repository root:
#   bash bench/gpu/run.sh                      # on the GPU machine (wheels in .whl/ if any)
#   BENCH_GPU_SMOKE=1 PYTHON=.venv/bin/python bash bench/gpu/run.sh   # small sizes, CPU
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/bench-gpu}
PY=${PYTHON:-python3}
BUDGET=${BENCH_GPU_BUDGET:-400}  # seconds for everything; each step gets at most what is left
mkdir -p "$OUT"
LOGS=$(mktemp -d)
start=$SECONDS

# Wheels for Python 3.12 in .whl/ (ignored by git, `carry: [".whl"]`): what the GPU image lacks
# (pydantic, pydantic-core, annotated-types, typing-inspection, typing-extensions, structlog)
# and the project's pins where the image has older ones (transformers 5.23.0, tokenizers
# 0.23.3: 5.17 has no activation_checkpointing_disable). Fetched by docs/benchmarks.md's recipe.
if [ -d .whl ] && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/trainer_image:$PWD/core:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

smoke=()
quick=()
if [ -n "${BENCH_GPU_SMOKE:-}" ]; then smoke=(--smoke); quick=(--quick); fi

main() {
{
  date -u
  nvidia-smi 2>&1 || echo "no nvidia-smi"
  "$PY" -c 'import sys, torch, transformers; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__); print(torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step() {  # step NAME LIMIT command...: run it within LIMIT and the budget left
  local name=$1 limit=$2 left
  shift 2
  left=$((BUDGET - (SECONDS - start)))
  if [ "$left" -lt "$limit" ]; then limit=$left; fi
  if [ "$limit" -lt 30 ]; then
    echo "=== $name: skipped, ${left}s of the budget left"
    return
  fi
  echo "=== $name: start at $((SECONDS - start))s, limit ${limit}s"
  timeout --kill-after=10 "$limit" "$@"
  echo "=== $name: exit $? at $((SECONDS - start))s"
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
}

step mfu 200 "$PY" -m bench.gpu.mfu "${smoke[@]}" --rows ddp,fsdp --timeout 110 \
  --out "$OUT/mfu.json" --log "$LOGS/mfu.log"
step serve 120 "$PY" -m bench.gpu.serve "${smoke[@]}" --out "$LOGS/serve.json"
cp "$LOGS/serve.json" "$OUT/serve.json" 2>/dev/null
step train 150 "$PY" -m bench.train "${quick[@]}" --out "$OUT/train.json" --plot "$LOGS/train.png"
# The row's own limit inside the step's, so that a slow compilation still leaves its JSON.
row_limit=$((BUDGET - (SECONDS - start) - 15))
step compile 180 "$PY" -m bench.gpu.mfu "${smoke[@]}" --rows compile --timeout "$row_limit" \
  --out "$OUT/mfu-compile.json" --log "$LOGS/mfu-compile.log"
echo "=== done at $((SECONDS - start))s"
ls -la "$OUT"
}

main 2>&1 | tee "$OUT/run.log"
