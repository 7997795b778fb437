#!/bin/bash
export HW2JAX_KERNEL_MARCH=x86-64-v3 ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 XLA_FLAGS=--xla_cpu_max_isa=AVX2
for i in 1 2; do
  for v in before after; do
    if [ $v = before ]; then dir=BEFORE_CHECKOUT; kc=BEFORE_CACHE; else dir=AFTER_CHECKOUT; kc=AFTER_CACHE; fi
    mkdir -p $kc
    echo "== $v $i $(date +%T)"
    (cd $dir && PYTHONPATH=$dir HW2JAX_KERNEL_CACHE=$kc .venv/bin/python benchmarks/attention_scaling.py --min-log2 12 --max-log2 14 --repeats 5 --impl "softmax (auto)" --impl "torch sdpa" --host-devices 1 --out OUT/${v}_$i 2>&1 | grep -E " ms$|wrote")
  done
done
echo "== end $(date +%T)"
