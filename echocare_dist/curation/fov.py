"""Field-of-view detection: where in a decoded frame the ultrasound image lies.

Scanner exports put patient data, depth scales, colour bars and logos around the image. Steps:
1. median blur (speckle becomes a solid region, strokes a few pixels wide vanish), threshold at
   `dark_threshold`, opening with a kernel of `min_feature` of the short side: only what is thick
   in both directions survives (the image, or its pieces when dark fluid splits it), not text
   lines, ticks, scale bars or ECG traces;
2. each surviving piece is B-mode or graphics. Graphics are flat (filled labels, logos, gray or
   colour ramps: most interior pixels equal their 3x3 median); B-mode always carries speckle.
   On real frames the relative speckle contrast of tissue can be low (BUSI tissue: 0.015-0.018,
   JPEG-smoothed), so a piece counts as textured when it is not flat, its levels vary (a noisy
   filled logo does not), it is not a 1-D gradient (a JPEG-blurred gray-scale bar is not flat
   but each of its rows is constant) AND its contrast reaches `min_texture`;
3. the content is the union of all textured pieces: pieces split apart by an anechoic cyst, a
   shadow or a dark lesion stay together (the earlier rule kept only pieces near the largest
   one's area and so cut lesions out). Fragments under BIG_PIECE of the largest piece are
   ignored. Pieces close together form a group (a closing bridges the gaps); the main group
   holds the most signal, and a group far from it is kept (a second view, tissue beyond a
   lesion at the edge) when its area reaches `component_fraction` of the main one's, else it is
   discarded;
4. the box is the bounding box of the kept pieces grown back to their full extent in the
   threshold mask (a sector's thin apex returns, detached overlays do not), plus `margin`;
5. a dim band beside the box that is still image is kept (`_faint_extension`): background is
   decided by the absence of signal, not by the gray level alone. Each border line (row or
   column) beyond the box counts as signal when over FAINT_LINE of it lies above the frame's
   noise floor (1st percentile of the median-blurred frame) + FAINT_DELTA. The box grows over
   the lines of signal adjacent to it, and to the frame's edge when the outermost lines there
   carry faint speckle (over EDGE_LINE of each line, not flat): an image already cropped to its
   field of view (BUSI: a dark deep band of faint speckle, pectoral muscle, rib shadows, under
   `dark_threshold`) has no border on that side, so what lies between is inside the FOV. A
   scanner's border is empty (flat at the floor, or thin text strokes and flat graphics), so
   sector frames keep their crop.

It fails (reason `crop_failed`) rather than return a wrong region: nothing textured (a flat
graphic, a mask, a blank band: there is no size-only fallback), textured content under
`min_content` of the frame, or a box that leaves out more than `max_discard` of the textured
area. "Signal" is the sum of (level - dark_threshold) over a piece, so a dim noisy band just
above the threshold never outweighs bright tissue.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

MAX_FLAT = 0.75     # graphics: >= this share of interior pixels equal their 3x3 median (BUSI tissue <= 0.61)
MIN_CV = 0.1        # graphics with noise on them stay near one level (std/mean ~0.01); BUSI tissue >= 0.27
MIN_2D = 0.02       # ramps, scale bars: ~0.0005 of their variance within rows or columns; BUSI tissue >= 0.1
BIG_PIECE = 0.02     # textured pieces under this share of the largest one are fragments (ignored)
MERGE_DISTANCE = 0.15  # textured pieces closer than this share of the short side belong together
FAINT_DELTA = 2      # faint signal: median-blurred level above the frame's noise floor (1st percentile) + this
FAINT_LINE = 0.3     # a border line (row/column) holding faint signal over this share continues the FOV
EDGE_LINE = 0.6      # the frame's outermost lines holding faint speckle over this share: no border on that side
EDGE_DEPTH = 0.02    # ... over this share of the frame's size (at least 2 lines)
MIN_SPECKLE = 0.5    # faint speckle: mean |level - 3x3 median| of the band (flat bars, labels: ~0)


@dataclass(frozen=True)
class FovParams:
    dark_threshold: int
    margin: int
    min_feature: float
    min_texture: float
    component_fraction: float
    max_discard: float
    min_content: float
    blank_outside: bool
    min_pixels: int = 0   # less textured content than this many pixels: too_few_pixels, not a crop fault


@dataclass(frozen=True)
class FieldOfView:
    box: tuple[int, int, int, int] | None   # x0, y0, x1, y1 (exclusive); None when it failed
    mask: np.ndarray | None                 # uint8 content hull (for blanking), None when blanking is off
    discarded: float                        # share of the textured signal outside the box
    content: float                          # textured area / frame area
    failure: str = ""                       # why there is no box ("" when there is one)
    reason: str = "crop_failed"             # the manifest reason of a failure


def _odd(n: float) -> int:
    return max(3, int(round(n)) | 1)


def _piece_stats(gray: np.ndarray, cores: np.ndarray, labels: np.ndarray, n: int):
    """Per piece (index 1..n-1): interior relative speckle contrast, flat share and coefficient of
    variation (std / mean level)."""
    inner = labels * cv2.erode(cores, np.ones((5, 5), np.uint8))
    has_interior = np.bincount(inner.ravel(), minlength=n) > 0
    region = np.where(has_interior[labels], inner, labels)  # too thin for an interior: use all of it
    deviation = cv2.absdiff(gray, cv2.medianBlur(gray, 3))
    flat_px = np.bincount(region.ravel(), weights=(deviation == 0).ravel(), minlength=n)[1:]
    count = np.maximum(np.bincount(region.ravel(), minlength=n)[1:], 1)
    dev_sum = np.bincount(region.ravel(), weights=deviation.ravel(), minlength=n)[1:]
    level_sum = np.bincount(region.ravel(), weights=gray.ravel(), minlength=n)[1:]
    square_sum = np.bincount(region.ravel(), weights=np.square(gray, dtype=np.float64).ravel(), minlength=n)[1:]
    mean = level_sum / count
    total_var = np.maximum(square_sum - level_sum * mean, 0.0)
    cv = np.sqrt(total_var / count) / np.maximum(mean, 1.0)
    # Share of the variance left inside rows (or columns): ~0 for a ramp, a scale bar or any
    # 1-D gradient (each row constant), large for tissue, even layered tissue.
    h, w = gray.shape
    rows = np.broadcast_to(np.arange(h)[:, None], (h, w)).ravel()
    cols = np.broadcast_to(np.arange(w)[None, :], (h, w)).ravel()
    lab, g = region.ravel(), gray.ravel().astype(np.float64)
    within = []
    for line, size in ((rows, h), (cols, w)):
        key = lab * size + line
        c = np.bincount(key, minlength=n * size)
        s1 = np.bincount(key, weights=g, minlength=n * size)
        s2 = np.bincount(key, weights=g * g, minlength=n * size)
        v = (s2 - s1 * s1 / np.maximum(c, 1)).reshape(n, size).sum(1)[1:]
        within.append(v)
    two_d = np.minimum(*within) / np.maximum(total_var, 1e-9)
    return dev_sum / np.maximum(level_sum, 1.0), flat_px / count, cv, two_d


def _faint_extension(signal: np.ndarray, dev: np.ndarray, size: int) -> int:
    """Lines to add beyond one side of the box. `signal` (faint-signal mask) and `dev` (|level -
    3x3 median|) hold the strip from the box outwards: line 0 next to the box, the last line at
    the frame's edge; `size` is the frame's extent across those lines."""
    n = signal.shape[0]
    if n == 0 or signal.shape[1] == 0:
        return 0
    share = signal.mean(axis=1)
    edge = min(n, max(2, int(round(EDGE_DEPTH * size))))
    if (share[-edge:] >= EDGE_LINE).all() and dev[-edge:].mean() >= MIN_SPECKLE:
        return n   # the image runs to the frame's edge: no border on this side
    # Otherwise the lines of faint signal adjacent to the box (up to the first empty one).
    return int(np.argmin(np.append(share >= FAINT_LINE, False)))


def detect_fov(gray: np.ndarray, p: FovParams) -> FieldOfView:
    h, w = gray.shape
    short = min(h, w)
    smooth = cv2.medianBlur(gray, _odd(short * 0.01))
    fg = (smooth > p.dark_threshold).astype(np.uint8)
    k = _odd(short * p.min_feature)
    cores = cv2.morphologyEx(fg, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (k, k)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(cores, connectivity=8)
    if n <= 1:
        return FieldOfView(None, None, 0.0, 0.0, f"no content above curation.dark_threshold={p.dark_threshold}",
                           reason="too_few_pixels")
    texture, flat, cv, two_d = _piece_stats(gray, cores, labels, n)
    # min_texture 0 turns the test off: every thick piece is content (and kept).
    textured = ((texture >= p.min_texture) & (flat < MAX_FLAT) & (cv >= MIN_CV) & (two_d >= MIN_2D)
                if p.min_texture > 0 else np.ones(n - 1, bool))
    if not textured.any():
        return FieldOfView(None, None, 0.0, 0.0,
                           f"no textured content (pieces are flat graphics: max speckle contrast "
                           f"{texture.max():.4f}, min flat share {flat.min():.2f})")
    # Signal of each piece: how far above the background its pixels are.
    above = np.clip(gray.astype(np.float64) - p.dark_threshold, 0, None)
    content_px = int(stats[1:, cv2.CC_STAT_AREA][textured].sum())
    content = content_px / (h * w)
    if content_px < p.min_pixels:
        return FieldOfView(None, None, 0.0, content, f"{content_px} pixels of textured content < "
                           f"curation.min_nonzero={p.min_pixels}", reason="too_few_pixels")
    if content < p.min_content:
        return FieldOfView(None, None, 0.0, content,
                           f"textured content covers {content:.2%} of the frame < curation.crop_min_content="
                           f"{p.min_content:g}")
    # Group textured pieces that lie close together (a closing bridges the dark gaps between them).
    # The main group holds the most signal; another group is a second view when its area reaches
    # `component_fraction` of the main group's (a dual view, or tissue beyond a lesion at the
    # edge); otherwise it is left out and counted as discarded.
    # Fragments (textured pieces under BIG_PIECE of the largest one: specks of noise in the dark
    # depth, the faint corners of a fan that come and go with noise) neither widen the box nor
    # count as discarded, so near-duplicates keep the same crop.
    areas = stats[1:, cv2.CC_STAT_AREA]
    textured &= areas >= BIG_PIECE * areas[textured].max()
    tex_mask = textured.astype(np.uint8)[np.maximum(labels - 1, 0)] * (labels > 0).astype(np.uint8)
    d = _odd(short * MERGE_DISTANCE)
    closed = cv2.morphologyEx(tex_mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (d, d)))
    n_g, groups = cv2.connectedComponents(closed, connectivity=8)
    group_signal = np.bincount(groups.ravel(), weights=(above * tex_mask).ravel(), minlength=n_g)
    group_signal[0] = 0
    group_area = np.bincount(groups.ravel(), weights=tex_mask.ravel(), minlength=n_g)
    main_area = group_area[int(np.argmax(group_signal))]
    kept_groups = group_area >= (p.component_fraction * main_area if p.min_texture > 0 else 0)
    kept_groups[0] = False
    kept = tex_mask.astype(bool) & kept_groups[groups]
    # Grow the kept pieces back to their full connected extent in `fg` (morphological
    # reconstruction): a sector's thin apex, a needle return; detached overlays do not. (Growing
    # from fragments too would let a fan's faint corner reach a depth scale and a logo.)
    kept_piece = np.zeros(n, bool)
    kept_piece[1:] = np.bincount(labels[kept], minlength=n)[1:] > 0
    n_fg, fg_labels = cv2.connectedComponents(fg, connectivity=8)
    fg_kept = np.bincount(fg_labels[kept_piece[labels]], minlength=n_fg) > 0
    fg_kept[0] = False
    region = fg_kept.astype(np.uint8)[fg_labels]
    x, y, bw, bh = cv2.boundingRect(region)
    # A dim band beside the box that is still image (step 5): grow the box (and the region, so
    # that blanking keeps it) over it.
    floor = float(np.percentile(smooth, 1))
    faint = (smooth > floor + FAINT_DELTA).astype(np.float32)
    dev = cv2.absdiff(gray, cv2.medianBlur(gray, 3)).astype(np.float32)
    x1, y1 = x + bw, y + bh
    down = _faint_extension(faint[y1:, x:x1], dev[y1:, x:x1], h)
    up = _faint_extension(faint[:y][::-1, x:x1], dev[:y][::-1, x:x1], h)
    ny0, ny1 = y - up, y1 + down
    right = _faint_extension(faint[ny0:ny1, x1:].T, dev[ny0:ny1, x1:].T, w)
    left = _faint_extension(faint[ny0:ny1, :x][:, ::-1].T, dev[ny0:ny1, :x][:, ::-1].T, w)
    if up or down or left or right:
        region = region.copy()
        region[ny0:y, x:x1] = 1
        region[y1:ny1, x:x1] = 1
        region[ny0:ny1, x - left:x] = 1
        region[ny0:ny1, x1:x1 + right] = 1
        x, y, bw, bh = x - left, ny0, bw + left + right, ny1 - ny0
    m = p.margin
    box = (max(0, x - m), max(0, y - m), min(w, x + bw + m), min(h, y + bh + m))
    inside = np.zeros((h, w), bool)
    inside[box[1]:box[3], box[0]:box[2]] = True
    # Discarded: the share of the textured area outside the box.
    discarded = float(tex_mask[~inside].sum()) / max(int(tex_mask.sum()), 1)
    if discarded > p.max_discard:
        return FieldOfView(box, None, discarded, content,
                           f"the crop would leave out {discarded:.1%} of the textured content "
                           f"> curation.crop_max_discard={p.max_discard:g}")
    if not p.blank_outside:
        return FieldOfView(box, None, discarded, content)
    # Blank outside the convex hull of the content: the image and whatever lies between its pieces
    # (dark fluid) stay, glyphs in the box's corners beside a convex sector go.
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    hull = cv2.convexHull(np.concatenate(contours))
    mask = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(mask, hull, 1)
    if m:
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_RECT, (2 * m + 1, 2 * m + 1)))
    return FieldOfView(box, mask, discarded, content)
