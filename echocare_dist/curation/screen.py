"""Which discovered files a build reads at all, and which frames are segmentation masks.

`exclude:` globs of the mapping drop files before anything is decoded (listed in the manifest
under `excluded`, not counted as rejected). Mask-like files are rejected as `mask_like`: by name
at discovery (no decode), by content per decoded still image (masklike.py); a source with
`allow_mask_like: true` skips both tests.
"""
from __future__ import annotations

import cv2
import numpy as np

from .mapping import Source
from .masklike import mask_name_pattern, mask_stats
from .media import MediaFile
from .preprocess import Rejected


def screen_files(src: Source, media: list[MediaFile], patterns) -> tuple[list[tuple[MediaFile, str]], list[str]]:
    """(kept files each with the mask-name pattern it matches or "", excluded paths)."""
    kept, excluded = [], []
    for m in media:
        if src.excluded(m.relpath) is not None:
            excluded.append(str(m.path))
            continue
        kept.append((m, "" if src.allow_mask_like else (mask_name_pattern(m.relpath, patterns) or "")))
    return kept, excluded


def check_mask_content(gray: np.ndarray, min_nonzero: int) -> None:
    """Raise Rejected('mask_like') when a decoded still image looks like a segmentation mask.
    A frame too empty to train on is left to the crop's `too_few_pixels` (an empty mask and a
    blank export are the same pixels; the older, plainer reason names it)."""
    if cv2.countNonZero(gray) < min_nonzero:
        return
    stats = mask_stats(gray)
    if stats.mask_like:
        raise Rejected("mask_like", f"looks like a segmentation mask: {stats.two_level_share:.1%} of pixels at "
                                    f"two levels, speckle contrast {stats.texture:.4f} (allow_mask_like: true "
                                    f"in the mapping keeps such files)")
