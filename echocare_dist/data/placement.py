"""Where the pretraining data is decoded: the one answer both the loader choice and DALI use."""
from __future__ import annotations

import torch

from ..config_sections import parse_device


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def decode_on_gpu(data_cfg, device) -> bool:
    """Whether DALI is asked to decode on the GPU: data.device=cuda (or its alias gpu), or
    data.device=auto with a CUDA training device on a machine that has CUDA. data.device=cuda says so
    even without CUDA: the DALI reader refuses that, "auto" loader selection falls back to PIL."""
    spec = parse_device(data_cfg.device, "data.device", allow_index=False)
    if spec == "cuda":
        return True
    return spec == "auto" and torch.device(device).type == "cuda" and torch.cuda.is_available()
