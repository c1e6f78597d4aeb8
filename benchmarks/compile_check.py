"""Compiles every Triton kernel in d2v_kernels/ for the H100 (sm_90) at the base configs' shapes, on any
machine (no GPU needed), and reports registers, spill bytes, shared memory and occupancy (blocks
resident per H100 SM given those, and resident warps of 64).

    python -m benchmarks.compile_check [--configs image_base,...] [--dtypes bfloat16,float16,float32]
                                    [--only masking,targets,attention] [--jobs N] [--csrc]
                                    [--json PATH] [--all] [--list]

What is compiled. Each base config (image v1/v2, audio v1/v2, text v1/v2) names the launches of one
training micro-batch: the masks; attention forward + backward of the student (train mode: the
config's attention dropout, key padding for audio and text, BEiT's shared relative-position bias
and its gradient; data2vec 2.0 students see the visible tokens only, micro-batch x clones) and the
forward of the EMA teacher (eval: no dropout); the teacher targets. The launchers of d2v_kernels/ run on
empty CPU tensors of those shapes with each kernel replaced by a recorder, so a compile sees the
arguments, the specialization (pointer alignment, integers divisible by 16) and the
meta-parameters a CUDA launch would pass. An autotuned kernel contributes every config its
pruning keeps for that launch (the ones the autotuner would time; the pruned ones are counted).
Attention runs in bf16 in training (autocast), the default; --dtypes adds fp16 / fp32 (the tests').

How. triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32)) per distinct launch and
config, in a fresh cache so that ptxas runs every time; ptxas' -v log (Triton asks for it) gives
registers and spill stores/loads, the compiled kernel's metadata its shared memory (Triton's is
dynamic; the H100 grants a block at most 227 KB). With --csrc, nvcc -Xptxas -v compiles
every .cu file of csrc/ for sm_90 too, with the very flags torch.utils.cpp_extension passes when it
builds the extension (read from the ninja file torch writes: -D__CUDA_NO_HALF_CONVERSIONS__ and the
other COMMON_NVCC_FLAGS, its arch flags, include paths and C++ standard), so code that plain nvcc
accepts and torch's build rejects fails here.

Fails (exit 1) on: a compile error; a config above 227 KB of shared memory; a kernel and launch
where every config spills. A spilling config with a spill-free sibling is listed, not fatal.
The targets and masking kernels are always listed (one launch each per config: their registers
and occupancy are the point); attention configs only when they spill, or with --all.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from d2v_engine.runtime.attention_shapes import attention_launches, tokens_per_sample

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("image_base", "image_v2", "audio_base", "audio_v2", "text_base", "text_v2")
GROUPS = ("masking", "targets", "attention")  # d2v_kernels/ modules whose launches are compiled
DTYPES = ("bfloat16", "float16", "float32")
TRAINING_DTYPES = ("bfloat16",)  # the configs train under bf16 autocast
SM = 90
MAX_SHARED = 227 * 1024  # H100: dynamic shared memory per block
# An H100 SM (sm_90): 64K 32-bit registers allocated per warp in units of 256, 2048 threads, 32
# blocks, 228 KB of shared memory of which the driver reserves 1 KB per block.
SM_REGISTERS, SM_THREADS, SM_BLOCKS = 65536, 2048, 32
SM_SHARED, BLOCK_RESERVED_SHARED = 228 * 1024, 1024


@dataclass
class Job:
    """One compile: a kernel launch (its arguments as the launcher passes them) and one config."""
    kernel: str
    launch: str  # what launched it: config, role, shape, dtype
    fn: object  # the JITFunction
    args: tuple
    kwargs: dict
    config: str  # "BMxBN w4 s3" for autotuned kernels, else the meta-parameters
    group: int  # launches of one autotuned call share a group: one spill-free config must exist
    users: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The launches of each base config


def _run_attention(launch, dtype, torch, attention):
    role, B, H, T, D, bias, padded, p, backward = launch
    q = torch.empty(B, H, T, D, dtype=dtype)
    pad = torch.zeros(B, T, dtype=torch.bool) if padded else None
    b = None  # the relative position bias is an fp32 parameter (autocast leaves it so)
    if bias == "shared":
        b = torch.empty(H, T, T, dtype=torch.float32)
    elif bias == "batched":
        b = torch.empty(B, H, T, T, dtype=torch.float32)
    # seed None: drawn as flash_forward draws it in training (a 1-element device tensor)
    out, lse, keep = attention.flash_forward(q, q, q, pad, b, D ** -0.5, p)
    if backward:
        attention.flash_backward(q, q, q, q, pad, b, q, lse, D ** -0.5, p, keep,
                                 need_bias_grad=b is not None)


def _run_targets(cfg, torch, targets):
    o, m = cfg.objective, cfg.model
    extra = 1 if cfg.modality == "image" else 0
    t, B = tokens_per_sample(cfg), cfg.train.micro_batch
    # the trainer passes y[:, extra:] of each block output: views that skip the CLS token
    layers = [torch.empty(B, t, m.embed_dim, dtype=torch.bfloat16)[:, extra:]
              for _ in range(o.top_k)]
    pad = torch.zeros(B, t - extra, dtype=torch.bool) if cfg.modality in ("audio", "text") else None
    targets._teacher_targets_triton(layers, pad, o.layer_norm, o.final_norm, 1e-5,
                                    o.instance_norm_padding)


def _run_masking(cfg, torch, masking):
    mk, v2 = cfg.masking, cfg.objective.mode == "v2"
    B = cfg.train.micro_batch * (cfg.objective.clone_batch if v2 else 1)
    seeds = torch.zeros(B, dtype=torch.int64)
    if cfg.modality == "image":
        side = cfg.model.img_size // cfg.model.patch_size
        args = masking._check_block(B, (side, side), mk.mask_prob, seeds, mk.min_block, v2, None,
                                    mk.mask_length, mk.mask_prob_adjust)
        masking._block_mask_triton(*args)
    elif cfg.modality == "audio":
        t = tokens_per_sample(cfg)
        masking._span_mask_triton(torch.full((B,), t), t, mk.mask_prob, mk.mask_length,
                                  mk.min_masks, seeds, mk.require_same_masks)
    else:
        t, vocab = tokens_per_sample(cfg), cfg.model.vocab_size
        tokens = torch.zeros(B, t, dtype=torch.int64)
        args = masking._check_token(tokens, mk.mask_prob, tokens == 1, vocab - 1, vocab, seeds,
                                    mk.mask_length, tuple(mk.replace), (0, 1, 2, 3, vocab - 1))
        masking._token_mask_triton(*args)


class _Recorder:
    """Stands in for a kernel in its module: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, name, kernel, sink):
        self.name, self.kernel, self.sink = name, kernel, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append((self.name, self.kernel, args, kwargs))


def _recorded(module, names, sink):
    """Context manager: module's kernels `names` replaced by recorders appending to sink."""
    stack = contextlib.ExitStack()
    from unittest import mock
    for name in names:
        stack.enter_context(mock.patch.object(module, name,
                                              _Recorder(name, getattr(module, name), sink)))
    return stack


def collect_jobs(configs=CONFIGS, dtypes=DTYPES, groups=GROUPS) -> tuple[list[Job], list[str]]:
    """Every distinct (launch, config) of the base configs' kernels in `groups` -> (jobs, notes on
    pruned configs)."""
    import torch
    from triton.runtime.autotuner import Autotuner

    from d2v_engine.config import load_config
    from d2v_kernels import attention, masking, targets

    attention_kernels = ["_fwd_kernel", "_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel",
                         "_bwd_dbias_kernel"]
    target_kernels = ["_instance_kernel", "_combine_kernel"]
    mask_kernels = ["_span_kernel", "_trim_kernel", "_token_kernel", "_beit_block_kernel",
                    "_inverse_block_kernel"]
    launches = []  # (label, recorded launch)
    for name in configs:
        cfg = load_config(ROOT / "configs" / f"{name}.yaml")
        sink = []
        if "masking" in groups:
            with _recorded(masking, mask_kernels, sink):
                _run_masking(cfg, torch, masking)
        if "targets" in groups:
            with _recorded(targets, target_kernels, sink):
                _run_targets(cfg, torch, targets)
        launches += [(f"{name}", rec) for rec in sink]
        for dtype_name in (dtypes if "attention" in groups else ()):
            dtype = getattr(torch, dtype_name)
            for launch in attention_launches(cfg):
                sink = []
                with _recorded(attention, attention_kernels, sink):
                    _run_attention(launch, dtype, torch, attention)
                role, B, H, T, D, bias, padded, p, _ = launch
                what = (f"{name} {role} {dtype_name} B={B} T={T}"
                        + (f" bias={bias}" if bias else "") + (" pad" if padded else "")
                        + (f" p={p:g}" if p else ""))
                launches += [(what, rec) for rec in sink]

    jobs, by_key, notes = [], {}, []
    for group, (label, (kname, kernel, args, kwargs)) in enumerate(launches):
        if isinstance(kernel, Autotuner):
            fn = kernel.fn
            nargs = dict(zip(fn.arg_names, args))
            kept = (kernel.early_config_prune(kernel.configs, nargs, **kwargs)
                    if kernel.early_config_prune else kernel.configs)
            if len(kept) < len(kernel.configs):
                notes.append(f"{kname} [{label}]: {len(kernel.configs) - len(kept)} of "
                             f"{len(kernel.configs)} configs pruned at this shape")
            variants = [({**kwargs, **c.all_kwargs()}, _config_name(c, kwargs)) for c in kept]
        else:
            fn = kernel
            variants = [(kwargs, _meta_name(args, kwargs))]
        for full_kwargs, config_name in variants:
            key = _compile_key(fn, args, full_kwargs)
            if key in by_key:
                job = by_key[key]
            else:
                job = Job(kname, label, fn, args, full_kwargs, config_name, group)
                by_key[key] = job
                jobs.append(job)
            job.users.append((group, label))
    return jobs, notes


def _meta_name(args, kwargs) -> str:
    """The tile meta-parameters of a plain launch (K: the length of a tuple of layers)."""
    shown = ("BLOCK", "num_", "SUB", "CW", "NCH")
    parts = [f"K={len(a)}" for a in args[:1] if isinstance(a, tuple)]
    parts += [f"{k.replace('num_warps', 'w')}={v}" for k, v in kwargs.items()
              if k.startswith(shown)]
    return " ".join(parts)


def _config_name(c, launch_kwargs) -> str:
    kw = {**launch_kwargs, **c.kwargs}  # a launcher may fix BLOCK_M itself
    return f"{kw['BLOCK_M']}x{kw['BLOCK_N']} w{c.num_warps} s{c.num_stages}"


def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", SM, 32)


def _bind(fn, args, kwargs):
    """(backend, signature, constexprs, attrs, options) exactly as JITFunction.run derives them for
    a CUDA launch, but for the sm_90 target instead of the current device."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(_target())
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization,
                                                          options)
    return backend, signature, constexprs, attrs, options


def _compile_key(fn, args, kwargs) -> str:
    _, signature, constexprs, attrs, options = _bind(fn, args, kwargs)
    return repr((fn.__name__, signature, sorted(constexprs.items(), key=str), attrs,
                 options.hash()))


# ---------------------------------------------------------------------------------------------
# Compiling (in worker processes: each rebuilds the job list, then compiles the ones it is given)

_WORKER_JOBS: list[Job] = []


def _worker_init(configs, dtypes, groups, cache_dir):
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    global _WORKER_JOBS
    _WORKER_JOBS = collect_jobs(configs, dtypes, groups)[0]


def compile_one(index: int) -> dict:
    """Compiles job `index`: {"regs", "spill_stores", "spill_loads", "shared", "threads",
    "blocks_per_sm", "occupancy", "seconds"} or {"error"}."""
    import triton
    from triton.compiler import ASTSource
    job = _WORKER_JOBS[index]
    start = time.perf_counter()
    try:
        _, signature, constexprs, attrs, options = _bind(job.fn, job.args, job.kwargs)
        triton.knobs.nvidia.dump_ptxas_log = True
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(job.fn, signature, constexprs, attrs),
                                    target=_target(), options=options.__dict__)
    except Exception as e:  # reported per job; the check fails
        return {"error": f"{type(e).__name__}: {str(e).strip()[:2000]}",
                "seconds": time.perf_counter() - start}
    usage = parse_ptxas_log(log.getvalue())
    if usage is None:  # no log (should not happen in a fresh cache): ask cuobjdump
        usage = cuobjdump_usage(kernel.asm["cubin"])
    threads = 32 * kernel.metadata.num_warps
    return {**usage, "shared": kernel.metadata.shared, "threads": threads,
            **occupancy(usage["regs"], threads, kernel.metadata.shared),
            "seconds": time.perf_counter() - start}


def occupancy(regs: int, threads: int, shared: int) -> dict:
    """Blocks of `threads` resident per H100 SM given registers per thread and shared bytes per
    block, and the resident warps as a fraction of the SM's 64."""
    warps = -(-threads // 32)
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (SM_REGISTERS // per_warp) // warps if per_warp else SM_BLOCKS
    by_shared = SM_SHARED // (shared + BLOCK_RESERVED_SHARED)
    blocks = min(SM_BLOCKS, SM_THREADS // (warps * 32), by_regs, by_shared)
    return {"blocks_per_sm": blocks, "occupancy": blocks * warps / (SM_THREADS // 32)}


def parse_ptxas_log(text: str) -> dict | None:
    regs = re.findall(r"Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs or not spills:
        return None
    return {"regs": max(map(int, regs)), "spill_stores": max(int(s) for s, _ in spills),
            "spill_loads": max(int(lo) for _, lo in spills)}


def cuobjdump_usage(cubin: bytes) -> dict:
    """Registers and stack bytes from triton's bundled cuobjdump (stack stands in for spills)."""
    import triton
    tool = triton.knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", out).group(1))
    stack = int(re.search(r"STACK:(\d+)", out).group(1))
    return {"regs": regs, "spill_stores": stack, "spill_loads": stack}


def compile_all(indices, configs, dtypes, groups, workers: int) -> list[dict]:
    """Results of the jobs at `indices` (of collect_jobs' list), in that order; compiled in
    `workers` processes, in one fresh Triton cache."""
    import multiprocessing
    with tempfile.TemporaryDirectory(prefix="d2v-compile-check-") as cache:
        if workers <= 1:
            _worker_init(configs, dtypes, groups, cache)
            return [compile_one(i) for i in indices]
        ctx = multiprocessing.get_context("spawn")
        results, start = [], time.perf_counter()
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                 initargs=(configs, dtypes, groups, cache)) as pool:
            for result in pool.map(compile_one, indices):
                results.append(result)
                if len(results) % 10 == 0:  # a sign of life in CI logs
                    print(f"  compiled {len(results)} of {len(indices)} "
                          f"({time.perf_counter() - start:.0f} s)", flush=True)
        return results


# ---------------------------------------------------------------------------------------------
# csrc/ with nvcc


def find_nvcc() -> str | None:
    """nvcc on PATH, under CUDA_HOME, or from the nvidia-cuda-nvcc wheel."""
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    try:
        import nvidia.cuda_nvcc  # the PyPI wheel
        candidate = Path(list(nvidia.cuda_nvcc.__path__)[0]) / "bin" / "nvcc"
        return str(candidate) if candidate.exists() else None
    except ImportError:
        return None


def cuda_home(nvcc: str) -> str:
    """The toolkit root of `nvcc` (what CUDA_HOME would be), from its --dryrun's TOP line: a
    wrapper script on PATH (/usr/local/bin/nvcc) does not sit in the toolkit's bin/."""
    run = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True)
    top = re.search(r"^#\$ TOP=(.+)$", run.stderr + run.stdout, re.M)
    if top is None:
        raise RuntimeError(f"{nvcc} --dryrun names no TOP= (its toolkit root)")
    return str(Path(top.group(1).strip()).resolve())


def torch_nvcc_command(nvcc: str) -> list[str]:
    """The nvcc and its flags that torch.utils.cpp_extension.load passes for the extension's .cu
    files (d2v_kernels._cuda's arguments), for sm_90: read from the ninja file torch itself writes
    for that build (its COMMON_NVCC_FLAGS -- -D__CUDA_NO_HALF_CONVERSIONS__ and the like --, the
    arch flags of TORCH_CUDA_ARCH_LIST=9.0, include_paths("cuda"), -std=c++20), so a flag torch
    adds tomorrow is checked here too. A CPU build of torch has no CUDA_HOME: nvcc's toolkit
    stands in."""
    from unittest import mock

    from torch.utils import cpp_extension as ce

    from d2v_kernels import _cuda
    home = ce.CUDA_HOME or cuda_home(nvcc)
    with tempfile.TemporaryDirectory() as tmp, mock.patch.object(ce, "CUDA_HOME", home), \
            mock.patch.dict(os.environ, {"TORCH_CUDA_ARCH_LIST": f"{SM // 10}.{SM % 10}"}):
        ninja = Path(tmp) / "build.ninja"
        # torch's own writer of the JIT build (private, but it is what load() runs)
        ce._write_ninja_file_to_build_library(
            path=str(ninja), name=_cuda.MODULE_NAME, sources=[str(p) for p in _cuda.sources()],
            extra_cflags=_cuda.EXTRA_CFLAGS, extra_cuda_cflags=_cuda.EXTRA_CUDA_CFLAGS,
            extra_sycl_cflags=[], extra_ldflags=[], extra_include_paths=[str(_cuda.CSRC)],
            with_cuda=True, with_sycl=False, is_standalone=False)
        text = ninja.read_text()
    values = dict(re.findall(r"^(\w+) = (.*)$", text, re.M))
    return [values["nvcc"], *shlex.split(values["cuda_cflags"]),
            *shlex.split(values.get("cuda_post_cflags", ""))]


def compile_csrc() -> dict:
    """{"nvcc", "flags", "kernels": [{name, regs, spill_stores, spill_loads, shared, threads,
    blocks_per_sm, occupancy}], "seconds"} for every .cu file of csrc/ compiled for sm_90 exactly as
    torch's extension build compiles it (torch_nvcc_command), or {"skipped": reason} /
    {"error": the compiler's error lines, "nvcc"}. d2v_cuda.cpp, the torch binding, is compiled by
    gpu_check's extension phase: it needs torch's CUDA headers, which a CPU build of torch lacks."""
    nvcc = find_nvcc()
    if nvcc is None:
        return {"skipped": "no nvcc (install the nvidia-cuda-nvcc wheel or a CUDA toolkit)"}
    from d2v_kernels import _cuda
    start = time.perf_counter()
    command = torch_nvcc_command(nvcc)
    entries, logs = [], []
    for src in (p for p in _cuda.sources() if p.suffix == ".cu"):
        with tempfile.TemporaryDirectory() as tmp:
            run = subprocess.run([*command, "-Xptxas", "-v", "-c", str(src), "-o",
                                  str(Path(tmp) / "k.o")], capture_output=True, text=True)
        if run.returncode != 0:
            return {"error": _cuda.error_summary(run.stderr + run.stdout, limit=20),
                    "nvcc": command[0], "flags": command[1:]}
        logs.append((src, run.stderr))
    for src, log in logs:
        # Every csrc kernel is launched with kThreads threads per block.
        threads = int(re.search(r"constexpr int kThreads = (\d+);", src.read_text()).group(1))
        current = None
        for line in log.splitlines():
            m = re.search(r"Compiling entry function '([^']+)'", line)
            if m:
                current = {"name": _demangle(m.group(1)), "threads": threads}
                entries.append(current)
            elif current is not None:
                if s := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
                    current["spill_stores"] = int(s.group(1))
                    current["spill_loads"] = int(s.group(2))
                if r := re.search(r"Used (\d+) registers", line):
                    current["regs"] = int(r.group(1))
                if sm := re.search(r"(\d+) bytes smem", line):
                    current["shared"] = int(sm.group(1))
    for k in entries:
        if "regs" in k:
            k.update(**occupancy(k["regs"], k["threads"], k.get("shared", 0)))
    return {"nvcc": command[0], "flags": command[1:], "kernels": entries,
            "seconds": time.perf_counter() - start}


def _demangle(name: str) -> str:
    tool = shutil.which("c++filt")
    if tool is None:
        return name
    return subprocess.run([tool, name], capture_output=True, text=True).stdout.strip() or name


# ---------------------------------------------------------------------------------------------


def summarize(jobs, results) -> list[str]:
    """The failures: compile errors, configs over 227 KB, launches whose every config spills."""
    failures = []
    for job, r in zip(jobs, results):
        if "error" in r:
            failures.append(f"compile error: {job.kernel} {job.config} [{job.launch}]: "
                            f"{r['error'].splitlines()[0]}")
        elif r["shared"] > MAX_SHARED:
            failures.append(f"shared memory {r['shared'] / 1024:.0f} KB > 227 KB: {job.kernel} "
                            f"{job.config} [{job.launch}]")
    groups: dict[int, list] = {}
    for job, r in zip(jobs, results):
        for group, label in job.users:
            groups.setdefault(group, []).append((job, r, label))
    for members in groups.values():
        ok = [r for _, r, _ in members if "error" not in r and r["spill_stores"] == 0
              and r["shared"] <= MAX_SHARED]
        if not ok:
            job, _, label = members[0]
            failures.append(f"every config spills or overflows: {job.kernel} [{label}]")
    return failures


# Kernels listed even when clean: one launch each per config, their occupancy is the point.
ALWAYS_LISTED = ("_combine_kernel", "_instance_kernel", "_span_kernel", "_trim_kernel",
                 "_token_kernel", "_beit_block_kernel", "_inverse_block_kernel")


def print_table(jobs, results, show_all: bool) -> None:
    """Compiles that spill, fail or are listed always (targets, masking); with show_all every one.
    blk/SM: blocks resident per SM (registers, threads, shared memory); occ: resident warps / 64."""
    print(f"{'kernel':<22}{'config':<44}{'regs':>5}{'spill st/ld':>13}{'smem KB':>9}"
          f"{'thr':>5}{'blk/SM':>7}{'occ':>5}{'s':>6}  launches")
    for job, r in zip(jobs, results):
        spills = "error" in r or r["spill_stores"] > 0 or r["shared"] > MAX_SHARED
        if not (show_all or spills or job.kernel in ALWAYS_LISTED):
            continue
        users = "; ".join(label for _, label in job.users[:3])
        if len(job.users) > 3:
            users += f"; +{len(job.users) - 3} more"
        if "error" in r:
            print(f"{job.kernel:<22}{job.config:<44}{'compile error':>33}  {users}")
            continue
        print(f"{job.kernel:<22}{job.config:<44}{r['regs']:>5}"
              f"{r['spill_stores']:>7}/{r['spill_loads']:<5}{r['shared'] / 1024:>9.1f}"
              f"{r['threads']:>5}{r['blocks_per_sm']:>7}{100 * r['occupancy']:>4.0f}%"
              f"{r['seconds']:>6.1f}  {users}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--dtypes", default=",".join(TRAINING_DTYPES),
                        help=f"attention dtypes, of {DTYPES} (default: the training dtype)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compile processes (default: one per core)")
    parser.add_argument("--only", default=",".join(GROUPS),
                        help=f"comma-separated kernel groups, of {GROUPS} (default: all)")
    parser.add_argument("--csrc", action="store_true", help="also nvcc csrc/ for sm_90")
    parser.add_argument("--all", action="store_true", help="list clean configs too")
    parser.add_argument("--match", default=None, metavar="REGEX",
                        help="only the compiles whose 'kernel config launches' line matches")
    parser.add_argument("--list", action="store_true",
                        help="only list the launches and configs that would be compiled")
    parser.add_argument("--json", metavar="PATH", help="write every result as JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the kernels would be decorated for the "
                     "interpreter; unset it")
    configs = [c for c in args.configs.split(",") if c]
    dtypes = [d for d in args.dtypes.split(",") if d]
    groups = [g for g in args.only.split(",") if g]
    bad = (sorted(set(configs) - set(CONFIGS)) + sorted(set(dtypes) - set(DTYPES))
           + sorted(set(groups) - set(GROUPS)))
    if bad:
        parser.error(f"unknown {bad}; configs: {CONFIGS}, dtypes: {DTYPES}, only: {GROUPS}")
    import triton
    start = time.perf_counter()
    jobs, notes = collect_jobs(configs, dtypes, groups)
    selected = list(range(len(jobs)))
    if args.match:  # indices into the full list: the workers rebuild that list
        keep = re.compile(args.match)
        selected = [i for i, j in enumerate(jobs) if keep.search(
            f"{j.kernel} {j.config} " + "; ".join(label for _, label in j.users))]
        jobs = [jobs[i] for i in selected]
    launches = len({g for job in jobs for g, _ in job.users})
    print(f"compile_check: triton {triton.__version__}, target sm_{SM}: {len(jobs)} distinct "
          f"compiles for {launches} launches of {len(configs)} configs ({', '.join(configs)}), "
          f"kernels of {', '.join(groups)}, attention in {', '.join(dtypes)}; {args.jobs} "
          "processes",
          flush=True)
    if args.list:
        for job in jobs:
            print(f"{job.kernel:<22}{job.config:<44}"
                  + "; ".join(label for _, label in job.users))
        for note in notes:
            print(note)
        return 0
    results = compile_all(selected, configs, dtypes, groups, args.jobs)
    failures = summarize(jobs, results)
    print_table(jobs, results, args.all)
    clean = sum(1 for r in results if "error" not in r and r["spill_stores"] == 0
                and r["shared"] <= MAX_SHARED)
    print(f"{clean} of {len(jobs)} compiles without spills within 227 KB; "
          f"{len(notes)} launches had configs pruned by their kernel's early_config_prune")
    csrc = compile_csrc() if args.csrc else None
    if csrc is not None:
        if "flags" in csrc:
            print(f"csrc: {csrc['nvcc']} {' '.join(csrc['flags'])}")
        if "kernels" in csrc:
            for k in csrc["kernels"]:
                occ = ""
                if "blocks_per_sm" in k:
                    occ = (f" threads {k['threads']} blk/SM {k['blocks_per_sm']} occ "
                           f"{100 * k['occupancy']:.0f}%")
                print(f"csrc {k['name'][:70]:<70} regs {k.get('regs')} spill "
                      f"{k.get('spill_stores')}/{k.get('spill_loads')} smem {k.get('shared', 0)}"
                      + occ)
                if k.get("spill_stores"):  # reported: the kernels of csrc/ are tuned by hand
                    print(f"  csrc spills: {k['name']}")
        elif "error" in csrc:
            failures.append(f"csrc does not compile with torch's nvcc flags: {csrc['error']}")
        else:
            print(f"csrc: skipped: {csrc['skipped']}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "triton": triton.__version__, "target": f"sm_{SM}", "configs": configs,
            "dtypes": dtypes, "groups": groups, "failures": failures, "csrc": csrc,
            "compiles": [{"kernel": j.kernel, "config": j.config,
                          "launches": [label for _, label in j.users], **r}
                         for j, r in zip(jobs, results)]}, indent=1) + "\n")
    print(f"compile_check: {time.perf_counter() - start:.0f} s, "
          + ("FAILED:" if failures else "passed"))
    for f in failures:
        print(f"  {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
