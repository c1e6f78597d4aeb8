"""The launch scripts as users run them, on CPU with gloo: no nvidia-smi on PATH, the python of
another environment (a wrapper outside any .venv), SLURM played by stand-ins for srun and scontrol.
Runs are tiny (2 ranks, micro-batch 2, a few steps)."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["train.max_steps=2", "train.global_batch=4", "train.micro_batch=2", "train.device=cpu",
        "train.progress=false", "train.log_every=1", "run.tensorboard=false"]
SRUN = """#!/bin/sh
# srun stand-in: one task on this node with the job's environment (srun's --export=ALL); records
# what it was given, then becomes the task, as srun's task would (SLURM signals go to it).
echo $$ > "$FAKE_SRUN_RECORD.pid"
env > "$FAKE_SRUN_RECORD.env"
printf '%s\\n' "$@" > "$FAKE_SRUN_RECORD.args"
[ "${FAKE_SRUN_EXEC:-1}" = 1 ] || exit 0
exec "$@"
"""
SCONTROL = """#!/bin/sh
# scontrol stand-in: "scontrol show hostnames LIST" for comma-separated lists
[ "$1 $2" = "show hostnames" ] || { echo "scontrol stand-in: unsupported: $*" >&2; exit 1; }
echo "$3" | tr ',' '\\n'
"""


def _executable(path, text):
    path.write_text(text)
    path.chmod(0o755)
    return path


@pytest.fixture
def env(tmp_path):
    """The environment of a user on a machine without nvidia-smi: PATH has the system binaries
    and a bin/ with the SLURM stand-ins; `python3` there and $PYTHON_OTHER wrap the venv's python
    from outside it (another environment); no launch variables inherited."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "srun", SRUN)
    _executable(bin_dir / "scontrol", SCONTROL)
    wrapper = f'#!/bin/sh\nexec "{sys.executable}" "$@"\n'
    _executable(bin_dir / "python3", wrapper)
    other = tmp_path / "other-env" / "bin"
    other.mkdir(parents=True)
    _executable(other / "python", wrapper)
    path = f"{bin_dir}:/usr/bin:/bin"
    assert shutil.which("nvidia-smi", path=path) is None
    keep = {k: v for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "TORCHELASTIC_", "GPUS", "PYTHON", "NNODES",
                                 "MASTER_", "RDZV_", "D2V_"))}
    return {**keep, "PATH": path, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "TRITON_INTERPRET": "0", "PYTHON_OTHER": str(other / "python"),
            "FAKE_SRUN_RECORD": str(tmp_path / "srun")}


def _run(cmd, env, timeout=600):
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _assert_trained(run_dir, steps, world):
    assert [r["step"] for r in _rows(run_dir) if "loss" in r] == steps
    assert (Path(run_dir) / f"checkpoint_{steps[-1]:08d}.pt").is_file()
    assert json.loads((Path(run_dir) / "plan.json").read_text())["world_size"] == world


def _first_line(stderr):
    return stderr.splitlines()[0] if stderr else ""


# --- one node -----------------------------------------------------------------------------------

def test_one_node_script_trains_two_gloo_ranks_and_checkpoints(env, tmp_path):
    run = tmp_path / "run"
    r = _run(["scripts/train_one_node.sh", "configs/tiny_image.yaml", f"run.dir={run}", *TINY],
             {**env, "GPUS": "2", "PYTHON": env["PYTHON_OTHER"]})
    assert r.returncode == 0, r.stderr[-3000:]
    first = _first_line(r.stderr)
    assert first.startswith(f"d2v-engine launch: {env['PYTHON_OTHER']} (torch "), first
    assert "1 node x 2 rank(s)" in first and "no CUDA" in first, first
    _assert_trained(run, [1, 2], world=2)


def test_one_node_script_without_cuda_or_settings_runs_one_cpu_rank_with_python3(env, tmp_path):
    r = _run(["scripts/train_one_node.sh", "configs/tiny_image.yaml", f"run.dir={tmp_path}",
              "train.dry_run=true"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    first = _first_line(r.stderr)
    python3 = str(tmp_path / "bin" / "python3")  # no .venv in the checkout: python3 from PATH
    if (ROOT / ".venv/bin/python").exists():
        python3 = str(ROOT / ".venv/bin/python")
    assert first.startswith(f"d2v-engine launch: {python3} (torch "), first
    assert "1 node x 1 rank(s), no CUDA: CPU ranks over gloo" in first, first
    assert json.loads((tmp_path / "plan.json").read_text())["world_size"] == 1


# --- several nodes ------------------------------------------------------------------------------

def test_multi_node_script_trains_two_gloo_ranks_and_checkpoints(env, tmp_path):
    run, port = tmp_path / "run", _free_port()
    r = _run(["scripts/train_multi_node.sh", "configs/tiny_image.yaml", f"run.dir={run}", *TINY],
             {**env, "NNODES": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
              "GPUS": "2", "PYTHON": env["PYTHON_OTHER"], "RDZV_ID": "t1"})
    assert r.returncode == 0, r.stderr[-3000:]
    first = _first_line(r.stderr)
    assert first.startswith(f"d2v-engine launch: {env['PYTHON_OTHER']} (torch "), first
    assert "1 node(s) x 2 rank(s)" in first and f"127.0.0.1:{port} id t1" in first, first
    _assert_trained(run, [1, 2], world=2)


@pytest.mark.parametrize("script, settings, expect", [
    ("train_multi_node.sh", {"MASTER_ADDR": "127.0.0.1"}, "NNODES is not set"),
    ("train_multi_node.sh", {"NNODES": "1"}, "MASTER_ADDR is not set"),
    ("train_multi_node.sh", {"NNODES": "one", "MASTER_ADDR": "127.0.0.1"}, "NNODES=one"),
    ("train_multi_node.sh", {"NNODES": "1", "MASTER_ADDR": "no-such-host.invalid"},
     "rendezvous host MASTER_ADDR=no-such-host.invalid: cannot resolve"),
    ("train_one_node.sh", {"PYTHON": "NO_TORCH"}, "cannot import torch"),
    ("train_multi_node.sh", {"NNODES": "1", "MASTER_ADDR": "127.0.0.1", "PYTHON": "NO_TORCH"},
     "cannot import torch"),
    ("train_one_node.sh", {"PYTHON": "/nonexistent/bin/python"},
     "no python at PYTHON=/nonexistent/bin/python"),
    ("train_one_node.sh", {"PYTHON": "OTHER", "GPUS": "two"}, "GPUS=two"),
    ("train.slurm", {}, "SLURM_JOB_NODELIST is not set"),
])
def test_each_launch_failure_is_one_line(script, settings, expect, env, tmp_path):
    no_torch = _executable(tmp_path / "no-torch-python",
                           "#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\n"
                           "exit 1\n")
    stand_ins = {"NO_TORCH": str(no_torch), "OTHER": env["PYTHON_OTHER"]}
    settings = {k: stand_ins.get(v, v) for k, v in settings.items()}
    r = _run([f"scripts/{script}", "configs/tiny_image.yaml", f"run.dir={tmp_path / 'run'}"],
             {**env, **settings, "RDZV_CHECK_TIMEOUT": "5"}, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and expect in lines[0], lines[0]
    assert not (tmp_path / "run").exists()


# --- SLURM --------------------------------------------------------------------------------------

def _sbatch_options():
    return dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", (ROOT / "scripts/train.slurm")
                           .read_text(), flags=re.M))


def _record(tmp_path):
    env = dict(l.split("=", 1) for l in (tmp_path / "srun.env").read_text().splitlines()
               if "=" in l)
    return env, (tmp_path / "srun.args").read_text().splitlines()


def test_slurm_script_hands_srun_the_node_list_job_and_signal_settings(env, tmp_path):
    slurm = {"SLURM_JOB_NODELIST": "node-a,node-b", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
             "SLURM_RESTART_COUNT": "3", "FAKE_SRUN_EXEC": "0"}
    r = _run(["scripts/train.slurm", "configs/tiny_image.yaml", "train.max_steps=2"],
             {**env, **slurm})
    assert r.returncode == 0, r.stderr
    got, args = _record(tmp_path)
    assert args == ["scripts/train_multi_node.sh", "configs/tiny_image.yaml", "train.max_steps=2"]
    assert (got["MASTER_ADDR"], got["NNODES"], got["RDZV_ID"]) == ("node-a", "2", "4242")
    assert got["SLURM_RESTART_COUNT"] == "3"  # what d2v_engine.run.preemption reads on a requeue
    # SLURM sends TERM 120 s before the limit; torchrun must give the ranks less than that to
    # finish the step and checkpoint, and more than its default 30 s.
    options = _sbatch_options()
    kind, lead = options["signal"].split("@")
    assert kind == "TERM" and 30 < int(got["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) < int(lead)
    assert "requeue" in options


def _events(run_dir, name):
    return [r for r in _rows(run_dir) if r.get("event") == name]


def test_slurm_job_stops_on_its_signal_and_the_requeued_job_resumes(env, tmp_path):
    """train.slurm under the stand-ins, one node (localhost), 2 gloo ranks: SIGTERM to the task
    (what --signal=TERM@120 does) makes the ranks finish the step and checkpoint within
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT; the same job requeued (SLURM_RESTART_COUNT=1) resumes from
    that checkpoint on its own. (torchrun itself exits 1 on SIGTERM, its SignalException, whatever
    the ranks did: its exit status says nothing here.)"""
    run = tmp_path / "run"
    slurm = {**env, "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1",
             "SLURM_JOB_ID": "77", "MASTER_PORT": str(_free_port()), "GPUS": "2",
             "PYTHON": env["PYTHON_OTHER"]}
    args = ["scripts/train.slurm", "configs/tiny_image.yaml", f"run.dir={run}", *TINY,
            "train.max_steps=50"]
    job = subprocess.Popen(args, cwd=ROOT, env=slurm, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 400
        while not ((run / "metrics.jsonl").exists()
                   and '"loss"' in (run / "metrics.jsonl").read_text()):  # a step is done
            assert job.poll() is None and time.time() < deadline, job.stderr.read()[-3000:]
            time.sleep(0.2)
        os.kill(int((tmp_path / "srun.pid").read_text()), signal.SIGTERM)  # the srun task
        stderr = job.communicate(timeout=300)[1]
    finally:
        if job.poll() is None:
            job.kill()
    stopped = _events(run, "preempted")
    assert len(stopped) == 1, stderr[-3000:]
    step = stopped[0]["step"]
    assert step < 50 and (run / f"checkpoint_{step:08d}.pt").is_file()

    requeued = _run([*args, f"train.stop_at={step + 1}"], {**slurm, "SLURM_RESTART_COUNT": "1"})
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert [(e["step"], e["restart"]) for e in _events(run, "resume")] == [(step, 1)]
    assert (run / f"checkpoint_{step + 1:08d}.pt").is_file()
