"""Data parallel on 8 CPU devices equals 1 device (a subprocess, since the device count is
fixed when jax starts)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_same_metrics, fresh_process_env

from hw2jax import cli
from hw2jax.train.sharding import DataParallel

SCRIPT = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, TESTS)
from conftest import make_fashion_folder
from test_train_vit import small_config
from pathlib import Path
from hw2jax.tasks import vit
from hw2jax.train import steps
from hw2jax.train.sharding import DataParallel

assert jax.device_count() == 8
folder = make_fashion_folder(Path(TMP) / "fashion")
config = small_config(folder)
train, test = vit.load_data(config)
task = vit.ViTTask(config, train, test)
params = task.init_params(jax.random.key(0))
tx = steps.build_optimizer(config, 3)
batch = task.train_batches(0)[0]
step = steps.make_train_step(task, jax.random.key(1))
fresh = lambda: steps.TrainState.create(jax.tree.map(np.array, params), tx)  # steps donate
one, _ = step(fresh(), batch)
dp = DataParallel(8, 40)
eight, _ = step(dp.replicate(fresh()), dp.shard_batch(batch))
sharded_over = len(dp.shard_batch(batch)["image"].sharding.device_set)
step_diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)))
eight = vit.train_and_evaluate(small_config(folder, "devices=8"), Path(TMP) / "run8")["epochs"]
print(json.dumps({"step_diff": step_diff, "sharded_over": sharded_over, "eight": eight,
                  "learning_rate": config.learning_rate}))
"""


@pytest.mark.slow
def test_eight_devices_match_one(tmp_path, small_vit_run):
    env = fresh_process_env(host_devices=8)
    tests = str(Path(__file__).parent)
    code = f"TESTS = {tests!r}; TMP = {str(tmp_path)!r}\n" + SCRIPT
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tests
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["sharded_over"] == 8
    # Adam's first step moves each weight by about the rate times the sign of its gradient, so
    # a gradient summed in another order may move a weight whose gradient is near zero by a
    # sliver of the rate; a shard's gradient lost or counted twice flips signs: whole rates.
    assert result["step_diff"] < 0.01 * result["learning_rate"]
    assert_same_metrics(result["eight"], small_vit_run.history["epochs"])


def test_auto_host_devices_take_the_most_cores_every_batch_splits_over(capsys):
    from hw2jax.cli import build_parser
    from hw2jax.train.sharding import auto_host_devices

    assert auto_host_devices(2, (256, 1000)) == 2
    assert auto_host_devices(6, (256, 1000)) == 4  # not 5 or 6: 256 would not split
    assert auto_host_devices(12, (256, 1000)) == 8
    assert auto_host_devices(16, (40, 16)) == 8
    assert auto_host_devices(3, (7,)) == 1 and auto_host_devices(0, (8,)) == 1
    base = ["vit", "train", "--config", "c.py", "--workdir", "w", "--host-devices"]
    assert build_parser().parse_args([*base, "auto"]).host_devices == "auto"
    assert build_parser().parse_args([*base, "3"]).host_devices == 3
    assert build_parser().parse_args([*base, "1"]).host_devices == 1
    for bad in ("0", "two"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([*base, bad])
        assert "expected 'auto' or a positive count" in capsys.readouterr().err


def test_auto_host_devices_resolve_by_backend_and_refuse_several_processes(monkeypatch):
    import jax
    import ml_collections

    from hw2jax import cli

    config = ml_collections.ConfigDict({"batch_size": 4, "eval_batch_size": 2})
    assert cli.auto_devices(config) == ("2" if jax.device_count() >= 2 else "1")
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="--host-devices auto is for one process"):
        cli.auto_devices(config)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert cli.auto_devices(config) is None  # a GPU run keeps its own devices


def test_a_batch_that_does_not_split_is_refused_before_any_data_is_read(
    monkeypatch, tmp_path, capsys
):
    """3 devices and batches of 256 and 1000: one line naming both batch sizes and a size that
    splits, before the data folder (missing here) is read or the work dir made."""
    import jax

    monkeypatch.setattr(jax, "device_count", lambda: 3)
    config = Path(__file__).parents[1] / "experiments" / "vit_fashion_mnist.py"
    args = ["vit", "train", "--config", str(config), "--workdir", str(tmp_path / "run")]
    args += ["--devices", "3", "--set", f"data_dir={tmp_path / 'no_data'}"]
    assert cli.main(args) == 2
    assert capsys.readouterr().err.strip() == (
        "hw2jax: error: batch size 256 does not split evenly over 3 devices; set batch_size and "
        "eval_batch_size to multiples of 3 (e.g. --set batch_size=255), or a device count that "
        "divides them (--host-devices auto picks one on CPU)."
    )
    assert not (tmp_path / "run").exists()
    # The Python API: the config's check, before the data, and the loop's.
    from hw2jax.config import load_config
    from hw2jax.tasks import vit

    settings = load_config(config)
    settings.update(devices="3", data_dir=str(tmp_path / "no_data"))
    with pytest.raises(ValueError, match=r"invalid config:\n  - batch size 256 does not split"):
        vit.train_and_evaluate(settings, tmp_path / "api")
    assert not (tmp_path / "api").exists()
    with pytest.raises(ValueError, match="batch size 1000 does not split evenly over 3"):
        DataParallel(3, 999, 1000)


@pytest.mark.slow
def test_cli_host_devices_split_the_cpu_for_data_parallel(small_vit_run, tmp_path):
    """--host-devices auto (and 2, where auto resolves to another count) in a fresh process (no
    forced device count) shows jax the CPU as several devices and shards over them
    (DataParallel(2) refuses to run on 1), with the metrics of a 1-device run. auto: one device
    per core, as many as batches of 40 and 16 split over; on 2 cores that is the run of
    --host-devices 2."""
    from test_reliability import cli_args

    from hw2jax.cpu import usable_cores
    from hw2jax.train.sharding import auto_host_devices

    auto = str(auto_host_devices(usable_cores(), (40, 16)))
    for host_devices in ("auto", "2") if auto != "2" else ("auto",):
        args = cli_args(small_vit_run.data, tmp_path / host_devices, "epochs=3")
        args += ["--host-devices", host_devices]
        env = fresh_process_env()
        code = f"from hw2jax import cli; raise SystemExit(cli.main({args!r}))"
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-3000:]
        expected = "2" if host_devices == "2" else auto
        assert (
            json.loads((tmp_path / host_devices / "config.json").read_text())["devices"] == expected
        )
        split = json.loads((tmp_path / host_devices / "history.json").read_text())["epochs"]
        assert_same_metrics(split, small_vit_run.history["epochs"])


def test_device_count_errors_are_clear():
    import jax

    from hw2jax.train.sharding import split_host_cpu

    jax.devices()  # jax has started: the CPU can no longer be split
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count=3"):
        split_host_cpu(3)
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count=64"):
        DataParallel(64)
    with pytest.raises(ValueError, match="'all' or a number"):
        DataParallel("many")
    assert DataParallel("all").n >= 1


MULTI_PROCESS = r"""
import json, os, sys
from pathlib import Path
import jax
sys.path.insert(0, TESTS)
from conftest import make_fashion_folder
from test_reliability import cli_args
from hw2jax import cli
from hw2jax.tasks import vit
from hw2jax.train.sharding import DataParallel
import numpy as np

run = Path(TMP) / "run"
writes = []  # files this process opens for writing in the work dir, besides checkpoints
def audit(event, args):
    if event == "open" and str(args[0]).startswith(str(run)) and "checkpoints" not in str(args[0]):
        mode, flags = args[1], args[2]
        if (mode and any(c in mode for c in "wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR):
            writes.append(os.path.relpath(args[0], run))
sys.addaudithook(audit)
train = vit.train_and_evaluate
result = {}
def keep(*a, **k):
    result.update(train(*a, **k))
    return result
vit.train_and_evaluate = keep
folder = make_fashion_folder(Path(TMP) / f"fashion{PID}")
args = cli_args(folder, run, "epochs=3") + ["--host-devices", "2"]  # --devices all is implied
args += ["--coordinator", f"localhost:{PORT}", "--num-processes", "2", "--process-id", str(PID)]
assert cli.main(args) == 0
assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
batch = DataParallel("all", 40).shard_batch({"x": np.zeros((40, 3), np.float32)})["x"]
print(json.dumps({"epochs": result["epochs"], "spans": len(batch.sharding.device_set),
                  "local_rows": sum(s.data.shape[0] for s in batch.addressable_shards),
                  "writes": sorted(set(writes))}))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, small_vit_run):
    """`hw2jax vit train --coordinator ... --num-processes 2 --process-id I --host-devices 2`
    (2 CPU processes x 2 devices, --devices all implied) trains like one process on one
    device: the same metrics; only process 0 writes the history, config, logs and plots."""
    tests = str(Path(__file__).parent)
    env = fresh_process_env()  # --host-devices splits

    def launch(pid, port):
        code = f"TESTS = {tests!r}; TMP = {str(tmp_path)!r}; PORT = {port}; PID = {pid}\n"
        code += MULTI_PROCESS
        return subprocess.Popen(
            [sys.executable, "-c", code],
            env=env,
            cwd=tests,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    port = _free_port()
    procs = [launch(pid, port) for pid in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    # A global batch of 40 spans all 4 devices; each of the 2 processes holds only its 20 rows.
    assert [(r["spans"], r["local_rows"]) for r in results] == [(4, 20), (4, 20)]
    first, second = (r["epochs"] for r in results)
    metrics = ("test_accuracy", "test_loss", "train_loss")
    for a, other in zip(first, second, strict=True):
        assert [a[k] for k in metrics] == [other[k] for k in metrics]  # the same global values
    assert_same_metrics(first, small_vit_run.history["epochs"])
    writes = [r["writes"] for r in results]
    assert writes[1] == [] and {"config.json.tmp", "history.json.tmp"} <= set(writes[0])
    assert (tmp_path / "run" / "history.json").exists()
    assert (tmp_path / "run" / "checkpoints" / "best").exists()


def test_devices_other_than_all_with_several_processes_is_one_line(tmp_path, capsys):
    from test_reliability import cli_args

    # Any one of the flags that start several processes is enough to refuse.
    for flags in (
        ["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "0"],
        ["--num-processes", "2"],
        ["--coordinator", "localhost:1"],
        ["--distributed"],
    ):
        args = [*cli_args(tmp_path, tmp_path / "run", "epochs=1"), "--devices", "2", *flags]
        assert cli.main(args) == 2, flags  # before any process connects or waits
        assert capsys.readouterr().err.strip() == (
            "hw2jax: error: --devices 2 with several processes: each batch is split over the "
            "devices of every process (a count leaves some process without rows); leave "
            "--devices out or pass --devices all."
        )
    # One process: a device count is its own to give (the run goes on, here to find no data).
    args = [*cli_args(tmp_path, tmp_path / "run", "epochs=1"), "--data-source", "idx"]
    assert cli.main([*args, "--devices", "1"]) == 2
    assert capsys.readouterr().err.startswith("hw2jax: error: FashionMNIST not found")


@pytest.mark.slow
def test_cli_sentiment_host_devices_match_one_device(tmp_path):
    """The sentiment experiment sharded over 2 host devices in a fresh process trains like one
    device; with BERT's dropout off, the fused CPU attention kernel runs per device in every step
    and evaluation (tests/test_kernels.py checks that it stays sharded)."""
    from test_sentiment_train import CONFIG, tiny_config, tiny_settings

    from hw2jax.tasks import sentiment

    overrides = ("use_mask=True", "bert_dropout=False", "epochs=3")
    args = [
        "sentiment",
        "train",
        "--config",
        str(CONFIG),
        "--workdir",
        str(tmp_path / "two"),
        "--host-devices",
        "2",
    ]
    for item in tiny_settings(tmp_path, *overrides):
        args += ["--set", item]
    env = fresh_process_env()
    code = f"from hw2jax import cli; raise SystemExit(cli.main({args!r}))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["devices"] == "2"
    two = json.loads((tmp_path / "two" / "history.json").read_text())["epochs"]
    one = sentiment.train_and_evaluate(tiny_config(tmp_path, *overrides), tmp_path / "one")
    one = one["epochs"]
    assert len(one) == len(two) == 3
    for a, b in zip(one, two, strict=True):
        assert a["valid_accuracy"] == pytest.approx(b["valid_accuracy"], abs=1e-6)
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


@pytest.mark.slow
def test_a_process_whose_peer_died_ends_at_once_with_one_line(fashion_dir, tmp_path):
    """kill -9 of process 1 mid-run: process 0's next collective fails; it ends within seconds
    (not after the runtime's 100 s heartbeat timeout and an abort), exit 2, one line, and the
    history says why."""
    import time

    from test_reliability import cli_args

    port = _free_port()
    env = fresh_process_env()
    base = cli_args(fashion_dir, tmp_path / "run", "epochs=500")
    base += ["--coordinator", f"localhost:{port}", "--num-processes", "2"]
    procs = []
    for pid in (0, 1):
        args = [*base, "--process-id", str(pid)]
        code = f"from hw2jax import cli; raise SystemExit(cli.main({args!r}))"
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        history = tmp_path / "run" / "history.json"
        deadline = time.monotonic() + 240
        while not (history.exists() and json.loads(history.read_text())["epochs"]):
            assert procs[0].poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        procs[1].kill()
        killed = time.monotonic()
        _, err = procs[0].communicate(timeout=90)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode == 2, err[-3000:]
    assert waited < 30 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("hw2jax: error:")]
    assert len(lines) == 1 and "process 0 of 2 lost contact with another process" in lines[0]
    assert json.loads(history.read_text())["status"].startswith("failed: PeerLost: process 0")


def test_only_a_lost_peer_of_a_run_of_several_processes_is_called_one(monkeypatch):
    import jax

    from hw2jax.train import sharding

    gone = RuntimeError("all-reduce failed\n  Gloo: Connection reset by peer [10.0.0.2]\nmore")
    assert sharding.peer_lost(gone, 7) is None  # one process: no peer to lose
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    assert sharding.peer_lost(RuntimeError("shapes (3,) and (4,) differ"), 7) is None
    lost = sharding.peer_lost(gone, 7)
    assert isinstance(lost, sharding.PeerLost)
    assert "of 2 lost contact with another process at step 7" in str(lost)
    assert "(Gloo: Connection reset by peer [10.0.0.2])" in str(lost)


_UNEVEN_DEVICES = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from hw2jax.train import sharding
sharding.PATIENT_COLLECTIVES.update(dict.fromkeys(sharding.PATIENT_COLLECTIVES, 1))
sharding.split_host_cpu(2)

def body(n, x):  # device 1 multiplies n times before the sum; device 0 waits for it there
    def step(c):
        return c[0] + 1, jnp.tanh(c[1] @ c[1])
    _, y = jax.lax.while_loop(lambda c: c[0] < n[0], step, (0, x[0]))
    return jax.lax.psum(y.sum(), "d")[None]

mesh = Mesh(np.array(jax.devices()), ("d",))
f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("d"), P("d")), out_specs=P("d")))
print(f(jnp.array([0, 50_000]), jnp.ones((2, 256, 256)) * 0.01))
"""


def test_host_devices_wait_at_collectives_as_long_as_set():
    """XLA:CPU ends the process when one host device waits too long for another at a
    collective; split_host_cpu sets how long. Set to 1 s each (warning, then ending) here, an
    uneven program ends at that wait instead of after its 50,000 products: the setting reaches
    XLA. (The default is an hour: a starved low-priority run must not die.)"""
    env = {k: v for k, v in fresh_process_env().items() if k != "XLA_FLAGS"}
    run = subprocess.run(
        [sys.executable, "-c", _UNEVEN_DEVICES],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode != 0 and "Termination timeout for `all reduce" in run.stderr, run.stderr


def test_the_users_own_collective_timeouts_are_kept(monkeypatch):
    from hw2jax.train import sharding

    name = "xla_cpu_collective_call_terminate_timeout_seconds"
    monkeypatch.setenv("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=false --{name}=5")
    sharding.add_collective_timeouts()
    flags = os.environ["XLA_FLAGS"].split()
    assert f"--{name}=5" in flags and not any(f.startswith(f"--{name}=3600") for f in flags)
    assert "--xla_cpu_collective_call_warn_stuck_timeout_seconds=600" in flags
    assert flags[0] == "--xla_cpu_multi_thread_eigen=false"
