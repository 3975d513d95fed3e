"""Reconstruction grid for tracking: a title band naming the columns, then one row per image,
columns input / masked input / reconstruction / target."""
from __future__ import annotations

import io

import numpy as np
import torch

COLUMNS = ("input", "masked input", "reconstruction", "target")
GRAY = 0.5       # how masked tokens are drawn in the "masked input" column
SEPARATOR = 2    # white pixels between tiles
MAX_FONT_PX, MIN_FONT_PX = 14, 6


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    """(C,H,W) in [0,1] -> (H,W) or (H,W,3) uint8."""
    arr = img.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu().numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def _title_font(tile_width: int):
    """The largest default font (up to MAX_FONT_PX) at which the longest title fits a tile."""
    from PIL import ImageFont

    longest = max(COLUMNS, key=len)
    probe = ImageFont.load_default(size=10)
    width_at_10 = max(1, probe.getbbox(longest)[2])
    size = int(10 * (tile_width - 2) / width_at_10)
    return ImageFont.load_default(size=max(MIN_FONT_PX, min(MAX_FONT_PX, size)))


def title_band_height(tile_width: int) -> int:
    """Pixel rows above the tiles that hold the column titles (depends on the tile width only)."""
    font = _title_font(tile_width)
    return int(getattr(font, "size", 10) * 1.4) + 2


def _title_band(tile_width: int, n_columns: int) -> np.ndarray:
    """(band, canvas width) uint8, black titles on white, each centred over its column; a title
    wider than its tile (tiny tiles) is clipped to the tile rather than spilling into the next."""
    from PIL import Image, ImageDraw

    font = _title_font(tile_width)
    band_h = title_band_height(tile_width)
    band = np.full((band_h, n_columns * (tile_width + SEPARATOR) - SEPARATOR), 255, dtype=np.uint8)
    for col, title in enumerate(COLUMNS[:n_columns]):
        cell = Image.new("L", (tile_width, band_h), 255)
        draw = ImageDraw.Draw(cell)
        left, top, right, bottom = draw.textbbox((0, 0), title, font=font)
        x = max(0, (tile_width - (right - left)) // 2) - left
        y = (band_h - (bottom - top)) // 2 - top
        draw.text((x, y), title, fill=0, font=font)
        x0 = col * (tile_width + SEPARATOR)
        band[:, x0:x0 + tile_width] = np.asarray(cell)
    return band


def reconstruction_grid(input: torch.Tensor, mask: torch.Tensor, recon: torch.Tensor, target: torch.Tensor,
                        norm_mean: float, norm_std: float, rows: int) -> bytes:
    """PNG bytes. `input` is normalized (x - mean) / std; `mask` is at token resolution (1 = masked).
    The tiles start `title_band_height(W)` rows down, below the column titles."""
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
    band = _title_band(w, len(tiles))
    top = band.shape[0]
    canvas_shape = (top + n * (h + sep) - sep, len(tiles) * (w + sep) - sep) + (() if c == 1 else (3,))
    canvas = np.full(canvas_shape, 255, dtype=np.uint8)
    canvas[:top] = band if c == 1 else band[..., None]
    for r in range(n):
        for col, column in enumerate(tiles):
            y, x = top + r * (h + sep), col * (w + sep)
            canvas[y:y + h, x:x + w] = _to_uint8(column[r])
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()
