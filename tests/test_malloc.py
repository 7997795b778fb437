"""malloc settings for XLA's buffers: when a command restarts itself with them, that it restarts
once with its arguments intact, and that they stop the page faults of a program whose large
temporary buffer is allocated and freed on every call."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import fresh_process_env

from hw2jax import malloc


@pytest.mark.parametrize(
    ("environ", "libc", "system", "restarts"),
    [
        ({}, "glibc", "Linux", True),
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "glibc", "Linux", True),
        ({"HW2JAX_MALLOC": "1"}, "glibc", "Linux", True),
        ({"HW2JAX_MALLOC": "0"}, "glibc", "Linux", False),
        ({"GLIBC_TUNABLES": "glibc.malloc.mmap_max=65536"}, "glibc", "Linux", False),
        ({"GLIBC_TUNABLES": malloc.TUNABLES}, "glibc", "Linux", False),
        ({}, "", "Linux", False),  # musl and others: platform.libc_ver() names no glibc
        ({}, "glibc", "Darwin", False),
    ],
)
def test_restarts_only_where_the_settings_apply(environ, libc, system, restarts):
    assert malloc.should_restart(environ, libc, system) == restarts


_SHOW = """
import os, sys
from hw2jax import malloc
malloc.restart_with_settings()
print(repr(sys.argv[1:]), os.environ.get("GLIBC_TUNABLES", ""), sep="|")
"""


@pytest.mark.parametrize(("given", "opt_out"), [("hugetlb=1", False), ("", False), ("", True)])
def test_a_command_restarts_once_with_its_arguments(given, opt_out):
    env = fresh_process_env()
    env.pop("GLIBC_TUNABLES", None)
    if given:  # kept, ours added after it
        env["GLIBC_TUNABLES"] = f"glibc.malloc.{given}"
    if opt_out:
        env[malloc.ENV] = "0"
    run = subprocess.run(
        [sys.executable, "-c", _SHOW, "two words", "--flag"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    argv, tunables = run.stdout.strip().split("|")
    assert argv == repr(["two words", "--flag"])
    if not malloc.should_restart(env):
        assert tunables == env.get("GLIBC_TUNABLES", "")
    else:
        assert tunables == ":".join(filter(None, [env.get("GLIBC_TUNABLES"), malloc.TUNABLES]))


_FAULTS = """
import resource, jax, jax.numpy as jnp
x = jnp.ones((2048, 8192), jnp.float32)  # 64 MiB, and as large a temporary: the scan's result
f = jax.jit(lambda x: jnp.cumsum(x, 0).sum())
faults = []
for _ in range(16):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[8:]))  # the heap takes a few calls to settle (up to six seen here)
"""


@pytest.mark.skipif(
    not malloc.should_restart({k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}),
    reason="the settings are glibc's, on Linux",
)
def test_the_settings_stop_the_page_faults_of_xlas_buffers():
    """By default every call of a program with a 64 MiB temporary buffer faults its pages in
    anew (16,384 pages of 4 KiB, and more): the fewest of eight calls is as many. With the
    settings, once the heap has settled, a call reuses the pages of the one before."""

    def faults(tunables: str | None) -> float:
        env = fresh_process_env()
        env.pop("GLIBC_TUNABLES", None)
        env.pop("XLA_FLAGS")  # at the tests' -O0 the scans take six times as long
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        run = subprocess.run(
            [sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr[-2000:]
        return float(run.stdout.split()[-1])

    default, kept = faults(None), faults(malloc.TUNABLES)
    assert default > 16_384, default
    assert kept < default / 20, (kept, default)
