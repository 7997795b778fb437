"""The bf16 product kernel's work items as they are (up to 128 rows; variant 0) and of 32 rows
(variant 32) against each other in one process: built with ``variants.diff`` applied, the kernel
reads $HW2JAX_ITEM_ROWS at each call. ``../product_stores/stores_ab.py``'s comparison: checks
that both give the same bits, then times products alone (bf16 out) and whole programs: MiniLM's
bf16 forward and the ViT's bf16 training step. Turns alternate the order; each timed call
follows two untimed ones; medians.

    PYTHONPATH=<a copy of the tree with the diff applied> HW2JAX_KERNEL_CACHE=<a folder of its own>
        GLIBC_TUNABLES=<hw2jax.malloc.TUNABLES> .venv/bin/python programs_ab.py 15 0,32
"""

import importlib.util
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "stores_ab", Path(__file__).parents[1] / "product_stores" / "stores_ab.py"
)
stores_ab = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stores_ab)

PRODUCTS = [*stores_ab.PRODUCTS, (256, 384, 384)]

if __name__ == "__main__":
    stores_ab.main(int(sys.argv[1]), sys.argv[2].split(","), "HW2JAX_ITEM_ROWS", PRODUCTS)
