"""The optimizer: AdamW with decoupled weight decay as one fused (or multi-tensor) launch.

optim.impl = auto picks, in order: NVIDIA apex FusedAdam (adam_w_mode=True) when apex is
installed and the parameters are on CUDA; torch's fused AdamW on CUDA; torch's foreach AdamW on
CPU. "apex", "fused" and "foreach" force one (apex on CPU, or without apex, is a ConfigError).
The three compute the same update; they differ in kernel launches only.
"""
from __future__ import annotations

import torch

from engine.backends import detect
from engine.errors import ConfigError


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and learned tokens (1-D or scalar-like parameters)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def choose_impl(requested: str, device: torch.device) -> str:
    """The implementation `requested` resolves to on `device`: apex, fused or foreach."""
    has_apex = detect()["apex"] is not None
    if requested == "auto":
        if device.type == "cuda":
            return "apex" if has_apex else "fused"
        return "foreach"
    if requested == "apex" and (not has_apex or device.type != "cuda"):
        why = "apex is not installed" if not has_apex else "apex FusedAdam needs CUDA parameters"
        raise ConfigError(f"config key 'optim.impl': 'apex' requested but {why}; choices: auto, "
                          f"apex, fused, foreach")
    if requested not in ("apex", "fused", "foreach"):
        raise ConfigError(f"config key 'optim.impl': got {requested!r}, expected one of auto, "
                          f"apex, fused, foreach")
    return requested


def build_optimizer(model: torch.nn.Module, optim_cfg, lr: float,
                    device: torch.device) -> torch.optim.Optimizer:
    """AdamW over `model`'s trainable parameters; `.impl` on the result says which one ran."""
    impl = choose_impl(getattr(optim_cfg, "impl", "auto"), device)
    groups = param_groups(model, optim_cfg.weight_decay)
    betas, eps = tuple(optim_cfg.betas), optim_cfg.eps
    if impl == "apex":
        from apex.optimizers import FusedAdam
        opt = FusedAdam(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
    else:
        kwargs = {"fused": True} if impl == "fused" else {"foreach": True}
        opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kwargs)
    opt.impl = impl
    return opt


def describe_optimizer(opt: torch.optim.Optimizer) -> str:
    return {"apex": "apex FusedAdam (adam_w_mode)", "fused": "torch fused AdamW",
            "foreach": "torch foreach AdamW"}.get(getattr(opt, "impl", ""), type(opt).__name__)
