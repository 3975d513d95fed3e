"""`torch.load` of checkpoint files that cannot run code.

A pickle can name any importable callable, and `torch.load(weights_only=False)` calls it: an
untrusted checkpoint is an untrusted program. We load with `weights_only=True`, allowing only the
few non-tensor types our checkpoints hold (SAFE_GLOBALS), and `check_pickle` scans a file's pickle
for anything else without loading it, before DeepSpeed's own loaders (which use
weights_only=False) are given the file.
"""
from __future__ import annotations

from pathlib import Path

from .export_load import ExportError


# What a checkpoint's pickles may reference beyond tensors and containers: numpy arrays (the RNG
# states in the client state) and DeepSpeed's own plain records in the optimizer files.
SAFE_GLOBALS = frozenset({
    "numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.utils.tensor_fragment.fragment_address",
})


def _resolve(names: set[str]) -> list:
    """The objects behind allowed global names (imports only what the file uses: DeepSpeed is slow)."""
    import importlib
    out = []
    for name in sorted(names):
        module, _, attr = name.rpartition(".")
        try:
            out.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):
            continue  # numpy 1 vs 2 spell the reconstructor differently; DeepSpeed may be absent
    if "numpy.dtype" in names:
        # numpy 2 pickles a dtype through its class (numpy.dtypes.UInt32DType, ...), which the scan
        # does not list: allow the classes of the plain numeric dtypes.
        import numpy as np
        out += [type(np.dtype(t)) for t in (np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32,
                                             np.int64, np.uint64, np.float16, np.float32, np.float64)]
    return out


# Python 3.11.0-3.11.4 pickle an enum member as getattr(EnumClass, "NAME") (later versions as
# EnumClass(value)): DeepSpeed's ZeroStageEnum in the optimizer files of a job that ran on such an
# interpreter (Debian bookworm's 3.11.2, the container's) references builtins.getattr. A free
# getattr would let a pickle walk from any allowed class to code, so the unpickler gets this
# checked stand-in instead: only members of allowed enum classes come out of it.
ENUM_GETATTR = "builtins.getattr"


def _enum_member(cls, name):
    import enum
    import pickle
    if (isinstance(cls, type) and issubclass(cls, enum.Enum) and f"{cls.__module__}.{cls.__qualname__}" in SAFE_GLOBALS
            and isinstance(name, str) and name in cls.__members__):
        return cls[name]
    raise pickle.UnpicklingError(f"getattr({getattr(cls, '__name__', cls)!r}, {name!r}) is not an enum member of "
                                 "an allowed class")


def check_pickle(path: Path) -> set[str]:
    """Refuse a checkpoint file whose pickle references code (it would run on load), without
    running it; returns the (allowed) non-tensor globals it references."""
    from torch.serialization import get_unsafe_globals_in_checkpoint
    try:
        unsafe = set(get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as exc:  # noqa: BLE001 - a truncated/corrupt file surfaces here
        raise ExportError(f"cannot read {path}: {type(exc).__name__}: {exc} "
                          f"(a partial or corrupt checkpoint file)") from exc
    refused = unsafe - SAFE_GLOBALS - {ENUM_GETATTR}
    if refused:
        raise ExportError(f"refusing {path}: its pickle references {sorted(refused)[:8]}, "
                          f"which a checkpoint of `echocare pretrain` never holds (loading it could run code)")
    if ENUM_GETATTR in unsafe:
        # DeepSpeed's loaders will unpickle this file with the real getattr: first prove, through the
        # restricted unpickler and the checked stand-in, that every getattr names an enum member.
        torch_load_safe(path, unsafe)
    return unsafe


def torch_load_safe(path: Path, referenced: set[str] | None = None) -> dict:
    import torch
    referenced = check_pickle(path) if referenced is None else referenced
    allowed = _resolve(referenced - {ENUM_GETATTR})
    if ENUM_GETATTR in referenced:
        allowed.append((_enum_member, ENUM_GETATTR))
    try:
        # mmap: a ZeRO-0 Swin-L module is ~0.8 GB; pages are read only when a tensor is touched.
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - a truncated/corrupt file surfaces here
        if ENUM_GETATTR in referenced and "getattr" in str(exc):
            raise ExportError(f"refusing {path}: its pickle calls getattr on something other than an enum member "
                              f"of an allowed class (loading it could run code): {exc}") from exc
        raise ExportError(f"cannot read {path}: {type(exc).__name__}: {exc} "
                          f"(a partial or corrupt checkpoint file)") from exc
