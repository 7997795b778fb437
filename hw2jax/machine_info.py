"""What ``hw2jax machine`` prints: this machine as a run's record names it, the C++ kernels'
build and what runs the bf16 products, and what auto has timed here (the dispatch cache): the
lines to paste beside a figure or a bug report."""

from __future__ import annotations

from hw2jax import cpu


def describe(build: bool = False) -> dict:
    """The record, the kernels' state (built only with ``build``: a first build takes tens of
    seconds) and auto's mode and timed classes."""
    import jax

    from hw2jax import kernels
    from hw2jax.attention import dispatch

    kernel = {"march": kernels.build_march()}
    try:
        target = kernels.library_target()
    except kernels.KernelUnavailable as err:
        kernel.update(state="unavailable", reason=str(err))
        target = None
    if target is not None and (build or target.exists()):
        error = kernels.build_error()
        kernel.update(state="built" if error is None else "unavailable", library=str(target))
        if error is not None:
            kernel["reason"] = error
        else:
            reason = kernels.bf16_products_unavailable_reason()
            kernel["bf16_products"] = kernels.bf16_products_engine() if reason is None else None
            kernel["bf16_products_reason"] = reason
    elif target is not None:
        kernel.update(state="not built", library=str(target))
    backend = jax.default_backend()
    cache = dispatch.cache_file() if backend == "cpu" else None
    timed = dispatch.cached_timings(cache) if cache is not None else {}
    auto = {
        "mode": dispatch.auto_mode(),
        "cache": str(cache) if cache is not None else None,
        "classes": {key: record["ms"] for key, record in sorted(timed.items())},
        # The probe cuts a class's rows and sequences to bound its time: the times are of these.
        "probe_shapes": {
            key: record["probe_shapes"]
            for key, record in sorted(timed.items())
            if record.get("probe_shapes")
        },
        # Classes last timed while other processes took over dispatch.LOADED_SHARE of the cores.
        "beside_load": {
            key: {
                "share": record["others_busy_share"],
                "timings": record.get("loaded_timings", 1),
                "again": dispatch.times_again(record),
            }
            for key, record in sorted(timed.items())
            if dispatch.timed_beside_load(record)
        },
    }
    return {
        "machine": cpu.machine(),
        "peak_fp32": cpu.peak_fp32_gflops(),
        "backend": backend,
        "kernels": kernel,
        "auto": auto,
    }


def text(info: dict) -> str:
    """:func:`describe`'s record as lines for a person."""
    from hw2jax.train.report import machine_line, times_text

    kernel, auto = info["kernels"], info["auto"]
    malloc = info["machine"]["malloc"]
    lines = ["this machine:", machine_line(info["machine"])]
    lines.append(
        "malloc: keeps freed memory (hw2jax.malloc's settings)"
        if malloc["keeps_freed_memory"]
        else "malloc: glibc's defaults (hw2jax's commands restart with hw2jax.malloc's settings)"
    )
    peak = info["peak_fp32"]
    if peak.get("gflops"):
        lines.append(
            f"float32 peak, estimated: {peak['gflops']:,.0f} GFLOP/s ({peak['cores']} cores x "
            f"{peak['ghz']:.2f} GHz x {peak['flops_per_cycle_per_core']} FLOP a cycle)"
        )
    lines.append(f"jax backend: {info['backend']}")
    if kernel["state"] == "built":
        lines.append(f"C++ kernels: built for -march={kernel['march']}, {kernel['library']}")
        lines.append(
            f"bf16 products: {kernel['bf16_products']}"
            if kernel["bf16_products"]
            else f"bf16 products: XLA's dot only ({kernel['bf16_products_reason']})"
        )
    elif kernel["state"] == "not built":
        lines.append(
            f"C++ kernels: not built yet for -march={kernel['march']}; the first run that needs "
            f"them builds them (tens of seconds), or `hw2jax machine --build` "
            f"({kernel['library']})"
        )
    else:
        lines.append(f"C++ kernels: unavailable, XLA's paths only: {kernel['reason']}")
    mode = {
        "measure": "times each shape class once per machine and takes the fastest",
        "rule": "takes the vector-feature rule, timing nothing",
    }.get(auto["mode"], "not a mode; set it to 'measure' (the default) or 'rule'")
    lines.append(f"auto (HW2JAX_AUTO={auto['mode']}): {mode}")
    if info["backend"] != "cpu":
        lines.append(f"timed classes: none (auto times paths on a CPU; here {info['backend']})")
        return "\n".join(lines)
    if auto["cache"] is None:
        lines.append("timed classes: none can be kept here (no kernel build to keep them beside)")
        return "\n".join(lines)
    if not auto["classes"]:
        lines.append(f"timed classes: none yet (runs keep them in {auto['cache']})")
        return "\n".join(lines)
    lines.append(
        f"timed classes ({len(auto['classes'])}, in {auto['cache']}; each path's best time on "
        "the probe's inputs, a class's rows and sequences cut to bound the probe's time):"
    )
    ties = {key for key, ms in auto["classes"].items() if near_tie(ms)}
    shapes, loaded = auto.get("probe_shapes", {}), auto.get("beside_load", {})
    for key, ms in auto["classes"].items():
        on = f" on {', '.join('x'.join(map(str, s)) for s in shapes[key])}" if key in shapes else ""
        notes = ["a near tie"] if key in ties else []
        if key in loaded:
            notes.append(_beside_load(**loaded[key]))
        lines.append(f"- {key}: {times_text(ms)}{on}" + (f" ({'; '.join(notes)})" if notes else ""))
    if ties:
        lines.append(
            "A near tie (the fastest two within the tie margin, dispatch.choose) takes the "
            "vector-feature rule's path where it is one of them: a fresh probe may time them "
            "the other way round."
        )
    return "\n".join(lines)


def _beside_load(share: float, timings: int, again: bool) -> str:
    said = f"timed while other processes took {100 * share:.0f} % of the cores"
    if again:
        return f"{said}: the next run times it again"
    return f"{said}, {timings} times: kept"


def near_tie(ms: dict[str, float]) -> bool:
    """Whether the fastest two paths' times are within :func:`dispatch.choose`'s tie margin."""
    from hw2jax.attention import dispatch

    if len(ms) < 2:
        return False
    best, second = sorted(ms.values())[:2]
    return dispatch.within_tie(second, best)
