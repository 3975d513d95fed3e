"""Burned-in text inside the kept region, found without OCR (docs/deid.md).

Scanner exports often print the patient's name, an ID or a date *inside* the image, where no
crop removes it. Reading it would need an OCR model; recognising that it is there does not.
Printed glyphs differ from ultrasound speckle in three ways this detector relies on:

1. strokes: thin (a few pixels), bright and flat, standing well above their surroundings. A white
   top-hat (the image minus its morphological opening) keeps exactly the bright structures
   thinner than its kernel, and a flat-topped stroke fills most of its box at one grey level,
   where a speckle grain is a graded peak; between the strokes lies a darker ground, where
   saturated tissue is as bright between its grains;
2. glyph shape: a character is a connected component of a certain height, not much wider than
   tall, and hollow (strokes cover a fraction of its box), where a speckle grain is small and a
   tissue interface is long and thin;
3. lines: characters sit side by side on one baseline with similar heights and small gaps.
   Three or more such components in a row are a line of text; chance alignments of speckle
   grains that also pass 1 and 2 are rare (measured: docs/deid.md).

The result is a list of boxes (x0, y0, x1, y1) in the frame given. `blank_boxes` zeroes them
(the builder's `curation.burned_in_text=blank`); by default the samples are only flagged for
`echocare shards audit`, because a box can also be a caliper label or a body marker.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

@dataclass(frozen=True)
class TextParams:
    levels: tuple[int, ...] = (150, 200, 240)  # glyphs are printed bright (white, yellow, light grey)
    min_contrast: int = 70      # above the local background (white top-hat)
    kernel: int = 11            # strokes thinner than this survive the top-hat
    min_height: int = 6         # glyph height in pixels of the frame given
    max_height: int = 48
    max_aspect: float = 1.6     # width / height of one glyph (wider: a line or an interface, not a glyph)
    min_fill: float = 0.12      # share of the glyph's box its strokes cover
    max_fill: float = 0.80
    flat_range: int = 48        # grey levels around the glyph's brightest value counted as "on the stroke"
    min_flat: float = 0.55      # share of the glyph's pixels within flat_range of its top value
    min_glyphs: int = 3         # glyphs in one line to call it text
    max_lit_background: float = 0.06  # share of the glyph box outside its strokes as bright as them
    pad: int = 2                # pixels added around a reported box


@dataclass(frozen=True)
class _Glyph:
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def h(self) -> int:
        return self.y1 - self.y0


def _glyphs(gray: np.ndarray, tophat: np.ndarray, level: int, p: TextParams) -> list[_Glyph]:
    strokes = ((gray >= level) & (tophat >= p.min_contrast)).astype(np.uint8)
    if not strokes.any():
        return []
    n, labels, stats, _ = cv2.connectedComponentsWithStats(strokes, connectivity=8)
    # Speckle gives thousands of components: the box tests run on all of them at once.
    w_, h_, area_ = (stats[1:, k].astype(np.float64) for k in (cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT,
                                                               cv2.CC_STAT_AREA))
    fill_ = area_ / (w_ * h_)
    ok = ((h_ >= p.min_height) & (h_ <= p.max_height) & (w_ <= p.max_aspect * h_)
          & (fill_ >= p.min_fill) & (fill_ <= p.max_fill))
    out = []
    for i in np.flatnonzero(ok) + 1:
        x, y, w, h = (int(v) for v in stats[i, :4])
        window, mine = gray[y:y + h, x:x + w], labels[y:y + h, x:x + w] == i
        values, around = window[mine], window[~mine]
        top = int(values.max())
        if np.count_nonzero(values >= top - p.flat_range) < p.min_flat * values.size:
            continue
        # Printed strokes lie on a darker ground; saturated tissue (a bright organ) is bright
        # between its grains too.
        if around.size and np.count_nonzero(around >= level) > p.max_lit_background * around.size:
            continue
        out.append(_Glyph(x, y, x + w, y + h))
    return out


def _aligned(chain: list[_Glyph]) -> int:
    """The most glyphs of `chain` sharing one baseline (or one cap line) to within a pixel or so,
    and one height: print has them, where chance chains of speckle grains drift up and down."""
    tol = max(1, round(0.12 * float(np.median([g.h for g in chain]))))
    best = 0
    for ref in chain:
        for edge in (lambda g: g.y1, lambda g: g.y0):
            # ... and of one height (a font's capitals, or its lower case), to a quarter.
            best = max(best, sum(abs(edge(g) - edge(ref)) <= tol and 0.8 <= g.h / ref.h <= 1.25 for g in chain))
    return best


def _lines(glyphs: list[_Glyph], p: TextParams) -> list[list[_Glyph]]:
    """Chains of glyphs left to right: similar height, overlapping rows, gaps under ~1.5 heights."""
    glyphs = sorted(glyphs, key=lambda g: (g.x0, g.y0))
    used = [False] * len(glyphs)
    lines = []
    for i, g in enumerate(glyphs):
        if used[i]:
            continue
        chain, last = [g], g
        used[i] = True
        for j in range(i + 1, len(glyphs)):
            c = glyphs[j]
            if used[j]:
                continue
            if c.x0 - last.x1 > 1.5 * max(last.h, c.h):
                if c.x0 - last.x1 > 3 * p.max_height:
                    break
                continue
            similar = 0.6 <= c.h / last.h <= 1.0 / 0.6
            base = abs(c.y1 - last.y1) <= 0.3 * max(c.h, last.h) or abs(c.y0 - last.y0) <= 0.3 * max(c.h, last.h)
            if similar and base and c.x0 >= last.x0 + 1:
                chain.append(c)
                used[j] = True
                last = c
        if len(chain) >= p.min_glyphs and _aligned(chain) >= p.min_glyphs:
            lines.append(chain)
    return lines


def find_text_boxes(gray: np.ndarray, p: TextParams = TextParams()) -> list[tuple[int, int, int, int]]:
    """Boxes (x0, y0, x1, y1) of lines of burned-in text in a 2-D uint8 frame; [] when none."""
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 frame, got {gray.dtype} {gray.shape}")
    h, w = gray.shape
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (p.kernel, p.kernel))
    tophat = cv2.morphologyEx(gray, cv2.MORPH_TOPHAT, kernel)
    boxes: list[tuple[int, int, int, int]] = []
    # Several levels: at a low one, white text over bright speckle merges with the grains next to
    # its strokes; at a high one, grey text disappears. A line found at any level counts.
    for level in p.levels:
        for line in _lines(_glyphs(gray, tophat, level, p), p):
            # One glyph height to each side: the ends of a line (thin glyphs, a lower-case tail)
            # are the likeliest to be missed, and `blank` must not leave half a name.
            side = p.pad + max(g.h for g in line)
            box = (max(0, min(g.x0 for g in line) - side), max(0, min(g.y0 for g in line) - p.pad),
                   min(w, max(g.x1 for g in line) + side), min(h, max(g.y1 for g in line) + p.pad))
            boxes = _merge(boxes, box)
    return sorted(boxes, key=lambda b: (b[1], b[0]))


def _merge(boxes: list, box: tuple) -> list:
    """`boxes` with `box` added, overlapping boxes joined into one."""
    keep = []
    for b in boxes:
        if b[0] < box[2] and box[0] < b[2] and b[1] < box[3] and box[1] < b[3]:
            box = (min(b[0], box[0]), min(b[1], box[1]), max(b[2], box[2]), max(b[3], box[3]))
        else:
            keep.append(b)
    return keep + [box]


def blank_boxes(gray: np.ndarray, boxes) -> np.ndarray:
    """A copy of `gray` with every box set to 0 (what the crop does to the border: black is background)."""
    out = np.array(gray, copy=True)
    for x0, y0, x1, y1 in boxes:
        out[y0:y1, x0:x1] = 0
    return out
