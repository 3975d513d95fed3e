"""One-process fine-tuning of an exported encoder (GPU if available, else CPU).

Writes to `finetune.run_dir`:
  config.resolved.yaml   how the run was made
  split.csv              the train/val split used (reusable as finetune.split_file)
  best.safetensors       weights of the best epoch (encoder + head/decoder), `load_finetuned` reads it
  best.json              task, classes, metrics and epoch of that checkpoint, encoder description
  metrics.json           every epoch's metrics, the best one, and `final`: the best checkpoint's
                         metrics with 95% bootstrap CIs (report.py); `skipped`: files left out
  confusion.png, roc.png (classification) / overlays.png (segmentation, landmarks, detection) /
  before_after.png (enhancement) of the best checkpoint (landmarks etc.: finetune/tasks/),
                         curves.png: train/val loss and the monitor per epoch
  fold_K/, cv.json       with finetune.folds >= 2: one run per fold, mean +- std (crossval.py)
  mlflow.db, mlartifacts/  MLflow run (unless tracking.uri / $MLFLOW_TRACKING_URI point elsewhere)
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..atomic import atomic_write_bytes, atomic_write_json
from ..config import Config, ConfigError, save_resolved
from ..config_sections import parse_device
from ..devices import cuda_problem
from ..schedule import warmup_cosine
from . import metrics as M
from . import plots
from .checkpoints import format_table, load_finetuned  # noqa: F401 - public names of the runner
from .data import FinetuneDataset, TaskData, collate, resolve_mask_mode, write_split
from .discovery import discover
from .losses import class_weights, soft_dice_loss
from .splits import splits_for
from .model import build_task_model, param_groups
from .tasks import TASK_SPECS

log = logging.getLogger(__name__)

RANDOM_INIT_SEED_OFFSET = 7919  # any fixed value other than 0 (see init=random below)
# Segmentation picks epochs by lesion-only Dice: with "empty-empty counts" a background-only
# epoch can look best on a set with many normal images (metrics.py).
DEFAULT_MONITOR = {"classification": "macro_f1", "segmentation": "dice_lesion", "regression": "mae"}
TASK_METRICS = {"classification": ("accuracy", "macro_f1", "auc"),
                "segmentation": ("dice", "nsd", "dice_lesion", "nsd_lesion"), "regression": ("mae",)}
DEFAULT_MONITOR.update({name: spec.monitor for name, spec in TASK_SPECS.items()})  # tasks/: one spec per task
TASK_METRICS.update({name: spec.metrics for name, spec in TASK_SPECS.items()})


def pick_device(spec: str) -> torch.device:
    spec = parse_device(spec, "finetune.device")  # the one vocabulary: "gpu" is "cuda"
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"finetune.device={spec!r} but CUDA is not usable: {cuda_problem(os.environ)}")
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


class Finetuner:
    """One fine-tuning run. `task` / `split` / `run_dir` let cross-validation and `echocare
    evaluate` run several models on data discovered and split once."""

    def __init__(self, cfg: Config, task: TaskData | None = None, split=None, run_dir: Path | None = None):
        import timm

        from ..export import load_encoder, read_export_meta, timm_kwargs

        self.cfg, ft = cfg, cfg.finetune
        self.ft = ft
        if not ft.checkpoint:
            raise ConfigError("finetune.checkpoint must name an exported encoder (`echocare export ... --out DIR`)")
        self.run_dir = Path(run_dir) if run_dir is not None else cfg.resolve_path(ft.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.device = pick_device(ft.device)
        self.amp = (ft.precision == "bf16") or (ft.precision == "auto" and self.device.type == "cuda")
        torch.manual_seed(ft.seed)
        np.random.seed(ft.seed % 2**32)

        weights_path, self.encoder_meta = read_export_meta(cfg.resolve_path(ft.checkpoint))
        # 0 = the export's own size: a tiny preset must not shrink a Swin-L's inputs to 64 px.
        self.img_size = ft.img_size or int(self.encoder_meta["img_size"])
        check_img_size(self.encoder_meta, self.img_size)
        full = ft.mode == "full"
        drop_path = ft.drop_path_rate if full else 0.0
        if ft.init == "random":  # the export's architecture, untrained
            # Its own seed stream: an export of a model initialised with seed S (tests, smoke runs)
            # must not come back bit-identical as the "random" baseline.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(ft.seed + RANDOM_INIT_SEED_OFFSET)
                encoder = timm.create_model(**timm_kwargs(self.encoder_meta, self.img_size, drop_path))
        else:
            encoder = load_encoder(weights_path, img_size=self.img_size, drop_path_rate=drop_path)

        task = task if task is not None else discover(ft, cfg.resolve_path)
        self.task_data = task
        self.spec = TASK_SPECS.get(ft.task)
        self.class_names = task.class_names if self.spec is None else task.target_names
        train, val = split if split is not None else splits_for(task, ft, cfg.resolve_path)[0]
        write_split(self.run_dir / "split.csv", train, val)
        self.mask_mode, self.target_mean, self.target_std = "ids", 0.0, 1.0
        if ft.task == "classification":
            self.num_outputs = max(ft.num_classes, len(task.class_names))
            if ft.num_classes and ft.num_classes < len(task.class_names):
                raise ConfigError(f"finetune.num_classes={ft.num_classes} but the data has "
                                  f"{len(task.class_names)} classes: {task.class_names}")
        elif ft.task == "segmentation":
            values = task.mask_values
            self.mask_mode = resolve_mask_mode(values, ft.mask_mode)
            found = 2 if self.mask_mode == "binary" else max(max(values) + 1, 2)
            if ft.num_classes and ft.num_classes < found:
                raise ConfigError(f"finetune.num_classes={ft.num_classes} but the masks hold class ids up to "
                                  f"{found - 1} (mask_mode={self.mask_mode})")
            self.num_outputs = ft.num_classes or found
        elif self.spec is not None:
            self.num_outputs = self.spec.num_outputs(task, ft)
        else:
            targets = np.array([s.target for s in train], dtype=np.float64)
            # Standardised targets keep the head's initial output scale sensible for any unit.
            self.target_mean, self.target_std = float(targets.mean()), float(targets.std()) or 1.0
            self.num_outputs = 1
        self.monitor = DEFAULT_MONITOR[ft.task] if ft.monitor == "auto" else ft.monitor
        empty = set(task.skipped.get("empty_mask_kept", ()))
        if ft.monitor == "auto" and ft.task == "segmentation" and all(s.key in empty for s in val):
            self.monitor = "dice"  # no lesion in validation: lesion-only Dice is undefined
        allowed = TASK_METRICS[ft.task] + ("loss",)
        if self.monitor not in allowed:
            raise ConfigError(f"finetune.monitor={ft.monitor!r} is not a {ft.task} metric; choose from {list(allowed)}")

        common = dict(task=ft.task, img_size=self.img_size, in_chans=self.encoder_meta["in_chans"],
                      norm_mean=self.encoder_meta["norm_mean"], norm_std=self.encoder_meta["norm_std"],
                      mask_mode=self.mask_mode, num_classes=self.num_outputs,
                      target_mean=self.target_mean, target_std=self.target_std, seed=ft.seed)
        if self.spec is not None:
            self.train_set = self.spec.dataset(train, True, ft, dict(common, hflip_prob=ft.hflip_prob))
            self.val_set = self.spec.dataset(val, False, ft, common)
        else:
            self.train_set = FinetuneDataset(train, train=True, hflip_prob=ft.hflip_prob, augment=ft.augment, **common)
            self.val_set = FinetuneDataset(val, train=False, **common)
        g = torch.Generator().manual_seed(ft.seed)
        pin = self.device.type == "cuda"
        self.loss_weight, sampler = None, None
        if ft.task == "classification" and ft.balance != "none":
            weights = class_weights([s.target for s in train], self.num_outputs)
            if ft.balance == "loss":
                self.loss_weight = weights.to(self.device)
            else:  # every class drawn equally often; an epoch still has len(train) draws
                per_sample = weights[torch.tensor([int(s.target) for s in train])].double()
                sampler = torch.utils.data.WeightedRandomSampler(per_sample, len(train), replacement=True,
                                                                 generator=g)
        self.train_loader = DataLoader(self.train_set, batch_size=ft.batch_size, shuffle=sampler is None,
                                       sampler=sampler, generator=g,
                                       num_workers=ft.num_workers, collate_fn=collate, pin_memory=pin,
                                       persistent_workers=ft.num_workers > 0)
        self.val_loader = DataLoader(self.val_set, batch_size=ft.batch_size, shuffle=False,
                                     num_workers=ft.num_workers, collate_fn=collate, pin_memory=pin)

        self.decoder_dim = self.spec.decoder_dim(ft, self.encoder_meta) if self.spec else ft.seg_decoder_dim
        self.model = build_task_model(ft.task, encoder, self.num_outputs, frozen=not full,
                                      decoder_dim=self.decoder_dim).to(self.device)
        if self.spec is not None:
            self.spec.init_head(self.model, weights_path, ft.init, task)
        self.groups = param_groups(self.model, ft.weight_decay, ft.layer_decay)
        self.optimizer = torch.optim.AdamW(self.groups, lr=ft.lr)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = ft.epochs * self.steps_per_epoch
        self.warmup_steps = int(round(ft.warmup_epochs * self.steps_per_epoch))
        log.info("fine-tuning %s (%s, %s init, %d px%s): %d train / %d val samples, %d outputs, device %s%s",
                 ft.task, ft.mode, ft.init, self.img_size, "" if ft.img_size else " from the export", len(train),
                 len(val), self.num_outputs, self.device, ", bf16 autocast" if self.amp else "")

    # ------------------------------------------------------------------ steps
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def _loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = out.float()
        if self.spec is not None:
            return self.spec.loss(out, target, self.ft)
        if self.ft.task == "classification":
            return F.cross_entropy(out, target, weight=self.loss_weight)
        if self.ft.task == "regression":
            return F.smooth_l1_loss(out.squeeze(1), target)
        loss = F.cross_entropy(out, target)
        if self.ft.dice_loss_weight > 0:
            loss = loss + self.ft.dice_loss_weight * soft_dice_loss(out, target)
        return loss

    def train_epoch(self, epoch: int, step: int) -> tuple[float, int]:
        from ..progress import progress_bar

        self.model.train()
        self.train_set.set_epoch(epoch)
        total, count = 0.0, 0
        bar = progress_bar(self.train_loader, desc=f"epoch {epoch + 1}/{self.ft.epochs}", leave=False, unit="batch")
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
    def evaluate(self, model=None, keep: int = 0) -> dict:
        """Validation metrics; the per-image values behind them go to `self.details` (report.py:
        CIs and figures), with the first `keep` segmentation predictions for the overlays."""
        model = model if model is not None else self.model
        model.eval()
        if self.spec is not None:
            result, self.details = self.spec.evaluate(self, model, keep)
            return result
        losses, n = 0.0, 0
        outputs, targets, dices, nsds, has_target, kept = [], [], [], [], [], []
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
                    truth = full.numpy()
                    d, s = M.segmentation_scores(pred, truth, self.num_outputs, self.ft.nsd_tolerance)
                    dices.append(d)
                    nsds.append(s)
                    has_target.append([bool((truth == c).any()) for c in range(1, self.num_outputs)])
                    if len(kept) < keep:
                        kept.append((truth, pred))
            else:
                outputs.append(out.cpu())
                targets.append(batch["target"])
        result = dict(loss=losses / max(n, 1))
        if self.ft.task == "classification":
            probs = torch.cat(outputs).softmax(dim=1).numpy()
            y_true = torch.cat(targets).numpy()
            result.update(M.classification_metrics(y_true, probs))
            self.details = dict(y_true=y_true, probs=probs)
        elif self.ft.task == "regression":
            pred = torch.cat(outputs).squeeze(1).numpy() * self.target_std + self.target_mean
            true = torch.cat(targets).numpy() * self.target_std + self.target_mean
            result["mae"] = M.mae(true, pred)
            self.details = dict(true=true, pred=pred)
        else:
            dices, nsds = np.asarray(dices), np.asarray(nsds)  # (images, foreground classes)
            has_target = np.asarray(has_target, dtype=bool)
            result.update(M.segmentation_summary(dices, nsds, has_target))
            self.details = dict(dices=dices, nsds=nsds, has_target=has_target, kept=kept)
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
            task=self.ft.task, mode=self.ft.mode, init=self.ft.init, epoch=epoch, monitor=self.monitor, metrics=metrics,
            num_outputs=self.num_outputs, class_names=self.class_names, mask_mode=self.mask_mode,
            target_mean=self.target_mean, target_std=self.target_std, img_size=self.img_size,
            seg_decoder_dim=self.decoder_dim, encoder=self.encoder_meta,
            encoder_checkpoint=str(self.cfg.resolve_path(self.ft.checkpoint))))

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict:
        from ..tracking import Tracker, flatten
        from ..tracking_context import pretraining_link_tags

        save_resolved(self.cfg, self.run_dir)
        tracking = self.cfg.tracking
        # Named like "finetune-classification/pretrained": an evaluation's arms stay apart.
        tracker = Tracker(active=tracking.enabled, uri=tracking.uri, experiment=self.ft.experiment,
                          run_name=tracking.run_name or f"{self.run_dir.parent.name}/{self.run_dir.name}",
                          run_dir=self.run_dir, source="echocare finetune",
                          system_metrics_s=tracking.system_metrics_interval,
                          tags={**pretraining_link_tags(self.encoder_meta), "echocare.init": self.ft.init,
                                "echocare.task": self.ft.task})
        tracker.start()
        tracker.log_params(flatten(self.cfg.to_dict()["finetune"], "finetune"))
        tracker.log_params({"encoder.arch": self.encoder_meta["arch"],
                            "encoder.source_step": str(self.encoder_meta.get("source", {}).get("step")),
                            "encoder.sha256": str(self.encoder_meta.get("files", {}).get("encoder", {}).get("sha256"))})
        history, best, best_epoch, step, status = [], None, None, 0, "FAILED"
        final, stopped_early = None, False
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
                patience = self.ft.early_stop_patience
                if patience and best_epoch is not None and epoch + 1 - best_epoch >= patience:
                    stopped_early = True
                    log.info("early stop after epoch %d: %s did not improve for %d epochs (best epoch %d)",
                             epoch + 1, self.monitor, patience, best_epoch)
                    break
            if best_epoch is not None:  # the figures and CIs describe the checkpoint we hand out
                from safetensors.torch import load_file

                from .report import final_report
                self.model.load_state_dict(load_file(str(self.run_dir / "best.safetensors")))
                final = final_report(self)
                final["figures"].append(plots.curves_png(history, self.monitor, self.run_dir / "curves.png").name)
                tracker.log_metrics({f"final_{k}": v for k, v in final.items()
                                     if isinstance(v, float) and not math.isnan(v)}, step=best_epoch)
                for name in final["figures"]:
                    tracker.log_artifact(self.run_dir / name)
                    if name.endswith(".png"):  # also as an image: the UI's image view, at its epoch
                        tracker.log_image(self.run_dir / name, Path(name).stem, step=best_epoch)
            status = "FINISHED"
        finally:
            summary = dict(task=self.ft.task, mode=self.ft.mode, init=self.ft.init, monitor=self.monitor,
                           best_epoch=best_epoch, best=history[best_epoch - 1] if best_epoch else None,
                           final=final, history=history, stopped_early=stopped_early, img_size=self.img_size,
                           num_train=len(self.train_set), num_val=len(self.val_set),
                           class_names=self.class_names, run_dir=str(self.run_dir),
                           skipped={k: len(v) for k, v in self.task_data.skipped.items()},
                           best_checkpoint=str(self.run_dir / "best.safetensors"), mlflow_run_id=tracker.run_id)
            atomic_write_json(self.run_dir / "metrics.json", summary)
            tracker.log_artifact(self.run_dir / "metrics.json")
            tracker.log_artifact(self.run_dir / "best.json")
            tracker.finish(status)
        print(format_table(history, self.monitor))
        if best_epoch is not None:
            from .report import format_final
            print(f"best epoch {best_epoch} ({self.monitor}={best:.4f}) -> {self.run_dir / 'best.safetensors'}")
            print(format_final(final, TASK_METRICS[self.ft.task]))
        return summary


def run_finetune(cfg: Config) -> dict:
    """One run, or with finetune.folds >= 2 one run per fold and their mean +- std (crossval.py)."""
    if cfg.finetune.folds >= 2 and not cfg.finetune.split_file:
        from .crossval import run_crossval
        return run_crossval(cfg, lambda task, split, run_dir: Finetuner(cfg, task, split, run_dir).run(),
                            TASK_METRICS[cfg.finetune.task])
    return Finetuner(cfg).run()
