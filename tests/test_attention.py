"""kernels.attention: the SDPA dispatcher against the plain math and an independent float64 formula."""
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
