"""d2v_engine.models: the data2vec 1.0 encoders (audio / image / text) on tiny configs."""
import pytest
import torch

from d2v_engine.config import ModelConfig, load_config
from d2v_engine.errors import ConfigError
from d2v_engine.models import Data2VecEncoder, EncoderOutput, build_model


@pytest.fixture(autouse=True)
def _sdpa_attention(monkeypatch):
    # These tests check the encoders' semantics; the Triton attention kernel has its own tests
    # (test_attention*.py). Interpreted, it would make every encoder test here take seconds.
    monkeypatch.setenv("D2V_ATTENTION", "sdpa")

MODALITIES = ["image", "audio", "text"]
# Parameters the teacher copies from the student that `embed` itself does not use: the mask
# embedding (the teacher never masks), the image CLS token (outside fairseq's EMA encoder) and the
# audio positional conv (fairseq data2vec_audio's ema_layers_only skips it).
COPIED_NOT_EMBEDDED = {"audio": ("mask_emb", "pos_conv."), "image": ("cls_token", "mask_emb"),
                       "text": ()}


def _model(modality, *overrides):
    cfg = load_config(f"configs/tiny_{modality}.yaml", list(overrides))
    torch.manual_seed(0)
    return build_model(cfg.model, modality), cfg


def _source(modality, cfg, batch=3, length=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if modality == "image":
        size = cfg.model.img_size
        return torch.randn(batch, 3, size, size, generator=g), None
    if modality == "audio":
        length = length or 4001
        return torch.randn(batch, length, generator=g), torch.zeros(batch, length, dtype=torch.bool)
    length = length or 23
    return torch.randint(5, 4000, (batch, length), generator=g), None


def _max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("modality", MODALITIES)
def test_build_model_exposes_the_encoder_interface(modality):
    model, cfg = _model(modality)
    assert isinstance(model, Data2VecEncoder)
    assert model.modality == modality
    assert model.embed_dim == cfg.model.embed_dim
    assert model.num_extra_tokens == (1 if modality == "image" else 0)


def test_build_model_rejects_an_unknown_modality():
    with pytest.raises(ConfigError, match="modality"):
        build_model(ModelConfig(), "video")


@pytest.mark.parametrize("modality,length", [("image", None), ("audio", 3333), ("audio", 4001),
                                             ("text", 17), ("text", 23)])
def test_output_shapes_and_one_result_per_block(modality, length):
    model, cfg = _model(modality)
    src, pad = _source(modality, cfg, length=length)
    x, x_pad = model.embed(src, pad)
    assert x.ndim == 3 and x.shape[0] == 3 and x.shape[2] == cfg.model.embed_dim
    if modality == "image":
        assert x.shape[1] == (cfg.model.img_size // cfg.model.patch_size) ** 2 and x_pad is None
    out = model.encode(x, x_pad, return_layers=True)
    assert isinstance(out, EncoderOutput)
    t = x.shape[1] + model.num_extra_tokens
    assert out.x.shape == (3, t, cfg.model.embed_dim), tuple(out.x.shape)
    assert len(out.layer_results) == len(out.block_results) == cfg.model.depth
    assert all(y.shape == out.x.shape for y in out.layer_results + out.block_results)
    if out.padding_mask is not None:
        assert out.padding_mask.shape == (3, t)
    plain = model.encode(x, x_pad)
    assert plain.layer_results == [] and plain.block_results == []


def test_audio_frame_padding_follows_the_conv_length_formula():
    model, cfg = _model("audio")
    lengths = torch.tensor([4001, 2999, 1234])
    pad = torch.arange(4001)[None, :] >= lengths[:, None]
    x, x_pad = model.embed(torch.randn(3, 4001), pad)
    expect = lengths.clone()
    for _, k, s in cfg.model.conv_layers:
        expect = torch.div(expect - k, s, rounding_mode="floor") + 1
    assert torch.equal((~x_pad).sum(1), expect), f"{(~x_pad).sum(1).tolist()} vs {expect.tolist()}"
    assert x.shape[1] == expect[0], f"{x.shape[1]} frames for {expect[0]}"
    assert not x_pad[torch.arange(3), expect - 1].any() and x_pad[1:, -1].all()
    assert model.embed(torch.randn(3, 4001))[1] is None


def test_text_padding_mask_and_positions_follow_pad_id():
    model, cfg = _model("text")
    ids = torch.randint(5, 4000, (2, 9), generator=torch.Generator().manual_seed(3))
    ids[1, 6:] = cfg.model.pad_id
    _, pad = model.embed(ids)
    assert torch.equal(pad, ids == cfg.model.pad_id)
    assert model.embed_positions.num_embeddings == cfg.model.max_positions + cfg.model.pad_id + 1
    assert model.embed_tokens.weight[cfg.model.pad_id].abs().max() == 0
    with pytest.raises(ConfigError, match="max_positions"):
        model.embed(torch.full((1, cfg.model.max_positions + 1), 7))


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_padded_positions_do_not_change_real_outputs(modality):
    model, cfg = _model(modality)
    model.eval()
    src, _ = _source(modality, cfg, batch=2)
    pad = torch.zeros_like(src, dtype=torch.bool)
    other = src.clone()
    if modality == "audio":
        pad[1, 2500:] = True
        other[1, 2500:] = torch.randn(src.shape[1] - 2500, generator=torch.Generator().manual_seed(9))
    else:
        pad[1, 15:] = True
        src[1, 15:] = cfg.model.pad_id
        other[1, 15:] = 4  # a real token id under the padding mask
    a = model(src, pad, return_layers=True)
    b = model(other, pad, return_layers=True)
    real = ~a.padding_mask
    assert real.sum() < real.numel(), "the test needs padded positions"
    for name, ya, yb in [("x", a.x, b.x)] + [(f"layer {i}", u, w) for i, (u, w) in
                                            enumerate(zip(a.layer_results, b.layer_results))]:
        err = _max_diff(ya[real], yb[real])
        assert err < 1e-5, f"{modality} {name}: padded content moved real outputs by {err:.3e}"


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_mask_embedding_replaces_masked_positions(modality):
    model, cfg = _model(modality)
    model.eval()
    src, pad = _source(modality, cfg, batch=2)
    x, x_pad = model.embed(src, pad)
    none = model.encode(x, x_pad).x
    empty = model.encode(x, x_pad, mask=torch.zeros(x.shape[:2], dtype=torch.bool)).x
    assert _max_diff(none, empty) == 0, "an all-False mask changed the output"
    mask = torch.zeros(x.shape[:2], dtype=torch.bool)
    mask[:, ::3] = True
    masked = model.encode(x, x_pad, mask=mask).x
    assert _max_diff(masked, none) > 1e-3, "masking did not change the output"
    x2 = x.clone()
    x2[mask] = torch.randn(int(mask.sum()), x.shape[-1], generator=torch.Generator().manual_seed(5))
    err = _max_diff(model.encode(x2, x_pad, mask=mask).x, masked)
    assert err < 1e-5, f"content under the mask still matters: {err:.3e}"


def test_text_encode_refuses_a_mask():
    model, cfg = _model("text")
    x, pad = model.embed(_source("text", cfg)[0])
    with pytest.raises(ValueError, match="mask"):
        model.encode(x, pad, mask=torch.zeros(pad.shape, dtype=torch.bool))


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_post_ln_output_is_the_last_block_and_ffn_branch_precedes_the_residual(modality):
    model, cfg = _model(modality)
    model.eval()
    src, pad = _source(modality, cfg, batch=2)
    out = model(src, pad, return_layers=True)
    assert _max_diff(out.x, out.block_results[-1]) == 0
    block = model.blocks.blocks[-1]
    h_in = out.block_results[-2]
    h = block.attn_norm(h_in + block.attn(h_in, out.padding_mask))
    err = _max_diff(block.ffn_norm(h + out.layer_results[-1]), out.x)
    assert err < 1e-5, f"x != LN(h + fc): {err:.3e}"
    err = _max_diff(out.layer_results[-1], block.fc2(torch.nn.functional.gelu(block.fc1(h))))
    assert err < 1e-5, f"fc != fc2(gelu(fc1(h))): {err:.3e}"


def test_audio_pre_ln_variant_ends_with_the_final_layer_norm():
    model, cfg = _model("audio", "model.layer_norm_first=true")
    model.eval()
    src, pad = _source("audio", cfg, batch=2)
    out = model(src, pad, return_layers=True)
    err = _max_diff(out.x, model.norm(out.block_results[-1]))
    assert err < 1e-6, f"x != LN(last block): {err:.3e}"
    block = model.blocks.blocks[-1]
    h_in = out.block_results[-2]
    h = h_in + block.attn(block.attn_norm(h_in), out.padding_mask)
    fc = block.fc2(torch.nn.functional.gelu(block.fc1(block.ffn_norm(h))))
    assert _max_diff(out.layer_results[-1], fc) < 1e-6, "pre-LN fc != fc2(gelu(fc1(LN(h))))"
    assert _max_diff(out.block_results[-1], h + fc) < 1e-6, "pre-LN block != h + fc"


def test_image_output_is_the_final_norm_and_blocks_are_residual_sums():
    model, cfg = _model("image")
    model.eval()
    src, _ = _source("image", cfg, batch=2)
    out = model(src, return_layers=True)
    err = _max_diff(out.x, model.norm(out.block_results[-1]))
    assert err < 1e-6, f"x != LN(last block): {err:.3e}"
    block = model.blocks.blocks[-1]
    h_in = out.block_results[-2]
    h = h_in + block.gamma_1 * block.attn(block.attn_norm(h_in), None, model.rel_pos_bias())
    fc = block.gamma_2 * block.fc2(torch.nn.functional.gelu(block.fc1(block.ffn_norm(h))))
    assert _max_diff(out.layer_results[-1], fc) < 1e-6
    assert _max_diff(out.block_results[-1], h + fc) < 1e-6


def test_image_relative_position_bias_index_follows_beit():
    model, cfg = _model("image")
    side = cfg.model.img_size // cfg.model.patch_size
    rpb = model.rel_pos_bias
    n = (2 * side - 1) ** 2 + 3
    assert rpb.table.shape == (n, cfg.model.num_heads) and rpb.table.abs().max() == 0
    idx = rpb.index
    assert idx.shape == (side * side + 1,) * 2
    assert idx[0, 0] == n - 1 and (idx[0, 1:] == n - 3).all() and (idx[1:, 0] == n - 2).all()
    # patch (r, c) -> (r', c'): ((r - r') + side - 1) * (2 side - 1) + (c - c') + side - 1
    r, c, r2, c2 = 1, 2, 3, 0
    a, b = 1 + r * side + c, 1 + r2 * side + c2
    assert idx[a, b] == (r - r2 + side - 1) * (2 * side - 1) + (c - c2 + side - 1)
    assert (idx.diagonal()[1:] == (side - 1) * (2 * side - 1) + side - 1).all()
    assert model.rel_pos_bias().shape == (cfg.model.num_heads, side * side + 1, side * side + 1)


def test_image_attention_has_no_key_bias_and_init_is_rescaled_per_depth():
    model, cfg = _model("image")
    for i, block in enumerate(model.blocks.blocks):
        attn = block.attn
        assert attn.k_proj.bias is None and attn.q_proj.bias is not None
        assert attn.v_proj.bias is not None
        assert torch.allclose(block.gamma_1, torch.full_like(block.gamma_1, 0.1))
    stds = [b.fc2.weight.std().item() for b in model.blocks.blocks]
    assert stds[0] > stds[-1] * 1.8, f"fc2 std per depth {stds} not rescaled by 1/sqrt(2 layer)"


@pytest.mark.parametrize("modality", MODALITIES)
def test_gradients_reach_every_student_parameter(modality):
    model, cfg = _model(modality, "model.dropout=0.1", "model.attention_dropout=0.1")
    src, pad = _source(modality, cfg, batch=2)
    x, x_pad = model.embed(src, pad)
    mask = None
    if modality != "text":
        mask = torch.zeros(x.shape[:2], dtype=torch.bool)
        mask[:, 1::2] = True
    model.encode(x, x_pad, mask=mask).x.pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == [], f"no gradient reached {missing}"


@pytest.mark.parametrize("modality", MODALITIES)
def test_feature_encoder_prefixes_cover_exactly_what_embed_uses(modality):
    model, cfg = _model(modality)
    src, pad = _source(modality, cfg, batch=2)
    x, _ = model.embed(src, pad)
    x.pow(2).sum().backward()
    used = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    named = {n for n, _ in model.named_parameters() if n.startswith(model.feature_encoder_prefixes())}
    assert used <= named, f"embed uses {sorted(used - named)} outside feature_encoder_prefixes"
    copied = {n for n in named if n.startswith(COPIED_NOT_EMBEDDED[modality])}
    assert named - used == copied, f"extra: {sorted(named - used)}, expected {sorted(copied)}"


@pytest.mark.parametrize("modality", MODALITIES)
def test_eval_mode_is_deterministic_and_train_mode_drops(modality):
    model, cfg = _model(modality, "model.dropout=0.3", "model.encoder_dropout_input=0.2")
    src, pad = _source(modality, cfg)
    model.eval()
    a, b = model(src, pad, return_layers=True), model(src, pad, return_layers=True)
    assert _max_diff(a.x, b.x) == 0
    model.train()
    assert _max_diff(model(src, pad).x, a.x) > 1e-3, "dropout 0.3 did nothing in train mode"


def test_layerdrop_skips_blocks_in_training_but_never_with_return_layers():
    model, cfg = _model("text", "model.layerdrop=1.0")
    src, _ = _source("text", cfg)
    model.train()
    x, pad = model.embed(src)
    skipped = model.encode(x, pad)
    assert _max_diff(skipped.x, x) == 0, "layerdrop=1 should skip every block"
    full = model.encode(x, pad, return_layers=True)
    assert len(full.layer_results) == cfg.model.depth and _max_diff(full.x, x) > 1e-3


def test_encode_rejects_bad_shapes():
    model, cfg = _model("audio")
    x, pad = model.embed(*_source("audio", cfg))
    with pytest.raises(ValueError, match="mask"):
        model.encode(x, pad, mask=torch.zeros(3, x.shape[1] + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="x must be"):
        model.encode(x[..., :-1], pad)
    image, icfg = _model("image")
    with pytest.raises(ValueError, match="image embed"):
        image.embed(torch.randn(1, 3, icfg.model.img_size + 4, icfg.model.img_size))


@pytest.mark.parametrize("modality", MODALITIES)
def test_bf16_autocast_on_cpu_stays_close_to_fp32(modality):
    model, cfg = _model(modality)
    model.eval()
    src, pad = _source(modality, cfg, batch=2, length=3001 if modality == "audio" else 19)
    if pad is not None:
        pad[1, 2000:] = True
    ref = model(src, pad, return_layers=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(src, pad, return_layers=True)
    real = torch.ones(ref.x.shape[:2], dtype=torch.bool) if ref.padding_mask is None \
        else ~ref.padding_mask
    pairs = [("x", ref.x, low.x), ("last ffn", ref.layer_results[-1], low.layer_results[-1])]
    for name, a, b in pairs:
        assert torch.isfinite(b).all(), f"{modality} bf16 {name}: non-finite values"
        rel = ((a - b.float())[real].norm() / a[real].norm()).item()
        assert rel < 5e-2, f"{modality} bf16 {name}: rel err {rel:.3e} vs fp32"


@pytest.mark.parametrize("img_size,patch", [(20, 4), (28, 4), (30, 5)])
def test_image_odd_grids_give_one_token_per_patch_plus_cls(img_size, patch):
    model, cfg = _model("image", f"model.img_size={img_size}", f"model.patch_size={patch}",
                        "data.img_size=" + str(img_size))
    model.eval()
    side = img_size // patch
    src = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, side * side, dtype=torch.bool)
    mask[0, ::2] = True
    out = model(src, mask=mask, return_layers=True)
    assert out.x.shape == (2, side * side + 1, cfg.model.embed_dim), tuple(out.x.shape)
    assert model.rel_pos_bias().shape == (cfg.model.num_heads, side * side + 1, side * side + 1)
    assert len(out.block_results) == cfg.model.depth and torch.isfinite(out.x).all()


def test_image_drop_path_rises_linearly_with_depth():
    model, cfg = _model("image", "model.drop_path=0.3")
    rates = [b.drop_path for b in model.blocks.blocks]
    expect = torch.linspace(0, 0.3, cfg.model.depth).tolist()
    assert rates == pytest.approx(expect), f"{rates} vs {expect}"


@pytest.mark.parametrize("width,depth", [(16, 2), (95, 5), (4, 2), (9, 3)])
def test_audio_positional_conv_keeps_length_with_even_and_odd_kernels(width, depth):
    model, cfg = _model("audio", f"model.conv_pos={width}", f"model.conv_pos_depth={depth}",
                        "model.conv_pos_groups=4")
    kernel = max(3, width // depth)
    convs = model.pos_conv.convs
    assert len(convs) == depth and all(c.kernel_size == (kernel,) for c in convs)
    assert all(c.groups == 4 and c.padding == (kernel // 2,) for c in convs)
    assert not any(n.elementwise_affine for n in model.pos_conv.norms)
    x = torch.randn(2, 37, cfg.model.embed_dim, generator=torch.Generator().manual_seed(2))
    assert model.pos_conv(x).shape == x.shape


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_encode_ignores_features_at_padded_positions(modality):
    model, cfg = _model(modality)
    model.eval()
    src, pad = _source(modality, cfg, batch=2)
    x, x_pad = model.embed(src, None if modality == "text" else pad)
    x_pad = torch.zeros(x.shape[:2], dtype=torch.bool)
    x_pad[1, x.shape[1] // 2:] = True
    noisy = x.clone()
    noisy[x_pad] = 1e3 * torch.randn(int(x_pad.sum()), x.shape[-1],
                                     generator=torch.Generator().manual_seed(4))
    a, b = model.encode(x, x_pad), model.encode(noisy, x_pad)
    err = _max_diff(a.x, b.x)
    assert err == 0, f"{modality}: padded features moved the output (padded rows too) by {err:.3e}"


def test_text_positions_start_after_pad_id_and_skip_padding():
    model, cfg = _model("text")
    model.eval()
    pad_id = cfg.model.pad_id
    ids = torch.tensor([[0, 11, 12, 13, 2], [0, 21, 2, pad_id, pad_id]])
    x, pad = model.embed(ids)
    positions = torch.tensor([[2, 3, 4, 5, 6], [2, 3, 4, pad_id, pad_id]])
    expect = model.embed_norm(model.embed_tokens(ids) + model.embed_positions(positions))
    err = _max_diff(x, expect)
    assert err < 1e-6, f"embedding != LN(tokens + positions from pad_id + 1): {err:.3e}"


def test_audio_mask_embedding_is_uniform_in_unit_interval():
    model, _ = _model("audio")
    m = model.mask_emb
    assert m.min() >= 0 and m.max() < 1 and m.std() > 0.1, f"{m.min()} {m.max()} {m.std()}"


def test_feature_grad_mult_scales_the_extractor_gradient():
    src, pad = _source("audio", _model("audio")[1], batch=2)
    grads = {}
    for mult in (1.0, 0.25, 0.0):
        model, _ = _model("audio", f"model.feature_grad_mult={mult}")
        model(src, pad).x.pow(2).mean().backward()
        grads[mult] = model.feature_extractor.convs[0].weight.grad
        assert model.feature_proj.weight.grad is not None
    assert grads[0.0] is None, "feature_grad_mult=0 should freeze the extractor (no autograd)"
    err = _max_diff(grads[0.25], 0.25 * grads[1.0]) / grads[1.0].abs().max().item()
    assert err < 1e-5, f"gradient not scaled by 0.25: rel err {err:.3e}"


@pytest.mark.parametrize("key", ["model.drop_path=0.1", "model.layer_scale_init=0.1"])
def test_post_ln_encoders_reject_drop_path_and_layer_scale(key):
    cfg = load_config("configs/tiny_text.yaml", [key])
    with pytest.raises(ConfigError, match=key.split("=")[0]):
        build_model(cfg.model, "text")


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("modality,visible", [("audio", False), ("text", False), ("audio", True),
                                              ("text", True)])
def test_skipping_padded_queries_keeps_real_outputs_and_gradients(modality, visible, backend,
                                                                  monkeypatch):
    """skip_padded_queries (what the objectives pass for the student, and for the teacher where
    the targets never read padding): the outputs and every layer result at the real positions,
    and the gradients of a loss over them (parameters and input features), equal the unskipped
    ones -- on the plain path and on data2vec 2.0's visible-only path. triton: the interpreted
    kernels (elsewhere CPU tensors take SDPA's path, which zeroes the padded rows)."""
    from d2v_engine.models.visible import encode_visible, split_indices
    monkeypatch.setenv("D2V_ATTENTION", backend)
    model, cfg = _model(modality)
    model.train()
    for m in model.modules():  # deterministic: the comparison is of two forwards
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.blocks.layerdrop = 0.0
    for block in model.blocks.blocks:
        block.attn.dropout = 0.0
    src, pad = _source(modality, cfg, batch=3)
    g = torch.Generator().manual_seed(4)
    if modality == "audio":
        pad[1, 2600:] = True
        pad[2, 1500:] = True
    else:
        src[1, 15:] = cfg.model.pad_id
        src[2, 9:] = cfg.model.pad_id
    x, x_pad = model.embed(src, pad)
    assert x_pad is not None and x_pad.any() and not x_pad.all(), "the test needs padding"
    mask = torch.rand(x_pad.shape, generator=g) < 0.4
    mask &= ~x_pad
    if visible:  # the same count masked per row, as data2vec 2.0's masks
        mask = torch.zeros_like(mask)
        for row in range(mask.shape[0]):
            mask[row, torch.randperm(int((~x_pad[row]).sum()), generator=g)[:3]] = True
    x = x.detach().requires_grad_()
    weights = torch.randn(x.shape[0], x.shape[1], cfg.model.embed_dim, generator=g)

    def run(skip):
        model.zero_grad(set_to_none=True)
        x.grad = None
        if visible:
            keep, _ = split_indices(mask)
            out = encode_visible(model, x, x_pad, mask, keep, return_layers=True,
                                 skip_padded_queries=skip)
            real = ~out.padding_mask
            w = torch.gather(weights, 1, keep[..., None].expand(-1, -1, weights.shape[-1]))
        else:
            out = model.encode(x, x_pad, mask=mask if modality == "audio" else None,
                               return_layers=True, skip_padded_queries=skip)
            real, w = ~x_pad, weights
        (out.x * w * real[..., None]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, real, grads, x.grad.clone()

    a, real, grads_a, gx_a = run(False)
    b, real_b, grads_b, gx_b = run(True)
    assert torch.equal(real, real_b) and real.sum() < real.numel()
    assert _max_diff(a.x[~real], b.x[~real]) > 1e-3, "skip_padded_queries changed nothing"
    pairs = [("x", a.x, b.x)] + [(f"layer {i}", u, w) for i, (u, w) in
                                 enumerate(zip(a.layer_results, b.layer_results))]
    for name, ya, yb in pairs:
        err = _max_diff(ya[real], yb[real]) / ya[real].abs().max().item()
        assert err < 1e-5, f"{modality} {name}: skipping padded queries moved real rows ({err:.2e})"
    assert set(grads_a) == set(grads_b)
    for name in grads_a:
        scale = grads_a[name].abs().max().item() or 1.0
        err = _max_diff(grads_a[name], grads_b[name]) / scale
        assert err < 1e-5, f"{modality} grad {name}: rel err {err:.2e}"
    assert _max_diff(gx_a, gx_b) / gx_a.abs().max().item() < 1e-5
