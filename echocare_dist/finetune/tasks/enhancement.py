"""finetune.task=enhancement: image-to-image restoration on the encoder.

Data (`finetune.data`): `high/` (reference quality) and optionally `low/`, images paired by their
path below the folder without the extension (`low/a/1.png` <-> `high/a/1.jpg`).
- paired: every pair is a training / validation sample (input low, reference high);
- unpaired (a `low/` whose names match nothing in `high/`) or no `low/`: the input is the high
  image degraded on the fly (Gaussian blur sigma 1.2 px + multiplicative gamma speckle, 4 looks,
  at the training size; seeded, the same for a validation image every epoch), so PSNR / SSIM are
  measured against the clean image; the unpaired low images are enhanced for the before/after
  grid only (no reference exists for them).
Head: the multi-scale decoder with one output channel and a sigmoid, i.e. the pretraining
reconstruction decoder; with init=pretrained and an export written `--with-heads` its weights
are loaded (when the shapes agree: same decoder width), so enhancement starts from the model
that learned to fill in masked ultrasound. Loss: L1 to the reference in [0, 1].
Metrics (at the training size, pixels in [0, 1]): PSNR and SSIM (scikit-image, 7x7 window).
No-reference metrics (NIQE, BRISQUE, PIQE) and FID are left out: see docs/finetune.md.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ...curation.masklike import is_mask_like_name
from ..data import DataError, Sample, TaskData, images_under
from ..metrics import bootstrap_ci
from . import overlays
from .base import ImageDataset, TaskSpec

log = logging.getLogger(__name__)

BLUR_SIGMA, SPECKLE_LOOKS = 1.2, 4.0
UNPAIRED_KEPT = "unpaired_low_kept"  # TaskData.skipped reason: low images shown in the grid, not trained on


@dataclass(frozen=True)
class EnhanceTarget:
    high: Path
    synthetic: bool          # the input is `high` degraded on the fly, not a low-quality file


def degrade(img01: np.ndarray, seed: int) -> np.ndarray:
    """Blur + speckle: the synthetic low-quality input (float32 in [0, 1])."""
    rng = np.random.default_rng(seed)
    blurred = cv2.GaussianBlur(img01, (0, 0), BLUR_SIGMA)
    speckle = rng.gamma(SPECKLE_LOOKS, 1.0 / SPECKLE_LOOKS, img01.shape).astype(np.float32)
    return np.clip(blurred * speckle, 0.0, 1.0).astype(np.float32)


def image_scores(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    pred, ref = pred.astype(np.float64), ref.astype(np.float64)
    psnr = math.inf if np.array_equal(pred, ref) else peak_signal_noise_ratio(ref, pred, data_range=1.0)
    return float(min(psnr, 100.0)), float(structural_similarity(ref, pred, data_range=1.0, win_size=7))


def enhancement_summary(psnr: np.ndarray, ssim: np.ndarray) -> dict:
    return dict(psnr=float(np.mean(psnr)) if len(psnr) else math.nan,
                ssim=float(np.mean(ssim)) if len(ssim) else math.nan)


def _stem_key(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def _images(folder: Path, skipped: dict[str, list[str]]) -> dict[str, Path]:
    """stem key -> image; segmentation masks in the folder (curation name rule) left out, counted."""
    found = {}
    for p in images_under(folder):
        if is_mask_like_name(p):
            skipped.setdefault("mask_like_name", []).append(f"{folder.name}/{p.relative_to(folder).as_posix()}")
        else:
            found[_stem_key(p, folder)] = p
    return found


class EnhancementDataset(ImageDataset):
    def pair(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input, reference), (S, S) float32 in [0, 1], flipped together when training."""
        s = self.samples[index]
        t: EnhanceTarget = s.target
        rng = self.rng(index)
        high = self.load(t.high)
        low = degrade(high, rng.getrandbits(32)) if t.synthetic else self.load(s.image)
        if self.train and self.hflip_prob > 0 and rng.random() < self.hflip_prob:
            low, high = low[:, ::-1], high[:, ::-1]
        return np.ascontiguousarray(low), np.ascontiguousarray(high)

    def __getitem__(self, index: int) -> dict:
        low, high = self.pair(index)
        return dict(image=self.to_input(low), index=index, target=torch.from_numpy(high)[None])


class EnhancementTask(TaskSpec):
    name = "enhancement"
    metrics = ("psnr", "ssim")
    monitor = "psnr"
    baseline_name = "identity (input as output)"

    def discover(self, ft, root: Path, csv_path: Path | None) -> TaskData:
        if csv_path is not None:
            raise DataError("finetune.task=enhancement reads folders: set finetune.data to a folder with high/ "
                            "(and optionally low/), not finetune.csv")
        high_dir, low_dir = root / "high", root / "low"
        if not high_dir.is_dir():
            raise DataError(f"{root}: enhancement needs a high/ folder of reference-quality images")
        skipped: dict[str, list[str]] = {}
        highs = _images(high_dir, skipped)
        if not highs:
            raise DataError(f"{high_dir} holds no images")
        lows = _images(low_dir, skipped) if low_dir.is_dir() else {}
        matched = sorted(set(lows) & set(highs))
        if matched:
            samples = [Sample(lows[k], EnhanceTarget(highs[k], False), f"low/{lows[k].relative_to(low_dir).as_posix()}")
                       for k in matched]
            lonely = sorted(set(lows) - set(matched)) + sorted(set(highs) - set(matched))
            if lonely:
                skipped["no_partner"] = lonely
            log.info("enhancement: %d low/high pairs", len(samples))
        else:
            samples = [Sample(p, EnhanceTarget(p, True), f"high/{p.relative_to(high_dir).as_posix()}")
                       for _, p in sorted(highs.items())]
            if lows:
                skipped[UNPAIRED_KEPT] = [f"low/{p.relative_to(low_dir).as_posix()}" for _, p in sorted(lows.items())]
            log.info("enhancement: %d high images, inputs degraded synthetically (blur + speckle)%s", len(samples),
                     f"; {len(lows)} unpaired low images enhanced for the figure" if lows else "")
        return TaskData(samples, None, root, skipped)

    def num_outputs(self, task: TaskData, ft) -> int:
        return 1

    def dataset(self, samples, train: bool, ft, common: dict) -> EnhancementDataset:
        return EnhancementDataset(samples, train, **common)

    def decoder_dim(self, ft, encoder_meta: dict) -> int:
        # the pretraining decoder's width, so its weights fit (random init gets the same architecture)
        model = encoder_meta.get("model") or {}
        return int(model["decoder_dim"]) if model.get("decoder") == "multiscale" else ft.seg_decoder_dim

    def init_head(self, model, export_weights: Path, init: str, task) -> None:
        heads = Path(export_weights).parent / "heads.safetensors"
        if init != "pretrained" or not heads.is_file():
            return
        from safetensors.torch import load_file

        own = model.decoder.state_dict()
        found = {k[len("decoder."):]: v for k, v in load_file(str(heads)).items() if k.startswith("decoder.")}
        usable = {k: v for k, v in found.items() if k in own and own[k].shape == v.shape}
        if found and len(usable) == len(own):
            model.decoder.load_state_dict(usable)
            log.info("enhancement head starts from the pretraining decoder in %s", heads)
        else:
            log.warning("enhancement head starts fresh: the pretraining decoder in %s does not match (%d of %d "
                        "tensors fit)",
                        heads, len(usable), len(own))

    def loss(self, out: torch.Tensor, target: torch.Tensor, ft) -> torch.Tensor:
        return F.l1_loss(out.float().sigmoid(), target)

    def _scores(self, runner, model, loader, keep: int):
        losses, n, psnr, ssim, kept = 0.0, 0, [], [], []
        for batch in loader:
            x = batch["image"].to(runner.device)
            with runner._autocast():
                out = model(x)
            target = batch["target"].to(runner.device)
            losses += self.loss(out, target, runner.ft).item() * len(x)
            n += len(x)
            pred = out.float().sigmoid()[:, 0].cpu().numpy()
            for p, ref, inp in zip(pred, batch["target"][:, 0].numpy(), batch["image"][:, 0].numpy()):
                a, b = image_scores(p, ref)
                psnr.append(a)
                ssim.append(b)
                if len(kept) < keep:
                    kept.append((inp * runner.encoder_meta["norm_std"] + runner.encoder_meta["norm_mean"], p, ref))
        return losses / max(n, 1), np.asarray(psnr), np.asarray(ssim), kept

    def evaluate(self, runner, model, keep: int) -> tuple[dict, dict]:
        loss, psnr, ssim, kept = self._scores(runner, model, runner.val_loader, keep)
        details = dict(psnr=psnr, ssim=ssim, kept=kept, model=model if keep else None)
        return dict(loss=loss, **enhancement_summary(psnr, ssim)), details

    def final(self, details: dict, resamples: int, seed: int) -> dict:
        psnr, ssim = details["psnr"], details["ssim"]
        out = enhancement_summary(psnr, ssim)
        out["psnr_ci"] = list(bootstrap_ci(lambda p: float(np.mean(p)), [psnr], resamples, seed))
        out["ssim_ci"] = list(bootstrap_ci(lambda s: float(np.mean(s)), [ssim], resamples, seed))
        return out

    def figures(self, runner, details: dict) -> list[Path]:
        items = [(inp, out, ref, f"{a:.1f}dB") for (inp, out, ref), a in zip(details["kept"], details["psnr"])]
        unpaired = runner.task_data.skipped.get(UNPAIRED_KEPT, [])[:4]
        model = details.get("model")
        if unpaired and model is not None:
            ds = EnhancementDataset([], False, runner.img_size, runner.encoder_meta["in_chans"],
                                    runner.encoder_meta["norm_mean"], runner.encoder_meta["norm_std"])
            with torch.no_grad():
                for rel in unpaired:
                    low = ds.load(runner.task_data.root / rel)
                    out = model(ds.to_input(low)[None].to(runner.device)).float().sigmoid()[0, 0].cpu().numpy()
                    items.append((low, out, None, "unpaired"))
        return [overlays.before_after_png(items, runner.run_dir / "before_after.png")]

    def baseline(self, train, val, runner) -> dict:
        ds = EnhancementDataset(val, False, runner.img_size, runner.encoder_meta["in_chans"],
                                runner.encoder_meta["norm_mean"], runner.encoder_meta["norm_std"], seed=runner.ft.seed)
        psnr, ssim = [], []
        for i in range(len(ds)):
            low, high = ds.pair(i)
            a, b = image_scores(low, high)
            psnr.append(a)
            ssim.append(b)
        return dict(psnr=np.asarray(psnr), ssim=np.asarray(ssim), kept=[])
