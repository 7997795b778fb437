r"""MQAR for the variants registered after the first sweep: Mamba-2's SSD, DeltaNet, Gated
DeltaNet, sliding-window softmax (window 64) and Based, on the same data, models and training
as experiments/mqar.py, so that their rows sit beside that sweep's six.

Command:   hw2jax mqar sweep --config experiments/mqar_variants.py --workdir runs/mqar_variants
           (T = 512 only: --set sweep.seq_lens='(512,)')
Expected:  experiments/results/mqar_variants/.
"""

import ml_collections
import mqar


def get_config() -> ml_collections.ConfigDict:
    c = mqar.get_config()  # differs from the first sweep only in its mixers
    c.sweep.mixers = ("ssd", "deltanet", "gated_deltanet", "sliding_window", "based")
    return c
