#!/usr/bin/env bash
# A probe beside other work, then two idle runs on the same dispatch cache:
# train_throughput.py --quick from an empty cache (its own copy of the built kernels, the
# same source: no rebuild) beside a load, then twice more with nothing else running.
# LOAD: flicker (default) or steady (one core busy throughout).
# Usage: run.sh CHECKOUT OUT_DIR [LOAD]
set -euo pipefail
checkout=$1 out=$2 load=${3:-flicker}
kernels=$(dirname "$(cd "$checkout" && .venv/bin/python -c 'from hw2jax import kernels; print(kernels.library_target())')")
flicker() {  # one core busy, then idle, for 0.1-1.0 s each, from a fixed seed
  exec python3 "$(dirname "$0")/../../../flicker_load.py"
}
steady() {  # one core busy for as long as it runs
  exec python3 -c 'while True: pass'
}
cache=$(mktemp -d /tmp/probe-cache-XXXX)
cp "$kernels"/cpu_attention-*.so "$cache"/
for run in loaded idle_next idle_third; do
  if [ "$run" = loaded ]; then "$load" & pid=$!; fi
  start=$(date +%s)
  (cd "$checkout" && HW2JAX_KERNEL_CACHE=$cache PYTHONPATH=$checkout .venv/bin/python \
    benchmarks/train_throughput.py --quick --out "$out/$run") > "$out/$run.log" 2>&1
  echo "$run $(( $(date +%s) - start )) s" | tee -a "$out/wall.txt"
  if [ "$run" = loaded ]; then kill "$pid"; fi
  cp "$cache"/dispatch-*.json "$out/$run/dispatch_cache.json"
done
rm -rf "$cache"
