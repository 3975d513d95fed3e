"""Benchmark of the fused losses: Triton vs eager reference vs torch.compile'd reference.

    .venv/bin/python benchmarks/kernels.py [--batch 256] [--img 256] [--patches 2 4] [--json out.json]

On a GPU: forward + backward time (median of CUDA-event timings), peak extra memory and, for the
masked L1, achieved GB/s against the device's HBM peak, at B=256, 1x256x256, p=2 and 4, and the
hierarchical loss at C=117 (the default ontology).
Without a GPU: the reference timings on CPU, the Triton kernels' agreement with the references
in the interpreter (a subprocess with TRITON_INTERPRET=1) and the ahead-of-time compilation of
every kernel variant for sm_80 / sm_90 (`python -m echocare_dist.kernels.aot`). Both print each
kernel's registers per thread, shared memory and register spills (ptxas -v; on a GPU for its own arch).

Bytes counted for the masked L1 (the traffic the fused kernels cannot avoid): forward reads
pred and target inside masked tokens plus the token mask; backward reads them again and writes
the full gradient. "full GB/s" counts whole tensors instead (2 reads + 2 reads + 1 write).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------ inputs
def l1_inputs(batch, img, p, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    pred = torch.rand(batch, 1, img, img, generator=g).to(device=device, dtype=dtype)
    target = torch.rand(batch, 1, img, img, generator=g).to(device)
    # SimMIM-style mask: 32-pixel mask patches, half of them masked, at token resolution.
    cells = img // 32
    coarse = torch.rand(batch, cells, cells, generator=g) < 0.5
    mask = coarse.repeat_interleave(32 // p, 1).repeat_interleave(32 // p, 2).to(device)
    return pred, target, mask


def hier_inputs(batch, onto, dtype, device, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    C = len(onto)
    logits = (torch.randn(batch, C, generator=torch.Generator().manual_seed(seed)) * 2).to(device=device, dtype=dtype)
    named = [list(rng.choice(C, size=int(rng.integers(0, 3)), replace=False)) for _ in range(batch)]
    labels = torch.from_numpy(onto.label_matrix(named)).to(device)
    return logits, labels


def l1_bytes(pred, target, mask) -> tuple[float, float]:
    """(bytes the fused fwd+bwd must move, bytes of whole-tensor traffic)."""
    frac = mask.float().mean().item()
    pt = pred.numel() * (pred.element_size() + target.element_size())
    touched = 2 * (frac * pt + mask.numel()) + pred.numel() * pred.element_size()
    full = 2 * pt + pred.numel() * pred.element_size()
    return touched, full


# ------------------------------------------------------------------ timing
def time_fwd_bwd(fn, leaf, iters, warmup, cuda):
    """Median seconds of loss = fn(); loss.backward(), and peak extra memory (bytes, CUDA only)."""
    def step():
        leaf.grad = None
        fn().backward()

    for _ in range(warmup):
        step()
    times = []
    if cuda:
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        leaf.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        peak = float("nan")
    return statistics.median(times), peak


def device_peak_gbps(args) -> float:
    if args.peak_gbps:
        return args.peak_gbps
    props = torch.cuda.get_device_properties(0)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9 if clock_khz and bus_bits else float("nan")


def print_table(title, header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))


# ------------------------------------------------------------------ benchmark proper
def bench(args, device, impls) -> list[dict]:
    """Time every impl in `impls` ({name: (l1_fn, hier_fn)}) on both losses."""
    from echocare_dist.ontology import load_ontology
    cuda = device.type == "cuda"
    onto = load_ontology(REPO / "configs" / "ontology" / "default.yaml")
    results = []
    for p in args.patches:
        for dname in args.dtypes:
            pred, target, mask = l1_inputs(args.batch, args.img, p, DTYPES[dname], device)
            pred.requires_grad_(True)
            touched, full = l1_bytes(pred, target, mask)
            for name, (l1_fn, _) in impls.items():
                t, peak = time_fwd_bwd(lambda: l1_fn(pred, target, mask, p), pred, args.iters, args.warmup, cuda)
                results.append(dict(loss="masked_l1", impl=name, p=p, dtype=dname, batch=args.batch, seconds=t,
                                    peak_bytes=peak, gbps=touched / t / 1e9, full_gbps=full / t / 1e9))
    anc, desc = onto.ancestor_table, onto.descendant_table
    for dname in args.dtypes:
        logits, labels = hier_inputs(args.batch, onto, DTYPES[dname], device)
        logits.requires_grad_(True)
        for name, (_, hier_fn) in impls.items():
            t, peak = time_fwd_bwd(lambda: hier_fn(logits, labels, anc, desc), logits, args.iters, args.warmup, cuda)
            results.append(dict(loss="hierarchical", impl=name, C=len(onto), dtype=dname, batch=args.batch,
                                seconds=t, peak_bytes=peak))
    return results


def report(results, peak_gbps=None):
    def speedup(r):
        eager = next(x for x in results if x["impl"] == "eager" and x["loss"] == r["loss"]
                     and x.get("p") == r.get("p") and x["dtype"] == r["dtype"])
        return f"{eager['seconds'] / r['seconds']:.2f}x"

    mb = lambda b: "-" if b != b else f"{b / 2**20:.1f}"  # noqa: E731 - NaN on CPU
    rows = []
    for r in (x for x in results if x["loss"] == "masked_l1"):
        pct = f"{100 * r['gbps'] / peak_gbps:.0f}%" if peak_gbps and peak_gbps == peak_gbps else "-"
        rows.append([f"p={r['p']}", r["dtype"], r["impl"], f"{r['seconds'] * 1e3:.3f}", speedup(r), mb(r["peak_bytes"]),
                     f"{r['gbps']:.1f}", pct, f"{r['full_gbps']:.1f}"])
    print_table(f"masked L1, fwd+bwd, B={results[0]['batch']}" + (f", device peak {peak_gbps:.0f} GB/s" if peak_gbps else ""),
                ["patch", "dtype", "impl", "ms", "vs eager", "peak MiB", "GB/s", "% peak", "full GB/s"], rows)
    rows = [[f"C={r['C']}", r["dtype"], r["impl"], f"{r['seconds'] * 1e3:.3f}", speedup(r), mb(r["peak_bytes"])]
            for r in results if r["loss"] == "hierarchical"]
    print_table("hierarchical min/max BCE, fwd+bwd", ["nodes", "dtype", "impl", "ms", "vs eager", "peak MiB"], rows)


def reference_impls(compile_refs: bool) -> dict:
    from echocare_dist.kernels import hierarchical_minmax_loss, masked_l1_loss
    from echocare_dist.kernels.reference import hierarchical_minmax_loss_reference, masked_l1_loss_reference
    from echocare_dist.kernels.tables import index_table

    def hier_ref(fn):
        return lambda z, y, a, d: fn(z, y, index_table(a, z.device), index_table(d, z.device))

    impls = {"eager": (lambda *a: masked_l1_loss(*a, impl="torch"),
                       lambda *a: hierarchical_minmax_loss(*a, impl="torch"))}
    if compile_refs:
        impls["compiled"] = (torch.compile(masked_l1_loss_reference),
                             hier_ref(torch.compile(hierarchical_minmax_loss_reference)))
    return impls


def run_gpu(args) -> list[dict]:
    from echocare_dist.kernels import hierarchical_minmax_loss, masked_l1_loss
    impls = {"triton": (lambda *a: masked_l1_loss(*a, impl="triton"),
                        lambda *a: hierarchical_minmax_loss(*a, impl="triton")),
             **reference_impls(compile_refs=not args.no_compile)}
    print(f"device: {torch.cuda.get_device_name(0)}")
    results = bench(args, torch.device("cuda"), impls)
    report(results, device_peak_gbps(args))
    return results


# ------------------------------------------------------------------ CPU-only machine
def interpreter_check(args) -> list[dict]:
    """Child process (TRITON_INTERPRET=1): Triton vs reference at the benchmark's image size."""
    from echocare_dist.kernels import coherent_probs, hierarchical_minmax_loss, masked_l1_loss
    from echocare_dist.ontology import load_ontology

    def grads(fn, leaf):
        leaf = leaf.detach().clone().requires_grad_(True)
        loss = fn(leaf)
        loss.backward()
        return loss.item(), leaf.grad.double()

    rows = []
    for p in args.patches:
        for dname in args.dtypes:
            pred, target, mask = l1_inputs(args.interp_batch, args.img, p, DTYPES[dname], "cpu")
            t0 = time.perf_counter()
            lt, gt = grads(lambda x: masked_l1_loss(x, target, mask, p, impl="triton"), pred)
            seconds = time.perf_counter() - t0
            lr, gr = grads(lambda x: masked_l1_loss(x, target, mask, p, impl="torch"), pred)
            rows.append(dict(check=f"masked_l1 p={p} B={args.interp_batch}", dtype=dname, loss_rel_err=abs(lt - lr) / abs(lr),
                             grad_max_err=(gt - gr).abs().max().item() / gr.abs().max().item(), seconds=seconds))
    onto = load_ontology(REPO / "configs" / "ontology" / "default.yaml")
    for dname in args.dtypes:
        logits, labels = hier_inputs(args.batch, onto, DTYPES[dname], "cpu")
        tables = onto.ancestor_table, onto.descendant_table
        t0 = time.perf_counter()
        lt, gt = grads(lambda z: hierarchical_minmax_loss(z, labels, *tables, impl="triton"), logits)
        seconds = time.perf_counter() - t0
        lr, gr = grads(lambda z: hierarchical_minmax_loss(z, labels, *tables, impl="torch"), logits)
        q_err = (coherent_probs(logits, tables[1], impl="triton") - coherent_probs(logits, tables[1], impl="torch"))
        rows.append(dict(check=f"hierarchical C={len(onto)} B={args.batch}", dtype=dname,
                         loss_rel_err=abs(lt - lr) / abs(lr), grad_max_err=(gt - gr).abs().max().item() / gr.abs().max().item(),
                         q_max_err=q_err.abs().max().item(), seconds=seconds))
    return rows


def _span(records, key) -> str:
    """'min-max' of one figure over a kernel's variants ('-' when none compiled)."""
    vals = [r[key] for r in records if key in r]
    return "-" if not vals else (f"{min(vals)}" if min(vals) == max(vals) else f"{min(vals)}-{max(vals)}")


def aot_report(archs) -> list[dict]:
    """Compile every kernel variant for `archs` (`python -m echocare_dist.kernels.aot`, in a clean
    process: interpreted kernels cannot be compiled) and print registers, shared memory and spills."""
    with tempfile.TemporaryDirectory() as tmp:
        aot_json = os.path.join(tmp, "aot.json")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-m", "echocare_dist.kernels.aot", "--workers", "2", "--json", aot_json,
                               "--arch", *map(str, archs)], env=env, cwd=REPO, capture_output=True, text=True)
        records = json.loads(Path(aot_json).read_text()) if os.path.exists(aot_json) else []
    by = {}
    for r in records:
        by.setdefault((r["kernel"], r["arch"]), []).append(r)
    print_table("ahead-of-time compilation of every variant: registers per thread, shared memory, spills (ptxas -v)",
                ["kernel", "arch", "warps", "variants", "compiled", "mean s", "registers", "max shared B",
                 "max spill st/ld B"],
                [[k, a, "/".join(sorted({str(r["num_warps"]) for r in rs})), len(rs), sum(r["ok"] for r in rs),
                  f"{statistics.mean(r['seconds'] for r in rs):.2f}", _span(rs, "registers"),
                  max(r.get("shared_bytes", 0) for r in rs),
                  f"{max(r.get('spill_store_bytes', -1) for r in rs)}/{max(r.get('spill_load_bytes', -1) for r in rs)}"]
                 for (k, a), rs in sorted(by.items())])
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:])
    return records


def run_cpu(args) -> dict:
    out = {}
    print(f"no GPU: reference timings on CPU ({torch.get_num_threads()} threads), B={args.batch}, {args.img}x{args.img}")
    results = bench(args, torch.device("cpu"), reference_impls(compile_refs=args.compile_cpu))
    report(results)
    out["cpu_reference"] = results

    with tempfile.TemporaryDirectory() as tmp:
        child = os.path.join(tmp, "interp.json")
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, __file__, "--interpreter-check", child, "--batch", str(args.batch), "--img", str(args.img),
               "--interp-batch", str(args.interp_batch), "--patches", *map(str, args.patches), "--dtypes", *args.dtypes]
        subprocess.run(cmd, env=env, check=True)
        rows = json.loads(Path(child).read_text())
        print_table("Triton (interpreter) vs reference: relative errors",
                    ["check", "dtype", "loss rel err", "grad max err / max|grad|", "q max err", "interp s"],
                    [[r["check"], r["dtype"], f"{r['loss_rel_err']:.1e}", f"{r['grad_max_err']:.1e}",
                      f"{r['q_max_err']:.1e}" if "q_max_err" in r else "-", f"{r['seconds']:.1f}"] for r in rows])
        out["interpreter"] = rows

        out["aot"] = aot_report([80, 90])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--img", type=int, default=256)
    ap.add_argument("--patches", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="GPU: skip the torch.compile'd reference")
    ap.add_argument("--compile-cpu", action="store_true", help="CPU: also time the torch.compile'd reference")
    ap.add_argument("--peak-gbps", type=float, help="override the device's HBM peak (GB/s)")
    ap.add_argument("--interp-batch", type=int, default=16, help="CPU: batch of the interpreter check of masked L1")
    ap.add_argument("--interpreter-check", metavar="JSON", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write all figures here")
    args = ap.parse_args(argv)

    if args.interpreter_check:
        from echocare_dist.atomic import atomic_write_text
        atomic_write_text(args.interpreter_check, json.dumps(interpreter_check(args)))
        return 0
    if torch.cuda.is_available():
        out = {"device": torch.cuda.get_device_name(0), "peak_gbps": device_peak_gbps(args), "results": run_gpu(args)}
        major, minor = torch.cuda.get_device_capability(0)
        out["aot"] = aot_report([10 * major + minor])
    else:
        if args.iters == 20:   # CPU references are slow: fewer repeats unless asked
            args.iters, args.warmup = 3, 1
        out = {"device": "cpu", **run_cpu(args)}
    if args.json:
        from echocare_dist.atomic import atomic_write_text
        atomic_write_text(args.json, json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
