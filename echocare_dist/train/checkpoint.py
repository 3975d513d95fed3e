"""Crash-safe DeepSpeed checkpoints with our own `latest` pointer, pruning and world-size changes.

Layout under {run_dir}/checkpoints/:
  step_00005000/            a DeepSpeed checkpoint (engine.save_checkpoint, tag = dir name);
                            its client state holds step, every rank's loader and RNG state,
                            the resolved config, the ontology hash and the MLflow run id
  step_00005000/meta.json   written by rank 0 after every rank finished saving: the marker
                            that the directory is complete (never trust a dir without it);
                            `files` holds the size and SHA-256 of every file of the directory,
                            checked on resume and by `echocare export` (a mismatch names the file)
  step_00005000_universal/  DeepSpeed universal form, made on demand when the world size changed
  latest                    text: the tag of the newest complete checkpoint, rewritten atomically
                            only after meta.json exists; keep-last-K pruning happens after that

A crash at any moment therefore leaves `latest` on a complete checkpoint (the previous one
while a save is in flight), and `--resume auto` never reads a partial directory. A save that
fails (disk full, I/O error) raises CheckpointSaveError naming the directory and the free space;
`latest` and the previous checkpoint are untouched.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write_json, atomic_write_text, file_sha256
from ..config import Config, ModelConfig
from . import distributed

log = logging.getLogger(__name__)

LATEST = "latest"
META = "meta.json"
UNIVERSAL_SUFFIX = "_universal"
_TAG_RE = re.compile(r"^step_(\d{8,})$")

# Model fields that change the parameter set; a checkpoint is refused when any differs.
# (drop_path_rate and grad_checkpointing change training, not the weights' meaning.)
ARCH_FIELDS = ("arch", "img_size", "patch_size", "window_size", "in_chans", "embed_dim", "depths",
               "num_heads", "decoder", "decoder_dim", "hie_head")


class ResumeError(RuntimeError):
    """A checkpoint exists but cannot continue this run (different ontology, architecture, ...)."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed; the message names the directory, the error and the free space."""


def hash_files(path: Path) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} of every file under a checkpoint directory but the marker."""
    out = {}
    for root, _, names in os.walk(path):
        for name in sorted(names):
            full = Path(root) / name
            rel = full.relative_to(path).as_posix()
            if rel != META:
                out[rel] = {"bytes": full.stat().st_size, "sha256": file_sha256(full)}
    return dict(sorted(out.items()))


def verify_files(path: Path, meta: dict) -> list[str]:
    """Files of checkpoint `path` that differ from what its marker recorded (empty: all match).

    A marker without `files` predates the hashes: nothing to compare (the caller may warn)."""
    recorded = meta.get("files")
    if not isinstance(recorded, dict):
        return []
    problems = []
    for rel, want in recorded.items():
        full = path / rel
        try:
            size = full.stat().st_size
        except OSError as exc:
            problems.append(f"{full}: {exc.strerror or exc} (recorded in {path / META})")
            continue
        if size != want.get("bytes"):
            problems.append(f"{full}: {size} bytes, {path / META} recorded {want.get('bytes')}")
        elif file_sha256(full) != want.get("sha256"):
            problems.append(f"{full}: SHA-256 differs from the one {path / META} recorded at save time "
                            f"(the file was damaged or replaced after the save)")
    return problems


def _free_space(path: Path) -> str:
    for p in (path, *path.parents):
        try:
            usage = shutil.disk_usage(p)
        except OSError:
            continue
        return f"{usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.1f} GiB on {p}"
    return "free space unknown"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int | None:
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def model_fingerprint(model_cfg: ModelConfig) -> dict:
    out = {}
    for name in ARCH_FIELDS:
        value = getattr(model_cfg, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


@dataclass(frozen=True)
class ResumePlan:
    load_dir: Path          # passed to engine.load_checkpoint together with `tag`
    tag: str
    source: Path            # the checkpoint as saved (before any universal conversion)
    meta: dict
    universal: bool


def _fsync_tree(path: Path) -> None:
    # torch.save closes without fsync; a power loss after `latest` moved must not lose shards.
    for root, _, files in os.walk(path):
        for name in files:
            try:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


class CheckpointManager:
    def __init__(self, root: str | os.PathLike, env: distributed.DistEnv, keep_last: int,
                 universal_workers: int = 1):
        self.root = Path(root)
        self.env = env
        self.keep_last = keep_last
        self.universal_workers = universal_workers

    # ------------------------------------------------------------------ inspection
    def read_meta(self, path: Path) -> dict | None:
        import json
        try:
            return json.loads((path / META).read_text())
        except (OSError, ValueError):
            return None

    def latest_tag(self) -> str | None:
        try:
            tag = (self.root / LATEST).read_text().strip()
        except OSError:
            return None
        return tag or None

    def complete_tags(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        tags = [p.name for p in self.root.iterdir()
                if p.is_dir() and step_of(p.name) is not None and (p / META).is_file()]
        return sorted(tags, key=step_of)

    def find_auto(self) -> Path | None:
        tag = self.latest_tag()
        if tag is not None:
            path = self.root / tag
            if (path / META).is_file():
                return path
            log.warning("checkpoint pointer %s names %s, which is not complete; "
                        "falling back to the newest complete checkpoint", self.root / LATEST, path)
        complete = self.complete_tags()
        return self.root / complete[-1] if complete else None

    # ------------------------------------------------------------------ resume
    def plan_resume(self, resume: str, cfg: Config, ontology_hash: str) -> ResumePlan | None:
        """Which checkpoint to load and how (collective: rank 0 may convert, the others wait)."""
        if resume == "none":
            return None
        if resume == "auto":
            source = self.find_auto()
            if source is None:
                return None
        else:
            source = Path(resume).expanduser().resolve()
            if not (source / META).is_file():
                raise ResumeError(f"train.resume={resume!r}: {source} is not a complete checkpoint "
                                  f"(no {META}; a crash mid-save leaves such directories)")
        meta = self.read_meta(source)
        if meta is None:
            raise ResumeError(f"{source / META} is unreadable")
        self._check_compatible(source, meta, cfg, ontology_hash)
        self._check_files(source, meta)

        saved_world = int(meta["world_size"])
        universal = saved_world != self.env.world_size and int(meta["zero_stage"]) >= 1
        if not universal:
            return ResumePlan(source.parent, source.name, source, meta, False)
        target = self.root / (source.name + UNIVERSAL_SUFFIX)
        log.info("checkpoint %s was written by %d ranks, this run has %d: loading it through "
                 "DeepSpeed's universal checkpoint %s", source, saved_world, self.env.world_size, target)
        error = None
        if self.env.is_main and not (target / META).is_file():
            try:
                self._convert_to_universal(source, target, meta)
            except Exception as exc:  # every rank must leave the barrier, then all fail together
                error = f"{type(exc).__name__}: {exc}"
        error = distributed.broadcast_object(error)
        if error:
            raise ResumeError(f"converting {source} to a universal checkpoint failed: {error}")
        return ResumePlan(self.root, target.name, source, meta, True)

    def _check_compatible(self, source: Path, meta: dict, cfg: Config, ontology_hash: str) -> None:
        if meta.get("ontology_hash") != ontology_hash:
            raise ResumeError(
                f"checkpoint {source} was trained with ontology hash {meta.get('ontology_hash')!r}, this run's "
                f"ontology ({cfg.ontology.path}) has hash {ontology_hash!r}: the label space differs. Use the "
                f"same ontology, a new train.run_dir, or train.resume=none.")
        saved, current = meta.get("model", {}), model_fingerprint(cfg.model)
        diff = {k: (saved.get(k), current[k]) for k in current if saved.get(k) != current[k]}
        if diff:
            detail = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
            raise ResumeError(f"checkpoint {source} has a different model architecture ({detail}). "
                              f"Use a new train.run_dir or train.resume=none.")

    def _check_files(self, source: Path, meta: dict) -> None:
        """Collective: rank 0 hashes the checkpoint's files against its marker, every rank gets the verdict."""
        problems = None
        if self.env.is_main:
            if "files" not in meta:
                log.warning("%s has no file hashes (written before they were recorded): not verified",
                            source / META)
            problems = verify_files(source, meta)
        problems = distributed.broadcast_object(problems)
        if problems:
            raise ResumeError(f"checkpoint {source} is damaged: " + "; ".join(problems[:5])
                              + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
                              + ". Resume from an earlier checkpoint (train.resume=<its directory>) or remove it.")

    def _convert_to_universal(self, source: Path, target: Path, meta: dict) -> None:
        from deepspeed.checkpoint import ds_to_universal

        tmp = target.parent / f".{target.name}.tmp"
        for stale in (tmp, target):  # a conversion killed half-way left one of these
            if stale.exists():
                shutil.rmtree(stale)
        t0 = time.time()
        args = argparse.Namespace(input_folder=str(source), output_folder=str(tmp),
                                  num_extract_workers=self.universal_workers,
                                  num_merge_workers=self.universal_workers,
                                  keep_temp_folder=False, strict=True, inject_missing_state=False)
        ds_to_universal.main(args)
        # The converter also drops a `latest_universal` pointer (naming the temp dir) next to its
        # output; we load by explicit tag, so remove it rather than leave a misleading file.
        (target.parent / "latest_universal").unlink(missing_ok=True)
        # The marker vouches for the converted files, not the source's (their hashes are other files').
        atomic_write_json(tmp / META, dict(meta, universal_of=source.name, files=hash_files(tmp)))
        _fsync_tree(tmp)
        os.replace(tmp, target)
        log.info("universal checkpoint %s written in %.1f s", target, time.time() - t0)

    def load(self, engine, plan: ResumePlan) -> dict:
        path, client_state = engine.load_checkpoint(str(plan.load_dir), tag=plan.tag,
                                                    load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise ResumeError(f"DeepSpeed could not load {plan.load_dir / plan.tag}")
        return client_state

    # ------------------------------------------------------------------ save
    def save(self, engine, step: int, client_state: dict, meta: dict) -> Path:
        """Collective. Returns the checkpoint directory once it is complete and `latest` names it."""
        tag = tag_for(step)
        path = self.root / tag
        if self.env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if self.latest_tag() == tag and (path / META).is_file():
                raise RuntimeError(f"refusing to overwrite the current checkpoint {path}")
            # Left over from a crash mid-save (maybe by another world size): never mix files.
            for stale in (path, self.root / (tag + UNIVERSAL_SUFFIX)):
                if stale.exists():
                    shutil.rmtree(stale)
        distributed.barrier()
        t0 = time.time()
        previous = self.latest_tag()
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state=client_state, save_latest=False)
        except Exception as exc:  # noqa: BLE001 - torch reports a full disk as RuntimeError("... iostream error")
            raise self._save_failed(path, previous, exc) from exc
        distributed.barrier()  # every rank's shards are on disk
        if self.env.is_main:
            try:
                _fsync_tree(path)
                files = hash_files(path)
                atomic_write_json(path / META, dict(meta, tag=tag, step=step, saved_at=time.time(), files=files))
                atomic_write_text(self.root / LATEST, tag + "\n")
            except OSError as exc:
                raise self._save_failed(path, previous, exc) from exc
            self.prune(current=tag)
            log.info("checkpoint %s complete (%.1f s)", path, time.time() - t0)
        distributed.barrier()  # nobody exits (e.g. after preemption) before `latest` moved
        return path

    def _save_failed(self, path: Path, previous: str | None, exc: BaseException) -> CheckpointSaveError:
        kept = (f"`latest` still names {previous}, which is untouched" if previous
                else "there is no earlier checkpoint")
        return CheckpointSaveError(
            f"checkpoint {path.name}: saving to {path} failed ({type(exc).__name__}: {exc}); "
            f"{_free_space(path.parent)}; {kept}; the partial {path.name} has no {META} and is never resumed")

    def prune(self, current: str) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop older ones and stale partial dirs."""
        complete = self.complete_tags()
        keep = set(complete[-self.keep_last:]) | {current}
        for p in self.root.iterdir():
            name = p.name
            base = name[:-len(UNIVERSAL_SUFFIX)] if name.endswith(UNIVERSAL_SUFFIX) else name
            if name.startswith(".") and name.endswith(".tmp"):  # an interrupted conversion or write
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                continue
            if step_of(base) is None or base in keep or not p.is_dir():
                continue
            shutil.rmtree(p, ignore_errors=True)
