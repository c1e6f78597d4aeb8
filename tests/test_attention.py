"""kernels.attention: the dispatcher, the interpreted Triton kernels and the plain math against an
independent float64 formula."""
import pytest
import torch

from kernels.attention import attention, attention_reference

FNS = [attention, attention_reference]


def _qkv(b, h, t, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g, dtype=dtype).requires_grad_() for _ in range(3)]


def _padding(b, t, lengths):
    return torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]


def _formula(q, k, v, pad, bias, scale):
    scores = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    if pad is not None:
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("fn", FNS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("t", [19, 37])
@pytest.mark.parametrize("batched_bias", [False, True])
def test_attention_matches_float64_formula_with_padding_and_bias(fn, t, batched_bias):
    q, k, v = _qkv(2, 3, t, 16, seed=t)
    pad = _padding(2, t, [t, t - 6])
    g = torch.Generator().manual_seed(100 + t)
    shape = (2, 3, t, t) if batched_bias else (3, t, t)
    bias = torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_()
    out = fn(q, k, v, key_padding_mask=pad, attn_bias=bias)
    expect = _formula(q, k, v, pad, bias, 16 ** -0.5)
    err = (out - expect).abs().max().item()
    assert err < 1e-12, f"{fn.__name__} T={t}: max abs err {err:.3e}"

    grads = torch.autograd.grad((out * expect.detach()).sum(), [q, k, v, bias])
    refs = torch.autograd.grad((expect * expect.detach()).sum(), [q, k, v, bias])
    for name, a, b in zip("qkv", grads, refs):
        gerr = (a - b).abs().max().item()
        assert gerr < 1e-10, f"{fn.__name__} T={t}: d{name} max abs err {gerr:.3e}"
    berr = (grads[3] - refs[3]).abs().max().item()
    assert berr < 1e-10, f"{fn.__name__} T={t}: bias grad max abs err {berr:.3e}"


@pytest.mark.parametrize("t", [19, 37])
def test_attention_dispatch_matches_reference_float32_and_bf16(t):
    q, k, v = _qkv(3, 4, t, 32, seed=7, dtype=torch.float32)
    pad = _padding(3, t, [t, 5, t - 1])
    bias = torch.randn(4, t, t, generator=torch.Generator().manual_seed(8))
    ref = attention_reference(q, k, v, pad, bias, scale=0.1)
    out = attention(q, k, v, pad, bias, scale=0.1)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-5, f"float32 T={t}: rel err {rel:.3e}"
    lo = [x.detach().bfloat16() for x in (q, k, v)]
    out_bf16 = attention(*lo, pad, bias.bfloat16(), scale=0.1).float()
    rel = ((out_bf16 - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, f"bf16 T={t}: rel err {rel:.3e}"


@pytest.mark.parametrize("fn", FNS, ids=lambda f: f.__name__)
def test_fully_padded_rows_give_zero_and_no_nan_gradients(fn):
    q, k, v = _qkv(2, 2, 19, 16, seed=2)
    pad = _padding(2, 19, [19, 0])  # sample 1 is all padding
    bias = torch.randn(2, 19, 19, dtype=torch.float64).requires_grad_()
    out = fn(q, k, v, key_padding_mask=pad, attn_bias=bias)
    assert not torch.isnan(out).any(), f"{fn.__name__}: NaN in the output"
    assert out[1].abs().max().item() == 0, f"{fn.__name__}: padded sample max {out[1].abs().max()}"
    assert out[0].abs().max().item() > 0
    grads = torch.autograd.grad(out.sum(), [q, k, v, bias])
    for name, gr in zip(["q", "k", "v", "bias"], grads):
        assert torch.isfinite(gr).all(), f"{fn.__name__}: non-finite d{name}"
    assert grads[0][1].abs().max().item() == 0, "the empty sample's queries got a gradient"


def test_attention_dropout_is_identity_at_zero_and_changes_output_otherwise():
    q, k, v = _qkv(2, 2, 19, 16, seed=4)
    torch.manual_seed(0)
    a = attention(q, k, v, dropout_p=0.0)
    torch.testing.assert_close(a, attention_reference(q, k, v), rtol=1e-12, atol=1e-12)
    d = attention(q, k, v, dropout_p=0.5)
    assert (d - a).abs().max().item() > 1e-3, "dropout_p=0.5 left the output unchanged"


def test_attention_rejects_bad_shapes():
    q, k, v = _qkv(2, 2, 19, 16, seed=3)
    for fn in FNS:
        with pytest.raises(ValueError, match="key_padding_mask"):
            fn(q, k, v, key_padding_mask=torch.zeros(2, 18, dtype=torch.bool))
        with pytest.raises(ValueError, match="key_padding_mask"):
            fn(q, k, v, key_padding_mask=torch.zeros(2, 19, dtype=torch.long))
        with pytest.raises(ValueError, match="attn_bias"):
            fn(q, k, v, attn_bias=torch.zeros(3, 19, 19, dtype=torch.float64))
        with pytest.raises(ValueError, match="B x H x T x D"):
            fn(q[0], k[0], v[0])


# ----------------------------------------------------------------------------- the Triton path
# Under TRITON_INTERPRET=1 (tests/conftest.py) CPU tensors of fp32/fp16/bf16 take our Triton kernels.
# Each test compares outputs and the gradients of q, k, v and the bias with float64 math on the
# same (rounded) inputs; outputs and gradients are NaN-poisoned first so a skipped store shows.

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check_triton_against_float64(b, h, t, d, dtype, pad_lengths, bias_kind, seed):
    from kernels import attention as attn_mod
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, t, d, generator=g).to(dtype).requires_grad_() for _ in range(3))
    pad = None if pad_lengths is None else _padding(b, t, pad_lengths)
    bias = None
    if bias_kind is not None:
        shape = (h, t, t) if bias_kind == "shared" else (b, h, t, t)
        bias = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    assert attn_mod.attention_backend(q, k, v, pad, bias) == "triton"
    leaves = [x for x in (q, k, v, bias) if x is not None]
    dout = torch.randn(b, h, t, d, generator=g).to(dtype)
    out = attention(q, k, v, key_padding_mask=pad, attn_bias=bias)
    grads = torch.autograd.grad(out, leaves, dout)

    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    q64, k64, v64 = leaves64[:3]
    bias64 = leaves64[3] if bias is not None else None
    # A fully padded sample attends to nothing: its rows are 0 with zero gradient (the formula runs
    # it unpadded, and masked_fill cuts both the value and the gradient).
    empty = None if pad is None else pad.all(dim=1)
    formula_pad = None if pad is None else pad & ~empty[:, None]
    expect = _formula(q64, k64, v64, formula_pad, bias64, d ** -0.5)
    if pad is not None:
        expect = expect.masked_fill(empty[:, None, None, None], 0.0)
    refs = torch.autograd.grad(expect, leaves64, dout.double())
    tol = TOL[dtype]
    label = f"{dtype} T={t} pad={pad_lengths} bias={bias_kind}"
    assert out.dtype == dtype
    assert _rel(out, expect) < tol, f"{label}: out rel err {_rel(out, expect):.3e}"
    for name, a, r in zip(["q", "k", "v", "bias"], grads, refs):
        assert torch.isfinite(a).all(), f"{label}: non-finite d{name}"
        # fp32 gradients sum T products more than the output: 4x the output tolerance
        assert _rel(a, r) < 4 * tol, f"{label}: d{name} rel err {_rel(a, r):.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("t", [19, 37])
@pytest.mark.parametrize("case", ["plain", "pad", "pad+shared_bias", "batched_bias"])
def test_triton_forward_backward_match_float64(dtype, t, case):
    pad = [t, t - 6] if "pad" in case else None
    bias = "shared" if "shared" in case else ("batched" if "batched" in case else None)
    _check_triton_against_float64(2, 2, t, 32, dtype, pad, bias, seed=t + len(case))


@pytest.mark.parametrize("case", ["pad+shared_bias", "pad+batched_bias"])
def test_triton_multi_block_paths(monkeypatch, case):
    """Blocks of 16 split T=37 into 3 query and 3 key blocks (the online rescaling, the partial last
    block, and the dbias kernel's loop over the batch all run)."""
    from kernels import attention as attn_mod
    monkeypatch.setattr(attn_mod, "INTERPRET_BLOCKS", (16, 16))
    bias = "shared" if "shared" in case else "batched"
    _check_triton_against_float64(3, 2, 37, 32, torch.float32, [37, 20, 0], bias, seed=11)


def test_triton_image_sequence_length_197():
    """data2vec's image length (196 patches + CLS), D=64, shared relative position bias, padding."""
    _check_triton_against_float64(2, 1, 197, 64, torch.float32, [197, 150], "shared", seed=197)


@pytest.mark.parametrize("d", [32, 64, 128])
def test_triton_head_dims(d):
    _check_triton_against_float64(1, 2, 19, d, torch.bfloat16, None, None, seed=d)


def test_triton_fully_padded_sample_gives_zero_and_finite_gradients(monkeypatch):
    from kernels import attention as attn_mod
    monkeypatch.setattr(attn_mod, "INTERPRET_BLOCKS", (16, 16))
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 2, 19, 16, generator=g).requires_grad_() for _ in range(3))
    bias = torch.randn(2, 19, 19, generator=g).requires_grad_()
    pad = _padding(2, 19, [19, 0])
    out = attention(q, k, v, key_padding_mask=pad, attn_bias=bias)
    assert out[1].abs().max().item() == 0 and torch.isfinite(out).all()
    grads = torch.autograd.grad(out.sum(), [q, k, v, bias])
    for name, gr in zip(["q", "k", "v", "bias"], grads):
        assert torch.isfinite(gr).all(), f"non-finite d{name}"
    assert grads[0][1].abs().max().item() == 0


def test_triton_dropout_is_reproducible_and_its_gradient_matches_the_same_mask():
    """Same seed -> same output; the backward uses the forward's dropout mask."""
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 37, 16, generator=g) for _ in range(3))
    torch.manual_seed(3)
    a = attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(3)
    b = attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b)
    assert 0 < (a - attention(q, k, v)).abs().max().item()
    # out = P_drop v is linear in v, so <out, dout> = <v, P_drop^T dout> = <v, dv> holds only if
    # the backward regenerated the forward's dropout mask.
    vv = v.clone().requires_grad_()
    dout = torch.randn(1, 2, 37, 16, generator=g)
    torch.manual_seed(4)
    out = attention(q, k, vv, dropout_p=0.3)
    (dv,) = torch.autograd.grad(out, [vv], dout)
    expect_out = out.detach()
    assert torch.isfinite(dv).all()
    # linearity: out(v) for the same seed is exactly P_drop v, so <out, dout> = <v, dv>
    torch.testing.assert_close((expect_out * dout).sum(), (vv.detach() * dv).sum(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias_kind", ["shared", "batched"])
def test_triton_kernels_write_every_element_of_nan_poisoned_outputs(monkeypatch, bias_kind):
    """flash_forward / flash_backward into NaN-filled buffers: every element gets written (a missed
    tail block or padded row would stay NaN) and matches the float64 formula."""
    from kernels import attention as attn_mod
    monkeypatch.setattr(attn_mod, "INTERPRET_BLOCKS", (16, 16))
    g = torch.Generator().manual_seed(21)
    b, h, t, d = 3, 2, 37, 32
    q, k, v, dout = (torch.randn(b, h, t, d, generator=g) for _ in range(4))
    bias = torch.randn((h, t, t) if bias_kind == "shared" else (b, h, t, t), generator=g)
    pad = _padding(b, t, [t, 20, 0])
    nan = lambda x: torch.full_like(x, float("nan"))  # noqa: E731
    out, lse = attn_mod.flash_forward(q, k, v, pad, bias, d ** -0.5, out=nan(q),
                                      lse=torch.full((b, h, t), float("nan")))
    grads = attn_mod.flash_backward(dout, q, k, v, pad, bias, out, lse, d ** -0.5,
                                    need_bias_grad=True, dq=nan(q), dk=nan(k), dv=nan(v),
                                    dbias=nan(bias))
    leaves = [x.double().requires_grad_() for x in (q, k, v, bias)]
    live = pad & ~pad.all(dim=1)[:, None]
    expect = _formula(*leaves[:3], live, leaves[3], d ** -0.5)
    expect = expect.masked_fill(pad.all(dim=1)[:, None, None, None], 0.0)
    refs = torch.autograd.grad(expect, leaves, dout.double())
    assert not torch.isnan(out).any() and _rel(out, expect) < 1e-5
    for name, a, r in zip(["q", "k", "v", "bias"], grads, refs):
        assert not torch.isnan(a).any(), f"d{name} has unwritten (NaN) elements"
        assert _rel(a, r) < 4e-5, f"d{name} rel err {_rel(a, r):.3e}"
