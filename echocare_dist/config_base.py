"""What every config section module shares: the error type, `require`, the device vocabulary.

Its own module so that the section modules (config_sections, config_train) can all use it
without importing each other.
"""
from __future__ import annotations

import re


class ConfigError(ValueError):
    """Raised for any invalid configuration; the message names the key and the value."""


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


DEVICE_VOCABULARY = "auto, cuda, cpu, cuda:N (a single process) or gpu (= cuda)"


def parse_device(value, key: str, *, allow_index: bool = True) -> str:
    """The one device vocabulary (echocare_dist/devices.py), canonical: 'auto' | 'cpu' | 'cuda' | 'cuda:N'."""
    text = value.strip().lower() if isinstance(value, str) else ""
    text = "cuda" if text == "gpu" else text
    if text in ("auto", "cpu", "cuda"):
        return text
    if re.fullmatch(r"cuda:\d+", text):
        require(allow_index, f"{key}={value!r}: a device index is not allowed here (use cuda)")
        return f"cuda:{int(text[5:])}"
    raise ConfigError(f"{key}={value!r}: expected {DEVICE_VOCABULARY}")
