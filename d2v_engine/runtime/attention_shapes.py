"""The attention calls a config makes per micro-batch, from its shapes alone: the student's and
the teacher's (B, H, T, D, bias, padding, dropout, backward), at the longest input. What the
measured dispatcher times before the first step (d2v_engine.runtime.backends) and what the Hopper
compile check compiles (benchmarks/compile_check.py)."""
from __future__ import annotations

AUDIO_SAMPLES = 320000  # data.max_sample_size of the audio configs: the longest crop


def tokens_per_sample(cfg) -> int:
    """Tokens per sample the context encoder sees on the full input (image: CLS included)."""
    m = cfg.model
    if cfg.modality == "image":
        return (m.img_size // m.patch_size) ** 2 + 1
    if cfg.modality == "audio":
        n = AUDIO_SAMPLES
        for _, k, s in m.conv_layers:
            n = (n - k) // s + 1
        return n
    return cfg.data.max_tokens


def visible_tokens(cfg, tokens: int) -> int:
    """Tokens a data2vec 2.0 student keeps (the shape class is what matters: its T bucket and
    whether it is a multiple of 16)."""
    mk = cfg.masking
    if cfg.modality == "image":
        n = tokens - 1
        return n - int(mk.mask_prob * n + 0.5) + 1
    if cfg.modality == "audio":  # fairseq spans overlap: expected unmasked fraction
        spans = mk.mask_prob * tokens / mk.mask_length
        return int(tokens * (1 - mk.mask_length / tokens) ** spans)
    return tokens - int(mk.mask_prob * tokens)


def attention_launches(cfg):
    """(role, B, H, T, D, bias kind, padded, dropout, backward) of the student and the teacher."""
    m = cfg.model
    v2 = cfg.objective.mode == "v2"
    batch, clones = cfg.train.micro_batch, cfg.objective.clone_batch if v2 else 1
    t = tokens_per_sample(cfg)
    heads, d = m.num_heads, m.embed_dim // m.num_heads
    bias = cfg.modality == "image" and m.rel_pos_bias
    padded = cfg.modality in ("audio", "text")
    t_student = visible_tokens(cfg, t) if v2 else t
    student_bias = ("batched" if v2 else "shared") if bias else None
    return [
        ("student", batch * clones, heads, t_student, d, student_bias, padded,
         m.attention_dropout, True),
        ("teacher", batch, heads, t, d, "shared" if bias else None, padded, 0.0, False),
    ]
