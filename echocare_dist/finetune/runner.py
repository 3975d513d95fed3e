"""One-process fine-tuning of an exported encoder (GPU if available, else CPU).

Writes to `finetune.run_dir`:
  config.resolved.yaml   how the run was made
  split.csv              the train/val split used (reusable as finetune.split_file)
  best.safetensors       weights of the best epoch (encoder + head/decoder), `load_finetuned` reads it
  best.json              task, classes, metrics and epoch of that checkpoint, encoder description
  metrics.json           every epoch's metrics and the best one (also printed as a table)
  mlflow.db, mlartifacts/  MLflow run (unless tracking.uri / $MLFLOW_TRACKING_URI point elsewhere)
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..atomic import atomic_write_bytes, atomic_write_json
from ..config import Config, ConfigError, save_resolved
from ..schedule import warmup_cosine
from . import metrics as M
from .data import (FinetuneDataset, collate, discover, resolve_mask_mode, scan_mask_values, split_samples,
                   write_split)
from .model import build_task_model, param_groups

log = logging.getLogger(__name__)

DEFAULT_MONITOR = {"classification": "macro_f1", "segmentation": "dice", "regression": "mae"}
TASK_METRICS = {"classification": ("accuracy", "macro_f1", "auc"), "segmentation": ("dice", "nsd"),
                "regression": ("mae",)}


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"finetune.device={spec!r} but CUDA is not available")
    return device


def check_img_size(meta: dict, img_size: int) -> None:
    """timm's error for a window that does not tile a stage is cryptic; say it in config terms."""
    patch, window = meta["patch_size"], meta["window_size"]
    if img_size % patch:
        raise ConfigError(f"finetune.img_size={img_size} is not divisible by the encoder's patch size {patch}")
    grid = img_size // patch
    for stage in range(len(meta["depths"])):
        g = grid // 2 ** stage
        if g * 2 ** stage != grid or not (g <= window or g % window == 0):
            raise ConfigError(f"finetune.img_size={img_size}: stage {stage} grid {g} is not tiled by the encoder's "
                              f"window {window} (use a multiple of {patch * window * 2 ** (len(meta['depths']) - 1)})")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean soft Dice over foreground classes (background excluded, like the metric)."""
    probs = logits.float().softmax(dim=1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return 1.0 - ((2 * inter + 1.0) / (denom + 1.0)).mean()


class Finetuner:
    def __init__(self, cfg: Config):
        from ..export import load_encoder, read_export_meta

        self.cfg, ft = cfg, cfg.finetune
        self.ft = ft
        if not ft.checkpoint:
            raise ConfigError("finetune.checkpoint must name an exported encoder (`echocare export ... --out DIR`)")
        self.run_dir = cfg.resolve_path(ft.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(ft.device)
        self.amp = (ft.precision == "bf16") or (ft.precision == "auto" and self.device.type == "cuda")
        torch.manual_seed(ft.seed)
        np.random.seed(ft.seed % 2**32)

        weights_path, self.encoder_meta = read_export_meta(cfg.resolve_path(ft.checkpoint))
        check_img_size(self.encoder_meta, ft.img_size)
        full = ft.mode == "full"
        encoder = load_encoder(weights_path, img_size=ft.img_size, drop_path_rate=ft.drop_path_rate if full else 0.0)

        task = discover(ft, cfg.resolve_path)
        self.class_names = task.class_names
        train, val = split_samples(task, ft, cfg.resolve_path)
        write_split(self.run_dir / "split.csv", train, val)
        self.mask_mode, self.target_mean, self.target_std = "ids", 0.0, 1.0
        if ft.task == "classification":
            self.num_outputs = max(ft.num_classes, len(task.class_names))
            if ft.num_classes and ft.num_classes < len(task.class_names):
                raise ConfigError(f"finetune.num_classes={ft.num_classes} but the data has "
                                  f"{len(task.class_names)} classes: {task.class_names}")
        elif ft.task == "segmentation":
            values = scan_mask_values([s.target for s in task.samples])
            self.mask_mode = resolve_mask_mode(values, ft.mask_mode)
            found = 2 if self.mask_mode == "binary" else max(max(values) + 1, 2)
            if ft.num_classes and ft.num_classes < found:
                raise ConfigError(f"finetune.num_classes={ft.num_classes} but the masks hold class ids up to "
                                  f"{found - 1} (mask_mode={self.mask_mode})")
            self.num_outputs = ft.num_classes or found
        else:
            targets = np.array([s.target for s in train], dtype=np.float64)
            # Standardised targets keep the head's initial output scale sensible for any unit.
            self.target_mean, self.target_std = float(targets.mean()), float(targets.std()) or 1.0
            self.num_outputs = 1
        self.monitor = DEFAULT_MONITOR[ft.task] if ft.monitor == "auto" else ft.monitor
        allowed = TASK_METRICS[ft.task] + ("loss",)
        if self.monitor not in allowed:
            raise ConfigError(f"finetune.monitor={ft.monitor!r} is not a {ft.task} metric; choose from {list(allowed)}")

        common = dict(task=ft.task, img_size=ft.img_size, in_chans=self.encoder_meta["in_chans"],
                      norm_mean=self.encoder_meta["norm_mean"], norm_std=self.encoder_meta["norm_std"],
                      mask_mode=self.mask_mode, num_classes=self.num_outputs,
                      target_mean=self.target_mean, target_std=self.target_std, seed=ft.seed)
        self.train_set = FinetuneDataset(train, train=True, hflip_prob=ft.hflip_prob, **common)
        self.val_set = FinetuneDataset(val, train=False, **common)
        g = torch.Generator().manual_seed(ft.seed)
        pin = self.device.type == "cuda"
        self.train_loader = DataLoader(self.train_set, batch_size=ft.batch_size, shuffle=True, generator=g,
                                       num_workers=ft.num_workers, collate_fn=collate, pin_memory=pin,
                                       persistent_workers=ft.num_workers > 0)
        self.val_loader = DataLoader(self.val_set, batch_size=ft.batch_size, shuffle=False,
                                     num_workers=ft.num_workers, collate_fn=collate, pin_memory=pin)

        self.model = build_task_model(ft.task, encoder, self.num_outputs, frozen=not full,
                                      decoder_dim=ft.seg_decoder_dim).to(self.device)
        self.groups = param_groups(self.model, ft.weight_decay, ft.layer_decay)
        self.optimizer = torch.optim.AdamW(self.groups, lr=ft.lr)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = ft.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(ft.warmup_epochs * self.steps_per_epoch))
        log.info("fine-tuning %s (%s): %d train / %d val samples, %d outputs, device %s%s", ft.task, ft.mode,
                 len(train), len(val), self.num_outputs, self.device, ", bf16 autocast" if self.amp else "")

    # ------------------------------------------------------------------ steps
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = out.float()
        if self.ft.task == "classification":
            return F.cross_entropy(out, target)
        if self.ft.task == "regression":
            return F.smooth_l1_loss(out.squeeze(1), target)
        loss = F.cross_entropy(out, target)
        if self.ft.dice_loss_weight > 0:
            loss = loss + self.ft.dice_loss_weight * soft_dice_loss(out, target)
        return loss

    def train_epoch(self, epoch: int, step: int) -> tuple[float, int]:
        from tqdm import tqdm

        self.model.train()
        self.train_set.set_epoch(epoch)
        total, count = 0.0, 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{self.ft.epochs}", leave=False, unit="batch")
        for batch in bar:
            lr = warmup_cosine(step, self.ft.lr, self.ft.min_lr, self.warmup_steps, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            x = batch["image"].to(self.device, non_blocking=True)
            target = batch["target"].to(self.device, non_blocking=True)
            with self._autocast():
                out = self.model(x)
            loss = self._loss(out, target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite training loss {loss.item()} at epoch {epoch + 1}, step {step}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.ft.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.ft.grad_clip)
            self.optimizer.step()
            step += 1
            total += loss.item() * len(x)
            count += len(x)
            bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{lr:.2e}")
        return total / max(count, 1), step

    @torch.no_grad()
    def evaluate(self, model=None) -> dict:
        model = model if model is not None else self.model
        model.eval()
        losses, n = 0.0, 0
        outputs, targets, dices, nsds = [], [], [], []
        for batch in self.val_loader:
            x = batch["image"].to(self.device)
            target = batch["target"].to(self.device)
            with self._autocast():
                out = model(x)
            out = out.float()
            losses += self._loss(out, target).item() * len(x)
            n += len(x)
            if self.ft.task == "segmentation":
                for logits, full in zip(out, batch["mask_full"]):
                    logits = F.interpolate(logits[None], size=tuple(full.shape), mode="bilinear", align_corners=False)
                    pred = logits[0].argmax(0).cpu().numpy()
                    d, s = M.segmentation_scores(pred, full.numpy(), self.num_outputs, self.ft.nsd_tolerance)
                    dices.append(d)
                    nsds.append(s)
            else:
                outputs.append(out.cpu())
                targets.append(batch["target"])
        result = dict(loss=losses / max(n, 1))
        if self.ft.task == "classification":
            probs = torch.cat(outputs).softmax(dim=1).numpy()
            result.update(M.classification_metrics(torch.cat(targets).numpy(), probs))
        elif self.ft.task == "regression":
            pred = torch.cat(outputs).squeeze(1).numpy() * self.target_std + self.target_mean
            true = torch.cat(targets).numpy() * self.target_std + self.target_mean
            result["mae"] = M.mae(true, pred)
        else:
            dices, nsds = np.asarray(dices), np.asarray(nsds)  # (images, foreground classes)
            result["dice"], result["nsd"] = float(dices.mean()), float(nsds.mean())
            if dices.shape[1] > 1:
                for c in range(dices.shape[1]):
                    result[f"dice_class{c + 1}"] = float(dices[:, c].mean())
        return result

    # ------------------------------------------------------------------ checkpoints
    def _better(self, value: float, best: float | None) -> bool:
        if value is None or math.isnan(value):
            return best is None
        if best is None or math.isnan(best):
            return True
        return value < best if self.monitor in M.LOWER_IS_BETTER else value > best

    def save_best(self, epoch: int, metrics: dict) -> None:
        from safetensors.torch import save

        state = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        atomic_write_bytes(self.run_dir / "best.safetensors", save(state, metadata={"format": "pt"}))
        atomic_write_json(self.run_dir / "best.json", dict(
            task=self.ft.task, mode=self.ft.mode, epoch=epoch, monitor=self.monitor, metrics=metrics,
            num_outputs=self.num_outputs, class_names=self.class_names, mask_mode=self.mask_mode,
            target_mean=self.target_mean, target_std=self.target_std, img_size=self.ft.img_size,
            seg_decoder_dim=self.ft.seg_decoder_dim, encoder=self.encoder_meta,
            encoder_checkpoint=str(self.cfg.resolve_path(self.ft.checkpoint))))

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict:
        from ..tracking import Tracker, flatten

        save_resolved(self.cfg, self.run_dir)
        tracking = self.cfg.tracking
        tracker = Tracker(active=tracking.enabled, uri=tracking.uri, experiment=self.ft.experiment,
                          run_name=tracking.run_name, run_dir=self.run_dir)
        tracker.start()
        tracker.log_params(flatten(self.cfg.to_dict()["finetune"], "finetune"))
        tracker.log_params({"encoder.arch": self.encoder_meta["arch"],
                            "encoder.source_step": str(self.encoder_meta.get("source", {}).get("step")),
                            "encoder.sha256": str(self.encoder_meta.get("files", {}).get("encoder", {}).get("sha256"))})
        history, best, best_epoch, step, status = [], None, None, 0, "FAILED"
        try:
            for epoch in range(self.ft.epochs):
                t0 = time.time()
                train_loss, step = self.train_epoch(epoch, step)
                train_s = time.time() - t0
                val = self.evaluate()
                row = dict(epoch=epoch + 1, train_loss=train_loss,
                           train_img_per_s=len(self.train_set) / max(train_s, 1e-9),
                           **{f"val_{k}": v for k, v in val.items()})
                improved = self._better(val.get(self.monitor), best)
                if improved:
                    best, best_epoch = val.get(self.monitor), epoch + 1
                    self.save_best(epoch + 1, val)
                row["best"] = improved
                history.append(row)
                tracker.log_metrics({k: v for k, v in row.items() if isinstance(v, float) and not math.isnan(v)},
                                    step=epoch + 1)
                log.info("epoch %d: %s", epoch + 1, ", ".join(f"{k}={v:.4f}" for k, v in row.items()
                                                               if isinstance(v, float)))
            status = "FINISHED"
        finally:
            summary = dict(task=self.ft.task, mode=self.ft.mode, monitor=self.monitor, best_epoch=best_epoch,
                           best=history[best_epoch - 1] if best_epoch else None, history=history,
                           num_train=len(self.train_set), num_val=len(self.val_set),
                           class_names=self.class_names, run_dir=str(self.run_dir),
                           best_checkpoint=str(self.run_dir / "best.safetensors"), mlflow_run_id=tracker.run_id)
            atomic_write_json(self.run_dir / "metrics.json", summary)
            tracker.log_artifact(self.run_dir / "metrics.json")
            tracker.log_artifact(self.run_dir / "best.json")
            tracker.finish(status)
        print(format_table(history, self.monitor))
        if best_epoch is not None:
            print(f"best epoch {best_epoch} ({self.monitor}={best:.4f}) -> {self.run_dir / 'best.safetensors'}")
        return summary


def format_table(history: list[dict], monitor: str) -> str:
    if not history:
        return "(no epochs)"
    cols = [k for k in history[0] if k not in ("best",)]
    width = {c: max(len(c), 9) for c in cols}

    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    lines = ["  ".join(c.rjust(width[c]) for c in cols) + "  best"]
    for row in history:
        lines.append("  ".join(fmt(row.get(c, "")).rjust(width[c]) for c in cols) + ("  *" if row["best"] else ""))
    return "\n".join(lines)


def run_finetune(cfg: Config) -> dict:
    return Finetuner(cfg).run()


def load_finetuned(run_dir: str | Path, device: str = "cpu"):
    """(model in eval mode, best.json) of a finished fine-tuning run."""
    import timm
    from safetensors.torch import load_file

    from ..export import timm_kwargs

    run_dir = Path(run_dir)
    info = json.loads((run_dir / "best.json").read_text())
    encoder = timm.create_model(**timm_kwargs(info["encoder"], img_size=info["img_size"]))
    model = build_task_model(info["task"], encoder, info["num_outputs"], frozen=info["mode"] == "linear_probe",
                             decoder_dim=info["seg_decoder_dim"])
    model.load_state_dict(load_file(str(run_dir / "best.safetensors")), strict=True)
    return model.to(device).eval(), info
