#!/usr/bin/env bash
# The faithful IMDB experiment end to end on a GPU machine, timed per epoch against the
# assignment's 13 min: the MiniLM encoder run in every step with its dropout on (no feature
# cache), the 2-layer BiGRU head, 2 epochs, all 25,000 test reviews.
#
#   benchmarks/gpu_sentiment.sh PACK OUT_DIR [BUDGET_S] [--set KEY=VALUE ...]
#
# PACK is the folder `hw2jax sentiment pack` writes: encoder/ (the checkpoint, bf16 weights) and
# imdb_tokens.npz (every review as uint16 word pieces). OUT_DIR receives the log, history.json,
# results.json and curves.png. BUDGET_S (default 560) caps the training process; a run cut by it
# resumes from its checkpoint when started again on the same machine.
#
# A device call receives at most 64 MiB with the working tree (~5 MiB). MiniLM's pack is
# 60.75 MiB (encoder/ 44.0 MiB, imdb_tokens.npz 16.75 MiB; 2026-11-30), so it travels in two
# calls made while the machine stays warm:
#   here:    hw2jax sentiment pack --config experiments/bert_gru_imdb.py --encoder minilm \
#              --data-dir ../shared/data/aclImdb_labeled.tar.gz --out runs/gpu_pack
#   call 1:  carry runs/gpu_pack/encoder
#            mkdir -p /tmp/gpu_pack && cp -r runs/gpu_pack/encoder /tmp/gpu_pack/
#   call 2:  carry runs/gpu_pack/imdb_tokens.npz
#            cp runs/gpu_pack/imdb_tokens.npz /tmp/gpu_pack/ &&
#            benchmarks/gpu_sentiment.sh /tmp/gpu_pack "$OUT" 560
set -u
pack=${1:?usage: gpu_sentiment.sh PACK OUT_DIR [BUDGET_S] [--set KEY=VALUE ...]}
out=${2:?usage: gpu_sentiment.sh PACK OUT_DIR [BUDGET_S] [--set KEY=VALUE ...]}
budget=${3:-560}
shift $(($# < 3 ? $# : 3))
py=${PYTHON:-python3}
work=${WORK:-/tmp/hw2jax_gpu_sentiment}  # kept between calls: a second call resumes
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null ||
        echo "no nvidia-smi: not a GPU machine"
    "$py" -c "import jax, flax, transformers; print('jax', jax.__version__, jax.devices(), \
'| flax', flax.__version__, '| transformers', transformers.__version__)"
    # The CPU run of record used bf16 matmul inputs too; microbatches only save CPU memory.
    echo "=== START sentiment (timeout ${budget}s) $(date -Is)"
    start=$(date +%s%N)
    timeout "$budget" "$py" -m hw2jax.cli sentiment train --config experiments/bert_gru_imdb.py \
        --workdir "$work" --encoder "$pack/encoder" --data-dir "$pack/imdb_tokens.npz" \
        --set progress=False --set encoder_dtype=bfloat16 --set encoder_microbatch=0 \
        --set cache_dir="$work/cache" "$@"
    echo "=== END sentiment rc=$? wall_ms=$((($(date +%s%N) - start) / 1000000))"
    for name in config.json history.json results.json curves.png; do
        [[ -f $work/$name ]] && cp "$work/$name" "$out/$name"
    done
} 2>&1 | tee -a "$out/gpu_sentiment.log"
