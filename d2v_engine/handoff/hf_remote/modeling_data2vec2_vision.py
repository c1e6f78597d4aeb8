"""A data2vec 2.0 image encoder for transformers (written by d2v-engine's export; load with
AutoModel.from_pretrained(dir, trust_remote_code=True)).

data2vec 2.0's image model (fairseq examples/data2vec, layer_norm_first false) is post-LN, which
transformers' Data2VecVision (BEiT, pre-LN) cannot express:

    x = [CLS; patch_embed(pixel_values)] (+ learned positions)
    x = LayerNorm(x)
    per block: x = norm1(x + attn(x)); x = norm2(x + fc2(gelu(fc1(x))))
    last_hidden_state = x (no final norm), CLS first.

pixel_values are normalized as d2v-engine's loader does (ImageNet mean / std).
"""
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .configuration_data2vec2_vision import Data2Vec2VisionConfig


class RelativePositionBias(nn.Module):
    """BEiT's learned relative position bias over an h x w grid plus the CLS: H x T x T."""

    def __init__(self, grid, heads):
        super().__init__()
        h, w = grid
        self.num_distances = (2 * h - 1) * (2 * w - 1) + 3
        self.table = nn.Parameter(torch.zeros(self.num_distances, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"))
        coords = coords.flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
        rel[:, :, 0] += h - 1
        rel[:, :, 1] += w - 1
        rel[:, :, 0] *= 2 * w - 1
        index = torch.zeros((h * w + 1,) * 2, dtype=torch.long)
        index[1:, 1:] = rel.sum(-1)
        index[0, 0:] = self.num_distances - 3
        index[0:, 0] = self.num_distances - 2
        index[0, 0] = self.num_distances - 1
        self.register_buffer("index", index, persistent=False)

    def forward(self):
        n = self.index.shape[0]
        return self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, bias=None):
        b, t, c = x.shape

        def split(y):
            return y.view(b, t, self.heads, c // self.heads).transpose(1, 2)

        mask = None if bias is None else bias.unsqueeze(0).to(x.dtype)
        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                             split(self.v_proj(x)), attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    """Post-LN block (data2vec 2.0's AltBlock with layer_norm_first false)."""

    def __init__(self, dim, heads, ffn_dim, eps):
        super().__init__()
        self.attn = Attention(dim, heads)
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x, bias=None):
        x = self.attn_norm(x + self.attn(x, bias))
        return self.ffn_norm(x + self.fc2(F.gelu(self.fc1(x))))


class Data2Vec2VisionModel(PreTrainedModel):
    config_class = Data2Vec2VisionConfig
    base_model_prefix = "data2vec2_vision"
    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__(config)
        dim, side = config.hidden_size, config.image_size // config.patch_size
        self.patch_embed = nn.Conv2d(config.num_channels, dim, config.patch_size,
                                     config.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = (nn.Parameter(torch.zeros(1, side * side + 1, dim))
                          if config.use_absolute_position_embeddings else None)
        self.rel_pos_bias = (RelativePositionBias((side, side), config.num_attention_heads)
                             if config.use_shared_relative_position_bias else None)
        self.norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(
            Block(dim, config.num_attention_heads, config.intermediate_size, config.layer_norm_eps)
            for _ in range(config.num_hidden_layers))
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, self.config.initializer_range)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.data.fill_(1.0)
            module.bias.data.zero_()

    def forward(self, pixel_values, output_hidden_states=None, return_dict=None):
        """pixel_values B x C x H x W -> last_hidden_state B x (1 + patches) x hidden, CLS first."""
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        bias = self.rel_pos_bias() if self.rel_pos_bias is not None else None
        x = self.norm(x)
        hidden = [x]
        for block in self.blocks:
            x = block(x, bias)
            hidden.append(x)
        return BaseModelOutput(last_hidden_state=x,
                               hidden_states=tuple(hidden) if output_hidden_states else None)
