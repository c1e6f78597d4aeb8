"""train.distributed=fsdp is a drop-in for ddp. On two gloo ranks, per objective (v1, v2):

- FSDP, DDP and one process with two micro-batches follow one trajectory (losses to 1e-5
  relative over 5 steps) and end with the same EMA teacher (1e-6) for every modality and every
  objective.ema_scope, and the teacher follows the scope (shared parts copied, the rest averaged);
- the step-3 checkpoint of the FSDP run resumes under FSDP, DDP and in one process onto the
  losses of steps 4 and 5 of the uninterrupted run, and the export of the FSDP run's last
  checkpoint matches the export of the DDP run's;
- the FSDP ranks print no warning (Python's warnings shown every time, PYTHONWARNINGS=always).

Each mode is one process (tests/run_jobs.py) that runs all its jobs, so torch and the ranks start
three times per objective, not once per job.
"""
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import get_args, get_type_hints

import pytest
import torch

from safetensors.torch import load_file

from engine.config import ObjectiveConfig, load_config
from engine.errors import CheckpointError
from engine.export import export
from engine.models import build_model
from engine.optim import param_groups
from engine.parallel import _optimizer_by_index, _optimizer_by_name

ROOT = Path(__file__).resolve().parent.parent
MODALITIES = ("image", "audio", "text")
SCOPES = get_args(get_type_hints(ObjectiveConfig)["ema_scope"])
STEPS, CUT = 5, 3
# model.dropout=0.0 turns off every random source in the model (tiny_image's drop path included),
# data.augment=false the loader's crops: what is left between the modes is summation order.
COMMON = [f"train.max_steps={STEPS}", "train.global_batch=4", "train.micro_batch=2",
          "model.dropout=0.0", "data.augment=false", "train.progress=false",
          "train.log_every=1", f"train.checkpoint_every={CUT}"]
EXTRA = {"audio": ["data.max_sample_size=8000"]}  # shorter crops: the test's CPU time


def _config(modality, version):
    return f"configs/tiny_{modality}{'_v2' if version == 'v2' else ''}.yaml"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(mode, jobs, spec):
    """Runs `jobs` under `mode` (fsdp / ddp: 2 gloo ranks under torchrun; one: one process)."""
    spec.write_text(json.dumps(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0",
           "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "always"}
    launch = [sys.executable]
    if mode != "one":
        launch += ["-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_port", str(_free_port())]
    r = subprocess.run([*launch, str(ROOT / "tests" / "run_jobs.py"), str(spec)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def _losses(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _checkpoint(run_dir, step):
    return torch.load(Path(run_dir) / f"checkpoint_{step:08d}.pt", map_location="cpu",
                      weights_only=False)


def _close(a, b, tol, what):
    assert a.keys() == b.keys(), what
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol,
                                   msg=lambda m: f"{what}: {name}: {m}")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_fsdp_ddp_and_one_process_train_alike_resume_alike_and_export_alike(version, tmp_path):
    def job(mode, modality, scope, resume=False):
        dist = [] if mode == "one" else [f"train.distributed={mode}"]
        return {"config": _config(modality, version),
                "overrides": [*COMMON, *EXTRA.get(modality, []), *dist,
                              f"objective.ema_scope={scope}"],
                "run_dir": str(tmp_path / mode / (f"resume_{modality}" if resume
                                                  else f"{modality}_{scope}")),
                **({"resume_from": str(tmp_path / "fsdp" / f"{modality}_{scope}"
                                       / f"checkpoint_{CUT:08d}.pt")} if resume else {})}

    default = {m: load_config(_config(m, version)).objective.ema_scope for m in MODALITIES}
    runs = {}
    for mode in ("fsdp", "ddp", "one"):
        jobs = [job(mode, m, s) for m in MODALITIES for s in SCOPES]
        jobs += [job(mode, m, default[m], resume=True) for m in MODALITIES]
        runs[mode] = _run(mode, jobs, tmp_path / f"{mode}.json")

    for modality in MODALITIES:
        cfg = load_config(_config(modality, version))
        shared = build_model(cfg.model, modality).feature_encoder_prefixes()
        for scope in SCOPES:
            name = f"{modality}_{scope}"
            losses = {mode: _losses(tmp_path / mode / name) for mode in runs}
            print(f"\n{version} {name}: " + "; ".join(f"{m} {list(l.values())}"
                                                     for m, l in losses.items()))
            for mode in ("ddp", "one"):
                assert list(losses[mode]) == list(range(1, STEPS + 1))
                assert list(losses[mode].values()) == pytest.approx(
                    list(losses["fsdp"].values()), rel=1e-5), f"{version} {name}: {losses}"
            states = {mode: _checkpoint(tmp_path / mode / name, STEPS) for mode in runs}
            for mode in ("ddp", "one"):
                _close(states[mode]["teacher"], states["fsdp"]["teacher"], 1e-6,
                       f"{version} {name} teacher, {mode} vs fsdp")
            for mode, state in states.items():
                # The scope's rule: the shared parts are the student's, the rest its average.
                before = _checkpoint(tmp_path / mode / name, CUT)["model"]
                student, teacher = state["model"], state["teacher"]
                trained = [n for n in teacher if n.startswith(shared)
                           and not torch.equal(student["encoder." + n], before["encoder." + n])]
                copied = [n for n in trained if torch.equal(teacher[n], student["encoder." + n])]
                assert trained, f"{mode} {name}: the feature encoder did not train"
                if scope == "transformer":
                    assert copied == trained, f"{mode} {name}: {set(trained) - set(copied)}"
                else:
                    assert not copied, f"{mode} {name}: {copied} copied, not averaged"

        # A checkpoint written under FSDP resumes under FSDP, DDP and in one process.
        uninterrupted = _losses(tmp_path / "fsdp" / f"{modality}_{default[modality]}")
        for mode in runs:
            resumed = _losses(tmp_path / mode / f"resume_{modality}")
            assert list(resumed) == list(range(CUT + 1, STEPS + 1))
            assert list(resumed.values()) == pytest.approx(
                [uninterrupted[s] for s in resumed], rel=1e-5), f"{mode} resume of {modality}"

        # The export of the FSDP run matches the export of the DDP run (same seed).
        exported = {}
        for mode in ("fsdp", "ddp"):
            out = export(tmp_path / mode / f"{modality}_{default[modality]}",
                         tmp_path / "export" / mode / modality)
            exported[mode] = load_file(out / "model.safetensors")
            assert json.loads((out / "config.json").read_text())["model_type"].startswith(
                "data2vec")
        _close(exported["fsdp"], exported["ddp"], 1e-6, f"{version} {modality} export")

    warned = [line for line in runs["fsdp"].stderr.splitlines()
              if re.search(r"Warning\b|\bWARNING\b", line)]
    assert not warned, "\n".join(warned)


def test_optimizer_state_converts_between_torch_numbering_and_parameter_names():
    """FSDP's full optimizer state dict is keyed by parameter name, torch's by position: a
    checkpoint of either kind loads into the other (engine.parallel.load_states converts)."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3)
    model(torch.randn(5, 3)).square().sum().backward()
    opt.step()
    numbered = opt.state_dict()
    named = _optimizer_by_name(numbered, opt, model)
    # Decay group first (matrices), then biases and norms: names follow the optimizer's order.
    assert named["param_groups"][0]["params"] == ["0.weight", "2.weight"]
    assert named["param_groups"][1]["params"] == ["0.bias", "1.weight", "1.bias", "2.bias"]
    assert torch.equal(named["state"]["2.weight"]["exp_avg"], numbered["state"][1]["exp_avg"])
    back = _optimizer_by_index(named, opt, model)
    assert back["param_groups"] == numbered["param_groups"]
    assert back["state"].keys() == numbered["state"].keys()
    for i, moments in numbered["state"].items():
        for key, value in moments.items():
            assert torch.equal(back["state"][i][key], value)
    assert _optimizer_by_name(named, opt, model) is named  # already by name: as is
    assert _optimizer_by_index(numbered, opt, model) is numbered
    foreign = {**named, "param_groups": [{**named["param_groups"][0], "params": ["head.weight"]}]}
    with pytest.raises(CheckpointError, match="head.weight"):
        _optimizer_by_index(foreign, opt, model)
