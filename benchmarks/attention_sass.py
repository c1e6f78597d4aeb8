"""What dropout costs in the attention kernels' inner loops, counted in sm_90 SASS (no GPU needed).

    python -m benchmarks.attention_sass [--json PATH]

Each row compiles one attention kernel at a base config's launch (benchmarks.compile_check's
recorded arguments, one autotune tile) twice, with and without dropout, disassembles the cubin
with triton's bundled cuobjdump and counts the instructions of its main loop (the longest
backward branch: one key block of the forward and of dQ, one query block of dK/dV, one sample's
tile of d(bias)). Instruction counts are not time -- the tensor-core MMAs run asynchronously and
memory latency is ignored -- so the ratios they give are estimates of the ALU work dropout adds.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

# (base config, launch substring, kernel, (BLOCK_M, BLOCK_N, warps, stages))
ROWS = [("image_base", "image_base student", "_fwd_kernel", (128, 64, 8, 3)),
        ("image_base", "image_base student", "_bwd_dkdv_kernel", (64, 64, 8, 2)),
        ("image_base", "image_base student", "_bwd_dq_kernel", (128, 64, 8, 2)),
        ("image_base", "image_base student", "_bwd_dbias_kernel", (64, 64, 8, 2)),
        ("audio_base", "audio_base student", "_fwd_kernel", (128, 64, 8, 3)),
        ("audio_base", "audio_base student", "_bwd_dkdv_kernel", (64, 64, 8, 2)),
        ("audio_base", "audio_base student", "_bwd_dq_kernel", (128, 64, 8, 2))]


def sass(kernel) -> list[str]:
    """The cubin's instructions (NOPs left out)."""
    import triton
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-sass", f.name],
                             capture_output=True, text=True, check=True).stdout
    return [line for line in out.splitlines()
            if re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+\S", line) and " NOP" not in line]


def main_loop(instructions: list[str]) -> list[str]:
    """The instructions between the longest backward branch and its target."""
    def addr(line):
        return int(re.match(r"\s+/\*([0-9a-f]{4,})\*/", line).group(1), 16)
    spans = []
    for line in instructions:
        m = re.search(r"BRA (0x[0-9a-f]+)", line)
        if m and int(m.group(1), 16) < addr(line):
            spans.append((int(m.group(1), 16), addr(line)))
    if not spans:
        return []
    lo, hi = max(spans, key=lambda s: s[1] - s[0])
    return [line for line in instructions if lo <= addr(line) <= hi]


def count(config, launch, kernel_name, tile, jobs) -> dict:
    import triton
    from triton.compiler import ASTSource

    from benchmarks import compile_check as cc
    job = next(j for j in jobs if j.kernel == kernel_name and launch in j.launch)
    m, n, w, s = tile
    row = {"config": config, "launch": job.launch, "kernel": kernel_name,
           "tile": f"{m}x{n} w{w} s{s}"}
    for dropout in (False, True):
        kwargs = dict(job.kwargs, DROPOUT=dropout, BLOCK_M=m, BLOCK_N=n, num_warps=w,
                      num_stages=s)
        _, signature, constexprs, attrs, options = cc._bind(job.fn, job.args, kwargs)
        compiled = triton.compile(ASTSource(job.fn, signature, constexprs, attrs),
                                  target=cc._target(), options=options.__dict__)
        row["loop_with_dropout" if dropout else "loop"] = len(main_loop(sass(compiled)))
    row["ratio"] = row["loop_with_dropout"] / row["loop"]
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="d2v-sass-"))
    import triton

    from benchmarks import compile_check as cc
    jobs = {c: cc.collect_jobs([c], ["bfloat16"])[0] for c in {r[0] for r in ROWS}}
    rows = [count(*r, jobs[r[0]]) for r in ROWS]
    print(f"triton {triton.__version__}, sm_90: main-loop SASS instructions per thread")
    print("| launch | kernel | tile | no dropout | dropout | ratio |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['launch']} | {r['kernel']} | {r['tile']} | {r['loop']} | "
              f"{r['loop_with_dropout']} | {r['ratio']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "target": "sm_90", "rows": rows}, f,
                      indent=1)
    return rows


if __name__ == "__main__":
    main()
