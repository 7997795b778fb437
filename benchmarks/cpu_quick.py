"""A CPU's quick figures in one command: the rows of the README's table of quick figures on each
CPU kind, hw2jax against torch in the same process.

    .venv/bin/python benchmarks/cpu_quick.py --out benchmarks/results/<cpu>/   # ~10 min, 2 cores
    .venv/bin/python benchmarks/cpu_quick.py --out DIR --summary-only     # the table again
    .venv/bin/python benchmarks/cpu_quick.py --out DIR --all      # ~13 min: a new CPU's figures

Runs, one after the other, each in a fresh process: ``train_throughput.py --quick`` (the ViT,
MiniLM, fine-tuning and GRU head steps) and ``attention_scaling.py`` at T = 4,096 to 16,384
(softmax ``auto`` against torch SDPA, forward and forward + backward, one device). Then writes
``quick_figures.md`` in DIR: the CPU, versions and date from the JSONs' meta, and each row's
ratio, round by round (the two sides are timed in turns; the median over rounds of torch's
time over ours). Refuses to start while other work keeps the cores busy: figures taken beside
it read whatever share of the cores was left (``--allow-busy`` takes them anyway, and says so).

``--all`` then runs what else a CPU kind not seen before should record, each into a folder of
DIR named after it: ``kernel_vs_xla.py`` (each fused kernel against XLA's form: what the kernel
build is worth here), ``float32_matmul.py`` (float32 products against torch's, and the measured
FMA peak) and ``precision_probe.py`` (which dtype ``encoder_dtype=auto`` takes here, and the
times that decide it); the table gains their rows. One of these that fails is named in the
table and the command exits non-zero, after the rest is written.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from hw2jax import cpu
from hw2jax.timing import ratio_in_turns, round_ratios

HERE = Path(__file__).parent
ATTENTION_ARGS = (
    "--min-log2",
    "12",
    "--max-log2",
    "14",
    "--repeats",
    "3",
    "--impl",
    "softmax (auto)",
    "--impl",
    "torch sdpa",
    "--host-devices",
    "1",
)
# --all's further runs: (script, the folder of DIR it writes to, the JSON it writes there).
MORE_RUNS = (
    ("kernel_vs_xla.py", "kernel_vs_xla", "kernel_vs_xla.json"),
    ("float32_matmul.py", "float32_matmul", "float32_matmul.json"),
    ("precision_probe.py", "precision_probe", "precision_probe.json"),
)


def cpu_busy_share(seconds: float = 1.0, stat: str = "/proc/stat") -> float:
    """The share of all cores' time spent outside idle over ``seconds`` (:func:`hw2jax.cpu.
    core_ticks`; niced work counts: it still takes the cores a benchmark would use)."""
    busy0, total0 = cpu.core_ticks(stat=stat) or (0, 0)
    time.sleep(seconds)
    busy1, total1 = cpu.core_ticks(stat=stat) or (0, 0)
    return (busy1 - busy0) / max(total1 - total0, 1)


def ratio_rows(throughput: dict, attention: dict) -> list[tuple[str, float]]:
    """(row, hw2jax / torch) for every row of train_throughput's JSON, then for softmax
    ``auto`` against torch SDPA at each T, pass and mask of attention_scaling's."""
    return [(row, ratio) for row, ratio, _ in _rows(throughput, attention)]


def _rows(throughput: dict, attention: dict) -> list[tuple[str, float, list[float] | None]]:
    rows = [
        (r["what"], float(r["ratio"]), _rounds(r.get("torch_s"), r.get("ours_s")))
        for r in throughput["results"]
    ]
    points = {
        (r["impl"], r["T"], r["pass"], r["causal"]): r
        for r in attention["records"]
        if r.get("median_ms") is not None
    }
    for (impl, t, kind, causal), ours in sorted(points.items(), key=lambda kv: kv[0][1:]):
        torch = points.get(("torch sdpa", t, kind, causal))
        if impl == "hw2jax softmax (auto)" and torch is not None:
            mask = "causal" if causal else "non-causal"
            together = ours["impl"] in torch.get("timed_with", ())
            ratio, rounds = _in_turns_or_medians(
                torch["times_ms"] if together else None,
                ours["times_ms"] if together else None,
                torch["median_ms"] / ours["median_ms"],
            )
            rows.append((f"softmax {kind}, {mask}, T = {t:,} (auto / torch SDPA)", ratio, rounds))
    return rows


def _rounds(theirs: list | None, ours: list | None) -> list[float] | None:
    """Each round's ``theirs / ours`` where both kept the times of the same rounds, else None."""
    if not theirs or not ours or len(theirs) != len(ours):
        return None
    return round_ratios(theirs, ours)


def _in_turns_or_medians(
    theirs: list | None, ours: list | None, ratio_of_medians: float
) -> tuple[float, list[float] | None]:
    """(the ratio, each round's): round by round where both kept the times of the same rounds
    (:func:`hw2jax.timing.ratio_in_turns`), else the medians' ratio and no rounds."""
    if (rounds := _rounds(theirs, ours)) is None:
        return ratio_of_medians, None
    return ratio_in_turns(theirs, ours), rounds


def bf16_rows(throughput: dict) -> list[tuple[str, float]]:
    """(row, ours in bf16 / ours in float32) for each of train_throughput's rows timed in both
    dtypes: whether bf16 pays on this CPU, as ``encoder_dtype=auto``'s probe asks of one
    encoder layer (docs/sentiment.md)."""
    rates: dict[str, dict[str, float]] = {}
    for r in throughput["results"]:
        if r.get("dtype") in ("float32", "bfloat16") and r.get("ours_per_s"):
            row = re.sub(r",? ?\b(bfloat16|float32)\b", "", r["what"])
            rates.setdefault(row, {})[r["dtype"]] = r["ours_per_s"]
    return [
        (row, rate["bfloat16"] / rate["float32"])
        for row, rate in rates.items()
        if set(rate) == {"float32", "bfloat16"}
    ]


def _failures(failed: list[dict]) -> str:
    """The further runs that failed, as the table and the exit message name them."""
    return ", ".join(f"{failure['script']} (exit {failure['exit']})" for failure in failed)


def more_sections(out: Path, failed: set[str] = frozenset()) -> list[str]:
    """The table's lines for ``--all``'s runs whose JSON is in ``out`` (none for the others,
    nor for the scripts in ``failed``: a JSON there is an earlier run's)."""
    lines: list[str] = []

    def read(script: str) -> list[dict] | None:
        folder, name = next((f, n) for s, f, n in MORE_RUNS if s == script)
        path = out / folder / name
        if script in failed or not path.exists():
            return None
        return json.loads(path.read_text())["results"]

    if (kernels := read("kernel_vs_xla.py")) is not None:
        lines += ["", "| each kernel (`kernel_vs_xla.py`) | XLA's time / the kernel's |"]
        lines += ["|---|---|"]
        for r in kernels:
            ratio, _ = _in_turns_or_medians(
                r.get("xla_s"), r.get("kernel_s"), r["xla_ms"] / r["kernel_ms"]
            )
            lines.append(f"| {r['operation']} | {ratio:.2f}× |")
    if (products := read("float32_matmul.py")) is not None:
        lines += ["", "| float32 product (`float32_matmul.py`), [M, K] x [K, N] | pass "]
        lines[-1] += "| torch's time / XLA's dot's | / XLA's own dot's | / our kernel's |"
        lines += ["|---|---|---|---|---|"]
        for r in products:
            ms, (m, k, n) = r["ms"], r["shape"]
            ratios = [ms["torch"] / ms[path] if path in ms else None for path in PRODUCT_PATHS]
            cells = " | ".join("" if x is None else f"{x:.2f}×" for x in ratios)
            lines.append(f"| {r['layer']}, {m:,} x {k:,} x {n:,} | {r['pass']} | {cells} |")
    if (probes := read("precision_probe.py")) is not None:
        lines += ["", "| `encoder_dtype=auto`'s probe (`precision_probe.py`) | takes | ms "]
        lines[-1] += "float32 / bf16 |"
        lines += ["|---|---|---|"]
        for r in probes:
            ms = r["ms"] or {}
            times = " / ".join(f"{ms[d]:.1f}" if d in ms else "-" for d in PRECISIONS)
            lines.append(f"| {r['kind']} | {r['choice']} | {times} |")
    return lines


PRODUCT_PATHS = ("xla", "xla_own_dot", "kernel")  # float32_matmul.py's names
PRECISIONS = ("float32", "bfloat16")


def summary(throughput: dict, attention: dict, run: dict, more: list[str] = ()) -> str:
    """quick_figures.md: the machine and versions from the JSONs' meta, the commit, wall time
    and load of the run (``run``: cpu_quick.json), and the table."""
    busy = run.get("busy_share_at_start")
    meta = throughput["meta"]
    features = ", ".join(name for name, has in meta["cpu_features"].items() if has) or "none"
    cores = f"{meta['cpu_count']} cores"
    if meta.get("usable_cores", meta["cpu_count"]) != meta["cpu_count"]:
        cores += f" (this run held to {meta['usable_cores']})"
    family_model = meta.get("cpu_family_model")
    named = f" (family/model {family_model})" if family_model else ""
    lines = [
        f"# Quick figures: {meta['cpu_model']}{named}, {cores}",
        "",
        f"Vector features: {features}. jax {meta['jax']}, torch {meta.get('torch')}, "
        f"{meta['date']}; `benchmarks/cpu_quick.py`. hw2jax / torch in the same process.",
    ]
    held_back = ", ".join(f"`{s}`" for s in cpu.instruction_sets_held_back(meta.get("env", {})))
    if held_back:
        lines += [
            "",
            f"Instruction sets held back: {held_back}. The CPU's features above are not what "
            "ran: these figures stand in for a CPU without the features held back.",
        ]
    if "commit" in run:
        lines += ["", f"Commit {run['commit']}; {run['wall_s']:.0f} s for the whole command."]
    if busy is not None:
        lines += ["", f"Taken with {100 * busy:.0f} % of the cores busy with other work at start."]
    if run.get("failed"):
        lines += ["", f"Failed, so not in the table: {_failures(run['failed'])}."]
    if probes := [r["probe_s"] for r in throughput["results"] if "probe_s" in r]:
        lines += [
            "",
            f"`auto`'s probe: {sum(probes):.1f} s of timing over the quick rows, at most "
            f"{max(probes):.1f} s in one (each row has a run's budget; 0 s where the cache held "
            "its classes).",
        ]
    lines += [
        "",
        "| row | hw2jax / torch | rounds: the lowest and highest round |",
        "|---|---|---|",
    ]
    for row, ratio, rounds in _rows(throughput, attention):
        spread = f"{len(rounds)}: {min(rounds):.2f}–{max(rounds):.2f}×" if rounds else ""
        lines.append(f"| {row} | {ratio:.2f}× | {spread} |")
    if pairs := bf16_rows(throughput):
        lines += ["", "| row | ours in bf16 / ours in float32 (speed) |", "|---|---|"]
        lines += [f"| {row} | {ratio:.2f}× |" for row, ratio in pairs]
    return "\n".join([*lines, *more]) + "\n"


def _read(out: Path, pattern: str) -> dict:
    found = sorted(out.glob(pattern))
    if not found:
        raise SystemExit(f"no {pattern} in {out}: run without --summary-only first.")
    return json.loads(found[-1].read_text())


def _run(script: str, script_args: tuple[str, ...]) -> int:
    print(f"== {script} {' '.join(script_args)}", flush=True)
    return subprocess.run([sys.executable, str(HERE / script), *script_args]).returncode


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the folder for the JSONs and the table")
    parser.add_argument("--summary-only", action="store_true", help="rewrite the table only")
    parser.add_argument("--allow-busy", action="store_true", help="time beside other work")
    parser.add_argument("--all", action="store_true", help="also a new CPU's further figures")
    args = parser.parse_args(argv)
    out = Path(args.out)
    failed: list[str] = []
    if not args.summary_only:
        start, busy = time.perf_counter(), cpu_busy_share()
        if busy > cpu.BUSY_SHARE_LIMIT and not args.allow_busy:
            raise SystemExit(
                f"{100 * busy:.0f} % of the cores' time went to other work in the last "
                "second: figures taken now would read that share low. Stop it (a training "
                "run, a test suite) and run this again, or pass --allow-busy to take them "
                "anyway (the table then says so)."
            )
        runs = (
            ("train_throughput.py", ("--quick", "--out", str(out))),
            ("attention_scaling.py", (*ATTENTION_ARGS, "--out", str(out / "attention"))),
        )
        more = [(s, ("--out", str(out / folder))) for s, folder, _ in MORE_RUNS if args.all]
        for script, script_args in runs:
            if (exit_code := _run(script, script_args)) != 0:
                raise SystemExit(f"{script} failed (exit {exit_code}); its output is above.")
        # The quick rows are in: a further run that fails is named in the table, not fatal.
        failed = [{"script": s, "exit": code} for s, a in more if (code := _run(s, a)) != 0]
        record = {
            "busy_share_at_start": busy if busy > cpu.BUSY_SHARE_LIMIT else None,
            "commit": cpu.source_commit() or "unknown",
            "wall_s": time.perf_counter() - start,
            "failed": failed,
        }
        out.mkdir(parents=True, exist_ok=True)
        (out / "cpu_quick.json").write_text(json.dumps(record))
        # Every class auto timed on this CPU (the benchmarks' and earlier runs'), its times and
        # its near ties: `hw2jax machine --json`, after the timed runs.
        from hw2jax import machine_info

        (out / "machine.json").write_text(json.dumps(machine_info.describe(), indent=1))
    run_file = out / "cpu_quick.json"
    run = json.loads(run_file.read_text()) if run_file.exists() else {}
    table = summary(
        _read(out, "train_throughput_*.json"),
        _read(out / "attention", "attention_scaling_*.json"),
        run,
        more_sections(out, {failure["script"] for failure in run.get("failed", [])}),
    )
    path = out / "quick_figures.md"
    path.write_text(table)
    print(table, end="")
    print(f"wrote {path}")
    if failed:
        raise SystemExit(f"{_failures(failed)} failed (output above); the rest is in {path}.")
    return path


if __name__ == "__main__":
    main()
