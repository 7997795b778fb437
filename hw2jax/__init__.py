"""hw2jax: a deep-learning course assignment rebuilt as a tested JAX/Flax research tool."""

__version__ = "0.1.0"
