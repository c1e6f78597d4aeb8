"""Every Triton kernel compiled for the GPU, on CUDA tensors, against float64 / reference math at
data2vec's shapes: attention (output, log-sum-exp, gradients of q, k, v and the bias, dropout),
teacher targets (every norm mode, padding, K = 6/8/10, C = 768) and masking (bit for bit at the
base configs' full batches). The CUDA C++ targets extension has its own module,
tests/test_targets_cuda.py.

The rest of the suite runs these kernels under TRITON_INTERPRET=1 on CPU tensors, whose numerics
are not those of compiled code (the interpreter's bf16 tl.dot is wrong, for one). conftest.py sets
the interpreter only where no CUDA device exists; here every test needs CUDA and is skipped, with
that reason, everywhere else.

Outputs are poisoned (NaN, or bytes that are neither False nor True) before each launch, so an
element a kernel forgets fails the test instead of passing as zero.
"""
import math
import os
from pathlib import Path

import pytest
import torch

from d2v_engine.config import load_config
from d2v_kernels import attention as attn
from d2v_kernels import masking, ops, targets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ROOT = Path(__file__).resolve().parent.parent
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# fp32 attention: every autotune config spills on sm_90 and compiles for 19-63 s; training runs
# attention in bf16, so make gpu-check runs these only when asked (--fp32; the marker below).
fp32_attention = pytest.mark.fp32_attention
ATTENTION_DTYPES = [torch.bfloat16, torch.float16,
                    pytest.param(torch.float32, marks=fp32_attention)]
LN2 = math.log(2.0)


def rel(got, want):
    """Norm-relative error against the float64 value."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def test_kernels_are_compiled_not_interpreted():
    assert os.environ.get("TRITON_INTERPRET") != "1", (
        "TRITON_INTERPRET=1 is set on a CUDA machine: the kernels would run interpreted")
    from triton.runtime.jit import JITFunction
    kernels = [attn._fwd_kernel.fn, attn._bwd_dkdv_kernel.fn, attn._bwd_dq_kernel.fn,
               attn._bwd_dbias_kernel.fn, attn._delta_kernel, targets._instance_kernel,
               targets._combine_kernel, masking._span_kernel, masking._trim_kernel,
               masking._token_kernel, masking._beit_block_kernel, masking._inverse_block_kernel]
    assert all(type(k) is JITFunction for k in kernels), [type(k).__name__ for k in kernels]


# ---------------------------------------------------------------------------------------------
# Attention
#
# Tolerances (norm-relative, against float64 math on the same rounded inputs):
#   log-sum-exp   1e-5 for every dtype: the logits are fp32 dot products of exactly representable
#                 16-bit (or fp32) inputs and the softmax statistics are fp32, so no 16-bit rounding
#                 enters it; what remains is fp32 summation over D = 64 terms and T keys.
#   fp32          1e-5: IEEE fp32 dots (never TF32) with fp32 accumulation; errors of a few ulp
#                 (6e-8 each) over at most T = 750 terms stay near 1e-6.
#   fp16 / bf16   1e-2 / 2e-2: the probabilities and dS are rounded to the input dtype before
#                 their matmuls (2^-11 / 2^-8 relative per element, 4.9e-4 / 3.9e-3) and so is the
#                 output; independent roundings add in norm to about that size, and dS = P (dP -
#                 delta) loses up to a few bits to cancellation. The bounds are ~5x the per-element
#                 rounding of each dtype.

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}
LSE_TOL = 1e-5

# (name, B, H, T, D, bias, padded fraction, dropout): the shapes data2vec trains at.
ATTENTION_CASES = [
    ("plain", 64, 12, 197, 64, None, 0.0, 0.0),  # image v2, the EMA teachers: the larger tiles
    ("image_v1", 32, 12, 197, 64, "shared", 0.0, 0.05),  # BEiT relative position bias
    ("audio", 16, 12, 750, 64, None, 0.3, 0.1),
    ("text", 32, 12, 512, 64, None, 0.2, 0.0),
]


def attention_inputs(B, H, T, D, bias, pad_frac, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device, dtype) for _ in range(3))
    pad = None
    if pad_frac > 0:
        # lengths uniform in [T (1 - 2 frac), T]: frac of the keys padded on average; sample 0 full
        lengths = torch.randint(int(T * (1 - 2 * pad_frac)), T + 1, (B,), generator=g)
        lengths[0] = T
        pad = (torch.arange(T)[None, :] >= lengths[:, None]).to(device)
    b = None
    if bias == "shared":
        b = torch.randn(H, T, T, generator=g).to(device, dtype)
    elif bias == "batched":
        b = torch.randn(B, H, T, T, generator=g).to(device, dtype)
    dout = torch.randn(B, H, T, D, generator=g).to(device, dtype)
    return q, k, v, pad, b, dout


def attention_float64(q, k, v, pad, bias, scale, keep, p):
    """Float64 leaves and (out, lse base 2) of softmax(q k^T scale + bias) with the keep mask."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    bias_leaf = None if bias is None else bias.detach().double().requires_grad_()
    s = leaves[0] @ leaves[1].transpose(-1, -2) * scale
    if bias_leaf is not None:
        s = s + bias_leaf
    if pad is not None:
        s = s.masked_fill(pad[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1) / LN2
    probs = torch.softmax(s, -1)
    if p > 0:  # the realized drop probability: a multiple of 2^-16
        probs = probs * keep / (1.0 - attn.dropout_threshold(p)[0] / 65536)
    return leaves, bias_leaf, probs @ leaves[2], lse


def run_attention_case(B, H, T, D, bias, pad_frac, p, dtype, device, seed=1234):
    """Forward and backward of the compiled kernels vs float64; returns the keep mask (the bits
    the forward stored, unpacked)."""
    q, k, v, pad, b, dout = attention_inputs(B, H, T, D, bias, pad_frac, dtype, device)
    if b is not None:
        b = b.float()  # the model's relative position bias is an fp32 parameter
    scale = D ** -0.5
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, H, T), float("nan"), device=device)
    _, _, keep_bits = attn.flash_forward(q, k, v, pad, b, scale, p, seed, out=out, lse=lse)
    grads = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    dbias = None if b is None else torch.full_like(b, float("nan"))
    dq, dk, dv, dbias = attn.flash_backward(dout, q, k, v, pad, b, out, lse, scale, p, keep_bits,
                                            need_bias_grad=b is not None, dq=grads[0],
                                            dk=grads[1], dv=grads[2], dbias=dbias)
    keep = attn.unpack_dropout_mask(keep_bits, T, T) if p > 0 else None
    leaves, bias_leaf, want, want_lse = attention_float64(q, k, v, pad, b, scale, keep, p)
    want.backward(dout.double())
    tol = TOL[dtype]
    assert out.dtype == dtype and not out.isnan().any(), "output has unwritten (NaN) elements"
    assert rel(out, want) < tol, f"out rel err {rel(out, want):.2e} >= {tol}"
    assert not lse.isnan().any() and rel(lse, want_lse) < LSE_TOL, (
        f"lse rel err {rel(lse, want_lse):.2e} >= {LSE_TOL}")
    pairs = [("dq", dq, leaves[0]), ("dk", dk, leaves[1]), ("dv", dv, leaves[2])]
    if b is not None:
        pairs.append(("dbias", dbias, bias_leaf))
    for name, got, leaf in pairs:
        want_dtype = b.dtype if name == "dbias" else dtype
        assert got.dtype == want_dtype and not got.isnan().any(), f"{name} has unwritten elements"
        err = rel(got, leaf.grad)
        assert err < tol, f"{name} rel err {err:.2e} >= {tol}"
    return keep


@pytest.mark.parametrize("dtype", ATTENTION_DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=lambda c: c[0])
def test_attention_forward_lse_and_grads_match_float64(case, dtype):
    """Output, LSE and the q/k/v/bias gradients at the training shapes. With dropout the float64
    reference applies the bit-packed mask the forward stored: a match of the forward *and* of
    every gradient means the dK/dV (with d(bias)) and dQ kernels read the mask the forward
    applied."""
    _, B, H, T, D, bias, pad_frac, p = case
    run_attention_case(B, H, T, D, bias, pad_frac, p, dtype, "cuda")


def test_attention_batched_bias_grads_match_float64():
    """A B x H x T x T bias (its gradient is stored by the dK/dV kernel), bf16, with dropout."""
    run_attention_case(8, 12, 197, 64, "batched", 0.2, 0.1, torch.bfloat16, "cuda")


def test_shared_bias_grad_partials_match_float64_chunk_sums():
    """The shared bias's gradient over 3 batch chunks at image v1's T = 197 with dropout: each
    fp32 partial is the float64 sum of the per-sample dS over its chunk's samples."""
    B, H, T, D, p = 8, 12, 197, 64, 0.05
    q, k, v, _, b, dout = attention_inputs(B, H, T, D, "shared", 0.0, torch.bfloat16, "cuda")
    b = b.float()
    out, lse, bits = attn.flash_forward(q, k, v, None, b, D ** -0.5, p, 3)
    partial = torch.full((3, H, T, T), float("nan"), device="cuda")
    _, _, _, dbias = attn.flash_backward(dout, q, k, v, None, b, out, lse, D ** -0.5, p, bits,
                                         need_bias_grad=True, dbias_partial=partial)
    keep = attn.unpack_dropout_mask(bits, T, T)
    _, per_sample, want, _ = attention_float64(q, k, v, None, b.expand(B, H, T, T), D ** -0.5,
                                               keep, p)  # a bias leaf per sample
    (grads,) = torch.autograd.grad(want, per_sample, dout.double())
    for c, rows in enumerate([range(0, 3), range(3, 6), range(6, 8)]):
        assert rel(partial[c], grads[list(rows)].sum(0)) < TOL[torch.bfloat16], c
    assert torch.equal(dbias, partial.sum(0))


@pytest.mark.parametrize("backend", ["flex", "sdpa_efficient", "sdpa_math"])
def test_attention_peers_match_float64_with_bias_and_padding(backend):
    """The dispatcher's other candidates compute the same attention (bf16, bias and padding)."""
    q, k, v, pad, b, dout = attention_inputs(4, 12, 197, 64, "shared", 0.2, torch.bfloat16,
                                             "cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    bias = b.float().requires_grad_()
    out = attn.run_backend(backend, *leaves, pad, bias, None, 0.0)
    grads = torch.autograd.grad(out, leaves + [bias], dout)
    ref_leaves, ref_bias, want, _ = attention_float64(q, k, v, pad, b.float(), 64 ** -0.5, None,
                                                      0.0)
    refs = torch.autograd.grad(want, ref_leaves + [ref_bias], dout.double())
    assert rel(out, want) < TOL[torch.bfloat16]
    for name, got, ref in zip(["q", "k", "v", "bias"], grads, refs):
        assert rel(got, ref) < 3 * TOL[torch.bfloat16], name


def test_measured_dispatch_keeps_the_fastest_candidate():
    """On CUDA the first call of a shape times every candidate; the pick is the fastest of those
    timed and later calls run it."""
    from d2v_kernels import attention_dispatch
    attention_dispatch.reset()
    q, k, v, pad, _, _ = attention_inputs(4, 12, 197, 64, None, 0.2, torch.bfloat16, "cuda")
    out = ops.attention(q, k, v, key_padding_mask=pad)
    (record,) = attention_dispatch.picks().values()
    assert record["ms"] and all(math.isfinite(ms) for ms in record["ms"].values())
    assert record["backend"] == min(record["ms"], key=record["ms"].get)
    assert "triton" in record["ms"], record["skipped"].get("triton")
    assert rel(out, attn.attention_reference(q.double(), k.double(), v.double(), pad)) < 2e-2
    attention_dispatch.reset()


def keep_mask(B, H, T, seed, p, device):
    """The keep mask the forward draws for (seed, p) at B x H x T x T, unpacked."""
    q = torch.randn(B, H, T, 64, device=device, dtype=torch.bfloat16)
    _, _, bits = attn.flash_forward(q, q, q, None, None, 0.125, p, seed)
    return attn.unpack_dropout_mask(bits, T, T)


@pytest.mark.parametrize("p", [0.05, 0.1])
def test_attention_dropout_keep_rate_and_independence(p):
    """Keep rate within 6 standard deviations of 1 - p over all B*H*T*T draws (a binomial: std
    sqrt(p (1 - p) / N); p is realized to 2^-16); different heads, samples and seeds draw
    different masks; the same seed redraws the same mask."""
    B, H, T = 16, 12, 197
    keep = keep_mask(B, H, T, 77, p, "cuda")
    n = keep.numel()
    rate = keep.double().mean().item()
    assert abs(rate - (1 - p)) < 6 * math.sqrt(p * (1 - p) / n), f"keep rate {rate} for p={p}"
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert torch.equal(keep, keep_mask(B, H, T, 77, p, "cuda"))
    assert not torch.equal(keep, keep_mask(B, H, T, 78, p, "cuda"))
    # per-row rates stay binomial too: no row is all kept or all dropped at T = 197
    per_row = keep.double().mean(-1)
    assert per_row.min() > 0 and per_row.max() < 1


@fp32_attention
def test_attention_dropout_mask_is_the_one_the_forward_applied():
    """v = identity: the forward's output is P * keep / (1 - p), so the mask it applied can be
    read off its output; it is the bit-packed mask it stored (which the backward reads, as
    test_attention_forward_lse_and_grads_match_float64 checks through the gradients)."""
    B, H, T, D, p = 4, 12, 128, 128, 0.1
    q, k, _, _, _, _ = attention_inputs(B, H, T, 64, None, 0.0, torch.float32, "cuda")
    q, k = (torch.nn.functional.pad(t, (0, D - 64)) for t in (q, k))  # the same scores
    eye = torch.eye(T, D, device="cuda").expand(B, H, T, D).contiguous()
    out, _, bits = attn.flash_forward(q, k, eye, None, None, 64 ** -0.5, p, 9)
    assert torch.equal(out[..., :T] != 0, attn.unpack_dropout_mask(bits, T, T))


def test_attention_dropout_output_scales_by_one_over_keep():
    """v = 1 everywhere: each output row is sum_j P_ij keep_ij / (1 - p), whose mean over many rows
    is 1; rows differ from 1 only by the dropped probability mass. In bf16, the training dtype:
    its output rounding (2^-8 relative) averages out over the 18,912 rows."""
    B, H, T, D, p = 8, 12, 197, 64, 0.1
    q, k, _, _, _, _ = attention_inputs(B, H, T, D, None, 0.0, torch.bfloat16, "cuda")
    v = torch.ones_like(q)
    out, _, _ = attn.flash_forward(q, k, v, None, None, D ** -0.5, p, 5)
    mean = out[..., 0].double().mean().item()
    assert abs(mean - 1) < 0.01, f"mean output {mean}: inverted dropout must be unbiased"
    assert out[..., 0].std() > 0.01, "dropout changed nothing"


# ---------------------------------------------------------------------------------------------
# Teacher targets
#
# Tolerance: 1e-5 relative (max |error| / max |target|) for every input dtype: the kernels load
# each element once, widen it to fp32 and do all statistics and sums in fp32, as the reference
# does after its own .float(); only the order of the fp32 sums differs (a few ulp).

TARGETS_TOL = 1e-5
NORM_PAIRS = [(a, b) for a in targets.NORMS for b in targets.NORMS]


def layers_and_padding(k, b, t, c, dtype, pad, seed):
    g = torch.Generator().manual_seed(seed)
    layers = []
    for _ in range(k):
        mean = torch.randn(1, 1, c, generator=g) * 3.0
        scale = torch.rand(1, 1, c, generator=g) * 2.5 + 0.5
        layers.append((torch.randn(b, t, c, generator=g) * scale + mean).to("cuda", dtype))
    mask = None
    if pad:
        lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
        lengths[0], lengths[-1] = t, 3
        mask = (torch.arange(t)[None, :] >= lengths[:, None]).cuda()
    return layers, mask


def check_targets(layers, pad, layer_norm, final_norm, padding="exclude"):
    b, t, c = layers[0].shape
    out = torch.full((b, t, c), float("nan"), device="cuda")
    got = targets._teacher_targets_triton(layers, pad, layer_norm, final_norm, 1e-5, padding,
                                          out=out)
    want = targets.teacher_targets_reference(layers, pad, layer_norm, final_norm,
                                             instance_norm_padding=padding)
    what = f"{layer_norm}/{final_norm}/{padding} {layers[0].dtype} K={len(layers)} {b}x{t}x{c}"
    assert got is out and not out.isnan().any(), f"{what}: unwritten (NaN) elements"
    err = ((out - want).abs().max() / want.abs().max()).item()
    assert err < TARGETS_TOL, f"{what}: rel err {err:.2e}"
    if pad is not None:
        assert (out[pad] == 0).all(), f"{what}: padded steps must be 0"


@pytest.mark.parametrize("padding", targets.INSTANCE_NORM_PADDING)
@pytest.mark.parametrize("layer_norm,final_norm", NORM_PAIRS)
def test_targets_every_norm_pair_with_padding(layer_norm, final_norm, padding):
    layers, pad = layers_and_padding(8, 16, 197, 768, torch.bfloat16, True, seed=1)
    check_targets(layers, pad, layer_norm, final_norm, padding)


# (name, K, B, T, layer_norm, final_norm, padded): each base config's targets, C = 768.
TARGET_CASES = [
    ("image_v1", 6, 256, 197, "none", "layer", False),
    ("image_v2", 10, 256, 197, "instance", "layer", False),
    ("audio", 8, 16, 999, "instance", "none", True),
    ("text", 10, 16, 512, "layer", "none", True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", TARGET_CASES, ids=lambda c: c[0])
def test_targets_match_reference_at_base_shapes(case, dtype):
    _, k, b, t, layer_norm, final_norm, padded = case
    layers, pad = layers_and_padding(k, b, t, 768, dtype, padded, seed=k)
    check_targets(layers, pad, layer_norm, final_norm)


# ---------------------------------------------------------------------------------------------
# Masking: the kernels and the references are integer arithmetic, so they must agree bit for
# bit; the reference runs on the CPU (masks are the same on every device).


def config(name):
    return load_config(ROOT / "configs" / f"{name}.yaml")


def batch_seeds(n, seed):
    return torch.randint(-2**62, 2**62, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["audio_base", "audio_v2"])
def test_span_mask_bit_identical_at_base_batch(name):
    cfg = config(name)
    m = cfg.masking
    clones = cfg.objective.clone_batch if cfg.objective.mode == "v2" else 1
    batch, frames = cfg.train.micro_batch * clones, 999  # 320000 samples -> 999 frames
    g = torch.Generator().manual_seed(3)
    lengths = torch.randint(frames // 10, frames + 1, (batch,), generator=g)
    lengths[0] = frames
    s = batch_seeds(batch, 4)
    args = (lengths, frames, m.mask_prob, m.mask_length, m.min_masks, s, m.require_same_masks)
    out = torch.full((batch, frames), 2, dtype=torch.uint8, device="cuda").view(torch.bool)
    got = masking._span_mask_triton(lengths.cuda(), *args[1:5], s.cuda(), args[6], out=out)
    assert got.view(torch.uint8).max() <= 1, "kernel left poisoned elements"
    want = masking.span_mask_reference(*args)
    assert torch.equal(got.cpu(), want), f"{(got.cpu() != want).sum().item()} elements differ"


@pytest.mark.parametrize("name", ["image_base", "image_v2"])
def test_block_mask_bit_identical_at_base_batch(name):
    cfg = config(name)
    m = cfg.masking
    inverse = cfg.objective.mode == "v2"
    clones = cfg.objective.clone_batch if inverse else 1
    batch = cfg.train.micro_batch * clones
    side = cfg.model.img_size // cfg.model.patch_size
    s = batch_seeds(batch, 5)
    args = masking._check_block(batch, (side, side), m.mask_prob, s.cuda(), m.min_block, inverse,
                                None, m.mask_length, m.mask_prob_adjust)
    out = torch.full((batch, side * side), 0xAA, dtype=torch.uint8, device="cuda")
    masking._block_mask_triton(*args, out=out.view(torch.bool))
    assert out.max() <= 1, "kernel left poisoned elements"
    want = masking.block_mask_reference(batch, (side, side), m.mask_prob, seed=s,
                                        min_block=m.min_block, inverse=inverse,
                                        inverse_length=m.mask_length,
                                        inverse_adjust=m.mask_prob_adjust)
    assert torch.equal(out.cpu().bool(), want), f"{(out.cpu().bool() != want).sum()} differ"


@pytest.mark.parametrize("name", ["text_base", "text_v2"])
def test_token_mask_bit_identical_at_base_batch(name):
    cfg = config(name)
    m = cfg.masking
    clones = cfg.objective.clone_batch if cfg.objective.mode == "v2" else 1
    batch, length, vocab = cfg.train.micro_batch * clones, cfg.data.max_tokens, cfg.model.vocab_size
    bos, pad_id, eos, unk, mask_id = 0, 1, 2, 3, vocab - 1
    g = torch.Generator().manual_seed(6)
    tokens = torch.randint(4, vocab - 1, (batch, length), generator=g)
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=g)
    lengths[0] = length
    pos = torch.arange(length)[None, :]
    tokens[:, 0] = bos
    tokens = torch.where(pos == lengths[:, None] - 1, eos, tokens)
    tokens = torch.where(pos >= lengths[:, None], pad_id, tokens)
    special = (tokens == bos) | (tokens == eos) | (tokens == pad_id)
    s = batch_seeds(batch, 7)
    exclude = (bos, pad_id, eos, unk, mask_id)
    cuda_args = masking._check_token(tokens.cuda(), m.mask_prob, special.cuda(), mask_id, vocab,
                                     s.cuda(), m.mask_length, tuple(m.replace), exclude)
    out = torch.full_like(tokens, -1, device="cuda")
    sel = torch.full((batch, length), 2, dtype=torch.uint8, device="cuda").view(torch.bool)
    got, got_sel = masking._token_mask_triton(*cuda_args, out=out, selected=sel)
    assert (got >= 0).all() and got_sel.view(torch.uint8).max() <= 1, "poisoned elements left"
    want, want_sel = masking.token_mask_reference(tokens, m.mask_prob, special, mask_id, vocab, s,
                                                  m.mask_length, tuple(m.replace), exclude)
    assert torch.equal(got.cpu(), want), f"{(got.cpu() != want).sum()} tokens differ"
    assert torch.equal(got_sel.cpu(), want_sel), f"{(got_sel.cpu() != want_sel).sum()} differ"


# ---------------------------------------------------------------------------------------------
# Host traffic: the step's host-made tensors reach the GPU without a host synchronization


def test_seed_copies_do_not_synchronize_the_host():
    """The trainer's per-micro-batch seeds and the masks' int-seed path copy through pinned memory
    (non_blocking); a copy from pageable memory would synchronize, which sync-debug mode turns
    into an error. Each op runs once first: compilation and cached tables may synchronize."""
    from d2v_engine.seeding import STREAM_MASK, sample_seeds
    from d2v_engine.run.mask_ahead import host_to_device
    lengths = torch.full((4,), 60, device="cuda")

    def step():
        seeds = host_to_device(sample_seeds(1, 2, torch.arange(4), STREAM_MASK),
                               torch.device("cuda"))
        masking.span_mask(lengths, 60, 0.5, 5, seed=7)
        masking.block_mask(4, (14, 14), 0.6, seed=7, device="cuda")
        masking.span_mask(lengths, 60, 0.5, 5, seed=seeds)
        return seeds

    want = step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, want) and torch.equal(got.cpu(), sample_seeds(1, 2, range(4),
                                                                          STREAM_MASK))
