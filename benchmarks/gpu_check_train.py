"""gpu_check section `train`: the real trainer step on one GPU, Swin-L p4 and p2, bf16.

Each configuration (preset x model.compile) runs in its own child process (`gpu_check.py
--train-worker`), so a crash, an out-of-memory or a hang costs that row only, and the GPU is
empty for the next. The child:
- DeepSpeed path (deepspeed imports, e.g. from the carried wheel): init_distributed on a world of
  one (NCCL), echocare_dist.train.step.build_components (ZeRO-2 engine, client AdamW, fused
  losses, loader) and train_step -- exactly what the trainer runs.
- FALLBACK (deepspeed does not import): the same model (build_model + apply_compile), optimizer
  and schedule (build_optimizer), loss (PretrainLoss) and loader (build_loader), stepped by plain
  torch: bf16 autocast, backward, clip_grad_norm_(optim.grad_clip), AdamW step. DeepSpeed's bf16
  mode instead keeps bf16 weights with fp32 master copies: the figures are labelled as fallback.
Data: shards written by echocare_dist.data.testing.write_shards (ultrasound-like JPEGs, 320x256),
read by the PIL loader (data.loader=pil, decode on the CPU: DALI is not on the lent machine).
data_wait is the time train_step waited for the loader; model img/s excludes it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gpu_check import md_table

PRESETS = ("echocare_swin_l_p4", "echocare_swin_l")
MIN_SECONDS_LEFT = 45.0     # a configuration is not started with less budget than this
WORKER_LIMIT_S = 240.0      # one configuration never runs longer


def compile_modes() -> list[str]:
    """Eager, plus regional compile when the config has model.compile."""
    from echocare_dist.config_sections import ModelConfig
    return ["none", "blocks"] if "compile" in ModelConfig.__dataclass_fields__ else ["none"]


def train_path() -> tuple[str, str]:
    """("deepspeed" | "fallback", label)."""
    try:
        import deepspeed
    except Exception as exc:  # noqa: BLE001 - any failure to import means the fallback, said so
        return "fallback", (f"FALLBACK without DeepSpeed ({type(exc).__name__}: {str(exc)[:120]}): plain torch "
                            f"AdamW + bf16 autocast, same model, loss and loader")
    return "deepspeed", f"DeepSpeed {deepspeed.__version__} ZeRO-2, world size 1 (echocare_dist.train.step)"


def overrides(shards: Path, run_dir: Path, steps: int, compile_mode: str, device: str = "cuda") -> list[str]:
    out = [f"data.shards={shards}", f"train.run_dir={run_dir}", f"train.device={device}", "train.precision=bf16",
           "train.zero_stage=2", f"train.steps={steps}", "train.resume=none", "tracking.enabled=false",
           "data.loader=pil", f"data.num_threads={min(16, os.cpu_count() or 2)}"]
    if compile_mode != "none":
        out.append(f"model.compile={compile_mode}")
    elif "compile" in _model_fields():
        out.append("model.compile=none")
    return out


def _model_fields():
    from echocare_dist.config_sections import ModelConfig
    return ModelConfig.__dataclass_fields__


# ------------------------------------------------------------------------------- child
def _fallback_components(cfg, device):
    from echocare_dist.data import build_loader
    from echocare_dist.hardware import peak_tflops
    from echocare_dist.models import build_model, flops_per_image
    from echocare_dist.models.compile import apply_compile
    from echocare_dist.ontology import load_ontology
    from echocare_dist.train import distributed
    from echocare_dist.train.loss import PretrainLoss
    from echocare_dist.train.optim import build_optimizer

    onto = load_ontology(cfg.resolve_path(cfg.ontology.path))
    distributed.seed_everything(cfg.train.seed)
    model = build_model(cfg.model, len(onto)).to(device)
    mode = apply_compile(model, cfg.model.compile, device) if "compile" in _model_fields() else "none"
    optimizer, scheduler = build_optimizer(model, cfg, 1, device)
    loss_fn = PretrainLoss(cfg, onto)
    loader = build_loader(cfg, onto, rank=0, world_size=1, device=device, run_dir=cfg.resolve_path(cfg.train.run_dir))
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        t0 = time.perf_counter()
        batch = next(loader)
        wait = time.perf_counter() - t0
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(batch["input"], batch["mask"])
        loss, _, _ = loss_fn(out, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        return loss.detach(), wait

    peak, source = peak_tflops(device, "bf16", cfg.train.peak_tflops)
    return step, flops_per_image(cfg.model, len(onto)), peak, source, mode, loader.close


def _deepspeed_components(cfg):
    from echocare_dist.train import distributed
    from echocare_dist.train.step import build_components, train_step

    env = distributed.init_distributed(cfg.train.dist_timeout_s, cfg.train.device)
    c = build_components(cfg, env, run_dir=cfg.resolve_path(cfg.train.run_dir))

    def step():
        result = train_step(c)
        return result.loss, result.data_wait_s

    def close():
        c.loader.close()
        c.engine.destroy()
        distributed.shutdown()
    return step, c.flops, c.peak_tflops, c.peak_source, getattr(c, "compile", "none"), close


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def worker(spec: dict) -> int:
    """One configuration; writes spec['result'] (JSON). spec: preset, overrides, steps, warmup,
    result, and for the CPU tests device ("cuda" unless given) and path ("fallback" forces it)."""
    import logging

    from echocare_dist.atomic import atomic_write_json
    from echocare_dist.config import load_config
    for name in ("echocare_dist", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    steps, warmup = spec["steps"], spec["warmup"]
    cfg = load_config(spec["preset"], spec["overrides"])
    device = torch.device(spec.get("device", "cuda"))
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    path, label = train_path()
    if spec.get("path") == "fallback" and path != "fallback":
        path, label = "fallback", "FALLBACK (forced): plain torch AdamW + bf16 autocast, same model, loss and loader"
    t0 = time.perf_counter()
    step, flops, peak, peak_source, mode, close = (_deepspeed_components(cfg) if path == "deepspeed"
                                                   else _fallback_components(cfg, device))
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warmup_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    wait, t0 = 0.0, time.perf_counter()
    for _ in range(steps):
        loss, w = step()
        wait += w
    loss = float(loss)  # waits for the device
    elapsed = time.perf_counter() - t0
    batch = cfg.train.micro_batch * cfg.train.grad_accum
    img_s = batch * steps / elapsed
    model_img_s = batch * steps / max(elapsed - wait, 1e-9)
    tflops = flops["train"] * img_s / 1e12
    m = cfg.model
    atomic_write_json(spec["result"], dict(
        name=f"{spec['preset']} compile={mode}", preset=spec["preset"], patch=m.patch_size, compile=mode, path=path,
        path_label=label, batch=batch, steps=steps, warmup=warmup, build_s=build_s, warmup_s=warmup_s,
        images_per_s=img_s, model_images_per_s=model_img_s, step_s=elapsed / steps, data_wait_s=wait / steps,
        tflops=tflops, peak_tflops=peak, peak_source=peak_source, mfu=tflops / peak,
        model_mfu=flops["train"] * model_img_s / 1e12 / peak, gflop_fwd=flops["forward"] / 1e9,
        peak_gib=torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else float("nan"), loss=loss, grad_checkpointing=m.grad_checkpointing))
    close()
    return 0 if loss == loss else 1


# ------------------------------------------------------------------------------- section
def train_section(ctx, steps: int, warmup: int) -> tuple[dict, str]:
    from echocare_dist.config import load_config
    from echocare_dist.data.testing import write_shards
    from echocare_dist.ontology import load_ontology

    path, label = train_path()
    rows = []
    with tempfile.TemporaryDirectory(prefix="echocare-gpu-check-") as tmp:
        work = Path(tmp)
        cfg = load_config(PRESETS[0])
        onto = load_ontology(cfg.resolve_path(cfg.ontology.path))
        samples = cfg.train.micro_batch * (steps + warmup + 2)   # the timed steps stay in the first epoch
        modes = compile_modes()
        # Eager for both presets first: p4 and p2 matter more than the compiled variants.
        configs = [(p, "none") for p in PRESETS] + [(p, m) for m in modes if m != "none" for p in PRESETS]
        for preset, mode in configs:
            left = ctx["deadline"] - time.monotonic()
            if left < MIN_SECONDS_LEFT:
                rows.append(dict(name=f"{preset} compile={mode}", skipped=f"budget: {left:.0f} s left"))
                continue
            if not (work / "shards").exists():
                write_shards(work / "shards", onto, counts=(-(-samples // 4),) * 4, size=(320, 256),
                             pattern="ultrasound", distinct_images=64)
            tag = f"{preset}_{mode}"
            spec = dict(preset=preset, steps=steps, warmup=warmup, result=str(work / f"{tag}.json"),
                        overrides=overrides(work / "shards", work / tag, steps + warmup, mode))
            cmd = [sys.executable, str(Path(__file__).with_name("gpu_check.py")), "--out", str(work),
                   "--train-worker", json.dumps(spec)]
            t0 = time.monotonic()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=min(left, WORKER_LIMIT_S))
                rc, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
            except subprocess.TimeoutExpired as exc:
                rc, tail = "timeout", str(exc.stderr or "")[-3000:]
            if rc == 0 and Path(spec["result"]).exists():
                row = json.loads(Path(spec["result"]).read_text())
            else:
                row = dict(name=f"{preset} compile={mode}", error=f"exit {rc}", log_tail=tail)
            row["wall_s"] = round(time.monotonic() - t0, 1)
            rows.append(row)
            print(f"[gpu_check] train {row['name']}: " + (f"{row['images_per_s']:.1f} img/s, MFU {row['mfu']:.1%}"
                  if "mfu" in row else row.get("error", "")), flush=True)
    target = ctx["targets"]["mfu_swin_l_p4"]
    table = []
    for r in rows:
        if "mfu" not in r:
            table.append([r["name"]] + ["-"] * 8 + [r.get("skipped") or r.get("error")])
            continue
        verdict = (f"{'met' if r['mfu'] >= target else 'NOT met'} (>= {target:.0%})"
                   if r["preset"] == "echocare_swin_l_p4" else "-")
        table.append([r["name"], r["batch"], f"{r['images_per_s']:.1f}", f"{r['model_images_per_s']:.1f}",
                      f"{r['mfu']:.1%}", f"{r['model_mfu']:.1%}", f"{r['peak_gib']:.1f}",
                      f"{r['data_wait_s'] * 1e3:.1f}", f"{r['build_s'] + r['warmup_s']:.0f}", verdict])
    md = (f"## train: {label}\n\nbf16, 1 GPU, {warmup} warm-up + {steps} timed steps per configuration; PIL loader "
          f"over write_shards JPEGs; MFU = 3 x analytic forward FLOPs x img/s / peak "
          f"({next((r['peak_source'] for r in rows if 'peak_source' in r), '-')}); 'model' columns exclude the "
          f"loader wait.\n\n"
          + md_table(["config", "batch", "img/s", "model img/s", "MFU", "model MFU", "peak GiB", "data wait ms/step",
                      "build+warmup s", "target"], table))
    return dict(path=path, path_label=label, rows=rows), md
