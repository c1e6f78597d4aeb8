"""d2v_kernels.attention: the dispatcher, the interpreted Triton kernels and the plain math against an
independent float64 formula."""
import os
import time
from pathlib import Path

import pytest
import torch

from d2v_kernels.attention import attention_reference
from d2v_kernels.ops import attention

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
# conftest sets TRITON_INTERPRET=1: CPU fp16/bf16/fp32 tensors run the Triton kernels interpreted.
# Outputs and gradients are compared with float64 math on the same (rounded) inputs.
from d2v_kernels import attention as attention_module  # noqa: E402
from d2v_kernels.attention import flash_backward, flash_forward  # noqa: E402
from d2v_kernels.attention_dispatch import attention_backend  # noqa: E402

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
INTERPRETER = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="runs the Triton interpreter on CPU tensors (set only "
                                 "without CUDA); tests/test_cuda_kernels.py runs these kernels "
                                 "compiled")


@pytest.fixture
def blocks(monkeypatch):
    """Sets the interpreter's (BLOCK_M, BLOCK_N); None: one tile per sequence."""
    return lambda b: monkeypatch.setattr(attention_module, "INTERPRET_BLOCKS", b)


def _inputs(b, h, tq, tk, d, dtype, lengths, bias_kind, seed, bias_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g).to(dtype).requires_grad_()
    k, v = [torch.randn(b, h, tk, d, generator=g).to(dtype).requires_grad_() for _ in range(2)]
    pad = None if lengths is None else _padding(b, tk, lengths)
    bias = None
    if bias_kind is not None:
        shape = (h, tq, tk) if bias_kind == "shared" else (b, h, tq, tk)
        bias = torch.randn(shape, generator=g).to(bias_dtype).requires_grad_()
    return q, k, v, pad, bias


def _empty_safe_formula(q, k, v, pad, bias, scale):
    """float64 math with rows of no admissible key set to 0 (the contract), as a leaf graph."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.double()
    if pad is not None:
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), -1).masked_fill(empty, 0.0)
    return probs @ v.double()


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


CASES = [  # B, H, Tq, Tk, D, dtype, key lengths, bias, interpreter blocks
    (2, 2, 19, 19, 32, torch.float32, None, None, (32, 16)),
    (2, 2, 37, 37, 64, torch.float32, [37, 30], "shared", (32, 16)),
    (2, 1, 37, 37, 32, torch.float32, [25, 37], "batched", (16, 16)),
    (1, 2, 19, 37, 32, torch.float32, [30], "batched", (16, 16)),
    (1, 1, 19, 19, 128, torch.float32, None, "shared", None),
    (2, 2, 19, 19, 64, torch.bfloat16, [19, 11], "shared", None),
    (2, 1, 37, 37, 32, torch.float16, [37, 20], "batched", (32, 16)),
    (1, 1, 197, 197, 64, torch.bfloat16, [150], "shared", (64, 64)),
]


@INTERPRETER
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[2]}x{c[3]}-D{c[4]}-{str(c[5])[6:]}"
                         f"-{'pad' if c[6] else 'nopad'}-{c[7]}")
def test_triton_output_and_grads_match_float64_math(case, blocks):
    b, h, tq, tk, d, dtype, lengths, bias_kind, block = case
    blocks(block)
    q, k, v, pad, bias = _inputs(b, h, tq, tk, d, dtype, lengths, bias_kind, seed=tq * d)
    assert attention_backend(q, k, v, pad, bias) == "triton"
    out = attention(q, k, v, key_padding_mask=pad, attn_bias=bias, scale=0.3)
    expect = _empty_safe_formula(q, k, v, pad, bias, 0.3)
    assert out.dtype == dtype and out.shape == (b, h, tq, d)
    tol = TOL[dtype]
    assert _rel(out, expect) < tol, f"{case}: output rel err {_rel(out, expect):.2e}"
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    leaves = [x for x in (q, k, v, bias) if x is not None]
    grads = torch.autograd.grad(out, leaves, dout)
    refs = torch.autograd.grad(expect, leaves, dout.double())
    for name, got, want in zip(["q", "k", "v", "bias"], grads, refs):
        assert got.dtype == want.dtype or got.dtype in (dtype, torch.float32)
        assert torch.isfinite(got).all(), f"{case}: non-finite d{name}"
        assert _rel(got, want) < tol, f"{case}: d{name} rel err {_rel(got, want):.2e}"


@INTERPRETER
@pytest.mark.parametrize("bias_kind", ["shared", "batched"])
def test_triton_writes_every_output_element_of_poisoned_buffers(bias_kind, blocks):
    """A missed tail block, padded row or bias tile would stay NaN."""
    blocks((16, 16))
    q, k, v, pad, bias = _inputs(3, 2, 37, 37, 32, torch.float32, [37, 0, 21], bias_kind, seed=9)
    q, k, v, bias = (x.detach() for x in (q, k, v, bias))
    out = torch.full_like(q, float("nan"))
    lse = torch.full((3, 2, 37), float("nan"))
    flash_forward(q, k, v, pad, bias, 0.2, out=out, lse=lse)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    expect = _empty_safe_formula(q, k, v, pad, bias, 0.2)
    assert _rel(out, expect) < 1e-5
    dout = torch.randn_like(out)
    bufs = [torch.full_like(x, float("nan")) for x in (q, k, v, bias)]
    flash_backward(dout, q, k, v, pad, bias, out, lse, 0.2, need_bias_grad=True, dq=bufs[0],
                   dk=bufs[1], dv=bufs[2], dbias=bufs[3])
    leaves = [x.clone().requires_grad_() for x in (q, k, v, bias)]
    refs = torch.autograd.grad(_empty_safe_formula(*leaves[:3], pad, leaves[3], 0.2), leaves,
                               dout.double())
    for name, got, want in zip(["q", "k", "v", "bias"], bufs, refs):
        assert not torch.isnan(got).any(), f"d{name} left NaN (unwritten) elements"
        assert _rel(got, want) < 1e-5, f"d{name} rel err {_rel(got, want):.2e}"


@INTERPRETER
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_fully_padded_rows_give_zero_output_and_finite_grads(dtype, blocks):
    blocks((16, 16))
    q, k, v, pad, bias = _inputs(2, 2, 19, 19, 32, dtype, [19, 0], "shared", seed=3)
    with torch.no_grad():  # a bias row of -inf also leaves its query without keys
        bias[1, 4] = float("-inf")
    out = attention(q, k, v, key_padding_mask=pad, attn_bias=bias)
    assert not torch.isnan(out).any()
    assert out[1].abs().max().item() == 0, "the all-padding sample's output is not 0"
    assert out[0, 1, 4].abs().max().item() == 0, "the all -inf bias row's output is not 0"
    assert out[0, 0].abs().max().item() > 0
    grads = torch.autograd.grad(out.float().square().sum(), [q, k, v, bias])
    for name, gr in zip(["q", "k", "v", "bias"], grads):
        assert torch.isfinite(gr).all(), f"non-finite d{name}"
    assert grads[0][1].abs().max().item() == 0, "the empty sample's queries got a gradient"
    assert grads[1][1].abs().max().item() == 0 and grads[2][1].abs().max().item() == 0


@INTERPRETER
def test_triton_dropout_is_seeded_inverted_dropout_with_exact_gradients(blocks):
    blocks((16, 16))
    t, d, p = 19, 32, 0.3
    q, k, v, pad, bias = _inputs(1, 2, t, t, d, torch.float32, [15], "shared", seed=11)
    eye = torch.eye(t, d).expand(1, 2, t, d)
    torch.manual_seed(123)
    dropped = attention(q.detach(), k.detach(), eye, pad, bias.detach(), dropout_p=p)[..., :t]
    probs = _empty_safe_formula(q, k, eye, pad, bias, d ** -0.5)[..., :t].detach()
    keep = dropped != 0
    admissible = probs > 0
    frac = (keep & admissible).sum().item() / admissible.sum().item()
    assert 0.55 < frac < 0.85, f"kept fraction {frac:.3f}, expected about {1 - p}"
    torch.testing.assert_close(dropped.double(), torch.where(keep, probs / (1 - p), 0.0),
                               rtol=1e-5, atol=1e-6)
    torch.manual_seed(123)  # same seed: same mask whatever v is
    out = attention(q, k, v, pad, bias, dropout_p=p)
    scores = (q.double() @ k.double().transpose(-1, -2)) * d ** -0.5 + bias.double()
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    expect = (torch.softmax(scores, -1) * keep / (1 - p)) @ v.double()
    assert _rel(out, expect) < 1e-5
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v, bias], dout)
    refs = torch.autograd.grad(expect, [q, k, v, bias], dout.double())
    for name, got, want in zip(["q", "k", "v", "bias"], grads, refs):
        assert _rel(got, want) < 1e-5, f"d{name} rel err {_rel(got, want):.2e}"
    torch.manual_seed(124)
    other = attention(q.detach(), k.detach(), eye, pad, bias.detach(), dropout_p=p)[..., :t]
    assert ((other != 0) != keep).any(), "another seed gave the same dropout mask"


@INTERPRETER
def test_attention_backend_picks_triton_for_what_it_supports(monkeypatch):
    q = torch.zeros(1, 2, 5, 64)
    assert attention_backend(q) == "triton"
    assert attention_backend(q.double()) == "sdpa"
    assert attention_backend(torch.zeros(1, 2, 5, 256)) == "sdpa"
    assert attention_backend(q, attn_bias=torch.zeros(2, 5, 5, dtype=torch.long)) == "sdpa"
    monkeypatch.setenv("D2V_ATTENTION", "sdpa")
    assert attention_backend(q) == "sdpa"


# ----------------------------------------------------------------------------- the dispatcher
# On CUDA the backend of each shape and feature set is measured. Here the timer is replaced by one
# that returns fixed times per candidate, and the measured path is switched on for CPU tensors.
from d2v_kernels import attention_dispatch  # noqa: E402

TIMES = {"triton": 3.0, "sdpa_flash": 2.0, "sdpa_efficient": 4.0, "sdpa_cudnn": 5.0,
         "sdpa_math": 1.0, "flex": 0.5, "flash_attn": 0.1}


@pytest.fixture
def measured(monkeypatch):
    """Measured dispatch on CPU with a fake timer; returns (timed names, run backend names)."""
    attention_dispatch.reset()
    monkeypatch.delenv("D2V_ATTENTION", raising=False)
    monkeypatch.setattr(attention_dispatch, "measures", lambda device: True)
    timed, ran = [], []
    monkeypatch.setattr(attention_dispatch, "_timer",
                        lambda name, fn: timed.append(name) or (TIMES[name], 2 * TIMES[name]))
    real = attention_module.run_backend

    def spy(name, *args, **kwargs):
        ran.append(name)
        return real(name, *args, **kwargs)
    monkeypatch.setattr(attention_module, "run_backend", spy)
    yield timed, ran
    attention_dispatch.reset()


def _call_inputs(t=19):
    q, k, v = _qkv(2, 2, t, 16, seed=t, dtype=torch.float32)
    pad = _padding(2, t, [t, t - 5])
    bias = torch.randn(2, t, t, generator=torch.Generator().manual_seed(1), requires_grad=True)
    return q, k, v, pad, bias


def test_dispatcher_pick_is_measured_once_recorded_and_honoured(measured):
    """The fastest candidate that computes these arguments is kept (flex and flash-attn cannot:
    no backward on CPU, no bias), is what the call runs, is timed once per key, and is what
    picks() -- env.json's attention_picks -- records, with each candidate's time."""
    timed, ran = measured
    q, k, v, pad, bias = _call_inputs()
    out = attention(q, k, v, key_padding_mask=pad, attn_bias=bias)
    assert ran == ["sdpa_math"]
    assert sorted(timed) == sorted(["triton", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn",
                                    "sdpa_math"])
    torch.testing.assert_close(out, attention_reference(q, k, v, pad, bias))
    (desc, record), = attention_dispatch.picks().items()
    assert record["backend"] == "sdpa_math"
    assert record["ms"] == {name: TIMES[name] for name in timed}
    assert record["single_ms"] == {name: 2 * TIMES[name] for name in timed}
    assert set(record["skipped"]) == {"flex", "flash_attn"}
    assert "T=19x19" in desc and "bias=shared" in desc and "pad=yes" in desc and "fwd+bwd" in desc
    attention(q, k, v, key_padding_mask=pad, attn_bias=bias)
    assert len(timed) == 5 and ran == ["sdpa_math"] * 2, "a known key is not re-timed"
    attention(q[:, :, :7], k, v, key_padding_mask=pad, attn_bias=bias[:, :7])  # another key
    assert len(timed) == 10 and len(attention_dispatch.picks()) == 2


def test_skipped_candidates_are_never_timed(measured, monkeypatch):
    """D2V_ATTENTION_SKIP: a candidate that cannot win where it costs a compile per key (flex)
    is left out of the timing, with that reason."""
    timed, _ = measured
    monkeypatch.setenv("D2V_ATTENTION_SKIP", "flex,sdpa_math")
    q, k, v, _, _ = _call_inputs()
    with torch.no_grad():  # forward only: CPU flex qualifies
        attention(q, k, v)
    (record,) = attention_dispatch.picks().values()
    assert "flex" not in timed and "sdpa_math" not in timed and timed, timed
    assert record["skipped"]["flex"] == record["skipped"]["sdpa_math"] == "D2V_ATTENTION_SKIP"
    assert record["backend"] == "sdpa_flash"  # the fastest of those timed


def test_backward_timing_uses_a_real_gradient(monkeypatch):
    """The candidates' backward gets a random gradient of the output's shape with real strides:
    an expanded (stride-0) one is not what a loss hands the kernels."""
    seen = []
    real = attention_module.run_backend

    def spy(name, *args, **kwargs):
        out = real(name, *args, **kwargs)
        out.register_hook(lambda g: seen.append(g))
        return out
    monkeypatch.setattr(attention_module, "run_backend", spy)
    q, k, v, pad, bias = _call_inputs()
    attention_dispatch._step(attention_module, "sdpa", q, k, v, pad, bias.detach(), 0.0, False,
                             True)()
    (grad,) = seen
    assert grad.shape == q.shape and 0 not in grad.stride(), grad.stride()
    assert grad.std(-1).min() > 0.1, "the gradient is constant along D (an expanded one)"


class _FakeEvent:
    """torch.cuda.Event on the host clock: records perf_counter; elapsed_time in ms."""
    recorded = 0

    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        _FakeEvent.recorded += 1
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def test_the_pick_times_calls_back_to_back_and_records_single_calls_beside(monkeypatch):
    """One event pair around REPEATS calls (per-call time: launches overlap the GPU's work, as
    in a training step), then each call alone between its own pair."""
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(attention_dispatch, "WARMUP", 2)
    monkeypatch.setattr(attention_dispatch, "REPEATS", 5)
    calls = []
    _FakeEvent.recorded = 0

    def fn():
        calls.append(1)
        time.sleep(0.002)

    together, single = attention_dispatch._cuda_event_ms("x", fn)
    assert len(calls) == 2 + 5 + 5 and _FakeEvent.recorded == 2 + 2 * 5
    assert 1.5 < together < 10 and 1.5 < single < 10, (together, single)


def test_forced_backend_wins_over_the_measured_pick(measured, monkeypatch):
    timed, ran = measured
    monkeypatch.setenv("D2V_ATTENTION", "triton")
    q, k, v, pad, bias = _call_inputs()
    attention(q, k, v, key_padding_mask=pad, attn_bias=bias)
    assert ran == ["triton"] and timed == []
    monkeypatch.setenv("D2V_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="D2V_ATTENTION must be one of"):
        attention(q, k, v)


def test_measuring_leaves_the_random_generators_alone(measured):
    torch.manual_seed(5)
    expect = torch.rand(3)
    torch.manual_seed(5)
    attention_dispatch.measure(attention_dispatch.shape_key(*_call_inputs()[:3]))
    assert torch.equal(torch.rand(3), expect)


def test_picks_reach_the_start_line_and_env_json_and_survive_a_resume(measured, tmp_path):
    """d2v_engine.runtime.backends picks the config's shapes before training (the start line names them:
    the student's forward + backward, the teacher's forward only, where CPU flex qualifies),
    env_report carries them, and a resumed run preloads them instead of timing again."""
    import json

    from d2v_engine.runtime import backends
    from d2v_engine.config import load_config
    timed, _ = measured
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny_audio.yaml")
    line = backends.describe(torch.device("cpu"), "loader x", cfg)
    assert "attention: measured: student sdpa math, teacher flex attention" in line, line
    env = backends.env_report(torch.device("cpu"))
    assert {r["backend"] for r in env["attention_picks"].values()} == {"sdpa_math", "flex"}
    (tmp_path / "env.json").write_text(json.dumps(env))
    attention_dispatch.reset()
    timed.clear()
    backends.preload_attention_picks(tmp_path)
    assert [b for _, b in backends.attention_picks(cfg, torch.device("cpu"))] == [
        "sdpa_math", "flex"]
    assert timed == [], "a resumed run re-timed its attention"


def test_compiled_call_takes_the_measured_pick(measured):
    """Under torch.compile the pick is made while tracing and enters the graph as a constant."""
    timed, ran = measured
    q, k, v, pad, bias = _call_inputs(t=23)
    compiled = torch.compile(lambda q, k, v, b: attention(q, k, v, key_padding_mask=pad,
                                                          attn_bias=b),
                             backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, bias)
    assert "sdpa_math" in ran and len(timed) == 5
    torch.testing.assert_close(out, attention_reference(q, k, v, pad, bias))


def test_every_rank_times_the_configs_shapes_then_all_run_rank_0s_picks(measured):
    """Before the first collective each rank makes its own picks (timed here: student sdpa math,
    teacher flex), then takes rank 0's, for those keys and for calls to come; rank 0 sends its
    own; a rank whose GPU is another model keeps its own."""
    from d2v_engine.runtime import backends
    from d2v_engine.config import load_config
    timed, ran = measured
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny_audio.yaml")
    cpu = torch.device("cpu")
    sent = []

    def from_rank0(obj, backend="sdpa_efficient", gpu=None):
        sent.append(obj)
        return {"gpu": obj["gpu"] if gpu is None else gpu,
                "picks": {desc: backend for desc in obj["picks"]}}

    shared = backends.share_attention_picks(cfg, cpu, 1, from_rank0)
    assert timed, "rank 1 did not time its shapes before the broadcast"
    assert sorted(sent[0]["picks"].values()) == ["flex", "sdpa_math"], sent
    assert (shared["shapes"], shared["replaced"], shared["same_gpu"]) == (2, 2, True), shared
    timed.clear()
    assert [b for _, b in backends.attention_picks(cfg, cpu)] == ["sdpa_efficient"] * 2
    assert timed == [], "an adopted pick was timed again"

    attention_dispatch.reset()
    shared = backends.share_attention_picks(cfg, cpu, 0, lambda obj: obj)
    assert shared["replaced"] == 0 and [b for _, b in backends.attention_picks(cfg, cpu)] == [
        "sdpa_math", "flex"], shared

    attention_dispatch.reset()
    shared = backends.share_attention_picks(cfg, cpu, 1, lambda obj: from_rank0(obj, gpu="other"))
    assert not shared["same_gpu"] and shared["replaced"] == 0, shared
    assert [b for _, b in backends.attention_picks(cfg, cpu)] == ["sdpa_math", "flex"]


def _grid_time(b, per_chunk, wave, chunks):
    """wave_chunks' model of the bias-gradient grid: waves x (samples per chunk + overhead)."""
    return -(-per_chunk * chunks // wave) * (-(-b // chunks) + attention_module.DBIAS_OVERHEAD)


@pytest.mark.parametrize("b", [1, 2, 7, 32, 64, 128, 256])
@pytest.mark.parametrize("heads,t", [(12, 197), (12, 65), (16, 750)])
def test_bias_gradient_grid_fills_whole_waves(b, heads, t):
    """On an H100 (132 SMs, one dbias program per SM): the chunk count is the best of the model
    over every count, no chunk is empty, and at image v1's B = 128 the grid runs within 5% of the
    work / SMs bound where about 4 programs per SM (the old rule: C = 3) lost 17% to its tail."""
    sms = 132
    per_chunk = heads * (-(-t // 64)) ** 2
    chunks = attention_module.wave_chunks(b, per_chunk, sms)
    assert 1 <= chunks <= b
    per = -(-b // chunks)
    assert (chunks - 1) * per < b, f"an empty chunk: {chunks} chunks of {per} for B={b}"
    best = min(_grid_time(b, per_chunk, sms, c) for c in range(1, b + 1))
    assert _grid_time(b, per_chunk, sms, chunks) == best
    if (b, heads, t) == (128, 12, 197):
        bound = per_chunk * b / sms
        assert _grid_time(b, per_chunk, sms, chunks) / bound < 1.05, chunks
        assert _grid_time(b, per_chunk, sms, 3) / bound > 1.15
