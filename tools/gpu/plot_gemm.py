#!/usr/bin/env python3
"""Roofline plot of a `run-bench gemm --out DIR` result (DIR/gemm.json).

    tools/gpu/plot_gemm.py bench/results/.../gemm.json --peak-tflops 1979 [--out gemm.png]

Left: achieved TFLOP/s against arithmetic intensity (FLOP per byte moved, each input and the output counted
once), under the roofline min(peak, copy bandwidth x intensity); the copy bandwidth is the same run's
(`copy_gbs`), the peak is what you pass (dense FP8 on H100 SXM: 1979; BF16: 989). Right: achieved GB/s per
M against the copy bandwidth. Our kernel (`fp8_gemm`) and each timed library baseline (`cublas_bf16`,
`cublaslt_fp8_*`) are separate series. Needs matplotlib; without it, prints a message and exits 0.
"""
import argparse
import json
import sys


def bytes_moved(name, m, n, k):
    """Bytes a GEMM of this kind reads and writes once: weights, activations, scales, bf16 output."""
    kb, nb = -(-k // 128), -(-n // 128)
    if name == "cublas_bf16":
        return 2.0 * (n * k + m * k + m * n)
    return n * k + m * k + 2.0 * m * n + 4.0 * (m * kb + nb * kb)


def series(results):
    """{series name: [(M, intensity, tflops, gbs)]} with each (kernel, shape) once."""
    out, seen = {}, set()
    for r in results:
        s = r["shape"]
        m, n, k = s["M"], s["N"], s["K"]
        flops = 2.0 * m * n * k
        # our kernel's row (or a library row measured against copy), once per shape
        key = (r["bench"], m, n, k)
        if key not in seen:
            seen.add(key)
            name = r["bench"] + (" lm_head" if s.get("op") == "lm_head" else "")
            b = bytes_moved(r["bench"], m, n, k)
            out.setdefault(name, []).append((m, flops / b, r["tflops"], r["gbs"]))
        # a library baseline timed in the same run
        base = r["baseline"]
        if base != "copy" and (base, m, n, k) not in seen:
            seen.add((base, m, n, k))
            us = r["baseline_us"]
            b = bytes_moved(base, m, n, k)
            out.setdefault(base, []).append((m, flops / b, flops / (us * 1e-6) / 1e12, b / (us * 1e-6) / 1e9))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="gemm.json written by run-bench gemm --out DIR")
    p.add_argument("--peak-tflops", type=float, required=True, help="compute roof in TFLOP/s")
    p.add_argument("--out", default="gemm_roofline.png", help="image to write (default gemm_roofline.png)")
    a = p.parse_args()
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_gemm.py: matplotlib is not installed (pip install matplotlib); nothing drawn")
        return 0

    with open(a.json) as f:
        report = json.load(f)
    copy_gbs = float(report["copy_gbs"])
    data = series(report["results"])
    if not data:
        print("plot_gemm.py: no results in " + a.json)
        return 0

    fig, (roof, bw) = plt.subplots(1, 2, figsize=(14, 6))
    intensities = [i for pts in data.values() for (_, i, _, _) in pts]
    lo, hi = min(intensities) / 2, max(intensities) * 2
    xs = [lo * (hi / lo) ** (t / 200) for t in range(201)]
    roof.plot(xs, [min(a.peak_tflops, copy_gbs * x / 1000) for x in xs], "k-", lw=1,
              label=f"roofline (copy {copy_gbs:.0f} GB/s, peak {a.peak_tflops:g} TFLOP/s)")
    for name, pts in sorted(data.items()):
        roof.scatter([i for (_, i, _, _) in pts], [t for (_, _, t, _) in pts], s=14, label=name)
        bw.scatter([m for (m, _, _, _) in pts], [g for (_, _, _, g) in pts], s=14, label=name)
    roof.set(xscale="log", yscale="log", xlabel="FLOP / byte", ylabel="TFLOP/s", title="GEMM roofline")
    bw.axhline(copy_gbs, color="k", lw=1, label="same-run copy bandwidth")
    bw.set(xscale="log", xlabel="M (tokens)", ylabel="GB/s", title="achieved bandwidth")
    for ax in (roof, bw):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report.get('device', '?')}, driver {report.get('driver', '?')}, commit {report.get('commit', '?')}")
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print("wrote " + a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
