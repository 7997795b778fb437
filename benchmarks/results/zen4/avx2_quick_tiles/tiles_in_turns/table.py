"""The README's table from the sweeps in turn: python table.py FOLDER (holding before_1 ...)."""

import glob
import json
import sys

RUNS = ("before_1", "after_1", "before_2", "after_2")


def medians(folder: str, run: str) -> dict:
    record = json.load(open(glob.glob(f"{folder}/{run}/*.json")[0]))
    return {
        (r["impl"][:6], r["pass"], r["causal"], r["T"]): r["median_ms"]
        for r in record["records"]
        if "median_ms" in r
    }


def span(xs: list[float]) -> str:
    low, high = f"{min(xs):.2f}", f"{max(xs):.2f}"
    return f"{low}×" if low == high else f"{low}–{high}×"


def main(folder: str) -> None:
    runs = {run: medians(folder, run) for run in RUNS}
    print("| pass, causal, T | before | after | before / after | SDPA / ours before | after |")
    print("|---|---|---|---|---|---|")
    for kind in ("fwd", "fwd+bwd"):
        for causal in (False, True):
            for t in (4096, 8192, 16384):
                ours, sdpa = ("hw2jax", kind, causal, t), ("torch ", kind, causal, t)
                before = [runs[r][ours] for r in ("before_1", "before_2")]
                after = [runs[r][ours] for r in ("after_1", "after_2")]
                ratio_before = [runs[r][sdpa] / runs[r][ours] for r in ("before_1", "before_2")]
                ratio_after = [runs[r][sdpa] / runs[r][ours] for r in ("after_1", "after_2")]
                times = [", ".join(f"{x:,.0f}" for x in xs) for xs in (before, after)]
                mask = "causal" if causal else "non-causal"
                print(
                    f"| {kind}, {mask}, {t:,} | {times[0]} | {times[1]} | "
                    f"{sum(before) / sum(after):.2f}× | "
                    f"{span(ratio_before)} | {span(ratio_after)} |"
                )


if __name__ == "__main__":
    main(sys.argv[1])
