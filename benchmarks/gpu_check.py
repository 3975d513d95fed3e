"""GPU acceptance check: one command, sized for a lent machine (one GPU, minutes of device time).

    bash scripts/gpu_check.sh --out DIR [--only kernels,train,decode] [--budget-s 300]

Sections (each writes DIR/<section>.json and DIR/<section>.md the moment it ends, so a killed run
keeps what finished; DIR/versions.json comes first, DIR/summary.md is rewritten after each):
  kernels  both fused losses vs their references on CUDA: max error (fp32 / bf16), GB/s of the
           masked L1 against the device's HBM bandwidth, speedup vs eager and vs torch.compile
  train    the real trainer step (echocare_dist.train.step) on 1 GPU, Swin-L p4 and p2, bf16:
           img/s, MFU, peak memory, data wait (gpu_check_train.py)
  decode   GPU JPEG decode at 256 px: DALI "mixed" when it imports, else torchvision's nvJPEG
Targets are printed beside the figures (TARGETS). Without CUDA nothing is measured: the script
says so, checks that it WOULD start (imports, presets, sections, AOT compile for sm_90 with the
spill gate), writes DIR/preflight.{json,md} and exits 0 -- or 1 when a check fails.

Runs from a plain checkout on a machine that has torch, Triton, timm, torchvision, Pillow, OpenCV,
PyYAML, safetensors and psutil but not DeepSpeed (carried as wheels in .gpu_wheels/, see
scripts/gpu_wheels.sh): `bootstrap` makes both importable without installing anything.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
WHEELS = Path(os.environ.get("ECHOCARE_GPU_WHEELS") or REPO / ".gpu_wheels")   # scripts/gpu_wheels.sh
SECTIONS = ("kernels", "train", "decode")
TARGETS = {"mfu_swin_l_p4": 0.50, "masked_l1_hbm_fraction": 0.80, "hier_speedup_vs_eager": 5.0,
           "decode_vs_model_img_s": 2.0}
SITE_ENV = "ECHOCARE_GPU_SITE"


# ------------------------------------------------------------------------------- bootstrap
def bootstrap(wheels: Path = WHEELS) -> Path | None:
    """Make the checkout and the carried wheels importable; returns the extracted site folder.

    Wheels are unpacked (a wheel is a zip of its importable files) into a folder APPENDED to
    sys.path, so a package the machine already has always wins; $ECHOCARE_GPU_SITE passes the
    folder to child processes. `echocare_dist.kernels` lives in kernels/ (setup.py package_dir):
    without an install it is mapped there through a one-link folder on the package's __path__."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    site = None
    archives = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if archives:
        tag = hashlib.sha256(repr([(a.name, a.stat().st_size) for a in archives]).encode()).hexdigest()[:16]
        site = Path(os.environ.get(SITE_ENV) or Path(tempfile.gettempdir()) / f"echocare-gpu-site-{tag}")
        done = site / ".complete"
        if not done.exists():
            site.mkdir(parents=True, exist_ok=True)
            for archive in archives:
                with zipfile.ZipFile(archive) as z:
                    z.extractall(site)
            done.write_text("\n".join(a.name for a in archives))
        os.environ[SITE_ENV] = str(site)
        if str(site) not in sys.path:
            sys.path.append(str(site))
    import echocare_dist
    if importlib.util.find_spec("echocare_dist.kernels") is None:
        # Named after this checkout: another checkout's link must never be picked up.
        shim = Path(tempfile.gettempdir()) / f"echocare-kernels-{hashlib.sha256(str(REPO).encode()).hexdigest()[:12]}"
        link = shim / "kernels"
        shim.mkdir(exist_ok=True)
        if not link.exists():
            link.symlink_to(REPO / "kernels", target_is_directory=True)
        echocare_dist.__path__.append(str(shim))
    return site


def load_benchmark(name: str):
    """benchmarks/<name>.py as module `bench_<name>` (by path: a plain `import kernels` would find kernels/)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------- output
def _module_version(name: str) -> str:
    try:
        module = __import__(name, fromlist=["__version__"])
    except Exception as exc:  # noqa: BLE001 - any import failure is a finding, reported as such
        return f"not importable ({type(exc).__name__}: {str(exc)[:160]})"
    return str(getattr(module, "__version__", "?"))


def versions() -> dict:
    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "platform": platform.platform()}
    for name in ("triton", "torchvision", "timm", "numpy", "PIL", "cv2", "yaml", "safetensors", "psutil",
                 "deepspeed", "pydantic", "nvidia.dali"):
        out[name] = _module_version(name)
    if torch.cuda.is_available():
        from echocare_dist.hardware import PEAK_TFLOPS, hbm_bandwidth_gbps, match_device
        key = match_device(torch.cuda.get_device_name(0))
        out.update(gpu=torch.cuda.get_device_name(0), capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   gpu_count=torch.cuda.device_count(),
                   gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1),
                   peak_tflops_bf16=PEAK_TFLOPS[key]["bf16"] if key else None, peak_table_key=key,
                   hbm_gbps=hbm_bandwidth_gbps(0))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            out["driver"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            out["driver"] = f"nvidia-smi unavailable ({exc})"
    return out


def md_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


class Output:
    """The output folder: every file written atomically, summary.md rewritten after each section."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.parts: dict[str, str] = {}

    def write(self, name: str, data: dict, markdown: str) -> None:
        from echocare_dist.atomic import atomic_write_json, atomic_write_text
        atomic_write_json(self.root / f"{name}.json", data)
        atomic_write_text(self.root / f"{name}.md", markdown + "\n")
        self.parts[name] = markdown
        atomic_write_text(self.root / "summary.md", "# GPU acceptance check\n\n"
                          + "\n\n".join(self.parts.values()) + "\n")
        print(f"\n{markdown}\n[gpu_check] wrote {self.root / name}.json and .md", flush=True)


# ------------------------------------------------------------------------------- no CUDA
def preflight(sections: list[str]) -> dict:
    """What must hold for the check to start on a GPU machine; each check recorded, none skipped."""
    checks = []

    def check(name, fn):
        t0 = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as exc:  # noqa: BLE001 - a failed check is the finding
            detail, ok = f"{type(exc).__name__}: {exc}"[:1500], False
        checks.append(dict(check=name, ok=ok, detail=detail, seconds=round(time.perf_counter() - t0, 2)))

    def imports():
        import torchvision.io  # noqa: F401 - the decode section's stand-in
        import echocare_dist.kernels  # noqa: F401
        from echocare_dist.kernels import _triton_common  # noqa: F401 - Triton itself
        import echocare_dist.train.step  # noqa: F401
        import gpu_check_sections  # noqa: F401
        import gpu_check_train
        return f"ok; train path: {gpu_check_train.train_path()[1]}"

    def presets():
        import gpu_check_train
        from echocare_dist.config import load_config
        from echocare_dist.paths import CONFIG_DIR
        names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        for name in names:
            load_config(name)
        for preset in gpu_check_train.PRESETS:
            for mode in gpu_check_train.compile_modes():
                load_config(preset, gpu_check_train.overrides(Path("/nonexistent/shards"), Path("/tmp/run"), 3, mode))
        return f"{len(names)} presets load; train overrides valid for {', '.join(gpu_check_train.PRESETS)} " \
               f"x compile {gpu_check_train.compile_modes()}"

    def aot_sm90():
        from echocare_dist.kernels.aot import compile_all, spill_free
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise RuntimeError("TRITON_INTERPRET=1 is set: the kernels would run interpreted; unset it")
        records = compile_all([90], log=None)
        bad = [f"{r['kernel']} [{r['example']}]: {r.get('error') or 'spills'}" for r in records
               if not r["ok"] or not spill_free(r)]
        if bad:
            raise RuntimeError("; ".join(bad))
        return f"{len(records)} variants compile for sm_90, none spills (max {max(r['registers'] for r in records)} registers)"

    check("sections resolve", lambda: ", ".join(sections))
    check("imports", imports)
    check("config presets", presets)
    check("kernels compile AOT for sm_90", aot_sm90)
    return dict(cuda=False, would_start=all(c["ok"] for c in checks), checks=checks)


# ------------------------------------------------------------------------------- driver
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output folder (created)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--budget-s", type=float, default=300.0,
                    help="end-to-end budget; a train configuration that would not fit is skipped (recorded)")
    ap.add_argument("--steps", type=int, default=30, help="train: timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=5, help="train: untimed steps first")
    ap.add_argument("--train-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        ap.error(f"--only {args.only!r}: unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    args.sections = [s for s in SECTIONS if s in sections]
    return args


def main(argv=None) -> int:
    t_start = time.monotonic()
    bootstrap()
    args = parse_args(argv)
    if args.train_worker:
        import gpu_check_train
        return gpu_check_train.worker(json.loads(args.train_worker))
    import torch
    out = Output(Path(args.out))
    found = versions()
    out.write("versions", found, "## versions\n\n" + md_table(["package", "version"], [[k, v] for k, v in found.items()]))
    if not torch.cuda.is_available():
        result = preflight(args.sections)
        verdict = ("NO CUDA: nothing was measured. The check WOULD start on a GPU machine." if result["would_start"]
                   else "NO CUDA: nothing was measured, and the check would NOT start (see the failed checks).")
        result["verdict"] = verdict
        out.write("preflight", result, f"## {verdict}\n\n" + md_table(
            ["check", "ok", "detail", "s"], [[c["check"], c["ok"], c["detail"], c["seconds"]] for c in result["checks"]]))
        print(f"[gpu_check] {verdict}", flush=True)
        return 0 if result["would_start"] else 1
    import gpu_check_sections
    import gpu_check_train
    failed = []
    context: dict = {"deadline": t_start + args.budget_s, "targets": TARGETS, "versions": found}
    for name in args.sections:
        t0 = time.perf_counter()
        print(f"[gpu_check] section {name} ({context['deadline'] - time.monotonic():.0f} s of budget left)", flush=True)
        try:
            run = {"kernels": gpu_check_sections.kernels_section, "decode": gpu_check_sections.decode_section,
                   "train": lambda ctx: gpu_check_train.train_section(ctx, args.steps, args.warmup)}[name]
            data, markdown = run(context)
            data["seconds"] = round(time.perf_counter() - t0, 1)
            context[name] = data
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others' figures
            failed.append(name)
            data = dict(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-6000:],
                        seconds=round(time.perf_counter() - t0, 1))
            markdown = f"## {name}: FAILED\n\n```\n{data['traceback']}\n```"
        out.write(name, data, markdown)
    print(f"[gpu_check] done in {time.monotonic() - t_start:.0f} s; failed sections: {failed or 'none'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
