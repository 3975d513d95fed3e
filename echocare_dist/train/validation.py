"""Validation during pretraining (docs/validation.md): every train.val_every steps, on a fixed
subset of the held-out shard set, the masked-reconstruction and hierarchical losses and a k-NN
probe of the pooled encoder features (probe.py), per source and overall.

Fixed: the subset (train.val_samples keys, in an order set by a hash of (train.val_seed, key)),
its preprocessing (the whole image resized, no augmentation) and its masks (masking.py's
counter-based masks under train.val_seed, epoch 0) are the same at every validation, on every
world size, before and after a resume. Nothing here draws from a training stream: the RNG states
are restored afterwards and the loader is not touched, so a run trains bit-identically with and
without validation (tests/test_validation.py).

Collective: each rank evaluates positions rank, rank + W, ... of the subset, in the same number of
forwards on every rank (ZeRO-3 gathers parameters in each one; a rank short of samples runs a
padded batch that counts nothing); the loss sums are all-reduced and the probe's features
gathered, so every rank computes the same figures and the same warning state.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import Config, ConfigError
from ..curation.valsplit import VAL_DIR, read_groups
from ..data.augment import AugmentParams, augment, decode_gray
from ..data.masking import MaskGenerator
from ..data.shards import ShardSet, TarReader
from ..ontology import Ontology
from ..shardfmt import MANIFEST, Manifest, ShardError, ShardReader
from . import distributed
from .probe import probe_accuracy

log = logging.getLogger(__name__)


def resolve_val_shards(cfg: Config) -> Path | None:
    """The validation shard set of this run, or None (data.val_shards, module doc of config_sections)."""
    value = cfg.data.val_shards.strip()
    if value.lower() == "none":
        return None
    if value:
        path = cfg.resolve_path(value)
        if not (path / MANIFEST).is_file():
            raise ConfigError(f"data.val_shards={value!r}: {path / MANIFEST} is missing (a finished shard "
                              f"build has one); use \"\" for {{data.shards}}/{VAL_DIR} or \"none\"")
        return path
    default = cfg.resolve_path(cfg.data.shards) / VAL_DIR
    return default if (default / MANIFEST).is_file() else None


def _check_beside(cfg: Config, path: Path) -> None:
    """A val set beside the training shards must come from the same build (else it may hold
    samples that now train)."""
    train_dir = cfg.resolve_path(cfg.data.shards)
    if path.resolve() != (train_dir / VAL_DIR).resolve():
        return
    val_fp, train_fp = Manifest.read(path).fingerprint, Manifest.read(train_dir).fingerprint
    if val_fp != train_fp:
        raise ShardError(f"{path / MANIFEST}: fingerprint {val_fp!r} differs from the training shards' "
                         f"{train_fp!r} ({train_dir / MANIFEST}): the validation set is from another build; "
                         f"rebuild the shards")


def _order_key(seed: int, key: str) -> bytes:
    return hashlib.blake2b(f"valsubset:{seed}:{key}".encode(), digest_size=8).digest()


@dataclass
class LocalSlice:
    """This rank's part of the fixed subset, decoded, on the host."""
    positions: np.ndarray       # in the subset (global order)
    images: torch.Tensor        # uint8 (n, 1, S, S)
    labels: torch.Tensor        # int8 (n, C)
    masks: torch.Tensor         # uint8 (n, S/p, S/p)
    sources: np.ndarray         # index into ValidationSet.sources
    groups: np.ndarray


def _read_slice(path: Path, cfg: Config, ontology: Ontology, env: distributed.DistEnv) -> tuple[list[str], int, LocalSlice]:
    shard_set = ShardSet.open(path, ontology)
    source_names = sorted(Manifest.read(path).per_source)
    groups = read_groups(path)
    reader = TarReader(len(ontology))
    try:
        entries = [(shard, i, reader.key(shard, i)) for shard in shard_set.shards for i in range(shard.samples)]
    finally:
        reader.close()
    t = cfg.train
    entries.sort(key=lambda e: _order_key(t.val_seed, e[2]))
    entries = entries[:t.val_samples]
    mine = list(range(env.rank, len(entries), env.world_size))
    params = dataclasses.replace(AugmentParams.from_config(cfg), rrc_prob=0.0, hflip_prob=0.0, vflip_prob=0.0,
                                 jitter_prob=0.0)
    unused = np.random.default_rng(0)  # augment() flips its coins on it; with every probability 0 nothing depends on it
    images, labels, keys, sources, group_ids, kept = [], [], [], [], [], []
    readers: dict[str, ShardReader] = {}
    try:
        for pos in mine:
            shard, i, key = entries[pos]
            reader = readers.get(shard.name) or readers.setdefault(shard.name, ShardReader(shard.tar, shard.idx))
            try:
                parts = reader.read(i)
                provenance = json.loads(parts["json"])
                image, _ = augment(decode_gray(parts["jpg"]), unused, params)
                if len(parts["lbl"]) != len(ontology):
                    raise ValueError(f".lbl has {len(parts['lbl'])} bytes, the ontology {len(ontology)} nodes")
            except (OSError, ValueError, KeyError) as exc:
                log.warning("validation: %s/%s is damaged and left out (%s)", shard.tar, key, exc)
                continue
            source = provenance.get("source")
            if source not in source_names:
                raise ShardError(f"{shard.tar}/{key}.json: source {source!r} is not in the manifest's per_source "
                                 f"{source_names}")
            images.append(torch.tensor(image))  # a copy: augment() may hand back a read-only view
            labels.append(torch.from_numpy(np.frombuffer(parts["lbl"], np.int8).copy()))
            keys.append(key)
            sources.append(source_names.index(source))
            # Without a group file every sample is its own group: offset past every position.
            group_ids.append(groups[key] if groups is not None and key in groups else -1 - pos)
            kept.append(pos)
    finally:
        for r in readers.values():
            r.close()
    size = cfg.model.img_size
    masks = MaskGenerator(size, cfg.mask.mask_patch_size, cfg.model.patch_size, cfg.mask.mask_ratio,
                          t.val_seed).token_masks(keys, epoch=0)
    grid = size // cfg.model.patch_size
    local = LocalSlice(
        positions=np.asarray(kept, np.int64),
        images=torch.stack(images)[:, None] if images else torch.zeros(0, 1, size, size, dtype=torch.uint8),
        labels=torch.stack(labels) if labels else torch.zeros(0, len(ontology), dtype=torch.int8),
        masks=masks if keys else torch.zeros(0, grid, grid, dtype=torch.uint8),
        sources=np.asarray(sources, np.int64), groups=np.asarray(group_ids, np.int64))
    return source_names, len(entries), local


def _metric_name(source: str) -> str:
    return re.sub(r"[^\w.-]+", "_", source).strip("_") or "source"


class Validator:
    """The run's validation: `run(components, step)` on every rank at a validation step returns the
    figures for that step's metrics record (the same on every rank); `state_dict` / `load_state_dict`
    carry the early-warning state through checkpoints."""

    def __init__(self, cfg: Config, env: distributed.DistEnv, ontology: Ontology, path: Path):
        self.cfg, self.env, self.path = cfg, env, path
        self.depth = ontology.depth
        t0 = time.perf_counter()
        _check_beside(cfg, path)
        self.sources, self.total, self.local = _read_slice(path, cfg, ontology, env)
        self.batch = cfg.train.val_batch or cfg.train.micro_batch
        # The same count on every rank (the collective contract): the largest slice's batches.
        self.num_batches = math.ceil(math.ceil(self.total / env.world_size) / self.batch)
        self.best: dict[str, float] = {}        # metric key (val/loss, val/<source>/loss) -> best so far
        self.since_best: dict[str, int] = {}    # validations since that best
        self.evaluations = 0
        self.seconds = 0.0                # spent validating in this process (the cost figure)
        self.started = time.perf_counter()
        log.info("validation: %d samples of %s (%d sources) every %d steps, %d forward pairs of %d per rank; "
                 "loaded in %.1f s", self.total, path, len(self.sources), cfg.train.val_every, self.num_batches,
                 self.batch, time.perf_counter() - t0)

    @classmethod
    def create(cls, cfg: Config, env: distributed.DistEnv, ontology: Ontology) -> "Validator | None":
        if cfg.train.val_every == 0:
            return None
        path = resolve_val_shards(cfg)
        if path is None:
            log.info("validation: no validation shard set (data.val_shards=%r, and no %s beside the shards; "
                     "build with curation.val_fraction > 0): validation is off", cfg.data.val_shards, VAL_DIR)
            return None
        if Manifest.read(path).num_samples == 0:
            log.warning("validation: %s holds no sample (the build could hold out no group): validation is off",
                        path)
            return None
        return cls(cfg, env, ontology, path)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return {"best": dict(self.best), "since_best": dict(self.since_best), "evaluations": self.evaluations}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.best, self.since_best = dict(state["best"]), dict(state["since_best"])
            self.evaluations = int(state["evaluations"])

    # ------------------------------------------------------------------ one validation
    def run(self, c, step: int) -> dict:
        """Collective. `c`: train.step.Components."""
        t0 = time.perf_counter()
        saved_rng = distributed.rng_state()
        module = c.engine.module
        was_training = module.training
        pooled: list[torch.Tensor] = []
        module.eval()
        try:
            with torch.no_grad():
                sums = self._losses_and_features(c, pooled)
        finally:
            module.train(was_training)
            distributed.set_rng_state(saved_rng)
        record = self._figures(sums, torch.cat(pooled) if pooled else torch.zeros(0, 0))
        self.seconds += time.perf_counter() - t0
        record["val/time_s"] = time.perf_counter() - t0
        record["val/cost_fraction"] = self.seconds / max(1e-9, time.perf_counter() - self.started - self.seconds)
        self._warn(step, record)
        return record

    def _losses_and_features(self, c, pooled: list) -> list[float]:
        from ..kernels import hierarchical_minmax_loss, masked_l1_loss

        local, device, loss_fn = self.local, self.env.device, c.loss_fn
        a = self.cfg.data.augment
        n_sources = len(self.sources)
        # Per-sample losses stay on the device until the end: one synchronisation, not one per sample.
        sample_sources, sample_mim, sample_hie = [], [], []
        for b in range(self.num_batches):
            rows = np.arange(b * self.batch, min(len(local.positions), (b + 1) * self.batch))
            real = len(rows)
            if not real:  # padding: this rank's slice is shorter; the forwards still happen
                rows = np.zeros(1, np.int64) if len(local.positions) else None
            if rows is None:
                size, grid = self.cfg.model.img_size, self.cfg.model.img_size // self.cfg.model.patch_size
                images = torch.zeros(1, 1, size, size, dtype=torch.uint8)
                masks, labels = torch.zeros(1, grid, grid, dtype=torch.uint8), None
            else:
                images, masks, labels = local.images[rows], local.masks[rows], local.labels[rows]
            target = images.to(device, torch.float32) / 255.0
            inputs = (target - a.norm_mean) / a.norm_std
            masks = masks.to(device)
            out = c.engine(inputs, masks)
            recon = out["recon"].float()
            for j in range(real):
                sample_sources.append(int(local.sources[rows[j]]))
                sample_mim.append(masked_l1_loss(recon[j:j + 1], target[j:j + 1], masks[j:j + 1],
                                                 loss_fn.patch_size, impl=loss_fn.impl))
                if loss_fn.use_hie:
                    sample_hie.append(hierarchical_minmax_loss(
                        out["logits"][j:j + 1].float(), labels[j:j + 1].to(device), loss_fn.ancestor_table,
                        loss_fn.descendant_table, impl=loss_fn.impl))
            before = len(pooled)
            # Whole images for the probe: the last stage after the encoder's norm (mim.encode's last
            # output), pooled over tokens, taken by a hook so the engine's own forward (autocast,
            # ZeRO-3 gathering) runs as in training.
            hook = c.engine.module.encoder.norm.register_forward_hook(
                lambda _m, _i, out: pooled.append(out.detach().float().mean(dim=(1, 2)).cpu()))
            try:
                c.engine(inputs, torch.zeros_like(masks))
            finally:
                hook.remove()
            if not real:
                del pooled[before:]
            elif len(pooled) != before + 1 or len(pooled[-1]) != real:
                raise RuntimeError(f"validation: the encoder norm hook saw {len(pooled) - before} calls in one "
                                   f"forward (expected 1)")
        count, mim, hie = np.zeros(n_sources), np.zeros(n_sources), np.zeros(n_sources)
        where = np.asarray(sample_sources, np.int64)
        np.add.at(count, where, 1.0)
        if sample_mim:
            np.add.at(mim, where, torch.stack(sample_mim).double().cpu().numpy())
        if sample_hie:
            np.add.at(hie, where, torch.stack(sample_hie).double().cpu().numpy())
        sums, _ = distributed.reduce_stats([*count, *mim, *hie], [], device)
        return sums

    def _figures(self, sums: list[float], features: torch.Tensor) -> dict:
        n = len(self.sources)
        count, mim, hie = np.asarray(sums[:n]), np.asarray(sums[n:2 * n]), np.asarray(sums[2 * n:])
        w = self.cfg.loss.hie_weight if self.cfg.model.hie_head else 0.0
        total = count.sum()
        record = {"val/samples": float(total),
                  "val/loss_mim": mim.sum() / total, "val/loss_hie": hie.sum() / total}
        record["val/loss"] = record["val/loss_mim"] + w * record["val/loss_hie"]
        for i, source in enumerate(self.sources):
            if count[i]:
                name = _metric_name(source)
                record[f"val/{name}/loss_mim"] = mim[i] / count[i]
                record[f"val/{name}/loss_hie"] = hie[i] / count[i]
                record[f"val/{name}/loss"] = (mim[i] + w * hie[i]) / count[i]
        local = self.local
        gathered = distributed.all_gather_object(
            (local.positions, features.numpy(), local.labels.numpy(), local.sources, local.groups))
        positions = np.concatenate([g[0] for g in gathered])
        order = np.argsort(positions, kind="stable")  # the subset's order: the same on any world size
        feats = np.concatenate([g[1] for g in gathered if len(g[0])])
        if len(feats) != len(positions):
            raise RuntimeError(f"validation: {len(feats)} feature rows for {len(positions)} samples")
        feats = feats[order]
        labels = np.concatenate([g[2] for g in gathered])[order]
        sources = np.concatenate([g[3] for g in gathered])[order]
        groups = np.concatenate([g[4] for g in gathered])[order]
        normed = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
        # ~0 when every image maps to the same direction (collapse).
        record["val/feature_std"] = float(normed.std(axis=0).mean())
        for level, (correct, counted) in probe_accuracy(feats, labels, groups, self.depth,
                                                        self.cfg.train.val_knn_k).items():
            if counted.any():
                record[f"val/knn_acc/level{level}"] = float(correct.sum() / counted.sum())
            for i, source in enumerate(self.sources):
                mine = counted & (sources == i)
                if mine.any():
                    record[f"val/{_metric_name(source)}/knn_acc/level{level}"] = float(correct[mine].sum() / mine.sum())
        return {k: float(v) for k, v in record.items()}

    def _warn(self, step: int, record: dict) -> None:
        """Early warning: no new best validation loss for train.val_patience validations, overall
        (`val/degraded`) or for one source (`val/<source>/degraded`: the run overfits the others)."""
        self.evaluations += 1
        patience = self.cfg.train.val_patience
        stalled = []
        for key in [k for k in record if k == "val/loss" or (k.endswith("/loss") and k.count("/") == 2)]:
            loss, best = record[key], self.best.get(key)
            if best is None or loss < best:
                self.best[key], self.since_best[key] = loss, 0
            else:
                self.since_best[key] += 1
            degraded = bool(patience) and self.since_best[key] >= patience
            record[key[:-len("loss")] + "degraded"] = float(degraded)
            if degraded:
                stalled.append(f"{key} {loss:.4f} (best {self.best[key]:.4f}, {self.since_best[key]} validations ago)")
        record["val/best_loss"] = self.best["val/loss"]
        record["val/evaluations"] = float(self.evaluations)
        if self.env.is_main:
            log.info("validation at step %d: loss %.4f (mim %.4f hie %.4f, best %.4f)%s, feature std %.3g, %.2f s",
                     step, record["val/loss"], record["val/loss_mim"], record["val/loss_hie"], self.best["val/loss"],
                     "".join(f", k-NN L{k[-1]} {v:.3f}" for k, v in record.items()
                             if k.startswith("val/knn_acc/")), record["val/feature_std"], record["val/time_s"])
            if stalled:
                log.warning("validation at step %d: no new best for train.val_patience=%d validations: %s; the "
                            "representation may have stopped improving, or overfits the other sources",
                            step, patience, "; ".join(stalled))
