"""Where the packaged presets and ontology live, and how relative paths in configs resolve.

The presets and the ontology are package data (`echocare_dist/configs/`), found through
importlib.resources, so a wheel install finds them as an editable one does. The repository's
`configs/` is a link to that folder, kept for the commands and docs that name it.

The path rule (docs/configuration.md), which looks at no file system:
- `~` is expanded; an absolute path is used as it is;
- a relative path is relative to the current working directory, except `base:` and the keys in
  FILE_RELATIVE_KEYS written in a config file: those are relative to the folder of that file
  (config.py makes them absolute while reading the file).
"""
from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

# A wheel is always unpacked onto the file system by pip, so the resource folder is a real path.
PACKAGE_DIR = Path(str(files("echocare_dist"))).resolve()
CONFIG_DIR = PACKAGE_DIR / "configs"
DEFAULT_ONTOLOGY = CONFIG_DIR / "ontology" / "default.yaml"
# The source checkout holding the package; meaningful only when running from one (benchmarks).
REPO_ROOT = PACKAGE_DIR.parent

# Keys that name part of the configuration itself (it travels with the config file); every other
# path (data, shards, run directories, exports, CSVs) belongs to where the job runs.
FILE_RELATIVE_KEYS = ("ontology.path",)


def resolve_path(p: str | os.PathLike) -> Path:
    """`p` with `~` expanded, relative to the current working directory unless absolute."""
    path = Path(os.path.expanduser(p))
    return path if path.is_absolute() else Path.cwd() / path


def relative_to_file(p: str, config_file: Path) -> str:
    """A FILE_RELATIVE_KEYS value read from `config_file`, made absolute against its folder."""
    path = Path(os.path.expanduser(p))
    return str(path if path.is_absolute() else config_file.parent / path)
