"""Pure Flax linen models."""
