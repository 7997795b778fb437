"""A load that flickers, to time beside: one core busy for 0.1-1.0 s, then idle for 0.1-1.0 s,
for ever, from a fixed seed (the same pattern each run). Stop it with a signal.
Usage: python3 benchmarks/flicker_load.py"""

import random
import time


def main() -> None:
    rng = random.Random(0)
    while True:
        end = time.monotonic() + rng.uniform(0.1, 1.0)
        while time.monotonic() < end:
            pass
        time.sleep(rng.uniform(0.1, 1.0))


if __name__ == "__main__":
    main()
