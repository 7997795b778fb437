"""benchmarks/noamx.cc: a command run under it, and what that command starts, cannot have AMX."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# arch_prctl(code, arg) through libc's syscall(): -1 and errno on failure, else the result.
ARCH_PRCTL = (
    "import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
    "r = libc.syscall(158, int(sys.argv[1], 0), int(sys.argv[2])); "
    "print(r, ctypes.get_errno() if r < 0 else 0)"
)
REQ_XCOMP_PERM, XTILEDATA = "0x1023", "18"  # asm/prctl.h; the AMX tile data's feature number
EPERM = 1


@pytest.fixture(scope="module")
def noamx(tmp_path_factory) -> Path:
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None or not sys.platform.startswith("linux"):
        pytest.skip("needs Linux and a C++ compiler")
    binary = tmp_path_factory.mktemp("noamx") / "noamx"
    subprocess.run([compiler, "-O2", "-o", binary, ROOT / "benchmarks" / "noamx.cc"], check=True)
    probe = subprocess.run([binary, "true"], capture_output=True, text=True)
    if probe.returncode != 0 and "seccomp filter" in probe.stderr:  # e.g. a container forbids it
        pytest.skip(f"this system refuses seccomp filters: {probe.stderr.strip()}")
    return binary


def arch_prctl(code: str, arg: str, prefix: tuple = ()) -> tuple[int, int]:
    done = subprocess.run(
        [*prefix, sys.executable, "-c", ARCH_PRCTL, code, arg],
        capture_output=True,
        text=True,
        check=True,
    )
    result, errno = done.stdout.split()
    return int(result), int(errno)


def test_the_request_for_amx_fails_with_eperm_in_the_command_and_its_children(noamx):
    # Without it the answer is the kernel's: granted (0) on a CPU with AMX, else EINVAL.
    if arch_prctl(REQ_XCOMP_PERM, XTILEDATA)[1] == EPERM:
        pytest.skip("AMX is refused to this process already (a seccomp filter above it)")
    assert arch_prctl(REQ_XCOMP_PERM, XTILEDATA, (noamx,)) == (-1, EPERM)
    child = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {ARCH_PRCTL!r}, "
    child += f"'{REQ_XCOMP_PERM}', '{XTILEDATA}'])"
    done = subprocess.run([noamx, sys.executable, "-c", child], capture_output=True, text=True)
    assert done.stdout.split() == ["-1", str(EPERM)]


def test_other_arch_prctl_calls_pass(noamx):
    # ARCH_GET_XCOMP_SUPP (0x1021) with a bad pointer: the kernel's own EFAULT, not the filter's.
    assert arch_prctl("0x1021", "0", (noamx,)) == arch_prctl("0x1021", "0")


def test_the_bf16_products_leave_the_tiles_under_it(noamx):
    from hw2jax import cpu

    features = cpu.machine()["cpu_features"]
    if not (features.get("amx_bf16") and features.get("avx512_bf16")):
        pytest.skip("needs a CPU with AMX-BF16 and AVX512-BF16")
    engine = "from hw2jax.kernels import matmul; print(matmul.bf16_products_engine())"
    here = subprocess.run([sys.executable, "-c", engine], capture_output=True, text=True)
    if here.stdout.strip() != "AMX tiles":
        pytest.skip(f"the products run on {here.stdout.strip()!r} here already")
    refused = subprocess.run([noamx, sys.executable, "-c", engine], capture_output=True, text=True)
    assert refused.stdout.strip() == "AVX512-BF16 pair dots"


def test_without_a_command_it_says_how_to_use_it(noamx):
    done = subprocess.run([noamx], capture_output=True, text=True)
    assert done.returncode == 2 and "usage: noamx COMMAND" in done.stderr
    done = subprocess.run([noamx, "no-such-command-here"], capture_output=True, text=True)
    assert done.returncode == 127 and "could not run no-such-command-here" in done.stderr
