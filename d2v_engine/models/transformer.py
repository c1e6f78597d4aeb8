"""The shared context encoder: self-attention + GELU MLP blocks, post-LN (wav2vec 2.0's
TransformerSentenceEncoderLayer, fairseq's TransformerEncoderLayer, data2vec 2.0's AltBlock with
layer_norm_first false) or pre-LN with layer scale and drop path (BEiT, data2vec vision)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from d2v_kernels.ops import attention


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v, out projections (1:1 with HF Data2Vec)."""

    def __init__(self, dim: int, heads: int, dropout: float, k_bias: bool = True):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=k_bias)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, key_padding_mask=None, attn_bias=None, skip_padded_queries=False):
        """x: B x T x C; key_padding_mask: B x T bool; attn_bias: H x T x T -> B x T x C.
        skip_padded_queries: the padded positions' outputs are 0 (for callers that never read
        them; d2v_kernels.attention)."""
        b, t, c = x.shape

        def split(y):
            return y.view(b, t, self.heads, c // self.heads).transpose(1, 2)

        out = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)),
                        key_padding_mask=key_padding_mask, attn_bias=attn_bias,
                        dropout_p=self.dropout if self.training else 0.0,
                        skip_padded_queries=skip_padded_queries)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zeroes a sample's whole branch with probability p, rescales the rest."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - p)
    return x * keep / (1.0 - p)


class Block(nn.Module):
    """One transformer block; forward returns (block output, FFN branch before the last residual).

    The FFN branch is fairseq's "fc" layer result: post-LN, fc2's output before dropout (wav2vec 2.0
    and fairseq TransformerEncoderLayer; AltBlock's ffn target); pre-LN, BEiT's
    fc_feature = drop_path(gamma_2 * mlp).
    It is returned only when asked for (`branch`, the teacher's return_layers), else None: fc2's
    output on B x T x C is a view (linear folds to 2-D and views back), and FSDP2 registers its
    pre-backward hook on every grad-requiring output of a sharded block, warning for views since an
    in-place op on one would drop the hook. The student never uses the branch, so it is not
    returned, and the teacher asks for it under no_grad, where FSDP2 registers no hook.

    Post-LN: x = attn_norm(x + drop_path(dropout(attn(x)))); out = ffn_norm(x + drop_path(
    dropout(mlp(x)))) (drop path as AltBlock; 0 in the reference's v1 audio / text layers).
    Pre-LN: x = x + drop_path(gamma_1 * dropout(attn(attn_norm(x)))); out = x + drop_path(
    gamma_2 * dropout(mlp(ffn_norm(x)))).
    """

    def __init__(self, dim, heads, ffn_dim, pre_ln, dropout=0.0, attention_dropout=0.0,
                 activation_dropout=0.0, drop_path=0.0, layer_scale_init=0.0, k_bias=True,
                 eps=1e-5):
        super().__init__()
        if not pre_ln and layer_scale_init > 0:
            raise ValueError("layer scale exists only in pre-LN (BEiT) blocks")
        self.pre_ln, self.drop_path = pre_ln, drop_path
        self.attn = SelfAttention(dim, heads, attention_dropout, k_bias=k_bias)
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.activation_dropout = nn.Dropout(activation_dropout)
        if layer_scale_init > 0:
            self.gamma_1 = nn.Parameter(torch.full((dim,), layer_scale_init))
            self.gamma_2 = nn.Parameter(torch.full((dim,), layer_scale_init))
        else:
            self.gamma_1 = self.gamma_2 = None

    def _mlp(self, x):
        return self.fc2(self.activation_dropout(F.gelu(self.fc1(x))))

    def forward(self, x, key_padding_mask=None, attn_bias=None, branch=True,
                skip_padded_queries=False):
        """x: B x T x C -> (B x T x C output, B x T x C FFN branch, or None without `branch`)."""
        if self.pre_ln:
            a = self.dropout(self.attn(self.attn_norm(x), key_padding_mask, attn_bias,
                                       skip_padded_queries))
            if self.gamma_1 is not None:
                a = self.gamma_1 * a
            x = x + drop_path(a, self.drop_path, self.training)
            fc = self.dropout(self._mlp(self.ffn_norm(x)))
            if self.gamma_2 is not None:
                fc = self.gamma_2 * fc
            fc = drop_path(fc, self.drop_path, self.training)
            return x + fc, fc if branch else None
        a = self.dropout(self.attn(x, key_padding_mask, attn_bias, skip_padded_queries))
        x = self.attn_norm(x + drop_path(a, self.drop_path, self.training))
        fc = self._mlp(x)
        out = drop_path(self.dropout(fc), self.drop_path, self.training)
        return self.ffn_norm(x + out), fc if branch else None


def _rng_restored(device: torch.device):
    """Restores the CPU RNG state (and `device`'s, for an accelerator) on exit."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


class BlockStack(nn.Module):
    """cfg.depth blocks; drop path rises linearly from 0 to cfg.drop_path with depth (BEiT)."""

    def __init__(self, cfg, pre_ln: bool, k_bias: bool = True, eps: float = 1e-5):
        super().__init__()
        # On the CPU explicitly: the plan builds models on the meta device (d2v_engine.planning.flops).
        rates = torch.linspace(0, cfg.drop_path, cfg.depth, device="cpu").tolist()
        self.layerdrop = cfg.layerdrop
        # Recompute each block's activations in backward (memory for compute); only the student's
        # backward pays it, the teacher runs under no_grad.
        self.checkpoint = getattr(cfg, "activation_checkpointing", False)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.num_heads, cfg.ffn_dim, pre_ln, cfg.dropout,
                  cfg.attention_dropout, cfg.activation_dropout, rates[i], cfg.layer_scale_init,
                  k_bias=k_bias, eps=eps)
            for i in range(cfg.depth)
        )
        # FSDP (d2v_engine.runtime.parallel sets it): every rank must gather every block in the same order,
        # but each rank draws its own layerdrop. A dropped block then still runs, its output
        # weighted 0: x + 0 * (block(x) - x) is x and passes x's gradient through unchanged, as
        # skipping does, and gives the block's parameters a zero gradient on this rank (which is
        # what DDP reduces for a parameter this rank did not use). The RNG state is restored
        # after it, so later dropout and layerdrop draws are those of a skip. `runs` counts, per
        # block, the micro-batches that kept it since d2v_engine.runtime.parallel.forget_unused_blocks last
        # read it.
        self.run_dropped = False
        self.runs = [0] * len(self.blocks)

    def _block(self, block, x, key_padding_mask, attn_bias, return_layers, skip):
        if self.checkpoint and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, x, key_padding_mask, attn_bias,
                                                     return_layers, skip, use_reentrant=False)
        return block(x, key_padding_mask, attn_bias, return_layers, skip)

    def forward(self, x, key_padding_mask=None, attn_bias=None, return_layers=False,
                skip_padded_queries=False):
        """x: B x T x C -> (output, per-block FFN branches, per-block outputs); lists only when
        return_layers, else empty. skip_padded_queries: attention leaves the padded positions'
        queries out (their rows are then not the unskipped ones: for callers that never read
        them; the other rows are unchanged, since padded keys are never attended)."""
        skip = bool(skip_padded_queries and key_padding_mask is not None)
        ffn_out, block_out = [], []
        for i, block in enumerate(self.blocks):
            # fairseq skips a layerdropped block and records no result for it; its teacher runs in
            # eval mode, so every target layer exists. return_layers (the teacher's call) likewise
            # runs every block, so layer_results always has one entry per block.
            if self.training and not return_layers and self.layerdrop > 0:
                if torch.rand(()) < self.layerdrop:
                    if self.run_dropped:
                        with _rng_restored(x.device):
                            y, _ = self._block(block, x, key_padding_mask, attn_bias, False,
                                               skip)
                        x = x + (y.to(x.dtype) - x) * 0.0
                    continue
                if self.run_dropped:
                    self.runs[i] += 1
            x, fc = self._block(block, x, key_padding_mask, attn_bias, return_layers, skip)
            if return_layers:
                ffn_out.append(fc)
                block_out.append(x)
        return x, ffn_out, block_out
