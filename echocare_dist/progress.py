"""Progress bars: the one place that decides whether tqdm draws.

A bar is a terminal device: written into a log file (Slurm, `nohup`, CI, `| tee`), each redraw
leaves a `\\r` fragment, hundreds per epoch. So bars are drawn only when stderr is a terminal,
and `--no-progress` (every long command) or ECHOCARE_PROGRESS=0 turns them off everywhere,
child processes included (the demo runs its stages as subprocesses).
"""
from __future__ import annotations

import os
import sys
from typing import IO, Iterable

ENV = "ECHOCARE_PROGRESS"  # "0": never; "1": always, even into a file; unset: when stderr is a terminal
ENV_VALUES = ("0", "1")


def disable_progress() -> None:
    """No bars in this process and the processes it starts (`--no-progress`)."""
    os.environ[ENV] = "0"


def progress_enabled(requested: bool = True, stream: IO | None = None) -> bool:
    """Whether a bar asked for (`requested`) is drawn on `stream` (default: stderr, where tqdm writes)."""
    setting = os.environ.get(ENV, "").strip()
    if setting and setting not in ENV_VALUES:
        raise ValueError(f"${ENV}={setting!r}: expected 0 (no bars) or 1 (always), or unset")
    if not requested or setting == "0":
        return False
    if setting == "1":
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **tqdm_kwargs):
    """tqdm over `iterable` (or a manual bar with total=...), disabled unless `progress_enabled`
    for the stream it draws on (tqdm's `file`, default stderr)."""
    from tqdm import tqdm
    tqdm_kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=not progress_enabled(enabled, tqdm_kwargs.get("file")), **tqdm_kwargs)
