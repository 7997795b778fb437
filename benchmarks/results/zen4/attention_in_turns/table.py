"""The quick table's attention rows from attention_scaling JSONs, one column per run, each ratio
as cpu_quick.py takes it (round by round where the two were timed in turns).

    .venv/bin/python benchmarks/results/zen4/attention_in_turns/table.py NAME=JSON ...
"""

import importlib.util
import json
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "cpu_quick", Path(__file__).parents[3] / "cpu_quick.py"
)
quick = importlib.util.module_from_spec(spec)
spec.loader.exec_module(quick)
runs = {}
for arg in sys.argv[1:]:
    name, path = arg.split("=", 1)
    runs[name] = dict(quick.ratio_rows({"results": []}, json.loads(Path(path).read_text())))
first = next(iter(runs.values()))
print("| row | " + " | ".join(runs) + " |")
print("|---|" + "---|" * len(runs))
for row in first:
    cells = " | ".join(f"{ratios[row]:.2f}×" for ratios in runs.values())
    print(f"| {row.replace(' (auto / torch SDPA)', '')} | {cells} |")
