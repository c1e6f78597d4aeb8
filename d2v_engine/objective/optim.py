"""The optimizer: AdamW with decoupled weight decay as one fused (or multi-tensor) launch.

optim.impl = auto picks, in order: NVIDIA apex FusedAdam (adam_w_mode=True) when apex is
installed and the parameters are plain CUDA tensors (one process, DDP); torch's fused AdamW on
CUDA, FSDP included; torch's foreach AdamW on CPU. "apex", "fused" and "foreach" force one (apex on
CPU, without apex, or under FSDP is a ConfigError). The three compute the same update; they
differ in kernel launches only. The decay is decoupled (lr * weight_decay * p), as fairseq's Adam;
optim.weight_decay_exempt names the parameters it skips.

Why not apex under FSDP: FSDP2's parameters are DTensors (each rank's shard wrapped with its
placement), and apex's multi-tensor kernel takes plain CUDA tensors only: the first step would
fail. torch's fused AdamW steps DTensors as it steps plain tensors (tests/test_optim_choice.py,
bit for bit on CPU); apex stays where its kernel takes the parameters (one process and DDP), the
choice this module made before FSDP.
"""
from __future__ import annotations

import torch

from d2v_engine.runtime.backends import detect
from d2v_engine.errors import ConfigError


# BEiT's no_weight_decay list in our names (its pos_embed, cls_token, mask_token).
BEIT_NO_DECAY = ("cls_token", "mask_emb", "pos_embed")
EXEMPT_RULES = ("none", "1d", "beit")


def decays(name: str, param: torch.Tensor, exempt: str) -> bool:
    """Whether weight decay applies to parameter `name` (dotted, as named_parameters gives it)
    under optim.weight_decay_exempt = `exempt` (see d2v_engine.config.OptimConfig)."""
    if exempt == "none":
        return True
    if exempt not in EXEMPT_RULES:
        raise ConfigError(f"config key 'optim.weight_decay_exempt': got {exempt!r}, expected one "
                          f"of {', '.join(EXEMPT_RULES)}")
    # fairseq data2vec 2.0: len(p.shape) == 1 or name.endswith(".bias"); BEiT: the same test
    # plus its list (matched on the last name component: ours sit under encoder.).
    if param.ndim <= 1 or name.endswith(".bias"):
        return False
    return not (exempt == "beit" and name.rsplit(".", 1)[-1] in BEIT_NO_DECAY)


def param_groups(model: torch.nn.Module, weight_decay: float, exempt: str = "1d") -> list[dict]:
    """[decayed, exempt] groups of the trainable parameters (either may be empty)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p, exempt) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def choose_impl(requested: str, device: torch.device, sharded: bool = False) -> str:
    """The implementation `requested` resolves to on `device` (`sharded`: FSDP's DTensor
    parameters): apex, fused or foreach."""
    has_apex = detect()["apex"] is not None
    if requested == "auto":
        if device.type == "cuda":
            return "apex" if has_apex and not sharded else "fused"
        return "foreach"
    if requested == "apex" and (not has_apex or device.type != "cuda" or sharded):
        why = ("apex is not installed" if not has_apex else
               "apex FusedAdam needs CUDA parameters" if device.type != "cuda" else
               "apex FusedAdam cannot take FSDP's DTensor parameters (train.distributed=fsdp)")
        raise ConfigError(f"config key 'optim.impl': 'apex' requested but {why}; choices: auto, "
                          f"apex, fused, foreach")
    if requested not in ("apex", "fused", "foreach"):
        raise ConfigError(f"config key 'optim.impl': got {requested!r}, expected one of auto, "
                          f"apex, fused, foreach")
    return requested


def why_impl(requested: str, impl: str, device: torch.device, sharded: bool = False) -> str:
    """Why `requested` became `impl`, for the start line."""
    if requested != "auto":
        return f"optim.impl={requested}"
    if device.type != "cuda":
        return "optim.impl=auto on the CPU"
    if impl == "apex":
        return "optim.impl=auto: apex installed, plain CUDA parameters"
    if sharded and detect()["apex"] is not None:
        return "optim.impl=auto: FSDP's DTensor parameters, which apex FusedAdam cannot take"
    return "optim.impl=auto: apex not installed"


def is_sharded(params) -> bool:
    """Whether any parameter is a DTensor (FSDP2's sharded parameters)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without distributed support has no DTensor parameters either
        return False
    return any(isinstance(p, DTensor) for p in params)


def build_optimizer(model: torch.nn.Module, optim_cfg, lr: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `model`'s trainable parameters; `.impl` on the result says which one ran."""
    requested = getattr(optim_cfg, "impl", "auto")
    sharded = is_sharded(model.parameters())
    impl = choose_impl(requested, device, sharded)
    groups = param_groups(model, optim_cfg.weight_decay,
                          getattr(optim_cfg, "weight_decay_exempt", "1d"))
    betas, eps = tuple(optim_cfg.betas), optim_cfg.eps
    if impl == "apex":
        from apex.optimizers import FusedAdam
        opt = FusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    else:
        kwargs = {"fused": True} if impl == "fused" else {"foreach": True}
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)
    opt.impl, opt.impl_why = impl, why_impl(requested, impl, device, sharded)
    return opt


def describe_optimizer(opt: torch.optim.Optimizer) -> str:
    """'torch fused AdamW (optim.impl=auto: ...)': which AdamW runs and why."""
    name = {"apex": "apex FusedAdam (adam_w_mode)", "fused": "torch fused AdamW",
            "foreach": "torch foreach AdamW"}.get(getattr(opt, "impl", ""), type(opt).__name__)
    why = getattr(opt, "impl_why", "")
    return f"{name} ({why})" if why else name
