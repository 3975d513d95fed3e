"""Helpers of the loader tests: shard directories (echocare_dist.data.testing), configs, batches."""
from __future__ import annotations

from pathlib import Path

from echocare_dist.data.testing import RAMP_X, write_shards  # noqa: F401  (re-exported for the tests)


def truncate_file(path: Path, keep_fraction: float = 0.5) -> None:
    size = Path(path).stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(int(size * keep_fraction))


def loader_config(root: Path, kind: str, *overrides: str, micro_batch: int = 4):
    """tiny_cpu (img 64, patch 2, mask patch 16) reading `root` with loader `kind` ("dali" / "pil")."""
    from echocare_dist.config import load_config
    return load_config("tiny_cpu", [f"data.shards={root}", f"data.loader={kind}", f"train.micro_batch={micro_batch}",
                                    "data.shuffle_buffer=8", "data.device=cpu", "data.num_threads=2",
                                    "data.max_quarantine_fraction=0.5", *overrides])


def take(loader, steps: int) -> list[dict]:
    """`steps` batches moved to plain Python/numpy (keys, labels, targets, masks, epoch)."""
    out = []
    for _ in range(steps):
        b = next(loader)
        out.append(dict(keys=b["keys"], labels=b["labels"].numpy(), target=b["target"].numpy(),
                        mask=b["mask"].numpy(), input=b["input"].numpy(), epoch=loader.epoch))
    return out
