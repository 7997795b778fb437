"""Where and how a torch peer of a benchmark runs (imports torch on first use)."""

from __future__ import annotations


def torch_peer_device() -> str:
    """Where a torch peer of a benchmark runs: on the GPU when jax runs on one and torch sees
    CUDA (a CPU peer would make any GPU ratio meaningless), else on the CPU."""
    import jax
    import torch

    if jax.default_backend() == "gpu" and torch.cuda.is_available():
        # JAX computes float32 matmuls with TF32 on recent NVIDIA GPUs by default; torch does not.
        torch.set_float32_matmul_precision("high")  # TF32 too, so both do the same arithmetic
        return "cuda"
    return "cpu"


def torch_synchronize(device: str) -> None:
    """Waits for torch's queued GPU work; CUDA calls return before their kernels finish."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
