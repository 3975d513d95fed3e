"""Reconstruction grid for tracking: one row per image, columns input / masked input / reconstruction / target."""
from __future__ import annotations

import io

import numpy as np
import torch

COLUMNS = ("input", "masked input", "reconstruction", "target")
GRAY = 0.5       # how masked tokens are drawn in the "masked input" column
SEPARATOR = 2    # white pixels between tiles


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """(C,H,W) in [0,1] -> (H,W) or (H,W,3) uint8."""
    arr = img.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def reconstruction_grid(input: torch.Tensor, mask: torch.Tensor, recon: torch.Tensor, target: torch.Tensor,
                        norm_mean: float, norm_std: float, rows: int) -> bytes:
    """PNG bytes. `input` is normalized (x - mean) / std; `mask` is at token resolution (1 = masked)."""
    from PIL import Image

    n = min(rows, input.shape[0])
    _, c, h, w = input.shape
    p = h // mask.shape[-2]
    shown_input = (input[:n].detach().float() * norm_std + norm_mean).clamp(0, 1)
    pixel_mask = mask[:n].detach().to(torch.float32).repeat_interleave(p, -2).repeat_interleave(p, -1)
    pixel_mask = pixel_mask.unsqueeze(1).to(shown_input.device)
    masked = shown_input * (1 - pixel_mask) + GRAY * pixel_mask
    tiles = [shown_input, masked, recon[:n].detach().float(), target[:n].detach().float()]

    sep = SEPARATOR
    canvas_shape = (n * (h + sep) - sep, len(tiles) * (w + sep) - sep) + (() if c == 1 else (3,))
    canvas = np.full(canvas_shape, 255, dtype=np.uint8)
    for r in range(n):
        for col, column in enumerate(tiles):
            y, x = r * (h + sep), col * (w + sep)
            canvas[y:y + h, x:x + w] = _to_uint8(column[r])
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()
