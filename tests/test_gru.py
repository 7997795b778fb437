import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_on_host_devices

from hw2jax import kernels
from hw2jax.attention import dispatch
from hw2jax.errors import InputError
from hw2jax.models.gru import GRU, params_from_torch
from hw2jax.models.layers import TorchDense

torch = pytest.importorskip("torch")

# Each recurrence path with a hidden size it takes: the kernel wants a multiple of 16.
PATHS = [("xla", 5), ("fused_cpu", 16)]


@pytest.fixture(params=PATHS, ids=[path for path, _ in PATHS])
def path(request):
    """(implementation, hidden size); the kernel's cases skip where it cannot be built."""
    if request.param[0] == "fused_cpu" and kernels.build_error():
        pytest.skip(f"the fused CPU kernels cannot be built here: {kernels.build_error()}")
    return request.param


def run_both(
    input_size, hidden, layers, bidirectional, lengths=None, seed=0, implementation="xla", batch=3
):
    torch.manual_seed(seed)
    tgru = torch.nn.GRU(
        input_size, hidden, num_layers=layers, bidirectional=bidirectional, batch_first=True
    )
    x = np.random.default_rng(seed).normal(size=(batch, 11, input_size)).astype(np.float32)
    ours = GRU(hidden, layers, bidirectional, implementation=implementation).apply(
        {"params": params_from_torch(tgru)},
        jnp.asarray(x),
        None if lengths is None else jnp.asarray(lengths),
    )
    with torch.no_grad():
        if lengths is None:
            out, h = tgru(torch.tensor(x))
        else:
            packed = torch.nn.utils.rnn.pack_padded_sequence(
                torch.tensor(x), torch.tensor(lengths), batch_first=True, enforce_sorted=False
            )
            out, h = tgru(packed)
            out, _ = torch.nn.utils.rnn.pad_packed_sequence(
                out, batch_first=True, total_length=x.shape[1]
            )
    return ours, (out.numpy(), h.numpy())


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_matches_torch_gru(layers, bidirectional, path):
    implementation, hidden = path
    (out, h), (t_out, t_h) = run_both(7, hidden, layers, bidirectional, None, 0, implementation)
    assert out.shape == t_out.shape and h.shape == t_h.shape
    np.testing.assert_allclose(out, t_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h, t_h, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers", [1, 2])
def test_lengths_match_torch_packed_sequences(layers, path):
    implementation, hidden = path
    lengths = [11, 4, 7]
    (out, h), (t_out, t_h) = run_both(6, hidden, layers, True, lengths, 0, implementation)
    np.testing.assert_allclose(out, t_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h, t_h, atol=1e-5, rtol=1e-5)
    # And differs from running over the padding.
    (_, h_pad), _ = run_both(6, hidden, layers, True, None, 0, implementation)
    assert not np.allclose(h, h_pad, atol=1e-3)


def test_the_kernel_over_many_rows_matches_torch():
    """The fused kernel's row tiles (8 rows), a tail tile and the batch split over threads: 19
    sequences of their own lengths, both directions, against torch's packed sequences."""
    if kernels.build_error():
        pytest.skip(f"the fused CPU kernels cannot be built here: {kernels.build_error()}")
    lengths = np.random.default_rng(1).integers(1, 12, 19).tolist()
    (out, h), (t_out, t_h) = run_both(6, 32, 2, True, lengths, 0, "fused_cpu", batch=19)
    np.testing.assert_allclose(out, t_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h, t_h, atol=1e-5, rtol=1e-5)


_SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from hw2jax.models.gru import GRU
rng = np.random.default_rng(0)
x = rng.standard_normal((6, 9, 8)).astype(np.float32)
lengths = np.array([9, 3, 5, 9, 1, 6])
model = GRU(16, 2, True, implementation="fused_cpu")
params = model.init(jax.random.key(0), x, lengths)["params"]
g = rng.standard_normal((6, 9, 32)).astype(np.float32)

def loss(params, x, lengths):
    out, last = model.apply({"params": params}, x, lengths)
    return jnp.sum(out * g) + jnp.sum(last ** 2)

f = jax.jit(jax.value_and_grad(loss, (0, 1)))
one_device = f(params, x, lengths)
mesh = Mesh(np.array(jax.devices()), ("data",))
put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
args = (jax.device_put(params, NamedSharding(mesh, P())),
        put(x, P("data")), put(lengths, P("data")))
hlo = f.lower(*args).compile().as_text()
calls = [line.split("=")[1].split("custom-call")[0].strip().split("{")[0].strip("(")
         for line in hlo.splitlines() if "hw2jax_cpu_gru" in line and "custom-call(" in line]
print("all-gather" in hlo)
print(sorted(set(calls)))
two = f(*args)
print(max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
          for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one_device))))
"""


def test_a_batch_split_over_devices_stays_split():
    """Two layers, both directions, forward and backward, under a 2-device mesh that splits the
    batch as data-parallel training does: each device runs the kernels on its 3 rows, with no
    all-gather, and the loss and every gradient (W_hh's summed over the devices) are the
    one-device ones."""
    if kernels.build_error():
        pytest.skip(f"the fused CPU kernels cannot be built here: {kernels.build_error()}")
    gathered, calls, error = run_on_host_devices(_SHARDED).splitlines()
    assert gathered == "False"
    assert calls == "['f32[9,2,3,16]', 'f32[9,2,3,48]']", calls  # states; the input's gradient
    assert float(error) < 5e-5


def test_the_kernel_under_vmap_runs_each_item():
    """vmap over inputs and weights: each item's outputs and gradients as if called alone."""
    if kernels.build_error():
        pytest.skip(f"the fused CPU kernels cannot be built here: {kernels.build_error()}")
    rng = np.random.default_rng(0)
    xp = rng.standard_normal((3, 5, 2, 2, 48)).astype(np.float32)
    w = (0.3 * rng.standard_normal((3, 2, 48, 16))).astype(np.float32)
    bias = rng.standard_normal((2, 48)).astype(np.float32)
    valid = np.arange(5)[None] < np.array([[5], [2]])

    def loss(xp, w):
        out, last = kernels.gru_recurrence_cpu(xp, w, bias, valid)
        return jnp.sum(out**2) + jnp.sum(last)

    batched = jax.vmap(jax.value_and_grad(loss, (0, 1)))(xp, w)
    alone = [jax.value_and_grad(loss, (0, 1))(a, b) for a, b in zip(xp, w, strict=True)]
    for got, expected in zip(
        jax.tree.leaves(batched), zip(*map(jax.tree.leaves, alone), strict=True), strict=True
    ):
        np.testing.assert_allclose(got, np.stack(expected), rtol=1e-6, atol=1e-6)


def test_the_kernel_refuses_what_it_cannot_take():
    x = jnp.zeros((2, 3, 4))
    with pytest.raises(dispatch.ImplementationError, match=r"multiple of 16.*'auto' or 'xla'"):
        GRU(5, implementation="fused_cpu").init(jax.random.key(0), x)
    with pytest.raises(dispatch.ImplementationError, match="use one of auto, xla, fused_cpu"):
        GRU(16, implementation="scan").init(jax.random.key(0), x)


def test_auto_takes_the_scan_for_what_the_kernel_refuses(monkeypatch):
    """auto asks the kernel's own operand check: a bf16 recurrence (which the kernel refuses by
    name) runs the scan, and H = 16 in float32 runs the kernel."""
    from hw2jax.models import gru

    taken = []
    monkeypatch.setattr(kernels, "gru_recurrence_cpu", lambda *a: taken.append("fused") or a[:2])
    monkeypatch.setattr(gru, "_scan_directions", lambda *a: taken.append("scan") or a[:2])
    valid = jnp.ones((3, 5), bool)
    for dtype in (jnp.bfloat16, jnp.float32):
        operands = [jnp.zeros(s, dtype) for s in ((5, 2, 3, 48), (2, 48, 16), (2, 48))]
        gru.recurrence(*operands, valid, implementation="auto")
        if dtype == jnp.bfloat16:
            with pytest.raises(dispatch.ImplementationError, match="float32; got x_proj"):
                gru.recurrence(*operands, valid, implementation="fused_cpu")
    assert taken == ["scan", "scan" if kernels.build_error() else "fused"]


GOOD_OPERANDS = {"x_proj": (5, 2, 3, 48), "w_hh": (2, 48, 16), "b_hh": (2, 48), "valid": (3, 5)}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"x_proj": (5, 2, 48)}, r"it wants x_proj \[T, D, B, 3H\].*; got \(5, 2, 48\)"),
        ({"x_proj": (5, 2, 4, 48)}, r"of one T, D, B and H; got \(5, 2, 4, 48\)"),
        ({"valid": (3, 6)}, r"of one T, D, B and H; got .*\(3, 6\)"),
        ({"b_hh": (2, 47)}, r"of one T, D, B and H; got .*\(2, 47\)"),
        ({"x_proj": (5, 2, 3, 60), "w_hh": (2, 60, 20), "b_hh": (2, 60)}, "16; got 20"),
        ({"dtype": jnp.bfloat16}, "float32; got x_proj, w_hh and b_hh in bfloat16"),
        ({"valid_dtype": jnp.float32}, "valid must be bool"),
    ],
)
def test_the_kernel_call_names_a_bad_operand_before_compiling(change, message):
    """x_proj [T, D, B, 3H], w_hh [D, 3H, H], b_hh [D, 3H], valid [B, T] bool, float32, H a
    multiple of 16: anything else is one InputError naming the operands, not XLA's error."""
    shapes = GOOD_OPERANDS | {k: v for k, v in change.items() if k in GOOD_OPERANDS}
    dtype = change.get("dtype", jnp.float32)
    operands = [jnp.zeros(shapes[k], dtype) for k in ("x_proj", "w_hh", "b_hh")]
    valid = jnp.ones(shapes["valid"], change.get("valid_dtype", jnp.bool_))
    with pytest.raises(InputError, match=message):
        jax.jit(kernels.gru_recurrence_cpu)(*operands, valid)


def test_the_kernel_call_takes_the_shapes_it_names():
    operands = [jnp.zeros(GOOD_OPERANDS[k], jnp.float32) for k in ("x_proj", "w_hh", "b_hh")]
    out, last = kernels.gru_recurrence_cpu(*operands, jnp.ones(GOOD_OPERANDS["valid"], bool))
    assert out.shape == (5, 2, 3, 16) and last.shape == (2, 3, 16)


def test_parameter_count_is_torchs():
    # The assignment's GRU over bert-base outputs: torch counts 2,758,656 (+513 in the head).
    params = jax.eval_shape(
        lambda: GRU(256, 2, True).init(jax.random.key(0), jnp.zeros((1, 3, 768)))
    )
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)) == 2_758_656
    tgru = torch.nn.GRU(768, 256, num_layers=2, bidirectional=True)
    assert sum(p.numel() for p in tgru.parameters()) == 2_758_656


def test_every_tensor_starts_from_torchs_draw():
    """torch.nn.GRU draws every tensor from U(-1/sqrt(H), 1/sqrt(H)), nn.Linear its weight and
    bias from U(-1/sqrt(fan_in), ...): ours (the GRU, and TorchDense of the heads) fill the
    interval torch's own tensors fill, no wider, with a uniform's spread (std bound / sqrt 3)."""
    gru = GRU(256, 1, True).init(jax.random.key(0), jnp.zeros((1, 3, 768)))["params"]
    dense = TorchDense(1000, 768).init(jax.random.key(1), jnp.zeros((1, 768)))["params"]
    torch.manual_seed(0)
    cases = [
        (gru, torch.nn.GRU(768, 256, bidirectional=True), 256),
        (dense, torch.nn.Linear(768, 1000), 768),
    ]
    for ours, theirs, n in cases:
        bound = 1 / np.sqrt(n)
        ours = [np.asarray(a).ravel() for a in jax.tree.leaves(ours)]
        theirs = [p.detach().numpy().ravel() for p in theirs.parameters()]
        assert len(ours) == len(theirs)
        for tensors in (ours, theirs):  # each tensor reaches to within 1 % of the bound
            assert all(0.99 * bound < np.abs(t).max() <= bound for t in tensors), n
            assert np.concatenate(tensors).std() == pytest.approx(bound / np.sqrt(3), rel=0.01)


def test_dropout_only_between_layers_and_only_in_training():
    gru = GRU(4, 2, dropout=0.5)
    x = jax.random.normal(jax.random.key(0), (2, 5, 3))
    params = gru.init(jax.random.key(1), x)
    a = gru.apply(params, x)
    b = gru.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a[0], b[0])
    single = GRU(4, 1, dropout=0.5)
    p1 = single.init(jax.random.key(1), x)
    np.testing.assert_array_equal(
        single.apply(p1, x)[0],
        single.apply(p1, x, deterministic=False, rngs={"dropout": jax.random.key(2)})[0],
    )


def test_dropout_masks_are_drawn_over_batch_major_outputs():
    """Layer 0's [batch, time, features] output, dropped by a Dropout module at the GRU's own
    path (so with the same key), then layer 1: the masks a seed gives do not depend on the
    layout the recurrence runs in."""
    import flax.linen as nn

    class DropoutAtGruPath(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dropout(0.5, name="Dropout_0")(x, deterministic=False)

    x = jax.random.normal(jax.random.key(0), (3, 6, 5))
    gru = GRU(4, 2, bidirectional=True, dropout=0.5)
    params = gru.init(jax.random.key(1), x)["params"]
    rngs = {"dropout": jax.random.key(2)}
    out, _ = gru.apply({"params": params}, x, deterministic=False, rngs=rngs)

    layer = GRU(4, 1, bidirectional=True)
    first = {k: v for k, v in params.items() if "_l0" in k}
    second = {k.replace("_l1", "_l0"): v for k, v in params.items() if "_l1" in k}
    hidden, _ = layer.apply({"params": first}, x)
    dropped = DropoutAtGruPath().apply({}, hidden, rngs=rngs)
    expected, _ = layer.apply({"params": second}, dropped)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"\[batch, time, features\]"):
        GRU(4).init(jax.random.key(0), jnp.zeros((5, 3)))


@pytest.mark.parametrize("lengths", [None, [11, 4, 7]])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_gradients_match_torch(lengths, bidirectional, path):
    """The written-out backward passes (the scan's and the kernel's) against torch's autograd,
    for every weight and the input, through outputs and final states (packed sequences where
    lengths are given)."""
    implementation, hidden = path
    torch.manual_seed(0)
    tgru = torch.nn.GRU(6, hidden, num_layers=2, bidirectional=bidirectional, batch_first=True)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 11, 6)).astype(np.float32)
    dirs = 2 if bidirectional else 1
    g_out = rng.normal(size=(3, 11, dirs * hidden)).astype(np.float32)
    g_h = rng.normal(size=(2 * dirs, 3, hidden)).astype(np.float32)
    gru = GRU(hidden, 2, bidirectional, implementation=implementation)

    def loss(params, x):
        out, h = gru.apply({"params": params}, x, None if lengths is None else jnp.array(lengths))
        return jnp.sum(out * g_out) + jnp.sum(h * g_h)

    grads, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params_from_torch(tgru), jnp.asarray(x))
    tx = torch.tensor(x, requires_grad=True)
    if lengths is None:
        out, h = tgru(tx)
    else:
        packed = torch.nn.utils.rnn.pack_padded_sequence(
            tx, torch.tensor(lengths), batch_first=True, enforce_sorted=False
        )
        out, h = tgru(packed)
        out, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=11)
    ((out * torch.tensor(g_out)).sum() + (h * torch.tensor(g_h)).sum()).backward()
    assert set(grads) == {name for name, _ in tgru.named_parameters()}
    for name, param in tgru.named_parameters():
        np.testing.assert_allclose(grads[name], param.grad.numpy(), atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(gx, tx.grad.numpy(), atol=1e-5, rtol=1e-4)


def test_auto_times_both_recurrences_on_first_use(monkeypatch, tmp_path):
    """Unfaked: the GRU's first call under auto times the scan and the kernel with gradients,
    over at most dispatch.PROBE_STEPS steps, records the class, and computes torch's outputs."""
    if kernels.build_error():
        pytest.skip(f"the fused CPU kernels cannot be built here: {kernels.build_error()}")
    monkeypatch.setenv("HW2JAX_AUTO", "measure")
    monkeypatch.setattr(dispatch, "state", dispatch.ProbeState())
    monkeypatch.setattr(dispatch, "cache_file", lambda: tmp_path / "dispatch-test.json")
    monkeypatch.setattr(dispatch, "PROBE_STEPS", 8)
    (out, h), (t_out, t_h) = run_both(6, 16, 1, True, None, 0, "auto")
    np.testing.assert_allclose(out, t_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h, t_h, atol=1e-5, rtol=1e-5)
    classes = json.loads((tmp_path / "dispatch-test.json").read_text())["classes"]
    timed = classes["gru fwd+bwd dirs 2 batch 2^1 hidden 16 float32"]
    assert timed["probe_shapes"] == [[8, 2, 3, 48], [2, 48, 16], [2, 48], [3, 8]]
    assert set(timed["ms"]) == {"xla", "fused_cpu"} and min(timed["ms"].values()) > 0
