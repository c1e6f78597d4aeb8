"""kernels.targets: the Triton path (run by the interpreter on CPU) against the reference, and the
reference against an independent float64 computation with F.instance_norm / F.layer_norm."""
import itertools
import os

# conftest.py sets TRITON_INTERPRET=1 (before triton is first imported) where no CUDA device
# exists; the kernel tests below need it and are skipped elsewhere.

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import targets  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="runs the Triton interpreter on CPU tensors (set only without CUDA); "
                                "tests/test_cuda_kernels.py runs these kernels compiled")

NORM_PAIRS = list(itertools.product(targets.NORMS, targets.NORMS))
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def test_kernels_were_decorated_under_the_interpreter():
    kinds = {type(k).__name__ for k in (targets._stats_kernel, targets._combine_kernel,
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


def test_combine_sub_blocks_cover_every_step(monkeypatch):
    # On a GPU a combine program loops over several row blocks; force that on a small shape whose
    # T is not a multiple of the rows per program (C=200: 16 rows per block, 3 blocks = 48 rows).
    monkeypatch.setattr(targets, "_sub_blocks", lambda b, t, block_r: 3)
    layers = make_layers(3, 2, 70, 200, seed=6)
    pad = make_padding(2, 70, seed=6)
    for layer_norm, final_norm in [("instance", "layer"), ("layer", "instance")]:
        got = run_triton(layers, pad, layer_norm, final_norm)
        want = targets.teacher_targets_reference(layers, pad, layer_norm, final_norm)
        assert_close_and_clean(got, want, pad, 1e-5, f"3 sub-blocks {layer_norm}/{final_norm}")


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
    # Views of one stacked tensor in reverse order: every table offset is negative.
    layers = make_layers(3, 2, 23, 40, seed=17)
    pad = make_padding(2, 23, seed=17)
    backwards = list(torch.stack(layers).unbind(0))[::-1]
    table, _ = targets._layer_table(backwards)
    assert (table[1:, 0] < 0).all(), f"offsets {table[:, 0].tolist()} should be negative"
    got = run_triton(backwards, pad, "instance", "none")
    want = targets.teacher_targets_reference(layers[::-1], pad, "instance", "none")
    assert_close_and_clean(got, want, pad, 1e-5, "negative offsets")


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
