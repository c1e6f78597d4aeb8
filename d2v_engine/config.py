"""Typed run configuration: dataclasses loaded from YAML, overridden by `dotted.key=value` strings.

Every key is checked: an unknown key or a value of the wrong type or outside its choices raises a
ConfigError that names the key and what is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from d2v_engine.errors import ConfigError

Modality = Literal["image", "audio", "text"]
Norm = Literal["instance", "layer", "none"]


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = ""  # empty: runs/<name>
    tensorboard: bool = True  # event files in <run dir>/tensorboard when tensorboard is installed
    wandb: bool = False  # also log to Weights & Biases (when installed)
    wandb_project: str = "d2v-engine"


@dataclass
class ModelConfig:
    # Start the student and teacher encoders from these weights (a Hugging Face Data2Vec*
    # directory, or one of our run directories / checkpoint files); heads fresh, step 0.
    init_from: str = ""
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    # Block layout. audio / text: pre-LN blocks with a final norm instead of post-LN (fairseq's
    # layer_norm_first). image: true = BEiT (data2vec 1.0 vision): pre-LN blocks with layer scale,
    # final LayerNorm, no k bias, trunc-normal init with the output projections divided by
    # sqrt(2 * depth), CLS at std 0.02; false = data2vec 2.0 (AltBlock, layer_norm_first false):
    # a LayerNorm on the blocks' input, post-LN blocks, no final norm, k bias, BERT init (normal
    # 0.02, no depth rescale), CLS at std 1.
    layer_norm_first: bool = False
    # eps of the context encoder's LayerNorms (blocks, input / final norm); null: the reference's
    # for the layout: 1e-6 for the data2vec 2.0 image encoder (fairseq norm_eps), else 1e-5.
    norm_eps: Optional[float] = None
    # Setting model.dropout=0.0 as an override (command line or load_config's overrides) turns off
    # every source of randomness in the model: attention_dropout, activation_dropout,
    # encoder_dropout_input, layerdrop and drop_path are forced to 0 too (see
    # deterministic_model). A YAML file's `dropout: 0.0` only sets the hidden dropout, so recipes
    # such as BEiT's (no hidden dropout, drop path 0.25) stay expressible.
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_dropout_input: float = 0.0  # dropout on the features entering the context encoder
    layerdrop: float = 0.0
    activation_checkpointing: bool = False  # recompute each block in backward (torch.utils.checkpoint)
    drop_path: float = 0.0
    layer_scale_init: float = 0.0  # 0 disables layer scale (BEiT's gamma_1 / gamma_2)
    head_layers: int = 1  # regression head depth (text v1 uses 2)
    # image
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    rel_pos_bias: bool = True  # BEiT's relative position bias shared by all blocks
    # audio
    conv_layers: list = field(
        default_factory=lambda: [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
    )  # (channels, kernel, stride) per conv of the wav2vec 2.0 feature extractor
    conv_bias: bool = False
    feature_grad_mult: float = 1.0
    conv_pos: int = 95  # total width of the convolutional positional embedding
    conv_pos_groups: int = 16
    conv_pos_depth: int = 5
    # text
    vocab_size: int = 50265
    max_positions: int = 512
    pad_id: int = 1


@dataclass
class MaskingConfig:
    mask_prob: float = 0.65
    mask_length: int = 10  # span length (audio), span of whole tokens (text)
    min_masks: int = 0
    require_same_masks: bool = True  # same masked count in every sample of a batch
    min_block: int = 16  # image: smallest BEiT block, in patches
    inverse: bool = False  # image: data2vec 2.0 inverse block masking
    replace: list = field(default_factory=lambda: [0.8, 0.1, 0.1])  # text: [mask, random, keep]
    mask_prob_adjust: float = 0.0  # v2 image: extra kept-block centers (fairseq mask_prob_adjust)


@dataclass
class ObjectiveConfig:
    mode: Literal["v1", "v2"] = "v1"  # v2: data2vec 2.0 (d2v_engine/objective/data2vec_v2.py)
    top_k: int = 8
    # which output of each teacher block is a target: "ffn" = the FFN branch before the last
    # residual (fairseq layer_results "fc": audio, text v1); "block" = the block's output
    # (end_of_block_targets: vision v1)
    layer_output: Literal["ffn", "block"] = "ffn"
    layer_norm: Norm = "instance"  # per target layer
    final_norm: Norm = "none"  # on the average of the K layers
    # "include" (fairseq's F.instance_norm): padded time steps count in the per-layer instance
    # statistics; "exclude" leaves them out (statistics of the real steps only).
    instance_norm_padding: Literal["exclude", "include"] = "include"
    loss_beta: float = 0.0  # 0: L2; > 0: smooth L1 with this beta
    loss_scale: Optional[float] = None  # None: 1/sqrt(C)
    ema_decay: float = 0.999
    ema_end_decay: float = 0.9999
    ema_anneal_end_step: int = 30000  # at optim.schedule_reference_steps (d2v_engine.objective.schedule)
    # What the teacher averages (d2v_engine.objective.ema.teacher_shared_prefixes); the rest it copies from the
    # student, and with "transformer" / "context" it encodes the student's local features:
    #   transformer  the blocks (+ audio's encoder norm): fairseq v1 ema_transformer_only
    #                (+ ema_layers_only: audio's positional conv copied); v2 ema_encoder_only
    #   context      all but the local feature encoder (conv stack + projection, patch embedding,
    #                token embedding): v2 ema_encoder_only false, ema_local_encoder false
    #   all          everything, and the teacher embeds the input itself: v2 ema_local_encoder true
    ema_scope: Literal["transformer", "context", "all"] = "transformer"
    min_target_var: float = 0.1
    min_pred_var: float = 0.01
    collapse_check_after: int = 5000  # the variance guard applies after this many updates (fairseq)
    # data2vec 2.0 only (mode v2): M masks per sample share one teacher pass; a conv decoder
    # (d2v_engine/models/decoder.py) predicts the targets from the visible tokens' encodings.
    clone_batch: int = 1
    decoder_dim: int = 384
    decoder_kernel: int = 7
    decoder_groups: int = 16
    decoder_layers: int = 4
    decoder_residual: bool = True
    decoder_projection_layers: int = 1  # > 1: Linear-GELU stack, first hidden width dim * ratio
    decoder_projection_ratio: float = 2.0
    decoder_input_dropout: float = 0.1
    mask_noise_std: float = 0.01  # decoder input at masked positions ~ N(0, std)
    cls_loss: float = 0.0  # image: weight of the CLS output vs the mean target


@dataclass
class DataConfig:
    path: str = ""
    num_workers: int = 0
    augment: bool = True
    on_bad_file: Literal["fail", "skip"] = "fail"
    loader: Literal["auto", "dali", "torch"] = "auto"  # auto: DALI for images/audio when installed
    # A sample file larger than this (or not a regular file) is a bad file, never read.
    max_file_bytes: int = 1 << 30
    # image
    img_size: int = 224
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])
    hflip: bool = True
    # ColorJitter(brightness, contrast, saturation) as torchvision draws and applies it, on the
    # whole image before the crop; 0 turns one off. fairseq's v1 image_pretraining (BEiT's
    # augmentation) uses 0.4 each, its v2 MaeImageDataset none.
    color_jitter: list = field(default_factory=lambda: [0.0, 0.0, 0.0])
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # crop resize filter (antialiased)
    # audio
    sample_rate: int = 16000
    max_sample_size: int = 320000
    min_sample_size: int = 0
    normalize: bool = True  # zero mean, unit variance per utterance
    resample: bool = False  # other rates are resampled to sample_rate; False: they are bad files
    pad_audio: bool = False  # False: crop a batch to its shortest sample (the reference)
    # Audio clips cropped to one length per group of this many consecutive positions of the
    # global batch (the paper's per-GPU batch; 0: the whole global batch), whatever the world
    # size and micro-batch: d2v_engine.data.audio.
    crop_group: int = 0
    # text
    max_tokens: int = 512  # tokens per sample, <s> included (fairseq tokens_per_sample)
    # How unlabelled text is cut into samples (fairseq's TokenBlockDataset): "none" = the token
    # stream in blocks of max_tokens - 1, across documents; "complete_doc" = blocks inside one
    # document (a longer one is split), shorter samples padded (the text v1 recipe).
    sample_break_mode: Literal["none", "complete_doc"] = "none"


@dataclass
class OptimConfig:
    lr: float = 5e-4
    lr_reference_batch: int = 0  # global batch at which `lr` holds; 0: no scaling
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01
    # Which parameters weight decay skips (d2v_engine.objective.optim.param_groups):
    #   none  every parameter decays: fairseq's plain adam (v1 audio / text / vision, v2 audio)
    #   1d    1-D parameters and biases (norms, biases, layer scale): fairseq's data2vec 2.0
    #         optim_overrides under its composite optimizer (v2 image / text)
    #   beit  1d plus cls_token, mask_emb and pos_embed: BEiT's parameter groups with its
    #         no_weight_decay list (the original data2vec 1.0 vision code)
    weight_decay_exempt: Literal["none", "1d", "beit"] = "1d"
    clip_norm: float = 0.0  # 0 disables clipping
    schedule: Literal["cosine", "tri_stage", "constant"] = "cosine"
    warmup_steps: int = 0  # at schedule_reference_steps (d2v_engine.objective.schedule)
    # The run length at which warmup_steps and objective.ema_anneal_end_step are stated (the
    # paper's max_steps; 0: train.max_steps). proportional: they scale with train.max_steps /
    # schedule_reference_steps; absolute: as stated (fairseq's step counts).
    schedule_reference_steps: int = 0
    schedule_scaling: Literal["proportional", "absolute"] = "proportional"
    tri_stage: list = field(default_factory=lambda: [0.03, 0.9, 0.07])  # warmup/hold/decay
    # cosine floor / tri-stage end, as a fraction of lr; null: 0 for cosine (fairseq min_lr),
    # 0.01 for tri_stage (fairseq's final_lr_scale)
    final_lr_scale: Optional[float] = None
    impl: Literal["auto", "apex", "fused", "foreach"] = "auto"  # d2v_engine.objective.optim: which AdamW


@dataclass
class TrainConfig:
    max_steps: int = 1000
    global_batch: int = 8
    # per rank and forward; 0: global_batch / world_size; auto: the largest that fits the memory
    # budget (d2v_engine.planning.memory), a multiple of 8 (or below 8) dividing the per-rank share
    micro_batch: int | Literal["auto"] = 0
    device_memory_gb: Optional[float] = None  # memory budget per rank (GB); None: the GPU's, if any
    memory_fraction: float = 0.9  # of device_memory_gb the plan's estimated peak may use
    peak_tflops: Optional[float] = None  # the device's dense bf16 peak for MFU; None: d2v_engine.planning.flops
    checkpoint_every: int = 0  # 0: only at the end
    stop_at: int = 0  # checkpoint and exit at this step, as a preemption would
    resume: bool = False
    # Resume from this checkpoint file instead of the newest complete one in run.dir.
    resume_from: str = ""
    # Keys a resume may change on purpose beyond those always free (d2v_engine.run.resume_check), e.g.
    # [optim.lr]; any other difference from the checkpoint's recipe is an error.
    resume_overrides: list = field(default_factory=list)
    log_every: int = 1
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA
    device: Literal["auto", "cpu", "cuda"] = "auto"
    compile: bool = False  # torch.compile the student and teacher encoders (d2v_engine.runtime.compile)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    compile_backend: str = "inductor"
    length_buckets: int = 16  # with compile: audio/text lengths snapped to this many (d2v_engine.planning.buckets)
    # The next micro-batch's masks drawn during the current one's backward, on CUDA on a side
    # stream with its copies (d2v_engine.run.mask_ahead); false draws them in the step. Same masks.
    mask_ahead: bool = True
    distributed: Literal["ddp", "fsdp"] = "ddp"  # several ranks: d2v_engine.runtime.parallel
    ddp_bucket_cap_mb: int = 25
    keep_last: int = 2
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    max_bad_steps: int = 5  # stop after this many non-finite (skipped) updates in a row
    max_failed_saves: int = 3  # stop after this many failed periodic checkpoint saves in a row
    debug_nan_steps: list = field(default_factory=list)  # test hook: steps whose loss is made NaN
    progress: bool = True
    probe: bool = False  # after the run, rank 0 prints a linear probe of the final checkpoint
    dry_run: bool = False  # print and write run.dir/plan.json, then exit without training
    world_size: int = 0  # expected number of ranks; 0: whatever torchrun gives
    # Seconds a collective waits for the slowest rank before the run fails (nccl and gloo; torch's
    # defaults are 10 and 30 minutes). 300: a rank that died or hung stops the job in 5 minutes
    # instead of holding every GPU for 10-30, while the longest waits a healthy run makes stay
    # well inside it: the other ranks wait in the save's all-reduce while rank 0 writes a
    # checkpoint (base configs: 1.4-1.5 GB; save_checkpoint wrote 1.48 GB in 5.8 s to a local
    # disk, 50 MB/s storage takes 30 s), and ranks reach the first step after compiling or timing
    # attention side by side. Raise it for checkpoints of several GB on slow storage.
    collective_timeout_s: float = 300.0


@dataclass
class Config:
    modality: Modality = "image"
    seed: int = 1
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir or Path("runs") / self.run.name)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Returns `value` as type `tp`, or raises ConfigError naming `key` and the allowed values."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"config key '{key}': got {value!r}, expected {_describe(tp)}")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{key}': got {value!r}, expected {_describe(tp)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    else:
        raise ConfigError(f"config key '{key}': unsupported type {tp}")
    raise ConfigError(f"config key '{key}': got {value!r}, expected {_describe(tp)}")


def _merge(obj, values: dict, prefix: str) -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.')}': expected a mapping, got {values!r}")
    types_ = _field_types(type(obj))
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in types_:
            choices = ", ".join(sorted(types_))
            raise ConfigError(f"unknown config key '{full}'; choices at this level: {choices}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(full, value, types_[key]))


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _nest(path: list[str], value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Loads a YAML config, applies `key=value` overrides and validates the result."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}: "
                              f"{e.object[e.start:e.start + 1]!r})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"bad YAML in {path}{where}: {getattr(e, 'problem', e)}") from None
        _merge(cfg, values, "")
    for text in overrides:
        keys, value = parse_override(text)
        _merge(cfg, _nest(keys, value), "")
        if keys == ["model", "dropout"] and cfg.model.dropout == 0.0:
            deterministic_model(cfg.model)
            cfg.objective.decoder_input_dropout = 0.0  # v2's decoder is part of the model too
    validate(cfg)
    return cfg


RANDOM_MODEL_KEYS = ("dropout", "attention_dropout", "activation_dropout", "encoder_dropout_input",
                     "layerdrop", "drop_path")


def deterministic_model(model: ModelConfig) -> None:
    """Turns off every source of randomness in the model (what model.dropout=0.0 means)."""
    for key in RANDOM_MODEL_KEYS:
        setattr(model, key, 0.0)


def validate(cfg: Config) -> None:
    """Cross-field checks that single types cannot express."""
    m, t, o = cfg.model, cfg.train, cfg.objective

    def need(ok: bool, key: str, msg: str):
        if not ok:
            raise ConfigError(f"config key '{key}': {msg}")

    need(m.embed_dim % m.num_heads == 0, "model.num_heads", f"must divide model.embed_dim={m.embed_dim}")
    need(1 <= o.top_k <= m.depth, "objective.top_k", f"must be in 1..model.depth={m.depth}")
    need(0 <= cfg.seed < 2**63, "seed", f"got {cfg.seed}, must be in [0, 2**63)")
    need(1 <= t.max_steps < 2**62, "train.max_steps", f"got {t.max_steps}, must be in [1, 2**62)")
    need(t.global_batch >= 1, "train.global_batch", "must be >= 1")
    need(t.micro_batch == "auto" or t.micro_batch >= 0, "train.micro_batch",
         "must be >= 0 or auto")
    need(t.device_memory_gb is None or t.device_memory_gb > 0, "train.device_memory_gb",
         "must be > 0 (GB per rank) or null")
    need(0.0 < t.memory_fraction <= 1.0, "train.memory_fraction", "must be in (0, 1]")
    need(t.peak_tflops is None or t.peak_tflops > 0, "train.peak_tflops", "must be > 0 or null")
    need(t.stop_at >= 0, "train.stop_at", "must be >= 0")
    need(t.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0")
    need(t.log_every >= 1, "train.log_every", "must be >= 1")
    need(t.keep_last >= 1, "train.keep_last", "must be >= 1")
    need(t.keep_every >= 0, "train.keep_every", "must be >= 0")
    need(t.max_bad_steps >= 1, "train.max_bad_steps", "must be >= 1")
    need(t.max_failed_saves >= 1, "train.max_failed_saves", "must be >= 1")
    need(all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in t.debug_nan_steps),
         "train.debug_nan_steps", "must be a list of steps >= 1")
    need(o.collapse_check_after >= 0, "objective.collapse_check_after", "must be >= 0")
    need(o.ema_anneal_end_step >= 0, "objective.ema_anneal_end_step", "must be >= 0")
    need(cfg.optim.lr >= 0, "optim.lr", f"got {cfg.optim.lr}, must be >= 0")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(cfg.data.num_workers >= 0, "data.num_workers", f"got {cfg.data.num_workers}, must be >= 0")
    need(cfg.data.max_file_bytes >= 1, "data.max_file_bytes", "must be >= 1")
    need(cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(cfg.optim.schedule_reference_steps >= 0, "optim.schedule_reference_steps",
         "must be >= 0 (0: train.max_steps, no scaling)")
    need(t.world_size >= 0, "train.world_size", "must be >= 0 (0: any)")
    need(t.collective_timeout_s > 0, "train.collective_timeout_s", "must be > 0 (seconds)")
    need(not (t.compile and t.compile_mode == "reduce-overhead" and t.distributed == "fsdp"),
         "train.compile_mode", "reduce-overhead (CUDA graphs) needs parameters at fixed addresses, "
         "and FSDP2 gathers them into new storage every step (every step would re-record, then "
         "run eager): use default or max-autotune with train.distributed=fsdp, or ddp")
    need(not ((t.resume or t.resume_from) and m.init_from), "model.init_from",
         "starts a new run from given weights; train.resume=true continues a run: use one of them")
    known = flatten(to_dict(Config()))
    unknown = [k for k in t.resume_overrides if not isinstance(k, str) or k not in known]
    need(not unknown, "train.resume_overrides",
         f"{unknown} are not config keys (dotted, e.g. [optim.lr, seed])")
    need(t.length_buckets >= 0, "train.length_buckets", "must be >= 0 (0: no bucketing)")
    need(t.ddp_bucket_cap_mb >= 1, "train.ddp_bucket_cap_mb", "must be >= 1")
    need(0.0 < cfg.masking.mask_prob < 1.0, "masking.mask_prob", "must be in (0, 1)")
    need(cfg.masking.mask_length >= 1, "masking.mask_length", "must be >= 1")
    need(len(cfg.masking.replace) == 3 and abs(sum(cfg.masking.replace) - 1) < 1e-6
         and min(cfg.masking.replace) >= 0, "masking.replace",
         "must be 3 non-negative fractions [mask, random, keep] summing to 1")
    need(0.0 <= o.ema_decay <= o.ema_end_decay <= 1.0, "objective.ema_end_decay",
         "need 0 <= objective.ema_decay <= objective.ema_end_decay <= 1")
    if o.mode == "v2":
        _validate_v2(cfg, need)
    need(len(cfg.optim.betas) == 2, "optim.betas", "must be two numbers")
    need(len(cfg.optim.tri_stage) == 3 and abs(sum(cfg.optim.tri_stage) - 1) < 1e-6,
         "optim.tri_stage", "must be 3 fractions [warmup, hold, decay] summing to 1")
    need(len(cfg.data.crop_scale) == 2, "data.crop_scale", "must be [min, max]")
    need(len(cfg.data.color_jitter) == 3 and all(isinstance(v, (int, float)) and 0 <= v < 1
                                                 for v in cfg.data.color_jitter),
         "data.color_jitter", "must be [brightness, contrast, saturation], each in [0, 1)")
    need(m.norm_eps is None or m.norm_eps > 0, "model.norm_eps", "must be > 0 (or null)")
    f = cfg.optim.final_lr_scale
    need(f is None or (0 <= f <= 1 and (f > 0 or cfg.optim.schedule != "tri_stage")),
         "optim.final_lr_scale", "must be in [0, 1] (> 0 for tri_stage: it decays exponentially)")
    need(cfg.data.crop_group >= 0, "data.crop_group", "must be >= 0 (0: the whole global batch)")
    if cfg.modality == "image":
        need(m.img_size % m.patch_size == 0, "model.patch_size",
             f"must divide model.img_size={m.img_size}")
    for i, layer in enumerate(m.conv_layers):
        need(isinstance(layer, list) and len(layer) == 3 and all(isinstance(v, int) for v in layer),
             f"model.conv_layers[{i}]", "must be [channels, kernel, stride]")


def _validate_v2(cfg: Config, need) -> None:
    m, o = cfg.model, cfg.objective
    need(o.clone_batch >= 1, "objective.clone_batch", "must be >= 1")
    need(o.decoder_layers >= 1, "objective.decoder_layers", "must be >= 1")
    need(o.decoder_kernel >= 1, "objective.decoder_kernel", "must be >= 1")
    need(o.decoder_projection_layers >= 1, "objective.decoder_projection_layers", "must be >= 1")
    need(o.decoder_groups >= 1 and o.decoder_dim % o.decoder_groups == 0
         and m.embed_dim % o.decoder_groups == 0, "objective.decoder_groups",
         f"must divide objective.decoder_dim={o.decoder_dim} and model.embed_dim={m.embed_dim}")
    need(0.0 <= o.decoder_input_dropout < 1.0, "objective.decoder_input_dropout", "must be in [0, 1)")
    need(o.mask_noise_std >= 0.0, "objective.mask_noise_std", "must be >= 0")
    need(o.cls_loss >= 0.0, "objective.cls_loss", "must be >= 0")
    need(o.cls_loss == 0.0 or cfg.modality == "image", "objective.cls_loss",
         "needs a CLS token: only the image encoder has one; set it to 0")
    need(cfg.masking.require_same_masks, "masking.require_same_masks",
         "objective.mode=v2 batches the visible tokens densely and needs true")
    need(cfg.masking.mask_prob_adjust >= 0.0, "masking.mask_prob_adjust", "must be >= 0")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flatten(values: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are values, not levels."""
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Keys (prefixes) that say where and how a run is logged, scheduled or executed on the machine,
# not what it learns: the model card's differences from the recipe leave them out, and a resume
# may change them (d2v_engine.run.resume_check), data.path excepted there.
BOOKKEEPING = ("run.", "data.path", "data.num_workers", "data.loader", "data.on_bad_file",
               "data.max_file_bytes",
               "train.progress", "train.log_every", "train.checkpoint_every", "train.keep_last",
               "train.keep_every", "train.device", "train.world_size", "train.dry_run",
               "train.probe", "train.resume", "train.stop_at", "train.debug_nan_steps",
               "train.max_bad_steps", "train.max_failed_saves")


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
