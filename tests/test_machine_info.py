"""`hw2jax machine`: this machine as runs record it, the kernels' build and auto's timings."""

import json

import pytest

from hw2jax import cli, cpu, kernels, machine_info
from hw2jax.attention import dispatch
from hw2jax.train import report

# The build target the line names: -march=native unless the environment asks for another.
MARCH = kernels.build_march()
# The reading itself, as imported (conftest's fixture stands a no-load one in for the tests).
OTHERS_BUSY = cpu.others_busy


@pytest.fixture
def timed_here(tmp_path, monkeypatch):
    """A dispatch cache holding three timed classes, one with the probe's input shapes (older
    records have none), and one entry of another shape, skipped."""
    cache = tmp_path / "dispatch-key-2-cores.json"
    classes = {
        "layer_norm fwd+bwd rows 2^8 width 64 float32": {"ms": {"fused_cpu": 0.107, "xla": 0.142}},
        "gru fwd+bwd dirs 2 batch 2^4 hidden 256 float32": {"ms": {"fused_cpu": 12.5, "xla": 27}},
        "layer_norm fwd+bwd rows 2^15 width 64 float32": {
            "ms": {"fused_cpu": 1.19, "xla": 2.63},
            "probe_shapes": [[16384, 64], [64], [64]],  # the probe's cut of 2^15 rows
        },
        "not a class record": [1, 2],
    }
    cache.write_text(json.dumps({"machine": {}, "classes": classes}))
    monkeypatch.setattr(dispatch, "cache_file", lambda: cache)
    return cache


def test_it_names_the_machine_the_build_and_the_classes_timed_here(timed_here, monkeypatch, capsys):
    peak = {"cores": 2, "ghz": 2.6, "flops_per_cycle_per_core": 64, "gflops": 332.8}
    monkeypatch.setattr(cpu, "peak_fp32_gflops", lambda: peak)
    built = kernels.build_error() is None  # built by the suite by now, or here, before asking
    assert cli.main(["machine"]) == 0
    lines = capsys.readouterr().out.splitlines()
    record = cpu.machine()
    assert lines[0] == "this machine:"
    assert lines[1].startswith(
        f"- {record['cpu_model']} (family/model {record['cpu_family_model']})"
    )
    assert f"commit {record['commit'] or 'unknown (not a checkout)'}" in lines[1]
    if built:
        assert f"C++ kernels: built for -march={MARCH}, {kernels.library_target()}" in lines
    assert "auto (HW2JAX_AUTO=rule): takes the vector-feature rule, timing nothing" in lines
    assert "float32 peak, estimated: 333 GFLOP/s (2 cores x 2.60 GHz x 64 FLOP a cycle)" in lines
    assert lines[-5:-1] == [
        f"timed classes (3, in {timed_here}; each path's best time on the probe's inputs, a "
        "class's rows and sequences cut to bound the probe's time):",
        "- gru fwd+bwd dirs 2 batch 2^4 hidden 256 float32: fused_cpu 12.5, xla 27 ms",
        "- layer_norm fwd+bwd rows 2^15 width 64 float32: fused_cpu 1.19, xla 2.63 ms on "
        "16384x64, 64, 64",
        # 0.035 ms apart: within the tie margin's 0.25 ms, so the rule's path is taken
        "- layer_norm fwd+bwd rows 2^8 width 64 float32: fused_cpu 0.107, xla 0.142 ms (a near "
        "tie)",
    ]
    assert lines[-1].startswith("A near tie (the fastest two within the tie margin")
    # As dispatch.choose decides them: the rule's path on the tie, the fastest otherwise.
    tie, apart = {"fused_cpu": 0.107, "xla": 0.142}, {"fused_cpu": 12.5, "xla": 27.0}
    assert dispatch.choose(tie, list(tie), "xla") == "xla"
    assert dispatch.choose(apart, list(apart), "xla") == "fused_cpu"
    # Three paths: the fastest two decide, wherever the third lies.
    assert machine_info.near_tie({"xla": 5.0, "fused_cpu": 0.107, "blockwise": 0.142})
    assert not machine_info.near_tie({"xla": 0.12, "fused_cpu": 12.5, "blockwise": 27.0})
    assert cli.main(["machine", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["machine"]["cpu_features"] == record["cpu_features"]
    if built:  # an engine named exactly where no reason says why there is none
        kernel = info["kernels"]
        assert (kernel["bf16_products"] is None) == (kernel["bf16_products_reason"] is not None)
    assert info["auto"]["classes"]["layer_norm fwd+bwd rows 2^8 width 64 float32"] == {
        "fused_cpu": 0.107,
        "xla": 0.142,
    }


def test_kernels_not_built_are_not_built_by_asking(tmp_path, timed_here, monkeypatch, capsys):
    """Without --build, a library not built yet is named, not built (a minute's work)."""
    monkeypatch.setattr(kernels, "library_target", lambda: tmp_path / "cpu_attention-new.so")

    def no_build():
        raise AssertionError("built without --build")

    monkeypatch.setattr(kernels, "build_error", no_build)
    assert cli.main(["machine"]) == 0
    out = capsys.readouterr().out
    assert machine_info.describe()["kernels"]["state"] == "not built"  # as cpu_quick.py asks
    assert (
        f"C++ kernels: not built yet for -march={MARCH}; the first run that needs them builds "
        f"them (tens of seconds), or `hw2jax machine --build` ({tmp_path / 'cpu_attention-new.so'})"
    ) in out.splitlines()
    # With --build: built (the build says so itself, tests/test_kernels.py).
    built = []
    monkeypatch.setattr(kernels, "build_error", lambda: built.append(1))
    assert cli.main(["machine", "--build", "--json"]) == 0
    captured = capsys.readouterr()
    kernel = json.loads(captured.out)["kernels"]
    assert built and kernel["state"] == "built"
    assert kernel["library"] == str(tmp_path / "cpu_attention-new.so")
    timed_here.write_text(json.dumps({"machine": {}, "classes": {}}))  # nothing timed yet
    assert cli.main(["machine"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"timed classes: none yet (runs keep them in {timed_here})"


def test_without_a_compiler_it_says_why_and_that_nothing_is_timed(monkeypatch, capsys):
    def no_compiler():
        raise kernels.KernelUnavailable("no C++ compiler found (install g++ or set $CXX)")

    monkeypatch.setattr(kernels, "library_target", no_compiler)
    monkeypatch.setattr(dispatch, "cache_file", lambda: None)
    monkeypatch.setenv("HW2JAX_AUTO", "sometimes")
    unknown = {"cores": 2, "ghz": None, "flops_per_cycle_per_core": None, "gflops": None}
    monkeypatch.setattr(cpu, "peak_fp32_gflops", lambda: unknown)
    assert cli.main(["machine"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("float32 peak") for line in lines)
    assert lines[-3:] == [
        "C++ kernels: unavailable, XLA's paths only: no C++ compiler found (install g++ or set "
        "$CXX)",
        "auto (HW2JAX_AUTO=sometimes): not a mode; set it to 'measure' (the default) or 'rule'",
        "timed classes: none can be kept here (no kernel build to keep them beside)",
    ]


def test_on_a_gpu_it_says_auto_times_nothing_there():
    from hw2jax import machine_info

    info = machine_info.describe()
    gpu = {**info, "backend": "gpu", "auto": {**info["auto"], "cache": None, "classes": {}}}
    assert machine_info.text(gpu).splitlines()[-1] == (
        "timed classes: none (auto times paths on a CPU; here gpu)"
    )


def test_the_record_reads_the_cpu_from_cpuinfo_or_else_the_platform(tmp_path):
    """The model name whole (a colon in it included), family/model and vendor; where the file
    has no model name (or is missing), the platform's processor or machine name."""
    import platform

    info = tmp_path / "cpuinfo"
    info.write_text(
        "vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 143\n"
        "model name\t: Intel(R) Xeon(R) Platinum: 8481C @ 2.70GHz\nflags\t\t: avx2\n"
    )
    record = cpu.machine(str(info))
    assert record["cpu_model"] == "Intel(R) Xeon(R) Platinum: 8481C @ 2.70GHz"
    assert (record["cpu_vendor"], record["cpu_family_model"]) == ("GenuineIntel", "6/143")
    assert record["cpu_features"]["avx2"] and not record["cpu_features"]["avx512f"]
    missing = cpu.machine(str(tmp_path / "missing"))
    assert missing["cpu_model"] == (platform.processor() or platform.machine())
    assert missing["cpu_model"] and missing["cpu_family_model"] is None
    assert "family/model" not in report.machine_line(missing)  # not "None/None"
    assert "(family/model 6/143)" in report.machine_line(record)


def test_others_busy_reads_other_processes_share_of_this_process_cores(tmp_path, monkeypatch):
    """From /proc/stat's lines for the cores this process may use (not the machine's line, not
    other cores), busy ticks less this process's own CPU time, over all their ticks; a block
    too short is read from an earlier reading at most LOOKBACK_S before, none where there is
    none; a long enough block from its own start, over LOOKBACK_S or not; a block with another
    inside it from its own start; nothing from an unreadable file."""
    import os

    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice: guest time is in user
    # already, so it is not counted twice.
    cores = {
        "cpu0": [100, 0, 50, 800, 50, 0, 0, 0, 7, 0],
        "cpu1": [100, 0, 50, 850, 0, 0, 0, 0, 0, 0],
        "cpu2": [0] * 10,  # not this process's
    }

    def write():
        lines = [f"cpu {' '.join(['999'] * 10)}"]
        lines += [f"{name} {' '.join(map(str, v))}" for name, v in cores.items()]
        stat.write_text("\n".join([*lines, "intr 12345 0 0"]) + "\n")

    def run(user, idle):  # on each of cores 0 and 1; core 2 busy throughout
        for name in ("cpu0", "cpu1"):
            cores[name][0] += user
            cores[name][3] += idle
        cores["cpu2"][0] += user + idle
        write()

    own = [1.0, 0.5, 0.0, 0.0]  # user, system, and both of children that have ended
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "times", lambda: os.times_result((*own, 0)))
    monkeypatch.setattr(os, "sysconf", lambda name: 100)
    write()
    with OTHERS_BUSY(str(stat)) as reading:
        # 300 ticks pass on each core, 175 + 60 of them busy (10 stolen; waiting on I/O is not
        # busy); this process ran 1.2 s of CPU (120 ticks: 0.5 s user, 0.4 s system, and 0.2 s
        # and 0.1 s in a child that has ended, a compiler run), so others took 115 of the 600.
        cores["cpu0"] = [250, 5, 60, 880, 95, 0, 0, 10, 999, 0]
        cores["cpu1"] = [150, 0, 60, 1090, 0, 0, 0, 0, 0, 0]
        run(0, 0)
        own[:] = [1.5, 0.9, 0.2, 0.1]
        assert reading["share"] is None  # read once the block has run
    assert reading["share"] == pytest.approx(115 / 600)
    run(20, 20)  # outside any block
    with OTHERS_BUSY(str(stat)) as reading:
        run(10, 5)  # 30 ticks, under MIN_SHARE_TICKS: read from the block before's end
    assert reading["share"] == pytest.approx((40 + 20) / (80 + 30))
    monkeypatch.setattr(cpu, "LOOKBACK_S", 0.0)
    with OTHERS_BUSY(str(stat)) as reading:
        run(10, 5)
    assert reading["share"] is None
    with OTHERS_BUSY(str(stat)) as reading:
        run(30, 10)  # long enough: read from its own start, however long ago that was
    assert reading["share"] == pytest.approx(60 / 80)
    monkeypatch.setattr(cpu, "LOOKBACK_S", 2.0)
    with OTHERS_BUSY(str(stat)) as outer:
        run(50, 50)
        with OTHERS_BUSY(str(stat)) as inner:
            run(0, 20)  # MIN_SHARE_TICKS exactly: read from its own start
        run(50, 50)
    assert inner["share"] == 0.0 and outer["share"] == pytest.approx(200 / 440)
    with OTHERS_BUSY(str(tmp_path / "missing")) as reading:
        pass
    assert reading["share"] is None


def test_classes_timed_beside_other_work_say_so(tmp_path, monkeypatch, capsys):
    """`hw2jax machine` marks a class whose last timing ran beside other work: timed again by
    the next run, or kept once LOADED_TIMINGS have run so; a low share is not marked."""
    cache = tmp_path / "dispatch-key-2-cores.json"
    ms = {"fused_cpu": 1.0, "xla": 2.0}
    classes = {
        "a fwd": {"ms": ms, "others_busy_share": 0.48, "loaded_timings": 1},
        "b fwd": {"ms": ms, "others_busy_share": 0.3, "loaded_timings": 3},
        "c fwd": {"ms": ms, "others_busy_share": 0.1, "loaded_timings": 2},
    }
    cache.write_text(json.dumps({"machine": {}, "classes": classes}))
    monkeypatch.setattr(dispatch, "cache_file", lambda: cache)
    assert cli.main(["machine"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3:] == [
        "- a fwd: fused_cpu 1, xla 2 ms (timed while other processes took 48 % of the cores: "
        "the next run times it again)",
        "- b fwd: fused_cpu 1, xla 2 ms (timed while other processes took 30 % of the cores, "
        "3 times: kept)",
        "- c fwd: fused_cpu 1, xla 2 ms",
    ]
    assert cli.main(["machine", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["auto"]["beside_load"] == {
        "a fwd": {"share": 0.48, "timings": 1, "again": True},
        "b fwd": {"share": 0.3, "timings": 3, "again": False},
    }
