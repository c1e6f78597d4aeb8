"""Each base / v2 config against fairseq's recipe, written here from the reference's definitions:
the data2vec 2.0 image block and its init, what the EMA averages and what it copies, which
parameters are decayed, the tri-stage schedule's last steps, the v2 text teacher's input, the
instance-norm statistics over padding."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from d2v_engine.config import OptimConfig, load_config
from d2v_engine.objective import build_objective
from d2v_engine.objective.ema import EMATeacher, teacher_shared_prefixes
from d2v_engine.models import build_model
from d2v_engine.objective.optim import build_optimizer
from d2v_engine.objective.schedule import lr_factor
from d2v_engine.models.transformer import Block
from d2v_kernels.targets import teacher_targets

ROOT = Path(__file__).resolve().parent.parent
SPECIAL = {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 4}
RECIPES = [(m, v) for m in ("audio", "image", "text") for v in ("base", "v2")]
# Small shapes of the same architecture (every recipe choice kept).
SHRINK = ["model.embed_dim=64", "model.depth=3", "model.num_heads=4", "model.ffn_dim=128",
          "objective.top_k=2", "objective.decoder_dim=32", "objective.decoder_groups=4"]
SHRINK_MODALITY = {
    "audio": ["model.conv_layers=[[32,10,5],[32,3,2]]", "model.conv_pos=16",
              "model.conv_pos_groups=4", "model.conv_pos_depth=2"],
    "image": ["model.img_size=32", "model.patch_size=8"],
    "text": ["model.vocab_size=100", "model.max_positions=64"],
}


@pytest.fixture(autouse=True)
def _sdpa(monkeypatch):
    monkeypatch.setenv("D2V_ATTENTION", "sdpa")  # semantics here; kernels have their own tests
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _recipe(modality, version, *overrides):
    return load_config(ROOT / f"configs/{modality}_{version}.yaml",
                       SHRINK + SHRINK_MODALITY[modality] + list(overrides))


def _objective(cfg):
    torch.manual_seed(0)
    encoder = build_model(cfg.model, cfg.modality)
    return build_objective(cfg, encoder, SPECIAL if cfg.modality == "text" else None)


# --------------------------------------------------------------------------------------------
# data2vec 2.0 image block (AltBlock, layer_norm_first false) and init


def test_post_ln_block_is_altblock_op_order():
    """AltBlock(layer_norm_first=False): x += attn(x); r = norm1(x); t = mlp(r);
    out = norm2(r + t); the ffn target is t."""
    torch.manual_seed(0)
    block = Block(32, 4, 64, pre_ln=False, eps=1e-6).eval()
    x = torch.randn(2, 7, 32)
    out, target = block(x)
    a = block.attn(x)
    r = F.layer_norm(x + a, (32,), block.attn_norm.weight, block.attn_norm.bias, 1e-6)
    t = block.fc2(F.gelu(block.fc1(r)))
    ref = F.layer_norm(r + t, (32,), block.ffn_norm.weight, block.ffn_norm.bias, 1e-6)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(target, t, rtol=1e-5, atol=1e-6)


def test_image_v2_encoder_norms_the_input_and_has_no_final_norm():
    cfg = _recipe("image", "v2")
    assert cfg.model.layer_norm_first is False
    torch.manual_seed(0)
    enc = build_model(cfg.model, "image").eval()
    src = torch.randn(2, 3, 32, 32)
    out = enc(src, return_layers=True)
    # reference order: patches, CLS first, (learned) positions, LayerNorm, blocks, nothing after
    x = enc.patch_embed(src).flatten(2).transpose(1, 2)
    x = torch.cat([enc.cls_token.expand(2, -1, -1), x], 1) + enc.pos_embed
    x = F.layer_norm(x, (64,), enc.norm.weight, enc.norm.bias, 1e-6)
    for block in enc.blocks.blocks:
        x, _ = block(x)
    torch.testing.assert_close(out.x, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.x, out.block_results[-1])
    assert all(b.attn.k_proj.bias is not None for b in enc.blocks.blocks), "AltBlock has qkv bias"
    eps = {m.eps for m in enc.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert eps == {1e-6}, f"fairseq v2 image norm_eps is 1e-6, got {eps}"


def _init_stats(layer_norm_first, depth=4, dim=256):
    overrides = [f"model.layer_norm_first={str(layer_norm_first).lower()}", f"model.depth={depth}",
                 f"model.embed_dim={dim}", f"model.ffn_dim={4 * dim}", "model.num_heads=4",
                 "model.drop_path=0.0", "model.layer_scale_init=0.0", "model.rel_pos_bias=false",
                 "model.img_size=64", "model.patch_size=16", "objective.top_k=2"]
    recipe = "image_base" if layer_norm_first else "image_v2"
    cfg = load_config(ROOT / f"configs/{recipe}.yaml", overrides)
    torch.manual_seed(0)
    return build_model(cfg.model, "image")


def test_image_v2_init_is_bert_with_cls_at_std_one():
    enc = _init_stats(False)
    for i, block in enumerate(enc.blocks.blocks):
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            lin = getattr(block.attn, name)
            assert lin.weight.std().item() == pytest.approx(0.02, rel=0.05), (i, name)
            assert lin.bias is not None and lin.bias.abs().max() == 0
        # no depth rescale: the last block's output projections are still N(0, 0.02)
        assert block.fc2.weight.std().item() == pytest.approx(0.02, rel=0.05), i
        assert block.fc1.bias.abs().max() == 0
    assert enc.cls_token.std().item() == pytest.approx(1.0, rel=0.15)
    w = enc.patch_embed.weight.view(enc.patch_embed.weight.shape[0], -1)
    bound = math.sqrt(6.0 / (w.shape[0] + w.shape[1]))  # xavier-uniform over (out, in * k * k)
    assert w.abs().max().item() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3),
                                                                              rel=0.05)


def test_image_v1_init_is_beit():
    enc = _init_stats(True)
    for i, block in enumerate(enc.blocks.blocks):
        assert block.attn.k_proj.bias is None, "BEiT attention has no k bias"
        assert block.attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
        scale = 0.02 / math.sqrt(2.0 * (i + 1))
        assert block.attn.out_proj.weight.std().item() == pytest.approx(scale, rel=0.08), i
        assert block.fc2.weight.std().item() == pytest.approx(scale, rel=0.08), i
    assert enc.cls_token.std().item() == pytest.approx(0.02, rel=0.2)
    assert {m.eps for m in enc.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}


def test_image_post_ln_rejects_layer_scale():
    from d2v_engine.errors import ConfigError

    cfg = load_config(ROOT / "configs/tiny_image_v2.yaml", ["model.layer_scale_init=0.1"])
    with pytest.raises(ConfigError, match="layer_scale_init"):
        build_model(cfg.model, "image")


# --------------------------------------------------------------------------------------------
# EMA: which parameters the teacher averages and which it copies


def _reference_averaged(modality, version, names):
    """The averaged set, from fairseq: v1 EMAModule over the encoder with skip keys; v2 over the
    model without decoder (and without the local encoder when ema_local_encoder is false),
    parameters without requires_grad copied."""
    def under(*prefixes):
        return {n for n in names if n.startswith(prefixes)}
    if (modality, version) == ("audio", "base"):  # ema_transformer_only + ema_layers_only
        return under("blocks.", "norm.")
    if (modality, version) == ("audio", "v2"):  # ema_encoder_only false, ema_local_encoder false
        return under("blocks.", "norm.", "pos_conv.")
    if (modality, version) == ("image", "base"):  # ema_transformer_only: the TransformerEncoder
        return under("blocks.", "norm.", "rel_pos_bias.")
    if (modality, version) == ("image", "v2"):  # ema_local_encoder true: all but the mask emb.
        return set(names) - {"mask_emb"}  # ours only, frozen in v2 (never used)
    return under("blocks.")  # text: ema_transformer_layers_only (v1), ema_encoder_only (v2)


@pytest.mark.parametrize("modality,version", RECIPES)
def test_ema_averages_and_copies_what_the_reference_does(modality, version):
    cfg = _recipe(modality, version)
    model = _objective(cfg)
    encoder = model.encoder
    teacher = EMATeacher(encoder, teacher_shared_prefixes(encoder, cfg.objective.ema_scope))
    names = [n for n, _ in encoder.named_parameters()]
    expect = _reference_averaged(modality, version, names)
    assert set(teacher.averaged) == expect, (sorted(set(teacher.averaged) ^ expect))
    assert set(teacher.shared) == set(names) - expect
    before = {n: p.detach().clone() for n, p in teacher.model.named_parameters()}
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p))
    teacher.update(encoder, 0.75)
    for n, p in teacher.model.named_parameters():
        s = encoder.get_parameter(n)
        want = 0.75 * before[n] + 0.25 * s if n in expect else s
        torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-6, msg=n)


def test_audio_v2_positional_conv_is_averaged_v1_copied():
    for version, averaged in (("base", False), ("v2", True)):
        cfg = _recipe("audio", version)
        enc = _objective(cfg).encoder
        teacher = EMATeacher(enc, teacher_shared_prefixes(enc, cfg.objective.ema_scope))
        assert ("pos_conv.convs.0.weight" in teacher.averaged) is averaged, version


# --------------------------------------------------------------------------------------------
# v2 text: the teacher encodes the student's local features, embedding dropout included


def test_v2_text_teacher_reads_the_students_embedding_with_its_dropout():
    cfg = _recipe("text", "v2")
    assert cfg.model.dropout > 0
    model = _objective(cfg).train()
    teacher = EMATeacher(model.encoder, teacher_shared_prefixes(model.encoder,
                                                                cfg.objective.ema_scope))
    seen = {}
    embed, encode = model.encoder.embed, teacher.model.encode

    def student_embed(source, padding_mask=None):
        seen["student"] = embed(source, padding_mask)[0]
        return seen["student"], padding_mask if padding_mask is not None else source.eq(1)

    def teacher_encode(x, padding_mask=None, **kw):
        seen["teacher"] = x
        return encode(x, padding_mask, **kw)

    model.encoder.embed, teacher.model.encode = student_embed, teacher_encode
    g = torch.Generator().manual_seed(0)
    source = torch.randint(5, 100, (2, 24), generator=g)
    model({"source": source, "padding_mask": source.eq(1)}, teacher.model,
          torch.tensor([3, 4]))
    assert torch.equal(seen["teacher"], seen["student"].detach())
    model.encoder.embed = embed
    clean = model.encoder.eval().embed(source)[0]
    assert not torch.allclose(seen["teacher"], clean), "dropout did not act on the teacher input"


# --------------------------------------------------------------------------------------------
# weight decay


def _fairseq_decayed(cfg, names_shapes):
    """plain adam: every parameter; composite (v2 image / text): optim_overrides set
    weight_decay_scale 0 where len(p.shape) == 1 or the name ends with .bias."""
    if cfg.optim.weight_decay_exempt == "none":
        return {n for n, _ in names_shapes}
    return {n for n, shape in names_shapes if not (len(shape) == 1 or n.endswith(".bias"))}


@pytest.mark.parametrize("modality,version", RECIPES)
def test_weight_decay_follows_the_reference_optimizer(modality, version):
    cfg = _recipe(modality, version)
    composite = (modality, version) in (("image", "v2"), ("text", "v2"))
    assert cfg.optim.weight_decay_exempt == ("1d" if composite else "none")
    model = _objective(cfg)
    named = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    opt = build_optimizer(model, cfg.optim, 1e-3, torch.device("cpu"))
    ids = {id(p): n for n, p in model.named_parameters()}
    decayed = {ids[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    exempt = {ids[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decayed == _fairseq_decayed(cfg, named)
    assert decayed | exempt == {n for n, _ in named}
    if composite:  # spot checks of the rule
        assert "encoder.blocks.blocks.0.attn_norm.weight" in exempt
        assert "encoder.blocks.blocks.0.fc1.weight" in decayed


def test_beit_rule_also_exempts_cls_mask_and_positions():
    cfg = _recipe("image", "base", "optim.weight_decay_exempt=beit", "model.rel_pos_bias=false")
    model = _objective(cfg)
    opt = build_optimizer(model, cfg.optim, 1e-3, torch.device("cpu"))
    ids = {id(p): n for n, p in model.named_parameters()}
    exempt = {ids[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    for name in ("encoder.cls_token", "encoder.mask_emb", "encoder.pos_embed",
                 "encoder.blocks.blocks.0.gamma_1", "encoder.blocks.blocks.0.fc1.bias"):
        assert name in exempt, name
    assert "encoder.blocks.blocks.0.fc1.weight" not in exempt


# --------------------------------------------------------------------------------------------
# learning rate


def _fairseq_tri_stage(num_updates, max_update, ratios, peak=1.0, init_scale=0.01,
                       final_scale=0.01):
    """fairseq TriStageLRSchedule.step_update with phase_ratio, as a multiplier of the peak."""
    warmup, hold, decay = (int(max_update * r) for r in ratios)
    if num_updates < warmup:
        return init_scale + (peak - init_scale) / warmup * num_updates
    if num_updates < warmup + hold:
        return peak
    if num_updates <= warmup + hold + decay:
        return peak * math.exp(math.log(final_scale) / decay * (num_updates - warmup - hold))
    return final_scale


@pytest.mark.parametrize("max_steps", [400000, 1000, 137])
def test_audio_v1_lr_multiplier_matches_fairseq_tri_stage(max_steps):
    cfg = load_config(ROOT / "configs/audio_base.yaml").optim
    assert cfg.final_lr_scale == 0.01
    for step in (0, 1, max_steps // 2, max_steps - 2, max_steps - 1, max_steps, max_steps + 5):
        ref = _fairseq_tri_stage(step, max_steps, cfg.tri_stage)
        assert lr_factor(cfg, step, max_steps) == pytest.approx(ref, rel=1e-12), step
    stages = [int(max_steps * r) for r in cfg.tri_stage]
    if sum(stages) == max_steps:  # the last update is one decay step short of 0.01
        want = 0.01 ** ((stages[2] - 1) / stages[2])
        assert lr_factor(cfg, max_steps - 1, max_steps) == pytest.approx(want)


def test_tri_stage_default_final_scale_is_fairseqs():
    cfg = OptimConfig(schedule="tri_stage", tri_stage=[0.1, 0.4, 0.5])
    assert lr_factor(cfg, 100, 100) == pytest.approx(0.01)


# --------------------------------------------------------------------------------------------
# instance norm over padded steps


def test_instance_norm_counts_padded_steps_as_fairseqs_f_instance_norm():
    cfg = load_config(ROOT / "configs/audio_base.yaml")
    assert cfg.objective.instance_norm_padding == "include"
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(2, 9, 8, generator=g) for _ in range(3)]
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    ours = teacher_targets(layers, pad, layer_norm="instance", final_norm="none",
                           instance_norm_padding=cfg.objective.instance_norm_padding)
    ref = sum(F.instance_norm(y.transpose(1, 2)).transpose(1, 2) for y in layers) / 3
    # the targets at padded steps are never used (ours are 0 there); the real steps' statistics
    # include the padded ones, as fairseq's
    torch.testing.assert_close(ours[~pad], ref[~pad], rtol=1e-5, atol=1e-5)
