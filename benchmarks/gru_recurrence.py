"""The GRU's recurrence by each path (``xla``: a ``lax.scan`` with a written-out backward pass;
``fused_cpu``: ``hw2jax.kernels.gru_recurrence_cpu``), in one process, timed in turns:

    .venv/bin/python benchmarks/gru_recurrence.py [--rounds 7] [--out DIR]

1. One layer's recurrence, both directions (x_proj [T, 2, B, 3H] given), forward alone and
   forward + backward, with its rate in GFLOP/s (2 x T x 2 x B x 3H x H flops forward, three
   times that forward and backward).
2. The sentiment head's whole training step (``train_throughput.py``'s GRU row without torch:
   2-layer bidirectional GRU over [B, T, 768] features, both last states into one logit, BCE,
   Adam), each path's step compiled once; with ``--host-devices N`` (N > 1) also the same step
   with the batch split over N host devices, as ``--host-devices`` trains.

Defaults: the assignment's head, B 128, T 512, H 256. Before timing, the paths' first losses
must agree to 1e-5 and their updated parameters to 1e-4 (the split steps' with the one-device
step's too). Writes ``gru_recurrence.json``.
"""

from __future__ import annotations

import argparse

import numpy as np

from hw2jax import malloc
from hw2jax.cpu import machine
from hw2jax.timing import (
    add_host_devices,
    interleaved_seconds,
    write_results,
)
from hw2jax.train.sharding import split_host_cpu

PATHS = ("xla", "fused_cpu")


def _recurrence_calls(batch: int, steps: int, hidden: int) -> dict:
    import jax
    import jax.numpy as jnp

    from hw2jax.models.gru import recurrence

    k = jax.random.split(jax.random.key(0), 3)
    x_proj = jax.random.normal(k[0], (steps, 2, batch, 3 * hidden)) * 0.5
    w_hh = jax.random.normal(k[1], (2, 3 * hidden, hidden)) / np.sqrt(hidden)
    b_hh = jax.random.normal(k[2], (2, 3 * hidden)) * 0.1
    valid = jnp.ones((batch, steps), bool)
    calls = {}
    for path in PATHS:

        def loss(x, w, b, path=path):
            out, h = recurrence(x, w, b, valid, path)
            return jnp.sum(out * x[..., :hidden]) + jnp.sum(h * h)

        forward = jax.jit(lambda x, w, b, path=path: recurrence(x, w, b, valid, path))
        both = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
        calls[f"{path} forward"] = lambda f=forward: jax.block_until_ready(f(x_proj, w_hh, b_hh))
        calls[f"{path} forward+backward"] = lambda f=both: jax.block_until_ready(
            f(x_proj, w_hh, b_hh)
        )
    return calls


def _step_calls(
    batch: int, steps: int, features: int, hidden: int, host_devices: int
) -> tuple[dict, dict]:
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from hw2jax.models.gru import GRU

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, steps, features)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, batch), jnp.float32)
    params = {
        "gru": GRU(hidden, 2, True, implementation="xla").init(jax.random.key(0), x[:1, :2])[
            "params"
        ],
        "w": jnp.full((2 * hidden, 1), 0.01),
        "b": jnp.zeros((1,)),
    }
    opt = optax.adam(1e-3)
    state = opt.init(params)
    if host_devices > 1:  # the batch split, parameters and optimiser state whole
        mesh = Mesh(np.array(jax.devices()[:host_devices]), ("data",))
        whole = jax.device_put((params, state), NamedSharding(mesh, PartitionSpec()))
        split = [jax.device_put(a, NamedSharding(mesh, PartitionSpec("data"))) for a in (x, y)]
        on_mesh = (*whole, *split)
    calls, first = {}, {}
    for path in PATHS:
        gru = GRU(hidden, 2, True, implementation=path)

        def loss_fn(p, x, y, gru=gru):
            _, h_n = gru.apply({"params": p["gru"]}, x)
            logit = (jnp.concatenate([h_n[-2], h_n[-1]], -1) @ p["w"] + p["b"])[:, 0]
            return optax.sigmoid_binary_cross_entropy(logit, y).mean()

        @jax.jit
        def step(p, s, x, y, loss_fn=loss_fn):
            loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
            updates, s = opt.update(grads, s, p)
            return optax.apply_updates(p, updates), s, loss

        first[path] = jax.block_until_ready(step(params, state, x, y))
        calls[f"{path} training step"] = lambda step=step: jax.block_until_ready(
            step(params, state, x, y)
        )
        if host_devices > 1:
            name = f"{path} training step on {host_devices} devices"
            first[name] = jax.block_until_ready(step(*on_mesh))
            calls[name] = lambda step=step: jax.block_until_ready(step(*on_mesh))
    return calls, first


def _check_agreement(first: dict) -> dict:
    """Every step's first loss and updated parameters against the scan's on one device."""
    import jax

    p_a, _, loss_a = first[PATHS[0]]
    loss_gap = param_gap = 0.0
    for p_b, _, loss_b in first.values():
        loss_gap = max(loss_gap, abs(float(loss_a) - float(loss_b)))
        param_gap = max(
            [param_gap]
            + [
                float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(p_a), jax.tree.leaves(p_b), strict=True)
            ]
        )
    if loss_gap > 1e-5 or param_gap > 1e-4:
        raise SystemExit(
            f"the paths disagree (loss by {loss_gap:.2e}, parameters by {param_gap:.2e}): "
            "nothing is timed"
        )
    return {"loss_gap": loss_gap, "param_gap": param_gap}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=512)
    parser.add_argument("--features", type=int, default=768)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    add_host_devices(parser, "a training step with the batch split over them", default=1)
    parser.add_argument("--out", default="benchmarks/results/gru_head")
    args = parser.parse_args(argv)
    split_host_cpu(args.host_devices)  # before any jax work

    step_calls, first = _step_calls(
        args.batch, args.steps, args.features, args.hidden, args.host_devices
    )
    agreement = _check_agreement(first)
    timed = interleaved_seconds(
        _recurrence_calls(args.batch, args.steps, args.hidden) | step_calls, args.rounds
    )
    flops = 2 * args.steps * 2 * args.batch * 3 * args.hidden * args.hidden
    results = []
    for name, (seconds, median) in timed.items():
        path, what = name.split(" ", 1)
        row = {"path": path, "what": what, "seconds": seconds, "median_s": median}
        if not what.startswith("training step"):
            row["gflops_per_s"] = (3 if what == "forward+backward" else 1) * flops / median / 1e9
        results.append(row)
        rate = f"  {row['gflops_per_s']:6.1f} GFLOP/s" if "gflops_per_s" in row else ""
        print(f"{path:10s} {what:18s} {median * 1e3:9.1f} ms{rate}")
    steps_on_mesh = [f"training step on {args.host_devices} devices"] * (args.host_devices > 1)
    for what in ("forward", "forward+backward", "training step", *steps_on_mesh):
        ms = {r["path"]: r["median_s"] for r in results if r["what"] == what}
        print(f"{what}: the kernel takes {ms['fused_cpu'] / ms['xla']:.2f} of the scan's time")
    meta = {
        **machine(),
        "sizes": {k: getattr(args, k) for k in ("batch", "steps", "features", "hidden")},
        "host_devices": args.host_devices,
        "rounds": args.rounds,
        "agreement": agreement,
    }
    write_results(args.out, "gru_recurrence.json", meta, results)


if __name__ == "__main__":
    malloc.restart_with_settings()
    main()
