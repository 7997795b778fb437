"""The package stands alone: its wheel, installed where neither this checkout, torch nor
tensorflow-datasets can be seen, runs the theory report and a short ViT training."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import make_fashion_folder

REPO = Path(__file__).parents[1]
# Test extras and this checkout's own (editable) install stay out of the fresh venv.
LEFT_OUT = ("torch", "functorch", "torchgen", "tensorflow", "hw2jax", "__editable__")


def run(cmd, cwd, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HW2JAX_DATA_DIR")}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.mark.slow
def test_wheel_runs_from_a_fresh_venv_without_torch_or_tfds(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the checkout
    run(["git", "clone", "-q", "--no-hardlinks", str(REPO), str(source)], cwd=tmp_path)
    for path in ("hw2jax", "pyproject.toml", "README.md", "experiments"):  # uncommitted edits
        run(["cp", "-r", str(REPO / path), str(source)], cwd=tmp_path)
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(source),
        ],
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "dist").glob("hw2jax-*.whl")

    # The runtime dependencies, already installed here, are linked in rather than downloaded
    # again; the test extras are not, so an import of them fails in the venv.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path)
    deps = tmp_path / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(LEFT_OUT) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    python = venv / "bin" / "python"
    site = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=tmp_path,
    ).strip()
    Path(site, "deps.pth").write_text(f"{deps}\n")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            str(wheel),
        ],
        cwd=tmp_path,
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = (
        "import importlib.util, hw2jax; print(hw2jax.__file__); "
        "print(importlib.util.find_spec('torch'), importlib.util.find_spec('tensorflow_datasets'))"
    )
    where, missing = run([str(python), "-c", probe], cwd=elsewhere).splitlines()
    assert where.startswith(site) and missing == "None None"

    hw2jax = str(venv / "bin" / "hw2jax")
    report = json.loads(run([hw2jax, "theory", "--json", "--lengths", "32"], cwd=elsewhere))
    rnn = report["recurrence"]
    assert (
        rnn["h"][-1]
        == rnn["closed_form_h_T"]
        == rnn["sum_even_positions"] - rnn["sum_odd_positions"]
    )
    assert report["self_attention"]["max_relative_copy_error"] < 1e-3
    assert [row["T"] for row in report["attention_timing"]["rows"]] == [32]

    data = make_fashion_folder(tmp_path / "idx")
    run(
        [
            hw2jax,
            "vit",
            "train",
            "--config",
            str(REPO / "experiments" / "vit_fashion_mnist.py"),
            "--workdir",
            "run",
            "--epochs",
            "1",
            "--data-dir",
            str(data),
            "--set",
            "model.depth=1",
            "--set",
            "batch_size=32",
            "--set",
            "progress=False",
        ],
        cwd=elsewhere,
    )
    results = json.loads((elsewhere / "run" / "results.json").read_text())
    assert results["test_count"] == 40 and 0.0 <= results["test_accuracy"] <= 1.0
    assert results["machines"][0]["commit"] is None  # an installed package: no checkout's
    info = json.loads(run([hw2jax, "machine", "--json"], cwd=elsewhere))
    assert info["machine"]["commit"] is None and info["machine"]["cpu_model"]
    history = json.loads((elsewhere / "run" / "history.json").read_text())
    assert history["status"] == "done" and len(history["epochs"]) == 1
