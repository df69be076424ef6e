#!/usr/bin/env bash
# Pretrained load -> bf16 fsdp training -> DCP checkpoint, kill, resume -> streamed export read
# back by transformers, on one GPU with NCCL (issue 27 points 2-4), under 3 minutes. One JSON
# line on stdout (also $OUT/load_check.json); exit non-zero on any failed check. From the
# repository root:
#   bash bench/gpu/load_check.sh                                   # the GPU machine (.whl/ wheels)
#   LOAD_CHECK_DEVICE=cpu PYTHON=.venv/bin/python bash bench/gpu/load_check.sh   # gloo, small
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/bench-gpu}
PY=${PYTHON:-python3}
DEVICE=${LOAD_CHECK_DEVICE:-cuda}
mkdir -p "$OUT"

# As bench/gpu/run.sh: the wheels in .whl/ (carry: [".whl"]) for what the GPU image lacks.
if [ -d .whl ] && "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/trainer_image:$PWD/core:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

timeout --kill-after=10 170 "$PY" -m bench.gpu.load_check --device "$DEVICE" \
  --out "$OUT/load_check.json" 2>"$OUT/load_check.log"
code=$?
[ "$code" -eq 0 ] || tail -n 40 "$OUT/load_check.log" >&2
exit "$code"
