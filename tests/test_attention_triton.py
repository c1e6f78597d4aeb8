"""The Triton flash attention (interpreted on CPU) against float64 math: output and the gradients
of q, k, v and the additive bias, with key padding, both bias layouts, odd lengths, every dtype."""
import os

import pytest
import torch

from d2v_kernels.attention import attention_reference
from d2v_kernels.attention_dispatch import attention_backend
from d2v_kernels.ops import attention

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton interpreter on CPU tensors (set only "
                                "without CUDA); tests/test_cuda_kernels.py runs these kernels "
                                "compiled")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _inputs(B, H, T, D, dtype, pad, bias, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(dtype) for _ in range(3))
    mask = None
    if pad:
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        lengths[0] = T
        mask = torch.arange(T)[None, :] >= lengths[:, None]
    b = None
    if bias == "shared":
        b = torch.randn(H, T, T, generator=g).to(dtype)
    elif bias == "batched":
        b = torch.randn(B, H, T, T, generator=g).to(dtype)
    return q, k, v, mask, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,pad,bias", [(19, False, None), (37, True, "shared"),
                                        (19, True, "batched"), (37, False, "shared")])
def test_triton_forward_backward_match_float64(dtype, T, pad, bias):
    B, H, D = 2, 2, 32
    q, k, v, mask, b = _inputs(B, H, T, D, dtype, pad, bias, seed=T * 7 + (bias is not None))
    assert attention_backend(q, k, v, mask, b) == "triton"
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    bias_leaf = None if b is None else b.clone().requires_grad_()
    out = attention(*leaves, key_padding_mask=mask, attn_bias=bias_leaf)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_bias = None if b is None else b.double().requires_grad_()
    ref = attention_reference(*ref_leaves, key_padding_mask=mask, attn_bias=ref_bias)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    assert _rel(out, ref) < TOL[dtype]
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    out.backward(dout)
    ref.backward(dout.double())
    for got, want in zip(leaves + [bias_leaf], ref_leaves + [ref_bias]):
        if want is None:
            continue
        assert got.grad is not None and torch.isfinite(got.grad).all()
        assert _rel(got.grad, want.grad) < 2 * TOL[dtype]


def test_fully_padded_rows_give_zero_and_finite_gradients():
    B, H, T, D = 2, 2, 19, 32
    q, k, v, _, b = _inputs(B, H, T, D, torch.float32, False, "shared", seed=3)
    mask = torch.zeros(B, T, dtype=torch.bool)
    mask[1] = True  # every key of sample 1 is padding
    leaves = [t.clone().requires_grad_() for t in (q, k, v, b)]
    out = attention(*leaves[:3], key_padding_mask=mask, attn_bias=leaves[3])
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    out.square().sum().backward()
    for t in leaves:
        assert torch.isfinite(t.grad).all()
    ref = attention_reference(q.double(), k.double(), v.double(), mask, b.double())
    assert _rel(out[0], ref[0]) < 1e-5


@pytest.mark.parametrize("bias", ["shared", "batched"])
def test_compiled_triton_attention_is_one_graph_and_matches_float64(bias):
    """Under torch.compile the Triton path goes through the d2v::attention_* op pair: fullgraph
    compiles (no graph break at the kernel launches), and the forward and every gradient still
    match float64 math."""
    q, k, v, mask, b = _inputs(2, 2, 19, 32, torch.float32, True, bias, seed=11)
    assert attention_backend(q, k, v, mask, b) == "triton"
    leaves = [t.clone().requires_grad_() for t in (q, k, v, b)]
    compiled = torch.compile(lambda q, k, v, b: attention(q, k, v, key_padding_mask=mask,
                                                          attn_bias=b),
                             fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(out, leaves, grad_out)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, b)]
    ref = attention_reference(*ref_leaves[:3], key_padding_mask=mask, attn_bias=ref_leaves[3])
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out.double())
    assert _rel(out, ref) < 1e-5
    for name, g, r in zip("q k v bias".split(), grads, ref_grads):
        assert _rel(g, r) < 1e-5, name


def test_compiled_triton_attention_with_dropout_is_one_graph_with_the_eager_masks():
    """Dropout also stays in the op pair: the seed is drawn from torch's generator as in eager,
    so with the same manual seed the compiled forward and gradients are the eager ones."""
    q, k, v, mask, b = _inputs(2, 2, 19, 32, torch.float32, True, "shared", seed=5)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, b)]
        torch.manual_seed(123)
        out = fn(*leaves)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
        return out, torch.autograd.grad(out, leaves, grad_out)

    def eager(q, k, v, b, p=0.3):
        return attention(q, k, v, key_padding_mask=mask, attn_bias=b, dropout_p=p)

    compiled = torch.compile(eager, fullgraph=True, backend="aot_eager")
    (out_e, grads_e), (out_c, grads_c) = run(eager), run(compiled)
    out_plain, _ = run(lambda *a: eager(*a, p=0.0))
    assert _rel(out_c, out_plain) > 0.05, "dropout did nothing"
    assert _rel(out_c, out_e) < 1e-6
    for name, gc_, ge in zip("q k v bias".split(), grads_c, grads_e):
        assert _rel(gc_, ge) < 1e-6, name


# ---------------------------------------------------------------------------------------------
# Dropout: one mask, drawn by the forward, read back bit for bit by the backward

from d2v_kernels import attention as attn  # noqa: E402


@pytest.fixture
def blocks(monkeypatch):
    """Sets the interpreter's (BLOCK_M, BLOCK_N) for the kernels launched next."""
    return lambda b: monkeypatch.setattr(attn, "INTERPRET_BLOCKS", b)


def _float64_grads(q, k, v, pad, bias, scale, keep, p, dout, skip=False):
    """float64 out and q/k/v/bias grads of attention with a given keep mask (True = kept)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, bias) if t is not None]
    s = leaves[0] @ leaves[1].transpose(-1, -2) * scale
    if bias is not None:
        s = s + leaves[3]
    if pad is not None:
        s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    empty = torch.isneginf(s).all(-1, keepdim=True)
    probs = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    if keep is not None:
        probs = probs * keep / (1 - attn.dropout_threshold(p)[0] / 65536)
    out = probs @ leaves[2]
    if skip:
        out = out.masked_fill(pad[:, None, :, None], 0.0)
    return out, torch.autograd.grad(out, leaves, dout.double())


def test_dropout_mask_is_the_same_in_forward_and_backward_bit_for_bit(blocks):
    """With v = identity the forward's output row i is P_i * keep_i / (1 - p): the mask the forward
    applied, read off its output. It equals the bit-packed mask the forward stored, and gradients
    computed by the backward kernels -- run with other block sizes than the forward's -- match
    float64 math with that mask. So the backward read the forward's mask, bit for bit."""
    B, H, T, D, p, scale = 2, 1, 37, 64, 0.3, 0.2
    g = torch.Generator().manual_seed(21)
    q, k = (torch.randn(B, H, T, D, generator=g) for _ in range(2))
    eye = torch.eye(T, D).expand(B, H, T, D).contiguous()
    pad = torch.arange(T)[None, :] >= torch.tensor([T, 25])[:, None]
    bias = torch.randn(H, T, T, generator=g)
    blocks((16, 32))
    out, lse, keep_bits = attn.flash_forward(q, k, eye, pad, bias, scale, p, seed=77)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale + bias.double()
    probs = torch.softmax(s.masked_fill(pad[:, None, None, :], float("-inf")), -1)
    admissible = probs > 0
    applied = out[..., :T] != 0
    stored = attn.unpack_dropout_mask(keep_bits, T, T)
    assert torch.equal(applied & admissible, stored & admissible)
    keep_frac = (applied & admissible).sum().item() / admissible.sum().item()
    assert 0.6 < keep_frac < 0.8, keep_frac
    # a second forward with the same seed draws the same bits; another seed other bits
    v = torch.randn(B, H, T, D, generator=g)
    out2, lse2, keep2 = attn.flash_forward(q, k, v, pad, bias, scale, p, seed=77)
    assert torch.equal(attn.unpack_dropout_mask(keep2, T, T) & admissible, stored & admissible)
    other = attn.flash_forward(q, k, v, pad, bias, scale, p, seed=78)[2]
    assert not torch.equal(attn.unpack_dropout_mask(other, T, T) & admissible,
                           stored & admissible)
    dout = torch.randn(B, H, T, D, generator=g)
    blocks((32, 16))  # the backward tiles differ from the forward's: the bits are per element
    grads = attn.flash_backward(dout, q, k, v, pad, bias, out2, lse2, scale, p, keep2, True)
    want_out, want = _float64_grads(q, k, v, pad, bias, scale, stored, p, dout)
    assert _rel(out2, want_out) < 1e-5
    for name, got, ref in zip("q k v bias".split(), grads, want):
        assert _rel(got, ref) < 1e-5, f"d{name} rel err {_rel(got, ref):.2e}"


def test_dropout_keep_rate_is_within_sampling_error_of_one_minus_p(blocks):
    """Over B*H*T*T = 32768 draws the keep rate is within 5 binomial standard deviations of
    1 - p; p itself is realized to 2^-16 (the 16-bit thresholds)."""
    blocks((64, 64))
    B, H, T, p = 2, 4, 64, 0.1
    thr, scale = attn.dropout_threshold(p)
    assert abs(thr / 65536 - p) <= 2 ** -17 and scale == pytest.approx(1 / (1 - thr / 65536))
    q = torch.randn(B, H, T, 16, generator=torch.Generator().manual_seed(2))
    _, _, keep = attn.flash_forward(q, q, q, None, None, 0.25, p, seed=1234)
    bits = attn.unpack_dropout_mask(keep, T, T)
    n = bits.numel()
    rate = bits.double().mean().item()
    assert abs(rate - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, rate
    assert not torch.equal(bits[0, 0], bits[0, 1]) and not torch.equal(bits[0, 0], bits[1, 0])
    # and (thresholds aside) the same uniforms: p = 0.5 keeps about half
    _, _, keep = attn.flash_forward(q, q, q, None, None, 0.25, 0.5, seed=1234)
    half = attn.unpack_dropout_mask(keep, T, T).double().mean().item()
    assert abs(half - 0.5) < 5 * (0.25 / n) ** 0.5, half


# ---------------------------------------------------------------------------------------------
# The shared bias's gradient: fp32 partial sums over batch chunks, summed in a fixed order


def test_shared_bias_grad_partials_match_reference_chunk_sums(blocks):
    """B = 5 samples in 2 chunks (3 + 2): partial c is the float64 sum over chunk c's samples of
    d loss / d bias_b (a per-sample copy of the bias), with padding (a fully padded sample
    included) and dropout, over 3 x 3 tiles; the gradient is the partials' sum."""
    blocks((16, 16))
    B, H, T, D, p, scale = 5, 1, 37, 32, 0.2, 0.25
    g = torch.Generator().manual_seed(8)
    q, k, v, dout = (torch.randn(B, H, T, D, generator=g) for _ in range(4))
    bias = torch.randn(H, T, T, generator=g)
    pad = torch.arange(T)[None, :] >= torch.tensor([T, 30, 0, 19, T])[:, None]
    out, lse, keep = attn.flash_forward(q, k, v, pad, bias, scale, p, seed=5)
    partial = torch.full((2, H, T, T), float("nan"))
    dbias = torch.full((H, T, T), float("nan"))
    attn.flash_backward(dout, q, k, v, pad, bias, out, lse, scale, p, keep, True,
                        dbias=dbias, dbias_partial=partial)
    per_sample = bias.double().expand(B, H, T, T).clone().requires_grad_()
    bits = attn.unpack_dropout_mask(keep, T, T)
    s = q.double() @ k.double().transpose(-1, -2) * scale + per_sample
    s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    empty = torch.isneginf(s).all(-1, keepdim=True)
    probs = torch.softmax(s.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    ref_out = (probs * bits / (1 - attn.dropout_threshold(p)[0] / 65536)) @ v.double()
    (d_per_sample,) = torch.autograd.grad(ref_out, per_sample, dout.double())
    assert not partial.isnan().any() and not dbias.isnan().any()
    for c, samples in enumerate([range(0, 3), range(3, 5)]):
        want = d_per_sample[list(samples)].sum(0)
        assert _rel(partial[c], want) < 1e-5, f"chunk {c}: rel err {_rel(partial[c], want):.2e}"
    assert _rel(dbias, d_per_sample.sum(0)) < 1e-5
    assert torch.equal(dbias, partial[0] + partial[1])


# ---------------------------------------------------------------------------------------------
# Padding: loops bounded by each sample's key length; the general path for masks with holes


def _padding_case(kind, T):
    lengths = torch.tensor([T, 21, 0, 5])
    pad = torch.arange(T)[None, :] >= lengths[:, None]
    if kind == "holes":  # not a right-padding mask: padded keys inside the sequence too
        pad[0, 3] = pad[0, 17] = True
        pad[1, 0] = True
    return pad


@pytest.mark.parametrize("kind", ["right", "holes"])
@pytest.mark.parametrize("skip", [False, True])
def test_padding_paths_match_float64_and_write_every_element(kind, skip, blocks):
    """Right padding (the key loops stop at each sample's length, only the last block masked) and
    a mask with holes (the general path: every block masked), with and without
    skip_padded_queries; a fully padded sample and a sample of 5 keys (two of its three query
    blocks padded) included. Outputs and gradients poisoned with NaN before the launches: every
    element is written, and matches float64 math (padded queries: 0 with skip_padded_queries)."""
    blocks((16, 16))
    B, H, T, D, scale = 4, 1, 37, 32, 0.3
    g = torch.Generator().manual_seed(40)
    q, k, v, dout = (torch.randn(B, H, T, D, generator=g) for _ in range(4))
    bias = torch.randn(B, H, T, T, generator=g)
    pad = _padding_case(kind, T)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, H, T), float("nan"))
    attn.flash_forward(q, k, v, pad, bias, scale, out=out, lse=lse, skip_padded_queries=skip)
    bufs = [torch.full_like(x, float("nan")) for x in (q, k, v, bias)]
    attn.flash_backward(dout, q, k, v, pad, bias, out, lse, scale, need_bias_grad=True,
                        dq=bufs[0], dk=bufs[1], dv=bufs[2], dbias=bufs[3],
                        skip_padded_queries=skip)
    want_out, want = _float64_grads(q, k, v, pad, bias, scale, None, 0.0, dout, skip)
    assert not out.isnan().any() and _rel(out, want_out) < 1e-5
    assert not lse.isnan().any()
    for name, got, ref in zip("q k v bias".split(), bufs, want):
        assert not got.isnan().any(), f"d{name} left unwritten elements"
        assert _rel(got, ref) < 1e-5, f"d{name} rel err {_rel(got, ref):.2e}"
    assert out[2].abs().max() == 0 and torch.isinf(lse[2]).all()  # the fully padded sample
    if skip:  # padded queries: zero rows, L = +inf, no gradient
        dead = pad[:, None, :].expand(B, H, T)
        assert out[dead[..., None].expand_as(out)].abs().max() == 0
        assert torch.isinf(lse[dead]).all()
        assert bufs[0][dead[..., None].expand_as(out)].abs().max() == 0


def test_fully_padded_query_blocks_return_zero_with_finite_gradients(blocks):
    """skip_padded_queries with 5 real tokens of 37: query blocks 1 and 2 (rows 16..36) are all
    padding and return at once; the whole output row block is 0, L = +inf, gradients finite and
    zero for the padded queries, keys and values."""
    blocks((16, 16))
    B, H, T, D = 1, 2, 37, 32
    q, k, v = (torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(i))
               .requires_grad_() for i in range(3))
    pad = torch.arange(T)[None, :] >= 5
    out = attention(q, k, v, key_padding_mask=pad, skip_padded_queries=True)
    assert out[:, :, 5:].abs().max() == 0 and out[:, :, :5].abs().min() > 0
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for name, gr in zip("qkv", grads):
        assert torch.isfinite(gr).all(), name
        assert gr[:, :, 5:].abs().max() == 0, f"padded positions got a d{name}"


# ---------------------------------------------------------------------------------------------
# torch.compile: the op pair's fakes declare the layouts the kernels return: no copies


def _aot_graphs(fn, *args):
    """Runs torch.compile(fn, fullgraph) with aot_eager, capturing the forward and backward
    graphs."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    backend = aot_autograd(fw_compiler=capture, bw_compiler=capture)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    out = compiled(*args)
    out.backward(torch.ones_like(out))
    return out, graphs


COPY_OPS = ("clone", "copy", "_to_copy", "contiguous", "as_strided_scatter")


def test_compiled_attention_graph_has_no_copies_around_the_op_pair(blocks):
    """A model's attention: q, k, v are B x T x H x D projections viewed as B x H x T x D, the
    output is transposed back and reshaped. The kernels write out / dq / dk / dv in the inputs'
    memory order and the fakes declare exactly that, so neither graph holds a copy; the real
    ops' strides are the declared ones; results match float64."""
    blocks((16, 16))
    B, T, H, D = 2, 19, 2, 16
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, 3 * H * D, generator=g, requires_grad=True)
    bias = torch.randn(H, T, T, generator=g, requires_grad=True)
    pad = torch.arange(T)[None, :] >= torch.tensor([T, 12])[:, None]

    def layer(x, bias):
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in x.split(H * D, dim=-1))
        out = attention(q, k, v, key_padding_mask=pad, attn_bias=bias)
        return out.transpose(1, 2).reshape(B, T, H * D)

    out, graphs = _aot_graphs(layer, x, bias)
    assert len(graphs) == 2, "expected one forward and one backward graph"
    for gm in graphs:
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert any("d2v.attention" in t for t in targets), targets
        copies = [t for t in targets if any(f"aten.{c}" in t for c in COPY_OPS)]
        assert not copies, f"copies in the compiled graph: {copies}"
    grads = (x.grad.clone(), bias.grad.clone())
    xd, bd = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in xd.split(H * D, dim=-1))
    ref = attention_reference(q, k, v, pad, bd).transpose(1, 2).reshape(B, T, H * D)
    ref.backward(torch.ones_like(ref))
    assert _rel(out, ref) < 1e-5
    assert _rel(grads[0], xd.grad) < 1e-5 and _rel(grads[1], bd.grad) < 1e-5
    # the real op returns the strides its fake declared
    from d2v_kernels import ops
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in x.detach().split(H * D, dim=-1))
    for impl in ("triton", "math"):
        o, lse, keep = ops._attention_forward_op(q, k, v, pad, bias, 0.25, impl, 0.0, False)
        assert o.stride() == attn.new_like(q).stride(), impl
        assert o.transpose(1, 2).is_contiguous(), "out is not in the B x T x H x D order of q"
        dq, dk, dv, db = ops._attention_backward_op(o.transpose(1, 2).contiguous().transpose(1, 2),
                                                    q, k, v, o, lse, pad, bias, 0.25, impl, 0.0,
                                                    keep, False)
        assert [t.stride() for t in (dq, dk, dv)] == [attn.new_like(t).stride() for t in (q, k, v)]
        assert db.is_contiguous() and db.shape == bias.shape


def test_compiled_block_with_dropout_draws_its_seed_inside_the_op_not_in_the_graph(blocks):
    """A training block with attention dropout, compiled: the forward graph holds the d2v op and
    no random op of its own (a CPU randint feeding the op would be a CPU node in a CUDA graph and,
    recorded once, one mask forever). The seed is drawn inside the op, so the same manual seed
    gives the same output, and two steps give two masks."""
    from d2v_engine.models.transformer import Block
    blocks((16, 16))
    B, T, C, H = 2, 19, 32, 2
    torch.manual_seed(0)
    block = Block(C, H, 2 * C, pre_ln=True, attention_dropout=0.3).train()
    x = torch.randn(B, T, C, generator=torch.Generator().manual_seed(1), requires_grad=True)
    pad = torch.arange(T)[None, :] >= torch.tensor([T, 11])[:, None]
    torch.manual_seed(7)
    out, graphs = _aot_graphs(lambda x: block(x, pad)[0], x)
    forward = graphs[0]
    ops = [n.target for n in forward.graph.nodes if n.op == "call_function"]
    assert torch.ops.d2v.attention_forward.default in ops, ops
    seeded = [str(t) for t in ops if isinstance(t, torch._ops.OpOverload)
              and torch.Tag.nondeterministic_seeded in t.tags and t.namespace != "d2v"]
    assert not seeded, f"random ops in the compiled forward graph: {seeded}"
    compiled = torch.compile(lambda x: block(x, pad)[0], backend="aot_eager", fullgraph=True)
    torch.manual_seed(7)
    again = compiled(x)
    assert _rel(again, out) == 0.0, "the same manual seed gave another mask"
    with torch.no_grad():
        plain = block.eval()(x, pad)[0]
    block.train()
    assert _rel(out, plain) > 0.05, "attention dropout did nothing"
    assert _rel(compiled(x), again) > 0.05, "a second step reused the first step's mask"


def test_the_dropout_seed_is_a_device_tensor_the_kernel_loads():
    # No seed value reaches the kernel's signature: a scalar argument would be frozen into a
    # captured CUDA graph (and, specialized, select another binary 1 call in 16).
    from d2v_kernels import attention as module
    fn = module._fwd_kernel.fn  # under the autotuner
    names = [p.name for p in fn.params] if hasattr(fn, "params") else fn.arg_names
    assert "Seed" in names and "seed" not in names, names
    q = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match="1-element int64"):
        module.flash_forward(q, q, q, dropout_p=0.5, seed=torch.tensor([3], dtype=torch.int32))
    a = module.flash_forward(q, q, q, dropout_p=0.5, seed=torch.tensor([3]))[2]
    assert torch.equal(a, module.flash_forward(q, q, q, dropout_p=0.5, seed=3)[2])
