"""PNG figures of the landmark, detection and enhancement tasks (OpenCV, like plots.py):
ground truth in green, prediction in magenta, drawn on the original image scaled to a tile."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ..plots import _text, _write

TRUE, PRED = (0, 200, 0), (255, 0, 255)
COLS = 4


def _tile(gray: np.ndarray, tile: int) -> tuple[np.ndarray, float, float]:
    h, w = gray.shape
    img = cv2.cvtColor(cv2.resize(gray, (tile, tile), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
    return img, tile / w, tile / h


def _sheet(tiles: list[tuple[np.ndarray, str]], path: Path, cols: int = COLS) -> Path:
    th, tw = tiles[0][0].shape[:2] if tiles else (64, 64)
    rows = max((len(tiles) + cols - 1) // cols, 1)
    sheet = np.full((rows * (th + 20), cols * tw, 3), 255, np.uint8)
    for n, (img, caption) in enumerate(tiles):
        r, c = divmod(n, cols)
        y = r * (th + 20)
        sheet[y:y + th, c * tw:(c + 1) * tw] = img
        _text(sheet, caption[:34], (c * tw + 3, y + th + 14), 0.38)
    return _write(path, sheet)


def points_png(items, names: list[str], path: Path, tile: int = 192) -> Path:
    """items: (gray, true (K, 2), predicted (K, 2), caption); a line joins each pair."""
    tiles = []
    for gray, truth, pred, caption in items:
        img, sx, sy = _tile(gray, tile)
        for (tx, ty), (px, py) in zip(truth, pred):
            t = (int(round((tx + 0.5) * sx)), int(round((ty + 0.5) * sy)))
            p = (int(round((px + 0.5) * sx)), int(round((py + 0.5) * sy)))
            cv2.line(img, t, p, (0, 200, 255), 1, cv2.LINE_AA)
            cv2.circle(img, t, 3, TRUE, -1, cv2.LINE_AA)
            cv2.drawMarker(img, p, PRED, cv2.MARKER_CROSS, 8, 1, cv2.LINE_AA)
        tiles.append((img, caption))
    return _sheet(tiles, path)


def _contours(img: np.ndarray, masks, colour) -> None:
    """Outlines of boolean masks of the original image, drawn on its tile."""
    for m in masks:
        small = cv2.resize(m.astype(np.uint8), img.shape[1::-1], interpolation=cv2.INTER_NEAREST)
        found, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(img, found, -1, colour, 1, cv2.LINE_AA)


def boxes_png(items, class_names: list[str], path: Path, tile: int = 192, masks=None) -> Path:
    """items: (gray, true boxes (N, 5: x1 y1 x2 y2 class), predicted (M, 6: + score), caption);
    masks: per item (true masks, predicted masks), boolean arrays of the original image, outlined."""
    tiles = []
    for n, (gray, truth, pred, caption) in enumerate(items):
        img, sx, sy = _tile(gray, tile)
        if masks is not None:
            _contours(img, masks[n][0], TRUE)
            _contours(img, masks[n][1], PRED)
        for boxes, colour in ((truth, TRUE), (pred, PRED)):
            for b in boxes:
                p1 = (int(round(b[0] * sx)), int(round(b[1] * sy)))
                p2 = (int(round(b[2] * sx)), int(round(b[3] * sy)))
                cv2.rectangle(img, p1, p2, colour, 1)
                label = class_names[int(b[4])][:8] if len(class_names) > 1 else ""
                if len(b) > 5:
                    label = f"{label} {b[5]:.2f}".strip()
                if label:
                    _text(img, label, (p1[0] + 2, max(p1[1] - 3, 10)), 0.35, colour)
        tiles.append((img, caption))
    return _sheet(tiles, path)


def before_after_png(items, path: Path, tile: int = 160) -> Path:
    """items: (input, enhanced, reference or None, caption), each (S, S) float in [0, 1]; one row
    per image: input | enhanced | reference."""
    tiles = []
    for low, out, ref, caption in items:
        for img, what in ((low, "input"), (out, "enhanced"), (ref, "reference")):
            if img is None:
                blank = np.full((tile, tile, 3), 235, np.uint8)
                _text(blank, "no reference", (10, tile // 2), 0.45)
                tiles.append((blank, f"{what}"))
                continue
            g = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
            tiles.append((cv2.cvtColor(cv2.resize(g, (tile, tile), interpolation=cv2.INTER_LINEAR),
                                       cv2.COLOR_GRAY2BGR), f"{what} {caption}" if what == "enhanced" else what))
    return _sheet(tiles, path, cols=3)
