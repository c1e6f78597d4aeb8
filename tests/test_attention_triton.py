"""The Triton flash attention (interpreted on CPU) against float64 math: output and the gradients
of q, k, v and the additive bias, with key padding, both bias layouts, odd lengths, every dtype."""
import os

import pytest
import torch

from kernels.attention import attention, attention_backend, attention_reference

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
