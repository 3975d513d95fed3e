"""Loader throughput: DALI vs the PIL fallback at equal thread counts, and the GPU decoder sweep.

Writes its own shards (640x480 B-mode-like JPEGs), then times each loader over one epoch after a
warm-up, producing the real batches (256x256 target + input, SimMIM mask, labels) on the training
device. CPU use = CPU seconds of this process and its DataLoader workers per wall second.
On a CUDA machine it adds DALI "mixed" decoding and a `data.hw_decoder_load` sweep.

    .venv/bin/python benchmarks/loader.py                      # CPU: DALI cpu vs fallback
    .venv/bin/python benchmarks/loader.py --images 16384 --threads 8 --batch 32   # GPU node
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

from hardware import describe  # benchmarks/hardware.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import torch  # noqa: E402

from echocare_dist.atomic import atomic_write_json  # noqa: E402
from echocare_dist.config import load_config  # noqa: E402
from echocare_dist.data import build_loader, dali_available  # noqa: E402
from echocare_dist.data.registry import loader_kind  # noqa: E402
from echocare_dist.data.testing import write_shards  # noqa: E402
from echocare_dist.ontology import load_ontology  # noqa: E402


def cpu_seconds(proc: psutil.Process) -> float:
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def measure(cfg, ontology, device: torch.device, warmup: int) -> dict:
    loader = build_loader(cfg, ontology, rank=0, world_size=1, device=device, run_dir=None)
    steps = loader.steps_per_epoch - warmup
    if steps < 4:
        raise SystemExit(f"--images too small: {loader.steps_per_epoch} batches per epoch, need warm-up + 4")
    proc = psutil.Process()
    try:
        for _ in range(warmup):  # pipeline build / worker start, first JPEG buffers
            next(loader)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cpu0, t0 = cpu_seconds(proc), time.perf_counter()
        for _ in range(steps):
            batch = next(loader)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
        cpu = cpu_seconds(proc) - cpu0  # read before close(): the DataLoader workers are still alive
    finally:
        loader.close()
    images = steps * cfg.train.micro_batch
    assert batch["target"].shape[-1] == cfg.model.img_size
    return {"images_per_s": images / wall, "cpu_cores": cpu / wall, "cpu_ms_per_image": 1000 * cpu / images,
            "images": images, "wall_s": wall}


def _dali_version() -> str:
    if not dali_available():
        return "absent"
    import nvidia.dali
    return nvidia.dali.__version__


def hardware() -> str:
    return describe()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1536, help="samples written (one epoch is timed)")
    ap.add_argument("--distinct", type=int, default=128, help="distinct JPEGs among them (decode cost is the same)")
    ap.add_argument("--threads", type=int, default=2, help="DALI threads = fallback DataLoader workers")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=256, help="output side (model.img_size)")
    ap.add_argument("--warmup", type=int, default=3, help="batches not timed")
    ap.add_argument("--hw-loads", default="0,0.25,0.5,0.65,0.75,0.9,1.0", help="GPU sweep of data.hw_decoder_load")
    ap.add_argument("--loaders", default="dali,pil", help="comma-separated data.loader kinds")
    ap.add_argument("--shards", default="", help="existing shard dir (default: write a temporary one)")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args(argv)

    # The loaders' own threads (DALI's, the DataLoader workers) are the ones compared; torch's
    # intra-op pool would otherwise fight them for the cores over the small per-batch finishing ops.
    torch.set_num_threads(1)
    ontology = load_ontology(REPO / "configs" / "ontology" / "default.yaml")
    tmp = None
    if args.shards:
        shard_dir = Path(args.shards)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="echocare-loader-bench-")
        shard_dir = Path(tmp.name)
        per_shard = 512
        counts = [per_shard] * (args.images // per_shard) + ([args.images % per_shard] if args.images % per_shard else [])
        t0 = time.perf_counter()
        write_shards(shard_dir, ontology, counts, size=(640, 480), pattern="ultrasound", distinct_images=args.distinct)
        print(f"wrote {args.images} 640x480 JPEGs in {len(counts)} shards ({sum(f.stat().st_size for f in shard_dir.glob('*.tar')) / 2**20:.0f} MiB) "
              f"in {time.perf_counter() - t0:.1f} s", flush=True)

    gpu = torch.cuda.is_available()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    runs = []  # (label, loader, decode device, hw load, overrides)
    wanted = {loader_kind(k) for k in args.loaders.split(",")}
    if "dali" in wanted and dali_available():
        runs.append(("DALI", "dali", "cpu", None))
        if gpu:
            runs += [("DALI", "dali", "gpu", float(x)) for x in args.hw_loads.split(",")]
    if "pil" in wanted:
        runs.append(("fallback (PIL)", "pil", "cpu", None))

    rows = []
    for label, kind, dev, load in runs:
        overrides = [f"data.shards={shard_dir}", f"data.loader={kind}", f"data.device={dev}",
                     f"data.num_threads={args.threads}", f"train.micro_batch={args.batch}",
                     f"model.img_size={args.size}", "model.patch_size=4", "mask.mask_patch_size=32",
                     "data.shuffle_buffer=256"]
        if load is not None:
            overrides.append(f"data.hw_decoder_load={load}")
        cfg = load_config("echocare_swin_l_p4", overrides)
        r = measure(cfg, ontology, device, args.warmup)
        r.update(loader=label, decode="GPU mixed" if dev == "gpu" else "CPU", threads=args.threads, hw_decoder_load=load)
        rows.append(r)
        print(f"  {label:15s} {r['decode']:9s} hw_load={load if load is not None else '-':<5} "
              f"{r['images_per_s']:8.0f} img/s", flush=True)

    versions = f"torch {torch.__version__}, DALI {_dali_version()}"
    print()
    print(f"Loader throughput, {args.size}x{args.size} output from 640x480 JPEG, micro-batch {args.batch}, "
          f"{args.threads} threads/workers")
    print(f"{datetime.datetime.now().isoformat(timespec='minutes')} | {platform.node()} | {hardware()} | {versions}")
    print(f"{'loader':16s} {'decode':10s} {'threads':>7s} {'hw load':>8s} {'img/s':>9s} {'CPU cores':>10s} {'CPU ms/img':>11s}")
    for r in rows:
        hw = f"{r['hw_decoder_load']:.2f}" if r["hw_decoder_load"] is not None else "-"
        print(f"{r['loader']:16s} {r['decode']:10s} {r['threads']:7d} {hw:>8s} {r['images_per_s']:9.0f} "
              f"{r['cpu_cores']:10.2f} {r['cpu_ms_per_image']:11.2f}")
    if args.json:
        atomic_write_json(args.json, {"date": datetime.datetime.now().isoformat(), "host": platform.node(),
                                      "hardware": hardware(), "versions": versions, "args": vars(args), "rows": rows})
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
