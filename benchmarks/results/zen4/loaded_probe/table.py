"""The dispatch cache after each run of run.sh, against the classes settled idle in
../probe_in_turns/ (both idle runs' fastest path the same, no near tie): per run, the probe's
seconds, the classes in the cache, those whose last timing ran beside other work (to be timed
again), those whose last timing read no load (too short a window), and the settled classes
whose cached fastest path is another, past the tie margin.
Usage: table.py DIR (run.sh's OUT_DIR)."""

import json
import sys
from pathlib import Path

from hw2jax.attention import dispatch
from hw2jax.machine_info import near_tie

RUNS = ("loaded", "idle_next", "idle_third")
IDLE = ("idle_before", "idle_after")  # ../probe_in_turns/, both idle from an empty cache


def throughput(folder: Path) -> dict:
    return json.loads(next(folder.glob("train_throughput_*.json")).read_text())


def fastest(ms: dict) -> str:
    return min(ms, key=ms.get)


def settled_idle(reference: Path) -> dict[str, str]:
    runs = [throughput(reference / name)["meta"]["auto_timed"]["classes"] for name in IDLE]
    settled = {}
    for key in set(runs[0]) & set(runs[1]):
        a, b = runs[0][key]["ms"], runs[1][key]["ms"]
        if fastest(a) == fastest(b) and not (near_tie(a) or near_tie(b)):
            settled[key] = fastest(a)
    return settled


def main(out: Path) -> None:
    settled = settled_idle(Path(__file__).parent.parent / "probe_in_turns")
    print(f"{len(settled)} classes settled idle in ../probe_in_turns/\n")
    print(
        "| run | probe s | classes cached | last timed beside load | load not read "
        "| settled, another path past the tie |"
    )
    print("|---|---|---|---|---|---|")
    details = []
    for name in RUNS:
        if not (out / name).exists():
            continue
        probe = sum(r.get("probe_s", 0) for r in throughput(out / name)["results"])
        cache = json.loads((out / name / "dispatch_cache.json").read_text())["classes"]
        loaded = {k: c for k, c in cache.items() if dispatch.timed_beside_load(c)}
        off = [
            k
            for k, path in settled.items()
            if k in cache
            and not dispatch.within_tie(cache[k]["ms"][path], min(cache[k]["ms"].values()))
        ]
        shares = [c["others_busy_share"] for c in loaded.values()]
        span = f" ({min(shares):.2f}–{max(shares):.2f} of the cores)" if shares else ""
        unread = sum(c.get("others_busy_share") is None for c in cache.values())
        print(
            f"| {name} | {probe:.1f} | {len(cache)} | {len(loaded)}{span} | {unread} | {len(off)} |"
        )
        details += [f"- {name}: {k}: {cache[k]['ms']} (idle: {settled[k]})" for k in off]
    if details:
        print("\nSettled classes on another path:\n" + "\n".join(details))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
