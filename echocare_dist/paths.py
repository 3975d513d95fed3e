"""Where the repository lives: presets and relative paths in configs resolve against it."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


def resolve_path(p: str | os.PathLike) -> Path:
    """`~` expanded; a relative path that does not exist from the working directory is taken
    relative to the repository root (where configs/ lives), so presets work from anywhere."""
    path = Path(os.path.expanduser(p))
    if path.is_absolute() or path.exists():
        return path
    candidate = REPO_ROOT / path
    return candidate if candidate.exists() else path
