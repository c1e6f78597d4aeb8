"""Attention at data2vec's shapes: our Triton flash kernel vs every SDPA backend (and flash-attn).

    python -m benchmarks.bench_attention [--tiny] [--quick] [--json PATH]

Forward and forward+backward TFLOP/s, counting 4*B*H*T*T*D for the forward and 2.5x that for
forward+backward (padded keys are counted too: the figure is comparable across implementations,
not a count of useful work). D=64, bf16, B*H chosen to fill the device, T in {197, 256, 512, 1024},
with no padding and with ~30% of the keys padded. A backend that refuses the arguments (e.g. flash
SDPA with a mask) is recorded with its reason, not fatal. `--tiny` runs small fp32 shapes on the
CPU, where our kernel runs interpreted: it checks the suite, not the speed.

--quick (make gpu-check): the plain case (T=197, no padding) and the three training cases of
tests/test_cuda_kernels.py: image v1 with BEiT's shared bias (its gradient included) and dropout,
audio with 30% key padding and dropout, text with padding. SDPA takes the same bias, padding and
dropout as an additive mask (the backends that refuse it say so in their row).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

if not torch.cuda.is_available():  # before triton is imported: the kernel runs interpreted on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.attention import _sdpa, attention  # noqa: E402

CASES = [(T, pad) for T in (197, 256, 512, 1024) for pad in (0.0, 0.3)]
TINY = [(19, 0.0), (37, 0.3)]
# --quick: (name, B, H, T, padded fraction, bias, dropout)
QUICK = [("plain", 256, 12, 197, 0.0, None, 0.0),
         ("image_train", 32, 12, 197, 0.0, "shared", 0.05),
         ("audio_train", 16, 12, 750, 0.3, None, 0.1),
         ("text_train", 32, 12, 512, 0.2, None, 0.0)]
QUICK_TINY = [(name, 2, 2, t, pad, bias, p) for (name, _, _, _, pad, bias, p), t
              in zip(QUICK, (19, 19, 37, 29))]


def _bh(T: int, tiny: bool) -> tuple[int, int]:
    if tiny:
        return 2, 2
    return max(1, 256 * 197 * 197 // (T * T)), 12  # the image base batch's work at every T


def make_inputs(B, H, T, D, pad_frac, dtype, device, seed=0, bias=None):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).to(device=device, dtype=dtype)
               for _ in range(3))
    mask = None
    if pad_frac > 0:
        keep = torch.randint(int(T * (1 - 2 * pad_frac)) + 1, T + 1, (B,), generator=g)
        mask = (torch.arange(T)[None, :] >= keep[:, None]).to(device)
    if bias == "shared":
        return q, k, v, mask, torch.randn(H, T, T, generator=g).to(device=device, dtype=dtype)
    return q, k, v, mask


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = getattr(SDPBackend, name)

    def run(q, k, v, mask, bias=None, p=0.0):
        with sdpa_kernel([backend]):
            return _sdpa(q, k, v, mask, bias, q.shape[-1] ** -0.5, p)
    return run


def implementations(device: torch.device) -> dict:
    """name -> fn(q, k, v, key_padding_mask, bias=None, dropout_p=0.0)."""
    impls = {"ours": lambda q, k, v, m, b=None, p=0.0: attention(q, k, v, key_padding_mask=m,
                                                                attn_bias=b, dropout_p=p)}
    if device.type == "cuda":
        for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION", "MATH"):
            impls[f"sdpa_{name.lower()}"] = _sdpa_backend(name)
        try:
            from flash_attn import flash_attn_func
            impls["flash_attn"] = lambda q, k, v, m, b=None, p=0.0: flash_attn_func(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=p) \
                if m is None and b is None else None
        except ImportError:
            pass
    else:
        impls["sdpa"] = lambda q, k, v, m, b=None, p=0.0: _sdpa(q, k, v, m, b, q.shape[-1] ** -0.5, p)
    return impls


def measure(fn, q, k, v, mask, device, backward: bool, repeats: int, bias=None,
            p: float = 0.0) -> float:
    """Median ms of the forward (no grad) or forward + backward (q, k, v and the bias as leaves,
    as in training where the relative-position bias is learned)."""
    from benchmarks.common import time_ms
    if backward:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        bias_leaf = None if bias is None else bias.detach().requires_grad_()

        def step():
            out = fn(*leaves, mask, bias_leaf, p)
            out.backward(torch.ones_like(out))
    else:
        def step():
            with torch.no_grad():
                fn(q, k, v, mask, bias, p)
    return time_ms(step, device, repeats=repeats, warmup=1 if device.type == "cpu" else 3)


def run_rows(tiny: bool, quick: bool = False) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    D, rows = (32 if tiny else 64), []
    if quick:
        cases = QUICK_TINY if tiny else QUICK
    else:
        cases = [(None, *_bh(T, tiny), T, pad, None, 0.0) for T, pad in (TINY if tiny else CASES)]
    for case, B, H, T, pad, bias_kind, p in cases:
        q, k, v, mask, *bias = make_inputs(B, H, T, D, pad, dtype, device, bias=bias_kind)
        bias = bias[0] if bias else None
        flops = 4 * B * H * T * T * D
        for name, fn in implementations(device).items():
            row = {"T": T, "pad": pad, "B": B, "H": H, "D": D, "dtype": str(dtype), "impl": name,
                   "case": case, "bias": bias_kind, "dropout": p}
            try:
                if fn(q, k, v, mask, bias, p) is None:
                    raise RuntimeError("does not take a key padding mask or bias")
                for phase, backward, mult in (("fwd", False, 1.0), ("fwd_bwd", True, 2.5)):
                    ms = measure(fn, q, k, v, mask, device, backward, 3 if tiny else 20, bias, p)
                    row[f"{phase}_ms"] = ms
                    row[f"{phase}_tflops"] = mult * flops / ms / 1e9
            except Exception as e:  # a backend that refuses these arguments is a row, not a crash
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
    return rows


def run(tiny: bool = False, quick: bool = False) -> list[dict]:
    """run_all's interface: ours vs each other backend, fwd and fwd+bwd TFLOP/s."""
    from benchmarks import common
    device = common.device()
    peak, _ = common.matmul_peak_tflops(device.type)
    rows = run_rows(tiny, quick)
    records = []
    same = ("T", "pad", "case")
    for ours in (r for r in rows if r["impl"] == "ours" and "error" not in r):
        shape = (f"{ours['case'] + ' ' if ours['case'] else ''}B={ours['B']} H={ours['H']} "
                 f"T={ours['T']} D={ours['D']} pad={ours['pad']:.0%}"
                 + (f" bias={ours['bias']}" if ours["bias"] else "")
                 + (f" p={ours['dropout']:g}" if ours["dropout"] else ""))
        for peer in (r for r in rows if r["impl"] != "ours"
                     and all(r[key] == ours[key] for key in same)):
            for phase in ("fwd", "fwd_bwd"):
                records.append(common.record(
                    f"attention_{phase}", shape, ours[f"{phase}_tflops"], peer["impl"],
                    peer.get(f"{phase}_tflops"), "TFLOP/s",
                    ours[f"{phase}_tflops"] / peak, device))
    return records


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU check)")
    parser.add_argument("--quick", action="store_true", help="make gpu-check's cases")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args(argv)
    rows = run_rows(args.tiny, args.quick)
    print(f"{'T':>5} {'pad':>4} {'impl':<26}{'fwd TFLOP/s':>12}{'fwd+bwd TFLOP/s':>16}")
    for r in rows:
        if "error" in r:
            print(f"{r['T']:>5} {r['pad']:>4.0%} {r['impl']:<26}  {r['error']}")
        else:
            print(f"{r['T']:>5} {r['pad']:>4.0%} {r['impl']:<26}{r['fwd_tflops']:>12.3g}"
                  f"{r['fwd_bwd_tflops']:>16.3g}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if torch.cuda.is_available()
                       else "cpu", "torch": torch.__version__, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
