#!/bin/bash
# The cpu_quick.py attention rows (attention_scaling.py, T = 4,096 to 16,384, softmax auto
# against torch SDPA) with one busy process on one of the two cores from 40 s to 80 s into the
# run: a slow patch of known place. Usage: busy_window.sh CHECKOUT OUT_DIR
set -euo pipefail
checkout=$1 out=$2
cd "$checkout"
PYTHONPATH="$checkout" .venv/bin/python benchmarks/attention_scaling.py --min-log2 12 \
  --max-log2 14 --repeats 3 --impl "softmax (auto)" --impl "torch sdpa" --host-devices 1 \
  --out "$out" > "$out.log" 2>&1 &
run=$!
sleep 40
timeout 40 python3 -c "while True: pass" || true
wait $run
