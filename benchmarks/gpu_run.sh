#!/usr/bin/env bash
# One prepared run on a GPU machine: the figures of benchmarks/README.md's "GPU" sections.
#
#   benchmarks/gpu_run.sh DATA_DIR OUT_DIR [BUDGET_S]
#
# DATA_DIR holds FashionMNIST's four idx files (the data must travel with the code: 30 MB).
# OUT_DIR receives the log and the JSON of every step. BUDGET_S (default 500) caps the whole
# run: each step gets a timeout from what is left, so one slow step cannot eat the others.
# STEPS picks and orders the steps (default: the first four):
#   vit_fp32      the assignment's 15-epoch ViT, float32; wall time from process start
#                 (compilation, evaluation, checkpoints and plots included)
#   throughput    train_throughput.py: ViT step fp32 / bf16 and BERT forward, torch on the same GPU
#   vit_bf16      the same 15-epoch ViT in bfloat16 (does bf16 cost accuracy?)
#   attention     attention_scaling.py, forward and forward + backward, T = 1k..64k, fp32 and
#                 bf16: softmax (auto, cuDNN, Pallas, blockwise), linear (chunked, Pallas), torch;
#                 with FLA_WHEELS=DIR also fla's Triton chunk kernel (DIR holds fla_core-*.whl:
#                 `pip download --no-deps fla-core -d runs/wheels` here, carried with the call)
#   vit_linear    the assignment's recipe with linear attention
#   vit_strong30  experiments/vit_fashion_mnist_strong.py for 30 epochs
#   vit_long60    experiments/vit_fashion_mnist_long.py: 60 epochs with random erasing, valid split
#   vit_ablation  `hw2jax vit ablate` on experiments/vit_fashion_mnist_ablation.py: the long recipe
#                 at 20 epochs and seven variants, each undoing one change, compared on valid;
#                 ablation.md and ablation.json go to OUT_DIR when all eight are done
set -u
data=${1:?usage: gpu_run.sh DATA_DIR OUT_DIR [BUDGET_S]}
out=${2:?usage: gpu_run.sh DATA_DIR OUT_DIR [BUDGET_S]}
deadline=$(($(date +%s) + ${3:-500}))
py=${PYTHON:-python3}
work=${WORK:-/tmp/hw2jax_gpu_run}  # fresh work dirs: a rerun must train, not resume a done run
rm -rf "$work"
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1
# jax and torch share the GPU in the benchmarks: jax must not take 75 % of it up front.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME CAP_S COMMAND...: runs COMMAND under min(CAP_S, time left)
    local name=$1 cap=$2 left
    shift 2
    left=$((deadline - $(date +%s)))
    ((left < cap)) && cap=$left
    if ((cap < 20)); then
        echo "=== SKIP $name: ${left}s left"
        return
    fi
    echo "=== START $name (timeout ${cap}s) $(date -Is)"
    local start rc
    start=$(date +%s%N)
    timeout "$cap" "$@"
    rc=$?
    echo "=== END $name rc=$rc wall_ms=$((($(date +%s%N) - start) / 1000000))"
}

# The assignment's recipe; no progress bar (the log is the output).
vit=("$py" -m hw2jax.cli vit train --data-dir "$data" --set progress=False
    --config experiments/vit_fashion_mnist.py)

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$py" -c "import jax, flax, optax, orbax.checkpoint as oc, torch, transformers; \
print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| optax', \
optax.__version__, '| torch', torch.__version__, torch.cuda.is_available(), \
'| transformers', transformers.__version__)"
    "$py" -m hw2jax.cli machine --json >"$out/machine.json"  # the record runs and JSONs carry
    for name in ${STEPS:-vit_fp32 throughput vit_bf16 attention}; do
        case $name in
        vit_fp32) step "$name" 240 "${vit[@]}" --workdir "$work/$name" ;;
        vit_bf16) step "$name" 150 "${vit[@]}" --workdir "$work/$name" --set model.dtype=bfloat16 ;;
        vit_linear) step "$name" 150 "${vit[@]}" --workdir "$work/$name" --attention linear ;;
        vit_strong30)
            step "$name" 200 "${vit[@]/%vit_fashion_mnist.py/vit_fashion_mnist_strong.py}" \
                --workdir "$work/$name" --epochs 30 ;;
        vit_long60)
            step "$name" 300 "${vit[@]/%vit_fashion_mnist.py/vit_fashion_mnist_long.py}" \
                --workdir "$work/$name" ;;
        vit_ablation)
            step "$name" 600 "$py" -m hw2jax.cli vit ablate --data-dir "$data" \
                --set progress=False --config experiments/vit_fashion_mnist_ablation.py \
                --workdir "$work/$name"
            cp "$work/$name"/ablation.* "$out/" 2>/dev/null ;;
        # shellcheck disable=SC2086  # word splitting wanted
        throughput)
            step "$name" 200 "$py" benchmarks/train_throughput.py ${THROUGHPUT_ARGS:---repeats 20} \
                --out "$out" ;;
        attention)
            step "$name" 240 "$py" benchmarks/attention_scaling.py --min-log2 10 --max-log2 16 \
                --repeats 5 --time-budget-ms 2000 --impl "softmax (" --impl cudnn --impl sdpa \
                --impl linear ${FLA_WHEELS:+--impl fla --fla-wheels "$FLA_WHEELS"} --out "$out" ;;
        *) echo "=== unknown step $name" ;;
        esac
        if [[ -f $work/$name/history.json ]]; then  # the run's record; $OUT holds few files
            cp "$work/$name/history.json" "$out/${name}_history.json"
            cp "$work/$name/curves.png" "$out/${name}_curves.png"
        fi
    done
    echo "=== DONE $(date -Is)"
} 2>&1 | tee "$out/gpu_run.log"
