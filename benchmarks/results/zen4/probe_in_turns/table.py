"""The probe's classes in each run of run.sh. A class is settled where both idle runs' fastest
path is the same and neither calls it a near tie (dispatch.within_tie); for each run, the
settled classes whose fastest path differs there, and of those the ones where the idle path
is past the tie margin of that run's fastest (the run's times overturn the idle path whatever
the feature rule's path); the probe's seconds and each row's ratio.
Usage: table.py DIR (run.sh's OUT_DIR)."""

import json
import sys
from pathlib import Path

from hw2jax.attention.dispatch import within_tie
from hw2jax.machine_info import near_tie

RUNS = ("idle_before", "idle_after", "flicker_before", "flicker_after")


def load(folder: Path) -> dict:
    return json.loads(next(folder.glob("train_throughput_*.json")).read_text())


def fastest(ms: dict) -> tuple[str, bool]:
    """The fastest path, and whether it is a near tie (`hw2jax machine`'s mark)."""
    return min(ms, key=ms.get), near_tie(ms)


def main(out: Path) -> None:
    runs = {name: load(out / name) for name in RUNS if (out / name).exists()}
    classes = {name: r["meta"]["auto_timed"]["classes"] for name, r in runs.items()}
    keys = sorted(set().union(*classes.values()))
    # The idle runs' fastest path where both agree and neither calls it a near tie.
    settled = {}
    for key in keys:
        idle = [fastest(classes[n][key]["ms"]) for n in RUNS[:2] if key in classes.get(n, {})]
        if len(idle) == 2 and idle[0][0] == idle[1][0] and not (idle[0][1] or idle[1][1]):
            settled[key] = idle[0][0]
    print(f"{len(keys)} classes; {len(settled)} settled idle (both idle runs, no near tie)\n")
    print("| run | classes | probe s | settled, another path fastest | of those, past the tie |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        found = classes[name]
        off = [
            k for k, path in settled.items() if k in found and fastest(found[k]["ms"])[0] != path
        ]
        past = [
            k
            for k in off
            if not within_tie(found[k]["ms"][settled[k]], min(found[k]["ms"].values()))
        ]
        probe = sum(r.get("probe_s", 0) for r in run["results"])
        print(f"| {name} | {len(found)} | {probe:.1f} | {len(off)} | {len(past)} |")
        for k in off:
            idle = "; ".join(f"{n} {classes[n][k]['ms']}" for n in RUNS[:2])
            mark = " **past the tie**" if k in past else ""
            print(f"|  | {k}: {found[k]['ms']}{mark} ({idle}) | | | |")
    print("\n| row | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    whats = [r["what"] for r in next(iter(runs.values()))["results"]]
    for what in whats:
        cells = []
        for run in runs.values():
            row = next((r for r in run["results"] if r["what"] == what), None)
            cells.append(f"{row['ratio']:.2f}×" if row else "")
        print(f"| {what} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
