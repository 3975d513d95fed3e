"""Ahead-of-time compilation of every Triton kernel variant the shipped presets launch, for
A100 (sm_80) and H100 (sm_90), on a machine without a GPU.

The variants are not written out by hand: each one is the `Launch` the ops themselves build,
here from meta tensors shaped like a real batch of every preset (configs/*.yaml): image size,
patch size, channels, micro batch, ontology size, and the dtypes training can produce (pred and
logits in fp32, bf16 or fp16 depending on train.precision; target fp32 by the batch contract).
The batch size is not specialized on (do_not_specialize), so one batch per preset covers all. A compile error for any
GPU arch therefore fails CI (tests/test_kernels_aot.py) instead of the first cluster job.

Spill gate: each cubin's PTX goes once more through the ptxas that Triton itself uses, with `-v`,
which reports registers per thread, stack frame and spill stores / loads; a variant that spills
(registers pushed out to local memory, i.e. slow global traffic in the inner loop) fails the run
like a compile error. Shared memory is Triton's own figure (compiled.metadata.shared).

    python -m echocare_dist.kernels.aot [--arch 80 90] [--workers 2] [--json out.json]

Run it without TRITON_INTERPRET (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ._triton_common import Launch, finalize_launch
from .hierarchical import coherent_probs_launch, hier_backward_launch, hier_forward_launch, hier_geometry
from .masked_l1 import l1_backward_launch, l1_forward_launch, l1_geometry

ARCHS = (80, 90)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TARGET_DTYPES = (torch.float32,)


@dataclass(frozen=True)
class Shape:
    """What one training setup feeds the kernels."""
    name: str
    batch: int
    in_chans: int
    img_size: int
    patch_size: int
    num_nodes: int
    ancestor_width: int
    descendant_width: int
    mask_patch: int = 0     # the per-mask-patch sums variant (hard patch mining) when > 0


def preset_shapes() -> list[Shape]:
    """One Shape per preset."""
    from echocare_dist.config import load_config
    from echocare_dist.paths import CONFIG_DIR, REPO_ROOT
    from echocare_dist.ontology import load_ontology

    shapes = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(path.stem)
        onto_path = Path(cfg.ontology.path)
        onto = load_ontology(onto_path if onto_path.is_absolute() else REPO_ROOT / onto_path)
        m = cfg.model
        shapes.append(Shape(path.stem, cfg.train.micro_batch, m.in_chans, m.img_size, m.patch_size, len(onto),
                            onto.ancestor_table.shape[1], onto.descendant_table.shape[1], cfg.mask.mask_patch_size))
    return shapes


def _meta(shape, dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def _scalar() -> torch.Tensor:
    return _meta((), torch.float32)


def shape_launches(s: Shape) -> list[tuple[str, Launch]]:
    """Every launch a forward + backward of both losses and a coherent_probs call make for `s`."""
    out = []
    B, C, H, p = s.batch, s.in_chans, s.img_size, s.patch_size
    mask = _meta((B, H // p, H // p), torch.bool).view(torch.uint8)
    for pred_dtype in FLOAT_DTYPES:
        for target_dtype in TARGET_DTYPES:
            pred, target = _meta((B, C, H, H), pred_dtype), _meta((B, C, H, H), target_dtype)
            geo = l1_geometry(pred, target, mask, p)
            sums, counts = _meta((geo.programs,), torch.float32), _meta((geo.programs,), torch.int32)
            tag = f"{s.name} pred={pred_dtype} target={target_dtype} p={p}"
            out.append((tag, l1_forward_launch(pred, target, mask, sums, counts, geo)))
            out.append((tag, finalize_launch(sums, counts, _scalar(), _scalar())))
            out.append((tag, l1_backward_launch(pred, target, mask, torch.empty_like(pred), _scalar(), _scalar(),
                                                geo)))
            if s.mask_patch:   # the forward that also writes per-mask-patch sums (its tiles are aligned)
                mp = s.mask_patch
                geo = l1_geometry(pred, target, mask, p, sum_patch=mp)
                sums, counts = _meta((geo.programs,), torch.float32), _meta((geo.programs,), torch.int32)
                plane_sums = _meta((B, C, H // mp, H // mp), torch.float32)
                out.append((f"{tag} sums@{mp}", l1_forward_launch(pred, target, mask, sums, counts, geo,
                                                                  plane_sums, mp)))
                out.append((f"{tag} sums@{mp}", l1_backward_launch(pred, target, mask, torch.empty_like(pred),
                                                                   _scalar(), _scalar(), geo)))
    anc = _meta((s.num_nodes, s.ancestor_width), torch.int32)
    desc = _meta((s.num_nodes, s.descendant_width), torch.int32)
    labels = _meta((B, s.num_nodes), torch.int8)
    for dtype in FLOAT_DTYPES:
        logits = _meta((B, s.num_nodes), dtype)
        geo = hier_geometry(logits, anc, desc)
        programs = geo.grid[0] * geo.grid[1]
        coef, arg = _meta(logits.shape, torch.float32), _meta(logits.shape, torch.int32)
        sums, counts = _meta((programs,), torch.float32), _meta((programs,), torch.int32)
        tag = f"{s.name} logits={dtype} C={s.num_nodes}"
        out.append((tag, hier_forward_launch(logits, labels, anc, desc, coef, arg, sums, counts, geo)))
        out.append((tag, finalize_launch(sums, counts, _scalar(), _scalar())))
        out.append((tag, hier_backward_launch(coef, arg, labels, anc, desc, _scalar(), _scalar(),
                                              torch.empty_like(logits), geo)))
        out.append((tag, coherent_probs_launch(logits, desc, _meta(logits.shape, torch.float32))))
    return out


def unique_variants(shapes: list[Shape]) -> list[tuple[str, Launch]]:
    """Launches that compile to distinct binaries (same kernel, signature, constexprs, attributes)."""
    seen: dict[str, tuple[str, Launch]] = {}
    for s in shapes:
        for tag, launch in shape_launches(s):
            key = launch.ast_source().hash() + f"/w{launch.num_warps}"
            seen.setdefault(key, (tag, launch))
    return list(seen.values())


_PTXAS_PATTERNS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_bytes": re.compile(r"(\d+) bytes stack frame"),
    "spill_store_bytes": re.compile(r"(\d+) bytes spill stores"),
    "spill_load_bytes": re.compile(r"(\d+) bytes spill loads"),
}


def parse_ptxas_log(log: str) -> dict:
    """{registers, stack_bytes, spill_store_bytes, spill_load_bytes} from `ptxas -v` output (one kernel)."""
    out = {}
    for key, pattern in _PTXAS_PATTERNS.items():
        found = pattern.findall(log)
        if len(found) != 1:
            raise ValueError(f"ptxas -v output: expected one '{pattern.pattern}', found {len(found)} in:\n{log[-2000:]}")
        out[key] = int(found[0])
    return out


def ptxas_path(arch: int) -> str:
    """The ptxas Triton compiles with (TRITON_PTXAS_PATH, else the one bundled with Triton)."""
    import triton
    override = os.environ.get("TRITON_PTXAS_BLACKWELL_PATH" if arch >= 100 else "TRITON_PTXAS_PATH")
    path = override or str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
                           / ("ptxas-blackwell" if arch >= 100 else "ptxas"))
    if not os.path.exists(path):
        raise FileNotFoundError(f"ptxas not found at {path} (set TRITON_PTXAS_PATH)")
    return path


def resource_usage(ptx: str, arch: int) -> dict:
    """Registers, stack and spills of one kernel's PTX for sm_`arch`, as `ptxas -v` reports them.
    Same arch name as Triton's own build (sm_90 -> sm_90a, the wgmma/TMA target)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        Path(src).write_text(ptx)
        proc = subprocess.run([ptxas_path(arch), "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
                               "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"ptxas -v failed ({proc.returncode}) for sm_{arch}: {proc.stderr[-2000:]}")
    return parse_ptxas_log(proc.stderr + proc.stdout)


def spill_free(rec: dict) -> bool:
    return rec.get("spill_store_bytes", 1) == 0 and rec.get("spill_load_bytes", 1) == 0


def _status(rec: dict) -> str:
    if not rec["ok"]:
        return "FAILED " + rec.get("error", "no cubin")
    usage = (f"{rec['registers']:3d} regs  {rec['shared_bytes']:6d} B smem  spills "
             f"{rec['spill_store_bytes']}/{rec['spill_load_bytes']} B")
    return usage + ("" if spill_free(rec) else "  SPILLS")


def _compile_slice(archs, shapes, start: int, step: int, log) -> list[dict]:
    import triton
    from triton.backends.compiler import GPUTarget

    records = []
    for tag, launch in unique_variants(shapes)[start::step]:
        src = launch.ast_source()
        variant = {k: v for k, v in src.signature.items() if v != "constexpr"}
        for arch in archs:
            rec = dict(kernel=launch.kernel.__name__, arch=f"sm_{arch}", example=tag,
                       constexprs={launch.kernel.arg_names[k[0]]: v for k, v in src.constants.items()},
                       signature=variant, num_warps=launch.num_warps)
            t0 = time.perf_counter()
            try:
                compiled = triton.compile(launch.ast_source(), target=GPUTarget("cuda", arch, 32),
                                          options={"num_warps": launch.num_warps})
                rec.update(ok=bool(compiled.asm.get("cubin")), shared_bytes=int(compiled.metadata.shared),
                           ptx_lines=compiled.asm["ptx"].count("\n"))
                rec.update(resource_usage(compiled.asm["ptx"], arch))
            except Exception as exc:  # noqa: BLE001 - every failure is reported, the caller decides
                rec.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
            rec["seconds"] = round(time.perf_counter() - t0, 3)
            records.append(rec)
            if log:
                log(f"{rec['arch']} {rec['kernel']:<24} w{rec['num_warps']} {rec['seconds']:6.2f}s {_status(rec)}  [{tag}]")
    return records


def compile_all(archs=ARCHS, shapes: list[Shape] | None = None, workers: int = 1, log=print) -> list[dict]:
    """Compile every unique variant for every arch; one record per compile (errors recorded, not
    raised). `workers` > 1 splits the variants over spawned processes (compiles are CPU-bound)."""
    shapes = shapes if shapes is not None else preset_shapes()
    if workers <= 1:
        return _compile_slice(tuple(archs), shapes, 0, 1, log)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = [pool.submit(_compile_slice, tuple(archs), shapes, i, workers, None) for i in range(workers)]
        records = [rec for part in parts for rec in part.result()]
    if log:
        for rec in records:
            log(f"{rec['arch']} {rec['kernel']:<24} w{rec['num_warps']} {rec['seconds']:6.2f}s {_status(rec)}  "
                f"[{rec['example']}]")
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities, e.g. 80 90")
    ap.add_argument("--json", help="write the records here (atomically)")
    ap.add_argument("--workers", type=int, default=1, help="compile in this many processes")
    args = ap.parse_args(argv)
    records = compile_all(args.arch, workers=args.workers)
    if args.json:
        from echocare_dist.atomic import atomic_write_text
        atomic_write_text(args.json, json.dumps(records, indent=1))
    failed = [r for r in records if not r["ok"]]
    spilled = [r for r in records if r["ok"] and not spill_free(r)]
    print(f"{len(records) - len(failed)}/{len(records)} kernel variants compiled for "
          + ", ".join(f"sm_{a}" for a in args.arch) + f"; {len(spilled)} with register spills"
          + (" (max registers per thread: " + str(max(r["registers"] for r in records if r["ok"])) + ")"
             if len(failed) < len(records) else ""))
    for r in spilled:
        print(f"SPILL {r['arch']} {r['kernel']} w{r['num_warps']}: {r['spill_store_bytes']} B stores / "
              f"{r['spill_load_bytes']} B loads  [{r['example']}]")
    return 1 if failed or spilled else 0


if __name__ == "__main__":
    sys.exit(main())
