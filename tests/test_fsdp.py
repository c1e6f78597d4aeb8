"""train.distributed=fsdp is a drop-in for ddp. On two gloo ranks, per objective (v1, v2):

- FSDP, DDP and one process with two micro-batches follow one trajectory (losses to 1e-5
  relative over 5 steps) and end with the same EMA teacher (1e-6) for every modality and every
  objective.ema_scope, and the teacher follows the scope (shared parts copied, the rest averaged);
  likewise with layerdrop (audio), where each rank drops its own blocks;
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

from d2v_engine.config import ObjectiveConfig, load_config
from d2v_engine.objective.ema import teacher_shared_prefixes
from d2v_engine.errors import CheckpointError
from d2v_engine.handoff.export import export
from d2v_engine.models import build_model
from d2v_engine.models.transformer import BlockStack
from d2v_engine.objective.optim import param_groups
from d2v_engine.runtime.parallel import _optimizer_by_index, _optimizer_by_name

ROOT = Path(__file__).resolve().parent.parent
MODALITIES = ("image", "audio", "text")
MODES = ("fsdp", "ddp", "one")  # 2 gloo ranks each for fsdp and ddp; one: 1 process x 2 micro
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


def _same_run(root, name, what):
    """Losses (1e-5 relative) and final teacher (1e-6) of run `name` agree across the modes;
    returns the final checkpoints by mode."""
    losses = {mode: _losses(root / mode / name) for mode in MODES}
    print(f"\n{what}: " + "; ".join(f"{m} {list(l.values())}" for m, l in losses.items()))
    states = {mode: _checkpoint(root / mode / name, STEPS) for mode in MODES}
    for mode in ("ddp", "one"):
        assert list(losses[mode]) == list(range(1, STEPS + 1)), what
        assert list(losses[mode].values()) == pytest.approx(
            list(losses["fsdp"].values()), rel=1e-5), f"{what}: {losses}"
        _close(states[mode]["teacher"], states["fsdp"]["teacher"], 1e-6,
               f"{what} teacher, {mode} vs fsdp")
    return states


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_fsdp_ddp_and_one_process_train_alike_resume_alike_and_export_alike(version, tmp_path):
    def job(mode, modality, name, *overrides, resume_from=None):
        dist = [] if mode == "one" else [f"train.distributed={mode}"]
        return {"config": _config(modality, version),
                "overrides": [*COMMON, *EXTRA.get(modality, []), *dist, *overrides],
                "run_dir": str(tmp_path / mode / name),
                **({"resume_from": str(resume_from)} if resume_from else {})}

    default = {m: load_config(_config(m, version)).objective.ema_scope for m in MODALITIES}
    runs = {}
    for mode in MODES:
        jobs = [job(mode, m, f"{m}_{s}", f"objective.ema_scope={s}")
                for m in MODALITIES for s in SCOPES]
        # Layerdrop (audio_base's 0.05, here 0.3): each rank drops its own blocks.
        jobs.append(job(mode, "audio", "audio_layerdrop", "model.layerdrop=0.3"))
        jobs += [job(mode, m, f"resume_{m}", resume_from=tmp_path / "fsdp" / f"{m}_{default[m]}"
                     / f"checkpoint_{CUT:08d}.pt") for m in MODALITIES]
        runs[mode] = _run(mode, jobs, tmp_path / f"{mode}.json")

    _same_run(tmp_path, "audio_layerdrop", f"{version} audio, layerdrop 0.3")
    for modality in MODALITIES:
        cfg = load_config(_config(modality, version))
        encoder = build_model(cfg.model, modality)
        features = encoder.feature_encoder_prefixes()
        for scope in SCOPES:
            name = f"{modality}_{scope}"
            shared = teacher_shared_prefixes(encoder, scope)
            states = _same_run(tmp_path, name, f"{version} {name}")
            for mode, state in states.items():
                # The scope's rule: the shared parts are the student's, the rest its average.
                before = _checkpoint(tmp_path / mode / name, CUT)["model"]
                student, teacher = state["model"], state["teacher"]
                trained = [n for n in teacher
                           if not torch.equal(student["encoder." + n], before["encoder." + n])]
                copied = [n for n in trained if torch.equal(teacher[n], student["encoder." + n])]
                assert any(n.startswith(features) for n in trained), (
                    f"{mode} {name}: the feature encoder did not train")
                want = [n for n in trained if n.startswith(shared)]
                assert copied == want, f"{mode} {name}: copied {copied}, the scope shares {want}"

        # A checkpoint written under FSDP resumes under FSDP, DDP and in one process.
        uninterrupted = _losses(tmp_path / "fsdp" / f"{modality}_{default[modality]}")
        for mode in MODES:
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
    checkpoint of either kind loads into the other (d2v_engine.runtime.parallel.load_states converts)."""
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


def _stack(*overrides):
    return BlockStack(load_config(_config("audio", "v1"), list(overrides)).model, pre_ln=False)


def test_a_student_block_returns_no_view_for_fsdp_to_hook():
    """FSDP2 hooks every grad-requiring output of a sharded block and warns on views (an in-place
    op on one would drop the hook): the student's call returns the block output alone, not fc2's
    output, which linear returns as a view of its 2-D product."""
    stack = _stack().train()
    x = torch.randn(2, 7, stack.blocks[0].fc1.in_features, requires_grad=True)
    out, fc = stack.blocks[0](x, branch=False)
    assert fc is None and out._base is None
    out, fc = stack.blocks[0](x)  # the teacher's call (under no_grad, where FSDP2 hooks nothing)
    assert fc._base is not None, "fc2's output is a view: why the student must not return it"


def test_a_dropped_block_run_at_weight_zero_is_a_skip_with_zero_parameter_gradients():
    """FSDP runs a layerdropped block at weight 0 (every rank must gather every block): output,
    input gradient and later random draws are those of skipping it; its parameters get zero
    gradients where skipping leaves none. Dropout on: the kept blocks draw from the same RNG."""
    skip = _stack("model.layerdrop=0.5", "model.dropout=0.1").train()
    ran = _stack("model.layerdrop=0.5", "model.dropout=0.1").train()
    ran.load_state_dict(skip.state_dict())
    ran.run_dropped = True
    results = []
    for stack in (skip, ran):
        torch.manual_seed(3)
        x = torch.randn(2, 9, stack.blocks[0].fc1.in_features, requires_grad=True)
        y = stack(x)[0]
        (y * torch.randn_like(y)).sum().backward()
        results.append((y.detach(), x.grad, torch.rand(4),
                        [b.fc1.weight.grad for b in stack.blocks]))
    (y0, g0, r0, w0), (y1, g1, r1, w1) = results
    assert torch.equal(y0, y1) and torch.equal(g0, g1) and torch.equal(r0, r1)
    dropped = [i for i, g in enumerate(w0) if g is None]
    assert dropped and len(dropped) < len(w0), "seed 3 should drop some blocks, not all"
    for i, g in enumerate(w1):
        if i in dropped:
            assert torch.count_nonzero(g) == 0
        else:
            assert torch.equal(g, w0[i])
    assert ran.runs == [0 if i in dropped else 1 for i in range(len(w0))]
