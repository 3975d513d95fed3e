"""gpu_check sections `kernels` and `decode` (CUDA only); each returns (data, markdown)."""
from __future__ import annotations

import statistics
import time

import torch

from gpu_check import load_benchmark, md_table

# benchmarks/kernels.py: the same inputs, byte counts and timing as its tables (loaded by path:
# the name `kernels` is also the repository's kernels/ package).
kbench = load_benchmark("kernels")

BATCH, IMG, PATCHES, DTYPES = 256, 256, (2, 4), ("fp32", "bf16")
DECODE_IMAGES, DECODE_SOURCE = 512, (320, 256)   # JPEGs a little larger than the model input, as in shards


# ------------------------------------------------------------------------------- kernels
def _errors(fn_triton, fn_ref, leaf) -> dict:
    """Loss and gradient of the Triton op against the reference on the same inputs."""
    def run(fn):
        x = leaf.detach().clone().requires_grad_(True)
        loss = fn(x)
        loss.backward()
        return loss.double(), x.grad.double()
    lt, gt = run(fn_triton)
    lr, gr = run(fn_ref)
    scale = gr.abs().max().clamp_min(1e-30)
    return dict(loss_abs_err=float((lt - lr).abs()), loss_rel_err=float((lt - lr).abs() / lr.abs().clamp_min(1e-30)),
                grad_max_err_rel=float((gt - gr).abs().max() / scale))


def _jit_resources() -> list[dict]:
    """Registers / spills of the kernels the JIT actually built on this GPU (when Triton exposes them)."""
    from echocare_dist.kernels import hierarchical, masked_l1
    rows = []
    for module in (masked_l1, hierarchical):
        for name in dir(module):
            fn = getattr(module, name)
            for cache in getattr(fn, "device_caches", {}).values():
                kernels = cache[0] if isinstance(cache, tuple) else cache
                for compiled in getattr(kernels, "values", lambda: [])():
                    regs, spills = getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None)
                    if regs is not None:
                        rows.append(dict(kernel=name, registers=regs, spills=spills,
                                         shared_bytes=getattr(compiled.metadata, "shared", None)))
    return rows


def kernels_section(ctx) -> tuple[dict, str]:
    from echocare_dist.hardware import hbm_bandwidth_gbps
    from echocare_dist.kernels import hierarchical_minmax_loss, masked_l1_loss
    from echocare_dist.ontology import load_ontology

    device = torch.device("cuda")
    hbm, hbm_source = hbm_bandwidth_gbps(0)
    onto = load_ontology(kbench.REPO / "configs" / "ontology" / "default.yaml")
    anc, desc = onto.ancestor_table, onto.descendant_table
    errors = []
    for dname in DTYPES:
        dtype = kbench.DTYPES[dname]
        for p in PATCHES:
            pred, target, mask = kbench.l1_inputs(BATCH, IMG, p, dtype, device)
            errors.append(dict(loss="masked_l1", p=p, dtype=dname, **_errors(
                lambda x: masked_l1_loss(x, target, mask, p, impl="triton"),
                lambda x: masked_l1_loss(x, target, mask, p, impl="torch"), pred)))
        logits, labels = kbench.hier_inputs(BATCH, onto, dtype, device)
        errors.append(dict(loss="hierarchical", p="-", dtype=dname, **_errors(
            lambda z: hierarchical_minmax_loss(z, labels, anc, desc, impl="triton"),
            lambda z: hierarchical_minmax_loss(z, labels, anc, desc, impl="torch"), logits)))
    impls = {"triton": (lambda *a: masked_l1_loss(*a, impl="triton"),
                        lambda *a: hierarchical_minmax_loss(*a, impl="triton")),
             **kbench.reference_impls(compile_refs=True)}
    args = type("Args", (), dict(patches=list(PATCHES), dtypes=list(DTYPES), batch=BATCH, img=IMG, iters=20, warmup=3))
    timings = kbench.bench(args, device, impls)

    def base(r, impl):
        return next(x for x in timings if x["impl"] == impl and x["loss"] == r["loss"] and x.get("p") == r.get("p")
                    and x["dtype"] == r["dtype"])

    rows, verdicts = [], []
    for r in timings:
        if r["impl"] != "triton":
            continue
        r["speedup_vs_eager"] = base(r, "eager")["seconds"] / r["seconds"]
        r["speedup_vs_compiled"] = base(r, "compiled")["seconds"] / r["seconds"]
        if r["loss"] == "masked_l1":
            r["hbm_fraction"] = r["gbps"] / hbm
            verdicts.append(r["hbm_fraction"] >= ctx["targets"]["masked_l1_hbm_fraction"])
            target = f"{r['hbm_fraction']:.0%} of HBM (target >= {ctx['targets']['masked_l1_hbm_fraction']:.0%})"
        else:
            verdicts.append(r["speedup_vs_eager"] >= ctx["targets"]["hier_speedup_vs_eager"])
            target = f"{r['speedup_vs_eager']:.1f}x eager (target >= {ctx['targets']['hier_speedup_vs_eager']:g}x)"
        rows.append([r["loss"], r.get("p", "-"), r["dtype"], f"{r['seconds'] * 1e3:.3f}",
                     f"{base(r, 'eager')['seconds'] * 1e3:.3f}", f"{base(r, 'compiled')['seconds'] * 1e3:.3f}",
                     f"{r['speedup_vs_eager']:.2f}x", f"{r['speedup_vs_compiled']:.2f}x",
                     f"{r['gbps']:.0f}" if "gbps" in r else "-", target])
    resources = _jit_resources()
    md = (f"## kernels: fused losses on {torch.cuda.get_device_name(0)}, fwd+bwd, B={BATCH}, {IMG}x{IMG}, "
          f"C={len(onto)}\n\nHBM peak {hbm:.0f} GB/s ({hbm_source}); GB/s counts the bytes the fused masked L1 "
          f"must move (benchmarks/kernels.py l1_bytes); median of 20 CUDA-event timings.\n\n"
          + md_table(["loss", "p", "dtype", "triton ms", "eager ms", "compiled ms", "vs eager", "vs compiled",
                      "GB/s", "target"], rows)
          + "\n\nTriton vs reference (same inputs):\n\n"
          + md_table(["loss", "p", "dtype", "loss abs err", "loss rel err", "grad max err / max|grad|"],
                     [[e["loss"], e["p"], e["dtype"], f"{e['loss_abs_err']:.2e}", f"{e['loss_rel_err']:.2e}",
                       f"{e['grad_max_err_rel']:.2e}"] for e in errors]))
    if resources:
        md += "\n\nJIT-built kernels on this GPU:\n\n" + md_table(
            ["kernel", "registers", "spills", "shared B"],
            [[r["kernel"], r["registers"], r["spills"], r["shared_bytes"]] for r in resources])
    return dict(hbm_gbps=hbm, hbm_source=hbm_source, timings=timings, errors=errors, jit_resources=resources,
                targets_met=all(verdicts)), md


# ------------------------------------------------------------------------------- decode
def _jpegs(n: int) -> list[bytes]:
    """n distinct grayscale JPEGs shaped like ultrasound frames (speckle inside a bright sector)."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(0)
    w, h = DECODE_SOURCE
    yy, xx = np.mgrid[0:h, 0:w]
    sector = (((xx - w / 2) ** 2 + yy ** 2) < (0.9 * h) ** 2) & (np.abs(xx - w / 2) < yy * 0.8 + 8)
    out = []
    for _ in range(n):
        img = (rng.gamma(2.0, 40.0, (h, w)) * sector).clip(0, 255).astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", cv2.GaussianBlur(img, (3, 3), 0), [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok, "cv2.imencode failed"
        out.append(buf.tobytes())
    return out


def _decode_torchvision(blobs, batch, device: str = "cuda") -> tuple[float, str]:
    """nvJPEG through torchvision ("cpu" lets a CPU test run the same code)."""
    import torchvision
    from torchvision.io import ImageReadMode, decode_jpeg
    data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]

    def run():
        for i in range(0, len(data), batch):
            imgs = decode_jpeg(data[i:i + batch], mode=ImageReadMode.GRAY, device=device)
            torch.nn.functional.interpolate(torch.stack(imgs).float(), size=(256, 256), mode="bilinear")
        if device == "cuda":
            torch.cuda.synchronize()
    run()  # warm-up: nvJPEG handles, allocator
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    label = (f"torchvision {torchvision.__version__} io.decode_jpeg(device='{device}') = nvJPEG, batches of {batch}, "
             f"+ bilinear resize to 256x256 (STAND-IN for DALI's mixed decoder, which did not import)")
    return len(data) / statistics.median(times), label


def _decode_dali(blobs, batch, device: str = "mixed") -> tuple[float, str]:
    """DALI's decoder on `device` ("mixed": nvJPEG on the GPU; "cpu" lets a CPU test build the same pipeline)."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    arrays = [np.frombuffer(b, dtype=np.uint8) for b in blobs]
    batches = [arrays[i:i + batch] for i in range(0, len(arrays) - batch + 1, batch)]

    @pipeline_def(batch_size=batch, num_threads=4, device_id=0 if device == "mixed" else None, prefetch_queue_depth=2)
    def pipe():
        # Batch mode: the callback gets the iteration index.
        jpegs = fn.external_source(source=lambda i: batches[i % len(batches)], batch=True, dtype=types.UINT8)
        images = fn.decoders.image(jpegs, device=device, output_type=types.GRAY)
        return fn.resize(images, resize_x=256, resize_y=256)

    p = pipe()
    p.build()
    for _ in range(len(batches)):
        p.run()
    t0, n = time.perf_counter(), 0
    for _ in range(3 * len(batches)):
        p.run()
        n += batch
    import nvidia.dali as dali
    return n / (time.perf_counter() - t0), f"DALI {dali.__version__} decoders.image(device='{device}') + resize, batch {batch}"


def decode_section(ctx) -> tuple[dict, str]:
    from importlib.util import find_spec
    blobs = _jpegs(DECODE_IMAGES)
    batch = 64
    if find_spec("nvidia") is not None and find_spec("nvidia.dali") is not None:
        img_s, label = _decode_dali(blobs, batch)
        backend = "dali-mixed"
    else:
        img_s, label = _decode_torchvision(blobs, batch)
        backend = "torchvision-nvjpeg"
    # The model's own rate (loader wait excluded): what a decoder must feed at twice the speed.
    model_rows = [r for r in ctx.get("train", {}).get("rows", []) if "model_images_per_s" in r]
    need = {r["name"]: ctx["targets"]["decode_vs_model_img_s"] * r["model_images_per_s"] for r in model_rows}
    rows = [[backend, f"{img_s:.0f}", name, f"{v / ctx['targets']['decode_vs_model_img_s']:.0f}", f"{v:.0f}",
             "met" if img_s >= v else "NOT met"] for name, v in need.items()]
    if not rows:
        rows = [[backend, f"{img_s:.0f}", "(train section not run)", "-", "-", "-"]]
    md = (f"## decode: GPU JPEG decode, {DECODE_IMAGES} grayscale {DECODE_SOURCE[0]}x{DECODE_SOURCE[1]} JPEGs "
          f"-> 256x256\n\n{label}\n\n"
          + md_table(["backend", "img/s", "model", "model img/s", "target (2x model) img/s", "target"], rows))
    return dict(backend=backend, label=label, images_per_s=img_s, images=DECODE_IMAGES, batch=batch,
                source_size=DECODE_SOURCE, targets=need), md
