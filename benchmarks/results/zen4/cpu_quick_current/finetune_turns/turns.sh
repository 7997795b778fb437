#!/bin/bash
# The fine-tuning rows of d8c2e16 (OLD) and of the current checkout (NEW), in turns:
# old, new, old, new. Each checkout imports its own package (PYTHONPATH) and keeps its own kernel
# cache, so each runs its own kernels and its own probe's choices.
#   turns.sh OLD_CHECKOUT OLD_CACHE NEW_CHECKOUT NEW_CACHE OUT_DIR
set -eu
old=$1 old_cache=$2 new=$3 new_cache=$4 out=$5
for i in 1 2; do
  for v in old new; do
    if [ $v = old ]; then dir=$old kc=$old_cache; else dir=$new kc=$new_cache; fi
    echo "== $v $i $(date +%T)"
    (cd "$dir" && PYTHONPATH=$dir HW2JAX_KERNEL_CACHE=$kc .venv/bin/python \
      benchmarks/train_throughput.py --only finetune --repeats 5 --out "$out/${v}_$i" 2>&1 |
      grep -E "x   \(")
  done
done
