"""The per-modality encoders: shapes, padding, masking, target layers, gradients, sharing."""
import pytest
import torch

from engine.config import load_config
from engine.models import build_model
from kernels.attention import attention, attention_reference


def _model(modality, *overrides):
    cfg = load_config(f"configs/tiny_{modality}.yaml", list(overrides))
    torch.manual_seed(0)
    return build_model(cfg.model, modality), cfg


def _source(modality, cfg, batch=3, length=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if modality == "image":
        return torch.randn(batch, 3, cfg.model.img_size, cfg.model.img_size, generator=g), None
    if modality == "audio":
        length = length or 4001
        return torch.randn(batch, length, generator=g), torch.zeros(batch, length, dtype=torch.bool)
    length = length or 23
    return torch.randint(5, 4000, (batch, length), generator=g), None


@pytest.mark.parametrize("modality", ["image", "audio", "text"])
def test_output_shapes_and_one_target_layer_per_block(modality):
    model, cfg = _model(modality)
    src, pad = _source(modality, cfg)
    x, x_pad = model.embed(src, pad)
    out = model.encode(x, x_pad, return_layers=True)
    t = x.shape[1] + model.num_extra_tokens
    assert out.x.shape == (3, t, cfg.model.embed_dim)
    assert len(out.layer_results) == len(out.block_results) == cfg.model.depth
    assert all(y.shape == out.x.shape for y in out.layer_results + out.block_results)


def test_audio_frame_padding_follows_the_conv_length_formula():
    model, cfg = _model("audio")
    lengths = torch.tensor([4001, 2999, 1234])
    pad = torch.arange(4001)[None, :] >= lengths[:, None]
    x, x_pad = model.embed(torch.randn(3, 4001), pad)
    expect = lengths.clone()
    for _, k, s in cfg.model.conv_layers:
        expect = (expect - k) // s + 1
    assert torch.equal((~x_pad).sum(1), expect), ((~x_pad).sum(1), expect)
    assert x.shape[1] == expect[0]


@pytest.mark.parametrize("modality", ["audio", "text"])
def test_padded_positions_do_not_change_real_outputs(modality):
    model, cfg = _model(modality)
    model.eval()
    src, _ = _source(modality, cfg, batch=2)
    if modality == "audio":
        pad = torch.zeros_like(src, dtype=torch.bool)
        pad[1, 2500:] = True
        other = src.clone()
        other[1, 2500:] = torch.randn(src.shape[1] - 2500)
    else:
        pad = torch.zeros_like(src, dtype=torch.bool)
        pad[1, 15:] = True
        src[1, 15:] = cfg.model.pad_id
        other = src.clone()
    a = model(src, pad)
    b = model(other, pad)
    real = ~a.padding_mask
    torch.testing.assert_close(a.x[real], b.x[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_mask_embedding_replaces_masked_positions(modality):
    model, cfg = _model(modality)
    model.eval()
    src, pad = _source(modality, cfg, batch=2)
    x, x_pad = model.embed(src, pad)
    none = model.encode(x, x_pad).x
    empty = model.encode(x, x_pad, mask=torch.zeros(x.shape[:2], dtype=torch.bool)).x
    torch.testing.assert_close(none, empty)
    mask = torch.zeros(x.shape[:2], dtype=torch.bool)
    mask[:, ::3] = True
    masked = model.encode(x, x_pad, mask=mask).x
    assert (masked - none).abs().max() > 1e-3
    # what a masked position holds does not matter any more
    x2 = x.clone()
    x2[mask] = torch.randn(int(mask.sum()), x.shape[-1])
    torch.testing.assert_close(model.encode(x2, x_pad, mask=mask).x, masked, rtol=1e-5, atol=1e-5)


def test_post_ln_final_output_is_the_last_block_output():
    model, cfg = _model("audio")
    model.eval()
    src, pad = _source("audio", cfg, batch=2)
    out = model(src, pad, return_layers=True)
    torch.testing.assert_close(out.x, out.block_results[-1])
    # post-LN: block output = LN(h + dropout(ffn(h))); the ffn branch (the v1 target) is its own
    block = model.blocks.blocks[-1]
    h_in = out.block_results[-2]
    a = block.attn_norm(h_in + block.attn(h_in, out.padding_mask))
    torch.testing.assert_close(block.ffn_norm(a + out.layer_results[-1]), out.x, rtol=1e-5, atol=1e-5)


def test_image_output_is_the_final_norm_of_the_last_block():
    model, cfg = _model("image")
    model.eval()
    src, _ = _source("image", cfg, batch=2)
    out = model(src, return_layers=True)
    torch.testing.assert_close(out.x, model.norm(out.block_results[-1]))
    # pre-LN with layer scale: block output = input + attention branch + ffn branch
    assert out.layer_results[-1].abs().max() > 0


@pytest.mark.parametrize("modality", ["image", "audio", "text"])
def test_gradients_reach_every_student_parameter(modality):
    model, cfg = _model(modality)
    src, pad = _source(modality, cfg, batch=2)
    x, x_pad = model.embed(src, pad)
    mask = None
    if modality != "text":
        mask = torch.zeros(x.shape[:2], dtype=torch.bool)
        mask[:, 1::2] = True
    model.encode(x, x_pad, mask=mask).x.pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == [], f"no gradient reached {missing}"


@pytest.mark.parametrize("modality", ["image", "audio", "text"])
def test_feature_encoder_prefixes_cover_what_embed_uses(modality):
    model, cfg = _model(modality)
    src, pad = _source(modality, cfg, batch=2)
    x, _ = model.embed(src, pad)
    x.sum().backward()
    used = {n for n, p in model.named_parameters() if p.grad is not None}
    prefixes = model.feature_encoder_prefixes()
    named = {n for n, _ in model.named_parameters() if n.startswith(prefixes)}
    assert used <= named, f"embed uses {used - named} outside feature_encoder_prefixes"
    assert not any(n.startswith("blocks.") for n in named)


def test_eval_mode_is_deterministic():
    model, cfg = _model("text", "model.dropout=0.3")
    model.eval()
    src, _ = _source("text", cfg)
    torch.testing.assert_close(model(src).x, model(src).x, rtol=0, atol=0)


def _qkv(b, h, t, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, t, d, generator=g, dtype=dtype) for _ in range(3)]


@pytest.mark.parametrize("t", [19, 37])
def test_attention_matches_the_float64_math_with_padding_and_bias(t):
    q, k, v = _qkv(2, 3, t, 16, seed=t)
    pad = torch.zeros(2, t, dtype=torch.bool)
    pad[1, t - 5:] = True
    bias = torch.randn(3, t, t, dtype=torch.float64, requires_grad=True)
    scores = (q @ k.transpose(-1, -2)) / 4.0 + bias
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    expect = torch.softmax(scores, -1) @ v
    for fn in (attention, attention_reference):
        out = fn(q, k, v, key_padding_mask=pad, attn_bias=bias)
        torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-10)
    grad, = torch.autograd.grad(attention(q, k, v, pad, bias).sum(), bias)
    grad_ref, = torch.autograd.grad(expect.sum(), bias)
    torch.testing.assert_close(grad, grad_ref)


def test_attention_without_bias_uses_sdpa_and_matches():
    q, k, v = _qkv(2, 2, 37, 32, seed=1, dtype=torch.float32)
    pad = torch.zeros(2, 37, dtype=torch.bool)
    pad[0, 30:] = True
    torch.testing.assert_close(attention(q, k, v, pad), attention_reference(q, k, v, pad),
                               rtol=1e-5, atol=1e-5)


def test_fully_padded_rows_give_zero_not_nan():
    q, k, v = _qkv(2, 2, 19, 16, seed=2, dtype=torch.float32)
    pad = torch.zeros(2, 19, dtype=torch.bool)
    pad[1] = True
    for fn in (attention, attention_reference):
        out = fn(q, k, v, key_padding_mask=pad)
        assert not torch.isnan(out).any()
        assert out[1].abs().max() == 0
        assert out[0].abs().max() > 0


def test_attention_rejects_bad_shapes():
    q, k, v = _qkv(2, 2, 19, 16, seed=3)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attention(q, k, v, key_padding_mask=torch.zeros(2, 18, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_bias"):
        attention(q, k, v, attn_bias=torch.zeros(3, 19, 19, dtype=torch.float64))
