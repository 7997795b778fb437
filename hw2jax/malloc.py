"""glibc malloc settings that keep XLA:CPU's freed buffers in the process: a command restarts
itself, once, with them.

Why: XLA:CPU allocates the temporary buffers of each run of a compiled program afresh (a ViT
training step on 128 images: one 259 MB block per device) and frees them after. glibc serves
blocks that large with a new mmap and returns them with munmap, so every step writes to hundreds
of MB of new pages, each one faulted in and zeroed by the kernel: 126,000 page faults a ViT step
on 2 host devices. With malloc told to keep one arena (``arena_max=1``: the other threads' arenas
cannot grow past 64 MB and fall back to mmap), never to mmap (``mmap_max=0``) and never to hand
freed memory back (``trim_threshold``), the next step reuses the same pages: on a 2-core Xeon
the ViT step went from 750 to 1,000 images/s on 2 host devices, and the bf16 fine-tuning step
from 6 to 11 reviews/s (benchmarks/results/amx_xeon/malloc/). The cost: the process keeps the
memory of its largest step until it ends, as a step needs it again anyway.

glibc reads its tunables once, when the process starts, so nothing can switch this on from
inside a running Python: the command-line entry points call :func:`restart_with_settings`
first, which execs the same command again with :data:`TUNABLES` added to ``GLIBC_TUNABLES``. It
does nothing outside Linux and glibc, where ``GLIBC_TUNABLES`` already sets malloc's
``mmap_max``, and where ``$HW2JAX_MALLOC=0``. In your own Python, start it with
``GLIBC_TUNABLES`` set to :data:`TUNABLES`.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

ENV = "HW2JAX_MALLOC"  # "0": keep the process as it was started
# A trim threshold of 2 GiB was not enough: the bf16 fine-tuning step frees more than that at
# the top of the heap each step, and 4.3 reviews/s against 11 was the result.
TUNABLES = ":".join(
    [
        "glibc.malloc.arena_max=1",
        "glibc.malloc.mmap_max=0",
        f"glibc.malloc.trim_threshold={1 << 40}",
        f"glibc.malloc.top_pad={64 << 20}",
    ]
)
# Transparent huge pages for the heap, where the kernel grants them on request (its "madvise"
# mode), are not among the defaults: on a 2-core Xeon with AMX they made the ViT step 3-7 %
# faster and the fine-tuning step 2-5 % slower (benchmarks/results/amx_xeon/huge_pages/). Add
# HUGE_PAGES to GLIBC_TUNABLES to have them; the restart keeps what GLIBC_TUNABLES says.
HUGE_PAGES = "glibc.malloc.hugetlb=1"
_DECIDES = "glibc.malloc.mmap_max"  # set by whoever started us: their choice stands


def should_restart(
    environ: Mapping[str, str], libc: str | None = None, system: str | None = None
) -> bool:
    """Whether a restart with :data:`TUNABLES` applies: not opted out, malloc's ``mmap_max`` not
    already set by whoever started us, and glibc on Linux (``libc`` and ``system`` default to
    this machine's ``platform.libc_ver()[0]`` and ``platform.system()``, read only when the
    environment leaves the question open, as it does not in the restarted process)."""
    if environ.get(ENV, "1") == "0" or _DECIDES in environ.get("GLIBC_TUNABLES", ""):
        return False
    libc = platform.libc_ver()[0] if libc is None else libc
    system = platform.system() if system is None else system
    return system == "Linux" and libc == "glibc"


def restart_with_settings() -> None:
    """Execs this command again, same arguments, with :data:`TUNABLES` added to
    ``GLIBC_TUNABLES``, where :func:`should_restart` says so; returns otherwise. Call it first
    thing in a command's entry point: what the process did before is done again."""
    if not should_restart(os.environ):
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), TUNABLES]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)


def state() -> dict[str, object]:
    """Whether this process runs with :data:`TUNABLES`, for benchmark and run metadata."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    return {"keeps_freed_memory": TUNABLES in tunables, "huge_pages": HUGE_PAGES in tunables}
