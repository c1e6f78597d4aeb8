"""Feature encoders and the per-modality data2vec encoders (student and teacher share the class).

audio: wav2vec 2.0 conv stack on raw 16 kHz waveform, layer norm, projection, convolutional
       positional embedding, post-LN blocks (fairseq data2vec_audio / HF Data2VecAudio).
image: 16x16 patch embedding, CLS token, then (model.layer_norm_first) either BEiT pre-LN blocks
       with layer scale and one relative position bias shared by all blocks and a final layer norm
       (fairseq data2vec_vision, data2vec 1.0) or a layer norm on the blocks' input and post-LN
       blocks without final norm (data2vec 2.0's AltBlock image model).
text:  token + learned positions (RoBERTa), embedding layer norm, post-LN blocks (data2vec_text).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from d2v_engine.config import ModelConfig
from d2v_engine.errors import ConfigError
from d2v_engine.models.transformer import BlockStack


@dataclass
class EncoderOutput:
    x: torch.Tensor  # B x T' x C final output (T' = T + num_extra_tokens)
    padding_mask: torch.Tensor | None  # B x T' bool, True = padded
    layer_results: list = field(default_factory=list)  # per block: FFN branch before residual
    block_results: list = field(default_factory=list)  # per block: the block's output


def context_norm_eps(cfg: ModelConfig, default: float = 1e-5) -> float:
    """eps of the context encoder's LayerNorms: model.norm_eps, else the layout's reference value."""
    return cfg.norm_eps if cfg.norm_eps is not None else default


class Data2VecEncoder(nn.Module):
    """Common interface of the modality encoders (the objective and the EMA teacher rely on it)."""

    modality: str
    num_extra_tokens: int  # leading tokens (image CLS) that are neither masked nor targets
    embed_dim: int

    def feature_encoder_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes the EMA teacher copies from the student instead of averaging
        under objective.ema_scope=transformer (fairseq's ema_transformer_only / ema_layers_only
        skip keys)."""
        raise NotImplementedError

    def local_encoder_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes of the local feature encoder, the part of `embed` that fairseq's
        data2vec 2.0 calls local_encoder + project_features (copied under ema_scope=context)."""
        raise NotImplementedError

    def embed(self, source, padding_mask=None):
        """Feature encoder: source -> (B x T x C features, B x T bool padding mask or None)."""
        raise NotImplementedError

    def token_layout(self, source, padding_mask=None) -> tuple[int, torch.Tensor | None]:
        """(T, B x T padding mask or None) that embed() gives, from the shapes and the padding
        alone (no weights, no feature computation): what masks need, before the step."""
        raise NotImplementedError

    def encode(self, x, padding_mask=None, mask=None, return_layers=False,
               skip_padded_queries=False) -> EncoderOutput:
        """Context encoder over B x T x C features; mask B x T bool (True = masked).
        skip_padded_queries: attention skips the padded positions' queries, whose outputs
        (and layer results) are then not the unskipped ones -- for callers that never read
        them; every other position is unchanged."""
        raise NotImplementedError

    def forward(self, source, padding_mask=None, mask=None, return_layers=False) -> EncoderOutput:
        """embed then encode."""
        x, x_pad = self.embed(source, padding_mask)
        return self.encode(x, x_pad, mask=mask, return_layers=return_layers)

    def _check_encode(self, x, padding_mask, mask):
        if x.ndim != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"{self.modality} encode: x must be B x T x {self.embed_dim}, "
                             f"got {tuple(x.shape)}")
        for name, m in (("padding_mask", padding_mask), ("mask", mask)):
            if m is not None and (m.dtype != torch.bool or m.shape != x.shape[:2]):
                raise ValueError(f"{self.modality} encode: {name} must be bool "
                                 f"{tuple(x.shape[:2])}, got {m.dtype} {tuple(m.shape)}")


def _bert_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()


class _GradMult(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ConvFeatureExtractor(nn.Module):
    """wav2vec 2.0 feature extractor in layer-norm mode: conv -> LayerNorm(channels) -> GELU."""

    def __init__(self, layers: list, bias: bool):
        super().__init__()
        self.layers = layers
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        in_ch = 1
        for ch, k, s in layers:
            conv = nn.Conv1d(in_ch, ch, k, stride=s, bias=bias)
            nn.init.kaiming_normal_(conv.weight)
            self.convs.append(conv)
            self.norms.append(nn.LayerNorm(ch))
            in_ch = ch

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for _, k, s in self.layers:
            lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
        return lengths

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        x = wave.unsqueeze(1)  # B x 1 x L
        for conv, norm in zip(self.convs, self.norms):
            x = F.gelu(norm(conv(x).transpose(1, 2)).transpose(1, 2))
        return x.transpose(1, 2)  # B x T x C


class ConvPositionalEmbedding(nn.Module):
    """data2vec audio's positional conv: depth x (grouped conv, same length, LayerNorm, GELU)."""

    def __init__(self, dim: int, width: int, groups: int, depth: int):
        super().__init__()
        self.kernel = max(3, width // depth)
        self.convs = nn.ModuleList(
            nn.Conv1d(dim, dim, self.kernel, padding=self.kernel // 2, groups=groups)
            for _ in range(depth)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim, elementwise_affine=False) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2)
        for conv, norm in zip(self.convs, self.norms):
            y = conv(y)
            if self.kernel % 2 == 0:  # even kernels make one extra frame
                y = y[:, :, :-1]
            y = F.gelu(norm(y.transpose(1, 2)).transpose(1, 2))
        return y.transpose(1, 2)


class AudioEncoder(Data2VecEncoder):
    """data2vec audio (wav2vec 2.0 layout): conv features, conv positions, post-LN blocks."""

    modality = "audio"
    num_extra_tokens = 0

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_dim = cfg.embed_dim
        self.feature_grad_mult = cfg.feature_grad_mult
        self.feature_extractor = ConvFeatureExtractor(cfg.conv_layers, cfg.conv_bias)
        conv_dim = cfg.conv_layers[-1][0]
        self.feature_norm = nn.LayerNorm(conv_dim)
        self.feature_proj = nn.Linear(conv_dim, cfg.embed_dim)
        self.dropout_input = nn.Dropout(cfg.encoder_dropout_input)
        self.mask_emb = nn.Parameter(torch.empty(cfg.embed_dim).uniform_())
        self.pos_conv = ConvPositionalEmbedding(cfg.embed_dim, cfg.conv_pos, cfg.conv_pos_groups,
                                                cfg.conv_pos_depth)
        self.layer_norm_first = cfg.layer_norm_first
        eps = context_norm_eps(cfg)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=eps)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = BlockStack(cfg, pre_ln=cfg.layer_norm_first, eps=eps)
        _bert_init(self.blocks)

    def feature_encoder_prefixes(self) -> tuple[str, ...]:
        # data2vec audio (ema_transformer_only + ema_layers_only): everything outside the
        # encoder, and the encoder's positional conv, is the student's.
        return ("feature_extractor.", "feature_norm.", "feature_proj.", "mask_emb", "pos_conv.")

    def token_layout(self, source, padding_mask=None):
        frames = int(self.feature_extractor.output_lengths(torch.tensor(source.shape[1])))
        return frames, None if padding_mask is None else self.feature_padding_mask(padding_mask,
                                                                                    frames)

    def local_encoder_prefixes(self) -> tuple[str, ...]:
        # fairseq v2 audio: local_encoder = the conv stack, project_features = LayerNorm + Linear.
        return ("feature_extractor.", "feature_norm.", "feature_proj.")

    def feature_padding_mask(self, padding_mask: torch.Tensor, frames: int) -> torch.Tensor:
        """B x L sample padding mask -> B x frames frame padding mask."""
        lengths = self.feature_extractor.output_lengths((~padding_mask).sum(1))
        return torch.arange(frames, device=padding_mask.device)[None, :] >= lengths[:, None]

    def embed(self, source, padding_mask=None):
        """B x L float waveform (B x L padding) -> B x T x C frame features, B x T frame padding."""
        if source.ndim != 2 or not source.is_floating_point():
            raise ValueError(f"audio embed: source must be a float B x L waveform, got "
                             f"{source.dtype} {tuple(source.shape)}")
        if padding_mask is not None and (padding_mask.shape != source.shape
                                         or padding_mask.dtype != torch.bool):
            raise ValueError(f"audio embed: padding_mask must be bool {tuple(source.shape)}, got "
                             f"{padding_mask.dtype} {tuple(padding_mask.shape)}")
        if self.feature_grad_mult == 0.0:  # fairseq: a frozen extractor runs without autograd
            with torch.no_grad():
                feats = self.feature_extractor(source)
        else:
            feats = self.feature_extractor(source)
            if self.feature_grad_mult != 1.0 and feats.requires_grad:
                feats = _GradMult.apply(feats, self.feature_grad_mult)
        x = self.feature_proj(self.feature_norm(feats))
        frame_pad = None
        if padding_mask is not None:
            frame_pad = self.feature_padding_mask(padding_mask, x.shape[1])
        return x, frame_pad

    def encode(self, x, padding_mask=None, mask=None, return_layers=False,
               skip_padded_queries=False) -> EncoderOutput:
        """dropout_input, mask embedding, conv positions, blocks: B x T x C -> EncoderOutput."""
        self._check_encode(x, padding_mask, mask)
        x = self.dropout_input(x)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        x = x + self.pos_conv(x)
        if not self.layer_norm_first:
            x = self.norm(x)
        x = self.dropout(x)
        x, ffn, blocks = self.blocks(x, padding_mask, None, return_layers, skip_padded_queries)
        if self.layer_norm_first:
            x = self.norm(x)
        return EncoderOutput(x, padding_mask, ffn, blocks)


class RelativePositionBias(nn.Module):
    """BEiT's learned relative position bias over a h x w grid plus a CLS token: H x T' x T'."""

    def __init__(self, grid: tuple[int, int], heads: int):
        super().__init__()
        h, w = grid
        self.num_distances = (2 * h - 1) * (2 * w - 1) + 3
        self.table = nn.Parameter(torch.zeros(self.num_distances, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        rel[:, :, 0] += h - 1
        rel[:, :, 1] += w - 1
        rel[:, :, 0] *= 2 * w - 1
        index = torch.zeros((h * w + 1,) * 2, dtype=torch.long)
        index[1:, 1:] = rel.sum(-1)
        index[0, 0:] = self.num_distances - 3  # cls -> token
        index[0:, 0] = self.num_distances - 2  # token -> cls
        index[0, 0] = self.num_distances - 1  # cls -> cls
        self.register_buffer("index", index, persistent=False)

    def forward(self) -> torch.Tensor:
        n = self.index.shape[0]
        return self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)


class ImageEncoder(Data2VecEncoder):
    """data2vec vision: patches, CLS, then one of two block layouts (model.layer_norm_first).

    true, BEiT (data2vec 1.0, fairseq data2vec_vision): pre-LN blocks with layer scale, the shared
    relative bias, a final LayerNorm (`norm`); q and v biases but no k bias; trunc-normal(0.02)
    Linear weights with each block's two output projections divided by sqrt(2 * (i + 1)); CLS and
    mask embedding at std 0.02; LayerNorm eps 1e-5.
    false, data2vec 2.0 (data2vec2.py with layer_norm_first false: modalities/images.py's
    context_encoder norm, then AltBlocks): a LayerNorm (`norm`) on the blocks' input, CLS
    included, post-LN blocks, no final norm; q, k and v biases; BERT init (init_bert_params:
    normal(0.02) Linear weights, zero biases, no depth rescale); the patch conv xavier-uniform;
    CLS at std 1 (init_extra_token_zero false); LayerNorm eps 1e-6 (norm_eps).
    Without rel_pos_bias a learned absolute position embedding (BEiT's use_abs_pos_emb) is added to
    the patches and the CLS before the blocks.
    """

    modality = "image"
    num_extra_tokens = 1

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_dim = cfg.embed_dim
        self.pre_ln = cfg.layer_norm_first
        self.grid = (cfg.img_size // cfg.patch_size,) * 2
        self.image_shape = (cfg.in_chans, cfg.img_size, cfg.img_size)
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.mask_emb = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.rel_pos_bias = RelativePositionBias(self.grid, cfg.num_heads) if cfg.rel_pos_bias else None
        if cfg.rel_pos_bias:
            self.pos_embed = None
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, cfg.embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        eps = context_norm_eps(cfg, 1e-5 if self.pre_ln else 1e-6)
        self.blocks = BlockStack(cfg, pre_ln=self.pre_ln, k_bias=not self.pre_ln, eps=eps)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=eps)  # pre-LN: final norm; post-LN: input norm
        if self.pre_ln:
            self._init_beit()
        else:
            self._init_data2vec2()

    def _init_beit(self):
        # BEiT / data2vec vision: trunc-normal Linear layers in the transformer, each block's two
        # output projections divided by sqrt(2 * depth index); the patch conv keeps torch's init.
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.mask_emb, std=0.02)
        with torch.no_grad():
            for i, block in enumerate(self.blocks.blocks):
                block.attn.out_proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                block.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))

    def _init_data2vec2(self):
        # data2vec 2.0: PatchEmbed's conv weight xavier-uniform over (out, in * k * k), then
        # init_bert_params over the model, which leaves the conv and the extra tokens alone; the
        # CLS is N(0, 1). Our mask embedding (v2 drops masked patches and never uses it) keeps
        # the v1 init.
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        _bert_init(self.blocks)
        nn.init.normal_(self.cls_token, std=1.0)
        nn.init.trunc_normal_(self.mask_emb, std=0.02)

    def feature_encoder_prefixes(self) -> tuple[str, ...]:
        # data2vec vision's EMA covers the transformer only; patches and CLS are the student's.
        return ("patch_embed.", "cls_token", "mask_emb")

    def local_encoder_prefixes(self) -> tuple[str, ...]:
        return ("patch_embed.",)  # fairseq v2 image: local_encoder = PatchEmbed

    def embed(self, source, padding_mask=None):
        """B x 3 x H x W -> B x N x C patch embeddings (row-major grid), no padding."""
        if source.ndim != 4 or source.shape[1:] != self.image_shape:
            raise ValueError(f"image embed: source must be B x {' x '.join(map(str, self.image_shape))}"
                             f", got {tuple(source.shape)}")
        return self.patch_embed(source).flatten(2).transpose(1, 2), None

    def token_layout(self, source, padding_mask=None):
        return self.grid[0] * self.grid[1], None

    def run_blocks(self, x, key_padding_mask, bias, return_layers):
        """CLS-first tokens B x T' x C through the layout's norms and blocks -> (x, ffn, blocks)."""
        if not self.pre_ln:
            x = self.norm(x)
        x, ffn, blocks = self.blocks(x, key_padding_mask, bias, return_layers)
        if self.pre_ln:
            x = self.norm(x)
        return x, ffn, blocks

    def encode(self, x, padding_mask=None, mask=None, return_layers=False,
               skip_padded_queries=False) -> EncoderOutput:
        """Mask embedding over patches, CLS, positions, norms and blocks: T' = T + 1 (patches
        have no padding: skip_padded_queries changes nothing)."""
        self._check_encode(x, padding_mask, mask)
        if padding_mask is not None:
            raise ValueError("image encode: patches have no padding; padding_mask must be None")
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_emb.to(x.dtype), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        x, ffn, blocks = self.run_blocks(x, None, bias, return_layers)
        return EncoderOutput(x, None, ffn, blocks)


class TextEncoder(Data2VecEncoder):
    """data2vec text (RoBERTa layout): token + learned positions, post-LN blocks."""

    modality = "text"
    num_extra_tokens = 0

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_dim = cfg.embed_dim
        self.pad_id = cfg.pad_id
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embed_dim, padding_idx=cfg.pad_id)
        self.embed_positions = nn.Embedding(cfg.max_positions + cfg.pad_id + 1, cfg.embed_dim,
                                            padding_idx=cfg.pad_id)
        self.embed_norm = nn.LayerNorm(cfg.embed_dim)
        self.dropout = nn.Dropout(cfg.dropout)
        eps = context_norm_eps(cfg)
        self.blocks = BlockStack(cfg, pre_ln=cfg.layer_norm_first, eps=eps)
        self.final_norm = nn.LayerNorm(cfg.embed_dim, eps=eps) if cfg.layer_norm_first else None
        _bert_init(self)

    def feature_encoder_prefixes(self) -> tuple[str, ...]:
        return ("embed_tokens.", "embed_positions.", "embed_norm.")

    def local_encoder_prefixes(self) -> tuple[str, ...]:
        # fairseq v2 text: TextLocalEncoder = token + position embeddings, LayerNorm, dropout.
        return ("embed_tokens.", "embed_positions.", "embed_norm.")

    def embed(self, source, padding_mask=None):
        """B x T int64 ids -> B x T x C (tokens + RoBERTa positions, LN, dropout), B x T padding."""
        if source.ndim != 2 or source.dtype != torch.long:
            raise ValueError(f"text embed: source must be int64 B x T ids, got {source.dtype} "
                             f"{tuple(source.shape)}")
        if padding_mask is None:
            padding_mask = source.eq(self.pad_id)
        elif padding_mask.shape != source.shape or padding_mask.dtype != torch.bool:
            raise ValueError(f"text embed: padding_mask must be bool {tuple(source.shape)}, got "
                             f"{padding_mask.dtype} {tuple(padding_mask.shape)}")
        keep = (~padding_mask).long()
        positions = torch.cumsum(keep, dim=1) * keep + self.pad_id
        max_positions = self.embed_positions.num_embeddings - self.pad_id - 1
        if source.shape[1] > max_positions:
            raise ConfigError(f"config key 'model.max_positions': {max_positions} is less than a "
                              f"batch of {source.shape[1]} tokens (data.max_tokens)")
        x = self.embed_tokens(source) + self.embed_positions(positions)
        return self.dropout(self.embed_norm(x)), padding_mask

    def token_layout(self, source, padding_mask=None):
        return source.shape[1], source.eq(self.pad_id) if padding_mask is None else padding_mask

    def encode(self, x, padding_mask=None, mask=None, return_layers=False,
               skip_padded_queries=False) -> EncoderOutput:
        """Post-LN blocks over embedded tokens (masking happened on the ids)."""
        self._check_encode(x, padding_mask, mask)
        if mask is not None:
            raise ValueError("text masks token ids before embed(); encode() takes mask=None")
        if padding_mask is not None:  # fairseq TransformerEncoder zeroes padded embeddings
            x = x.masked_fill(padding_mask[..., None], 0.0)
        x, ffn, blocks = self.blocks(x, padding_mask, None, return_layers, skip_padded_queries)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return EncoderOutput(x, padding_mask, ffn, blocks)


ENCODERS: dict[str, type[Data2VecEncoder]] = {"audio": AudioEncoder, "image": ImageEncoder, "text": TextEncoder}


def build_model(cfg: ModelConfig, modality: str) -> Data2VecEncoder:
    """The data2vec encoder of `modality` (student architecture; the teacher is its EMA copy)."""
    if modality not in ENCODERS:
        raise ConfigError(f"config key 'modality': got {modality!r}, expected one of "
                          f"{', '.join(ENCODERS)}")
    if not cfg.layer_norm_first:
        # data2vec 2.0's image AltBlocks have drop path; fairseq's post-LN audio / text layers
        # (wav2vec 2.0, RoBERTa) have neither; no post-LN block has layer scale.
        keys = ("layer_scale_init",) if modality == "image" else ("drop_path", "layer_scale_init")
        for key in keys:
            if getattr(cfg, key) > 0:
                raise ConfigError(f"config key 'model.{key}': post-LN {modality} blocks (model."
                                  f"layer_norm_first=false) have no {key.replace('_', ' ')}; "
                                  f"set it to 0")
    return ENCODERS[modality](cfg)
