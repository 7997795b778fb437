#!/usr/bin/env bash
# `auto`'s probe one path after another (BEFORE) against in turns (AFTER): train_throughput.py
# --quick from an empty dispatch cache, idle and then beside a flickering load, each checkout
# with its own copy of the built kernels (the same source: no rebuild). LOADS=flicker runs
# the loaded pair alone.
# Usage: run.sh BEFORE_CHECKOUT AFTER_CHECKOUT OUT_DIR
set -euo pipefail
before=$1 after=$2 out=$3
kernels=$(dirname "$(cd "$after" && .venv/bin/python -c 'from hw2jax import kernels; print(kernels.library_target())')")
flicker() {  # one core busy, then idle, for 0.1-1.0 s each, from a fixed seed
  exec python3 "$(dirname "$0")/../../../flicker_load.py"
}
for load in ${LOADS:-idle flicker}; do
  for side in before after; do
    checkout=${!side}
    cache=$(mktemp -d /tmp/probe-cache-XXXX)
    cp "$kernels"/cpu_attention-*.so "$cache"/
    if [ "$load" = flicker ]; then flicker & pid=$!; fi
    start=$(date +%s)
    (cd "$checkout" && HW2JAX_KERNEL_CACHE=$cache PYTHONPATH=$checkout .venv/bin/python \
      benchmarks/train_throughput.py --quick --out "$out/${load}_$side") > "$out/${load}_$side.log" 2>&1
    echo "$load $side $(( $(date +%s) - start )) s" | tee -a "$out/wall.txt"
    if [ "$load" = flicker ]; then kill "$pid"; fi
    rm -rf "$cache"
  done
done
