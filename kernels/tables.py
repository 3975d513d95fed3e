"""Ontology index tables (Ontology.ancestor_table / descendant_table) as device tensors.

The tables are constant for a run but arrive as numpy arrays (or tensors) at every loss call:
the device copy is made and validated once per (table, device) and then reused, so a training
step pays neither a host-to-device copy nor a validation sync.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch

_CACHE_SIZE = 16
_cache: "OrderedDict[tuple, tuple[object, torch.Tensor]]" = OrderedDict()
_lock = threading.Lock()


class TableError(ValueError):
    pass


def _validate(host: np.ndarray, name: str) -> None:
    if host.ndim != 2:
        raise TableError(f"{name} must be 2-D (num_nodes, width), got shape {tuple(host.shape)}")
    if not np.issubdtype(host.dtype, np.integer):
        raise TableError(f"{name} must hold integer node indices, got dtype {host.dtype}")
    C = host.shape[0]
    if host.size and (host.min() < -1 or host.max() >= C):
        raise TableError(f"{name}: entries must be node indices in [0, {C}) or -1 padding, "
                         f"got values in [{host.min()}, {host.max()}]")
    missing = [v for v in range(C) if not (host[v] == v).any()]
    if missing:
        raise TableError(f"{name}: row v must include v itself (A*(v) / D*(v)); rows {missing[:5]} do not")


def _to_host(table) -> np.ndarray:
    if isinstance(table, torch.Tensor):
        return table.detach().to("cpu").numpy()
    return np.asarray(table)


def index_table(table, device: torch.device | str, name: str = "table") -> torch.Tensor:
    """The table as a contiguous int32 tensor on `device`, validated; cached for immutable inputs
    (read-only numpy arrays such as the Ontology's, and tensors until modified in place)."""
    device = torch.device(device)
    if isinstance(table, torch.Tensor):
        key = ("tensor", id(table), table._version, device)
    elif isinstance(table, np.ndarray) and not table.flags.writeable:
        key = ("numpy", id(table), device)
    else:  # a mutable array or a nested list: no identity to trust, convert every call
        key = None
    if key is not None:
        with _lock:
            hit = _cache.get(key)
            if hit is not None and hit[0] is table:
                _cache.move_to_end(key)
                return hit[1]
    host = _to_host(table)
    _validate(host, name)
    out = torch.from_numpy(np.array(host, dtype=np.int32, order="C")).to(device)
    if key is not None:
        with _lock:
            # The entry keeps `table` alive, so its id cannot be reused by another object.
            _cache[key] = (table, out)
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    return out
