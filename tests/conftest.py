import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

# One XLA compilation cache for the whole run (xdist workers and the fresh processes some tests
# start included): the many small trainings compile the same programs again and again. A new,
# empty cache per run, so nothing compiled by an earlier run is trusted.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
XLA_CACHE = Path(tempfile.gettempdir()) / f"hw2jax-test-xla-cache-{_RUN}"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(XLA_CACHE))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# jax writes an entry in place, unlocked, and a worker once read another's half-written entry:
# a warning, then a compile again. A size limit would lock each read and write, but then each
# write scans the whole cache (thousands of entries): the suite ran at half speed.
# The tests compile hundreds of small programs and run each a few times, so they compile for
# speed of compiling: LLVM's optimisations off (-O0 takes a third less time) and XLA:CPU's
# older elemental emitters in place of its MLIR fusion emitters (compiling takes less than
# half as long again: tests/test_attention.py 91 s -> 60 s on a 2-core Zen 4). The same
# programs and checks; runs and benchmarks compile with XLA's defaults. Fresh processes keep
# the flags (fresh_process_env), so that their runs are bitwise those of this process.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
# auto by the feature rule: no test's path may depend on how fast this machine ran a probe.
# tests/test_dispatch.py sets "measure" where it fakes or checks the timing.
os.environ["HW2JAX_AUTO"] = "rule"

from hw2jax.data import write_idx  # noqa: E402 (after the cache settings: jax reads them once)
from hw2jax.train import hooks  # noqa: E402

_erf = np.vectorize(math.erf, otypes=[np.float64])


def gelu64(z):
    """The exact (erf) GELU in float64."""
    z = np.asarray(z, np.float64)
    return 0.5 * z * (1.0 + _erf(z / math.sqrt(2.0)))


def gelu_slope64(z):
    """The exact GELU's derivative in float64."""
    z = np.asarray(z, np.float64)
    return 0.5 * (1.0 + _erf(z / math.sqrt(2.0))) + z * np.exp(-0.5 * z * z) / math.sqrt(
        2 * math.pi
    )


def fresh_process_env(host_devices: int | None = None) -> dict[str, str]:
    """The environment for a fresh Python process of a test: this one's, with the test compile
    flag as the only XLA flag, or with XLA's forced count of ``host_devices`` CPU devices."""
    flags = TEST_XLA_FLAGS
    if host_devices is not None:
        flags = f"--xla_force_host_platform_device_count={host_devices} {flags}"
    return {**os.environ, "XLA_FLAGS": flags}


def run_on_host_devices(script: str, devices: int = 2) -> str:
    """The standard output of ``python -c script`` in a fresh process that sees ``devices`` host
    CPU devices; the calling test fails with the script's stderr if it does."""
    run = subprocess.run(
        [sys.executable, "-c", script],
        env=fresh_process_env(host_devices=devices),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller, after every worker
        shutil.rmtree(XLA_CACHE, ignore_errors=True)


class SignalAfter(hooks.Hook):
    """Sends this process a real SIGINT when step ``step`` ends: the run saves and stops after
    the next step, as it does when Ctrl-C comes during that step."""

    def __init__(self, step):
        self.step = step

    def after_step(self, run):
        if run.step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture(autouse=True)
def probes_read_no_load(monkeypatch):
    """auto's probe reads no load from other processes here: the other xdist worker's would mark
    a class timed (faked or not) to be timed again by a fresh process, and a test's count of
    timings would hang on it. tests/test_dispatch.py's ``load`` fixture sets a share; the
    reading itself is tested apart (tests/test_machine_info.py)."""
    import contextlib

    from hw2jax import cpu

    @contextlib.contextmanager
    def unread():
        yield {"share": None}

    monkeypatch.setattr(cpu, "others_busy", unread)


@pytest.fixture
def sigint_handled():
    # A known handler first: a shell's background job starts with SIGINT ignored.
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, outer)


def untimed(records: list[dict]) -> list[dict]:
    """History records without their times and rates, which differ between two runs of the
    same work (a resumed run against one that was never cut)."""
    return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in records]


def make_fashion_folder(folder, n_train=96, n_test=40, gz=True, seed=0):
    """Writes a tiny FashionMNIST-format folder whose classes are learnable: each class
    lights up its own horizontal band of the image."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 + 2 * label : 4 + 2 * label, 4:24] = 250
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
    return folder


@pytest.fixture
def fashion_dir(tmp_path):
    return make_fashion_folder(tmp_path / "fashion")


@pytest.fixture(scope="session")
def small_vit_run(tmp_path_factory):
    """small_config's 3-epoch run on make_fashion_folder's data, trained once per test process:
    the run that resumed, sharded and multi-process runs of the same config must reproduce."""
    import types

    from test_train_vit import small_config

    from hw2jax.tasks import vit

    root = tmp_path_factory.mktemp("small_vit_run")
    data = make_fashion_folder(root / "fashion")
    config = small_config(data)
    history = vit.train_and_evaluate(config, root / "run")
    return types.SimpleNamespace(data=data, config=config, workdir=root / "run", history=history)


def assert_same_metrics(epochs: list[dict], reference: list[dict]) -> None:
    """A run's epochs have the metrics of the reference run's 3 epochs, up to float rounding
    (another split of each batch sums in another order)."""
    assert len(epochs) == len(reference) == 3
    for a, b in zip(epochs, reference, strict=True):
        assert a["test_accuracy"] == pytest.approx(b["test_accuracy"], abs=1e-6)
        assert a["test_loss"] == pytest.approx(b["test_loss"], rel=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def assert_names_its_machine(record: dict) -> None:
    """A benchmark's meta or a run's machine names the CPU this test runs on (read here from
    /proc/cpuinfo), its cores, vector features and the versions, and the date."""
    import datetime
    import platform

    import jax

    from hw2jax import malloc

    with open("/proc/cpuinfo") as f:
        lines = dict(line.split(":", 1) for line in f if ":" in line)
    fields = {k.strip(): v.strip() for k, v in lines.items()}
    assert record["cpu_model"] == fields.get("model name", platform.processor())
    assert record["cpu_family_model"] == f"{fields.get('cpu family')}/{fields.get('model')}"
    assert record["cpu_count"] == os.cpu_count()
    assert record["usable_cores"] == len(os.sched_getaffinity(0))
    assert record["cpu_features"]["avx2"] == ("avx2" in fields.get("flags", "").split())
    assert record["jax"] == jax.__version__ and record["jaxlib"]
    # The day the record was written: today, or yesterday for a run that crossed midnight.
    written = datetime.date.fromisoformat(record["date"])
    assert 0 <= (datetime.date.today() - written).days <= 1, record["date"]
    assert record["malloc"] == malloc.state()
    # The code's commit where the package runs from a checkout of its own, by other git commands
    # than the record's.
    root = Path(malloc.__file__).parents[1]
    if (root / ".git").exists() and shutil.which("git"):
        git = ["git", "-C", str(root)]
        head = subprocess.run([*git, "log", "-1", "--format=%h"], capture_output=True, text=True)
        clean = subprocess.run([*git, "diff", "--quiet", "HEAD"]).returncode == 0
        assert record["commit"] == head.stdout.strip() + ("" if clean else "+changes")
