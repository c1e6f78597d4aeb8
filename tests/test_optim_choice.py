"""optim.impl=auto with NVIDIA apex installed (a stand-in apex.optimizers.FusedAdam in
sys.modules): FSDP's DTensor parameters get torch's fused AdamW, plain parameters (one process,
DDP) still get apex, and the start line says why. torch's fused AdamW steps DTensors exactly as
plain tensors (on CPU, a 1-rank gloo group)."""
from __future__ import annotations

import importlib.machinery
import sys
import types

import pytest
import torch
import torch.distributed as dist

from d2v_engine.objective import optim
from d2v_engine.runtime import backends
from d2v_engine.config import load_config
from d2v_engine.errors import ConfigError

CUDA = torch.device("cuda")  # the choice only looks at the device type: no GPU needed


class FusedAdam:
    """Stands in for apex.optimizers.FusedAdam: records how it was built."""

    def __init__(self, groups, **kwargs):
        self.param_groups, self.kwargs = list(groups), kwargs


@pytest.fixture
def apex(monkeypatch):
    """NVIDIA apex 'installed': importable apex and apex.optimizers (backends.detect sees it)."""
    top = types.ModuleType("apex")
    top.__spec__ = importlib.machinery.ModuleSpec("apex", None, is_package=True)
    top.__version__ = "0.1-stand-in"
    sub = types.ModuleType("apex.optimizers")
    sub.__spec__ = importlib.machinery.ModuleSpec("apex.optimizers", None)
    sub.FusedAdam = FusedAdam
    top.optimizers = sub
    monkeypatch.setitem(sys.modules, "apex", top)
    monkeypatch.setitem(sys.modules, "apex.optimizers", sub)
    backends.detect.cache_clear()
    assert backends.detect()["apex"] == "0.1-stand-in", backends.detect()["apex"]
    yield
    backends.detect.cache_clear()


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-rank gloo process group, so fully_shard makes DTensor parameters on CPU."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))


def _sharded(seed: int = 0) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model = _model(seed)
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    return model


def test_auto_takes_torch_fused_adamw_for_fsdp_and_apex_otherwise(apex):
    assert optim.choose_impl("auto", CUDA, sharded=False) == "apex"
    assert optim.choose_impl("auto", CUDA, sharded=True) == "fused"
    assert optim.choose_impl("auto", torch.device("cpu"), sharded=True) == "foreach"
    assert optim.choose_impl("fused", CUDA, sharded=True) == "fused"
    with pytest.raises(ConfigError, match=r"config key 'optim.impl': 'apex' requested but apex "
                                          r"FusedAdam cannot take FSDP's DTensor parameters.*"
                                          r"choices: auto, apex, fused, foreach"):
        optim.choose_impl("apex", CUDA, sharded=True)


def test_fsdp_model_with_apex_installed_builds_torch_fused_adamw_and_says_why(apex,
                                                                             one_rank_group):
    cfg = load_config(None, [])
    opt = optim.build_optimizer(_sharded(), cfg.optim, 1e-3, CUDA)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] is True, type(opt)
    assert optim.describe_optimizer(opt) == (
        "torch fused AdamW (optim.impl=auto: FSDP's DTensor parameters, which apex FusedAdam "
        "cannot take)"), optim.describe_optimizer(opt)


def test_plain_parameters_with_apex_installed_still_get_apex(apex):
    cfg = load_config(None, [])
    opt = optim.build_optimizer(_model(), cfg.optim, 1e-3, CUDA)
    assert isinstance(opt, FusedAdam) and opt.kwargs["adam_w_mode"] is True, opt
    assert optim.describe_optimizer(opt) == ("apex FusedAdam (adam_w_mode) (optim.impl=auto: "
                                             "apex installed, plain CUDA parameters)")
    line = backends.describe(torch.device("cpu"), "loader x", None,
                             optim.describe_optimizer(opt))
    assert "optimizer: apex FusedAdam (adam_w_mode) (optim.impl=auto: apex installed" in line, line


def test_without_apex_the_start_line_says_so(monkeypatch):
    monkeypatch.setattr(optim, "detect", lambda: {"apex": None})
    cfg = load_config(None, [])
    opt = optim.build_optimizer(_model(), cfg.optim, 1e-3, CUDA)
    assert optim.describe_optimizer(opt) == "torch fused AdamW (optim.impl=auto: apex not installed)"
    cfg.optim.impl = "foreach"
    opt = optim.build_optimizer(_model(), cfg.optim, 1e-3, torch.device("cpu"))
    assert optim.describe_optimizer(opt) == "torch foreach AdamW (optim.impl=foreach)"


def test_torch_fused_adamw_steps_dtensors_as_plain_tensors(one_rank_group):
    """Three updates of fused AdamW on FSDP's DTensor parameters and on a plain copy of the
    model, same gradients: the weights agree bit for bit."""
    plain, sharded = _model(3), _sharded(3)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
            for m in (plain, sharded)]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(5, 4, generator=g)
        for model, opt in zip((plain, sharded), opts):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for (name, a), b in zip(plain.named_parameters(), sharded.parameters()):
        diff = (a.detach() - b.full_tensor()).abs().max().item()
        assert diff == 0.0, f"{name}: fused AdamW on DTensor differs by {diff}"
