"""The shared training loop, checkpoints and plots."""
