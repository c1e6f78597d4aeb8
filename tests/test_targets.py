"""d2v_kernels.targets: the Triton path (run by the interpreter on CPU) against the reference, and the
reference against an independent float64 computation with F.instance_norm / F.layer_norm."""
import dataclasses
import itertools
import os

# conftest.py sets TRITON_INTERPRET=1 (before triton is first imported) where no CUDA device
# exists; the kernel tests below need it and are skipped elsewhere.

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from d2v_kernels import targets  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton interpreter on CPU tensors (set only without CUDA); "
                                "tests/test_cuda_kernels.py runs these kernels compiled")

NORM_PAIRS = list(itertools.product(targets.NORMS, targets.NORMS))
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def test_kernels_were_decorated_under_the_interpreter():
    kinds = {type(k).__name__ for k in (targets._instance_kernel, targets._combine_kernel,
                                        targets.tl.standard.sum)}
    assert kinds == {"InterpretedFunction"}, (
        f"kernels are {kinds}: triton was imported before TRITON_INTERPRET=1 was set (by an "
        "earlier test module?); set it in the environment of the pytest run")


def make_layers(k, b, t, c, dtype=torch.float32, seed=0):
    """K layers B x T x C with a different mean and scale per layer and channel."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(k):
        mean = torch.randn(1, 1, c, generator=g) * 3.0
        scale = torch.rand(1, 1, c, generator=g) * 2.5 + 0.5
        out.append((torch.randn(b, t, c, generator=g) * scale + mean).to(dtype))
    return out


def make_padding(b, t, seed=0):
    """B x T bool, True = padded: sample 0 unpadded, the last one keeps only 3 steps."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    lengths[0] = t
    lengths[-1] = 3
    return torch.arange(t)[None, :] >= lengths[:, None]


def run_triton(layers, pad, layer_norm, final_norm, padding="exclude"):
    """The Triton launcher into a NaN-poisoned output, so every element must be written."""
    b, t, c = layers[0].shape
    out = torch.full((b, t, c), float("nan"))
    got = targets._teacher_targets_triton(list(layers), pad, layer_norm, final_norm, 1e-5, padding,
                                          out=out)
    assert got is out
    return out


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def assert_close_and_clean(got, want, pad, tol, what):
    assert not got.isnan().any(), f"{what}: {got.isnan().sum().item()} NaN left in the output"
    err = rel_err(got, want)
    assert err < tol, f"{what}: rel err {err:.3g} >= {tol}"
    if pad is not None:
        worst = got[pad].abs().max().item() if pad.any() else 0.0
        assert worst == 0, f"{what}: padded steps not 0, max |.| {worst}"


@pytest.mark.parametrize("padding", targets.INSTANCE_NORM_PADDING)
@pytest.mark.parametrize("layer_norm,final_norm", NORM_PAIRS)
def test_triton_matches_reference_for_every_norm_pair(layer_norm, final_norm, padding):
    layers = make_layers(3, 3, 49, 96, seed=1)
    pad = make_padding(3, 49, seed=1)
    got = run_triton(layers, pad, layer_norm, final_norm, padding)
    want = targets.teacher_targets_reference(layers, pad, layer_norm, final_norm,
                                             instance_norm_padding=padding)
    assert_close_and_clean(got, want, pad, 1e-5, f"{layer_norm}/{final_norm}/{padding}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layer_norm,final_norm", [("instance", "none"), ("layer", "none"),
                                                   ("none", "layer"), ("instance", "layer")])
def test_triton_matches_reference_for_half_inputs(dtype, layer_norm, final_norm):
    layers = make_layers(4, 2, 37, 72, dtype, seed=2)
    pad = make_padding(2, 37, seed=2)
    got = run_triton(layers, pad, layer_norm, final_norm)
    want = targets.teacher_targets_reference(layers, pad, layer_norm, final_norm)
    assert_close_and_clean(got, want, pad, TOL[dtype], f"{dtype} {layer_norm}/{final_norm}")


def test_triton_matches_reference_at_vit_shape_t197_c768():
    layers = make_layers(2, 1, 197, 768, torch.bfloat16, seed=3)
    got = run_triton(layers, None, "instance", "layer")
    want = targets.teacher_targets_reference(layers, None, "instance", "layer")
    assert_close_and_clean(got, want, None, TOL[torch.bfloat16], "T=197 C=768 bf16")


@pytest.mark.parametrize("k", [1, 6, 12])
def test_triton_matches_reference_for_k_layers(k):
    layers = make_layers(k, 2, 21, 40, seed=4)
    pad = make_padding(2, 21, seed=4)
    for layer_norm, final_norm in [("instance", "none"), ("layer", "layer")]:
        got = run_triton(layers, pad, layer_norm, final_norm)
        want = targets.teacher_targets_reference(layers, pad, layer_norm, final_norm)
        assert_close_and_clean(got, want, pad, 1e-5, f"K={k} {layer_norm}/{final_norm}")


def test_triton_reads_strided_views_of_separate_tensors():
    # What the objective passes: each teacher layer without its CLS token, y[:, 1:].
    full = make_layers(3, 2, 30, 48, seed=5)
    layers = [y[:, 1:] for y in full]
    pad = make_padding(2, 29, seed=5)
    got = run_triton(layers, pad, "instance", "layer")
    dense = [y.contiguous() for y in layers]
    want = targets.teacher_targets_reference(dense, pad, "instance", "layer")
    assert_close_and_clean(got, want, pad, 1e-5, "strided views")


def forced_plan(monkeypatch, **fields):
    """Launches with these Plan fields (e.g. several row tiles per task, T split in chunks)."""
    plan = targets._plan
    monkeypatch.setattr(targets, "_plan", lambda *a: dataclasses.replace(plan(*a), **fields))


@pytest.mark.parametrize("fields", [
    dict(sub=3, block_r=16),  # T = 70 is not a multiple of the 48 rows per task
    dict(block_r=16, block_t=8, tchunk=16, nj=5, ahead=1),  # T split: 5 partials per channel
    dict(block_r=16, block_t=8, tchunk=24, nj=3, ahead=2),
    dict(block_r=16, block_t=8, tchunk=8, nj=9, ahead=3),  # every sample's stats come first
], ids=["sub3", "split5_ahead1", "split3_ahead2", "split9_ahead_all"])
def test_task_splits_cover_every_step(monkeypatch, fields):
    forced_plan(monkeypatch, **fields)
    layers = make_layers(3, 3, 70, 200, seed=6)
    pad = make_padding(3, 70, seed=6)
    for layer_norm, final_norm in [("instance", "layer"), ("layer", "instance"),
                                   ("instance", "instance")]:
        got = run_triton(layers, pad, layer_norm, final_norm)
        want = targets.teacher_targets_reference(layers, pad, layer_norm, final_norm)
        assert_close_and_clean(got, want, pad, 1e-5, f"{fields} {layer_norm}/{final_norm}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_time_statistics_match_float64(monkeypatch, dtype):
    # Chan merges of the T chunks' partial (count, mean, M2), the last chunk shorter; bf16 inputs
    # accumulate in fp32, so they are held to fp32's bound against float64 of the bf16 values.
    forced_plan(monkeypatch, block_t=8, tchunk=16, nj=4)
    layers = make_layers(3, 2, 61, 48, dtype, seed=18)
    layers = [y + 20.0 * (i + 1) for i, y in enumerate(layers)]  # large means: no cancellation
    pad = make_padding(2, 61, seed=18)
    lengths = (~pad).sum(1).tolist()
    got = run_triton(layers, pad, "instance", "none")
    want = float64_targets(layers, lengths, "instance", "none")
    err = rel_err(got.double(), want)
    assert err < 1e-5, f"{dtype}: split-T statistics rel err {err:.3g} vs float64"
    assert (got[pad] == 0).all(), "padded steps must be 0"


def test_workspaces_left_nan_never_reach_the_targets(monkeypatch):
    # Partial and final statistics, counts and the output start as NaN: every element a kernel
    # reads must have been written by an earlier task of the same launch.
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    forced_plan(monkeypatch, block_t=8, tchunk=16, nj=3, ahead=1)
    monkeypatch.setattr(torch, "empty", poisoned)
    layers = make_layers(3, 3, 41, 48, seed=19)
    pad = make_padding(3, 41, seed=19)
    for layer_norm, final_norm in [("instance", "layer"), ("none", "instance")]:
        got = run_triton(layers, pad, layer_norm, final_norm)
        want = targets.teacher_targets_reference(layers, pad, layer_norm, final_norm)
        assert_close_and_clean(got, want, pad, 1e-5, f"poisoned {layer_norm}/{final_norm}")


def test_dram_bytes_are_the_minimum_without_instance_norm():
    minimal, ours = targets.dram_bytes(256, 196, 768, 6, 2, "none", "layer")
    assert minimal == ours == 256 * 196 * 768 * (6 * 2 + 4)
    minimal, ours = targets.dram_bytes(16, 1000, 768, 8, 2, "instance", "none")
    stats = 8 * 8 * 16 * 768 * (triton_cdiv(1000, targets.STATS_ROWS) + 1)
    assert ours == minimal + stats and ours < 1.05 * minimal, (minimal, ours)


def triton_cdiv(a, b):
    return -(-a // b)


def test_combine_tiles_fit_768_channels_exactly():
    plan = targets._plan(256, 197, 768, 6, 2, True)
    assert (plan.cw, plan.nch, plan.mask_c) == (256, 3, False), plan
    for c in (96, 384, 1024, 1280):
        p = targets._plan(8, 50, c, 4, 2, False)
        assert p.cw * p.nch == c and not p.mask_c, f"C={c}: {p}"
    odd = targets._plan(8, 50, 200, 4, 2, False)
    assert odd.mask_c and odd.cw >= 200, f"C=200 (8 x 25) takes one masked chunk: {odd}"


def test_dispatcher_runs_the_triton_launcher_under_the_interpreter(monkeypatch):
    calls = []
    launcher = targets._teacher_targets_triton

    def spy(*args, **kwargs):
        calls.append(args[0][0].shape)
        return launcher(*args, **kwargs)

    monkeypatch.setattr(targets, "_teacher_targets_triton", spy)
    layers = make_layers(3, 2, 17, 24, seed=7)
    pad = make_padding(2, 17, seed=7)
    got = targets.teacher_targets(layers, pad, "instance", "layer")
    assert len(calls) == 1, f"the Triton launcher ran {len(calls)} times, expected once"
    want = targets.teacher_targets_reference(layers, pad, "instance", "layer")
    assert_close_and_clean(got, want, pad, 1e-5, "dispatcher")


def test_dispatcher_picks_triton_only_where_it_can_run(monkeypatch):
    cpu = torch.zeros(1, 1, 1)
    assert targets._use_triton(cpu), "CPU tensors under TRITON_INTERPRET=1 must go to Triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not targets._use_triton(cpu), "CPU without the interpreter must go to the reference"
    monkeypatch.setattr(targets, "_teacher_targets_triton", None)  # would raise if called
    layers = make_layers(2, 1, 5, 8, seed=8)
    got = targets.teacher_targets(layers, None, "layer", "none")
    assert torch.equal(got, targets.teacher_targets_reference(layers, None, "layer", "none"))


def test_stacked_tensor_input_equals_list_input():
    layers = make_layers(4, 2, 19, 32, torch.bfloat16, seed=9)
    pad = make_padding(2, 19, seed=9)
    stacked = torch.stack(layers)
    for fn in (targets.teacher_targets, targets.teacher_targets_reference):
        from_list = fn(layers, pad, "instance", "layer")
        from_stack = fn(stacked, pad, "instance", "layer")
        assert torch.equal(from_list, from_stack), \
            f"{fn.__name__}: max diff {(from_list - from_stack).abs().max().item()}"


def test_layers_below_the_first_one_in_memory_are_read_right():
    # Views of one stacked tensor in reverse order: each layer lies below the previous one.
    layers = make_layers(3, 2, 23, 40, seed=17)
    pad = make_padding(2, 23, seed=17)
    backwards = list(torch.stack(layers).unbind(0))[::-1]
    assert backwards[1].data_ptr() < backwards[0].data_ptr()
    got = run_triton(backwards, pad, "instance", "none")
    want = targets.teacher_targets_reference(layers[::-1], pad, "instance", "none")
    assert_close_and_clean(got, want, pad, 1e-5, "layers below the first")


def test_padded_steps_never_influence_targets():
    layers = make_layers(3, 3, 25, 40, seed=10)
    pad = make_padding(3, 25, seed=10)
    dirty = [y.masked_fill(pad[..., None], float("nan")) for y in layers]
    dirty[1][pad] = 1e30
    for layer_norm, final_norm in NORM_PAIRS:
        clean = targets.teacher_targets_reference(layers, pad, layer_norm, final_norm)
        for name, got in (("triton", run_triton(dirty, pad, layer_norm, final_norm)),
                          ("reference", targets.teacher_targets_reference(dirty, pad, layer_norm,
                                                                          final_norm))):
            assert_close_and_clean(got, clean, pad, 1e-5, f"{name} {layer_norm}/{final_norm}")


def test_fully_padded_sample_gives_zeros():
    layers = make_layers(2, 2, 12, 16, seed=11)
    pad = torch.zeros(2, 12, dtype=torch.bool)
    pad[1] = True
    for layer_norm, final_norm in [("instance", "instance"), ("layer", "layer")]:
        got = run_triton(layers, pad, layer_norm, final_norm)
        want = targets.teacher_targets_reference(layers, pad, layer_norm, final_norm)
        assert_close_and_clean(got, want, pad, 1e-5, f"fully padded {layer_norm}/{final_norm}")


def float64_targets(layers, lengths, layer_norm, final_norm, eps=1e-5):
    """Per sample on its unpadded slice, in float64, with F.instance_norm and F.layer_norm."""
    def norm(x, kind):  # x: L x C
        if kind == "instance":
            return F.instance_norm(x.T[None], eps=eps)[0].T
        if kind == "layer":
            return F.layer_norm(x, x.shape[-1:], eps=eps)
        return x

    b, t, c = layers[0].shape
    out = torch.zeros(b, t, c, dtype=torch.float64)
    for i, n in enumerate(lengths):
        avg = sum(norm(y[i, :n].double(), layer_norm) for y in layers) / len(layers)
        out[i, :n] = norm(avg, final_norm)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer_norm,final_norm", NORM_PAIRS)
def test_reference_matches_float64_per_sample_norms(layer_norm, final_norm, dtype):
    layers = make_layers(5, 3, 40, 64, dtype, seed=12)
    pad = make_padding(3, 40, seed=12)
    lengths = (~pad).sum(1).tolist()
    got = targets.teacher_targets_reference(layers, pad, layer_norm, final_norm)
    want = float64_targets(layers, lengths, layer_norm, final_norm)
    assert got.dtype == torch.float32
    assert_close_and_clean(got.double(), want, pad, 1e-5, f"{dtype} {layer_norm}/{final_norm}")


def test_include_mode_is_instance_norm_over_the_full_time_axis():
    layers = make_layers(3, 3, 30, 24, seed=13)
    pad = make_padding(3, 30, seed=13)

    def inorm(x):  # B x T x C over the full T, padded steps included: fairseq's reference
        return F.instance_norm(x.double().transpose(1, 2), eps=1e-5).transpose(1, 2)

    want = inorm(sum(inorm(y) for y in layers) / len(layers)).masked_fill(pad[..., None], 0.0)
    for name, got in (
        ("reference", targets.teacher_targets_reference(layers, pad, "instance", "instance",
                                                        instance_norm_padding="include")),
        ("triton", run_triton(layers, pad, "instance", "instance", "include")),
    ):
        assert_close_and_clean(got.double(), want, pad, 1e-5, f"include mode, {name}")
    excluded = targets.teacher_targets_reference(layers, pad, "instance", "instance")
    assert rel_err(excluded.double(), want) > 1e-3, "exclude mode must differ given padding"


def test_final_layer_norm_gives_zero_mean_unit_variance_rows():
    layers = make_layers(3, 2, 33, 80, seed=14)
    pad = make_padding(2, 33, seed=14)
    got = run_triton(layers, pad, "instance", "layer")[~pad]
    mean, var = got.mean(-1), got.var(-1, unbiased=False)
    assert mean.abs().max() < 1e-5, f"row mean up to {mean.abs().max().item():.3g}"
    assert (var - 1).abs().max() < 1e-3, f"row variance off 1 by {(var - 1).abs().max().item():.3g}"


def test_single_instance_normed_layer_has_zero_mean_unit_variance_per_channel():
    layers = make_layers(1, 3, 45, 56, seed=15)
    pad = make_padding(3, 45, seed=15)
    got = run_triton(layers, pad, "instance", "none")
    for i in range(3):
        x = got[i][~pad[i]]
        mean, var = x.mean(0), x.var(0, unbiased=False)
        worst = mean.abs().max().item()
        assert worst < 1e-5, f"sample {i}: channel mean up to {worst:.3g}"
        assert (var - 1).abs().max() < 1e-3, \
            f"sample {i}: channel variance off 1 by {(var - 1).abs().max().item():.3g}"


def test_large_channel_means_keep_fp32_precision():
    # Welford/Chan merges: a mean 30x the std must not cost precision (E[x^2] - E[x]^2 would).
    g = torch.Generator().manual_seed(16)
    layers = [torch.randn(2, 150, 32, generator=g) + 30.0 for _ in range(2)]
    got = run_triton(layers, None, "instance", "none")
    want = float64_targets(layers, [150, 150], "instance", "none")
    err = rel_err(got.double(), want)
    assert err < 1e-5, f"rel err {err:.3g} with channel means of 30"


@pytest.mark.parametrize("kwargs,message", [
    (dict(layers=[]), "K >= 1"),
    (dict(layers=torch.zeros(2, 3, 4)), "K x B x T x C"),
    (dict(layers=[torch.zeros(2, 3)]), "B x T x C"),
    (dict(layers=[torch.zeros(2, 3, 4, dtype=torch.int32)]), "dtype"),
    (dict(layers=[torch.zeros(2, 3, 4), torch.zeros(2, 3, 5)]), "layer 1"),
    (dict(layers=[torch.zeros(2, 3, 4), torch.zeros(2, 3, 4, dtype=torch.bfloat16)]), "layer 1"),
    (dict(padding_mask=torch.zeros(2, 3)), "bool"),
    (dict(padding_mask=torch.zeros(2, 4, dtype=torch.bool)), "B x T"),
    (dict(layer_norm="batch"), "layer_norm"),
    (dict(final_norm="Layer"), "final_norm"),
    (dict(instance_norm_padding="ignore"), "instance_norm_padding"),
    (dict(eps=0.0), "eps"),
])
def test_bad_arguments_raise_clear_value_errors(kwargs, message):
    args = dict(layers=[torch.zeros(2, 3, 4)])
    args.update(kwargs)
    for fn in (targets.teacher_targets, targets.teacher_targets_reference):
        with pytest.raises(ValueError, match=message):
            fn(**args)
