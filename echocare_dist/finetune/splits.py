"""Group-aware train/val splits and K-fold cross-validation (SPEC 9).

Two files that show one scan must land on the same side, or validation measures memory:
- exact duplicates: the same decoded pixels (the curation pixel hash, so a PNG and its JPEG
  re-save are only caught by the next rule);
- near-duplicates: 64-bit DCT pHash within `finetune.split_similarity` (the curation hash and
  multi-index search, calipers on/off, small shifts, re-encodes).
Each sample starts as its own group; matches are merged with union-find. The near-duplicate
search is greedy (a hash is compared against the kept representatives), the same rule as the
shard builder, so the groups are what curation would call one image.

Classification splits are stratified: a group counts for its majority class and each class's
groups are dealt to the folds that hold the fewest of that class so far (largest groups first),
so every fold keeps the class mix. Groups whose members carry different labels are counted and
logged: the same scan with two labels is a labelling problem the user must hear about.
"""
from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

from ..curation.neardup import NearDuplicateIndex
from ..curation.preprocess import phash64, pixel_key
from .data import DataError, Sample, TaskData, read_gray
from .discovery import read_split_file

log = logging.getLogger(__name__)


@dataclass
class Grouping:
    group_of: list[int]          # sample index -> group id (the smallest member index)
    exact_pairs: int             # samples merged because their pixels are identical
    near_pairs: int              # samples merged because their pHash is within the distance
    conflicting_groups: int      # groups whose members have different classification labels

    @property
    def num_groups(self) -> int:
        return len(set(self.group_of))


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def _union(parent: list[int], a: int, b: int) -> bool:
    ra, rb = _find(parent, a), _find(parent, b)
    if ra == rb:
        return False
    parent[max(ra, rb)] = min(ra, rb)
    return True


def group_samples(samples: list[Sample], similarity: float, classification: bool) -> Grouping:
    """Duplicate groups of `samples`; `similarity` >= 1 merges exact duplicates only."""
    parent = list(range(len(samples)))
    by_key: dict[str, int] = {}
    index = NearDuplicateIndex(similarity) if similarity < 1.0 else None
    exact = near = 0
    for i, s in enumerate(samples):
        img = read_gray(s.image)
        key = pixel_key(img)
        if key in by_key:
            exact += _union(parent, by_key[key], i)
            continue
        by_key[key] = i
        if index is not None:
            j = index.add(phash64(img), i)
            if j is not None:
                near += _union(parent, j, i)
    group_of = [_find(parent, i) for i in range(len(samples))]
    conflicts = 0
    if classification:
        labels: dict[int, set] = defaultdict(set)
        for g, s in zip(group_of, samples):
            labels[g].add(s.target)
        conflicts = sum(1 for v in labels.values() if len(v) > 1)
    return Grouping(group_of, exact, near, conflicts)


def _groups_by_class(samples: list[Sample], grouping: Grouping, classification: bool):
    """(group -> its sample indices, majority class -> its groups); one stratum without classes."""
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(grouping.group_of):
        members[g].append(i)
    strata: dict[object, list[int]] = defaultdict(list)
    for g, idx in members.items():
        label = Counter(samples[i].target for i in idx).most_common(1)[0][0] if classification else 0
        strata[label].append(g)
    return members, strata


def assign_folds(samples: list[Sample], grouping: Grouping, folds: int, seed: int,
                 classification: bool) -> list[int]:
    """sample index -> fold in [0, folds); whole groups per fold, stratified by majority class."""
    members, strata = _groups_by_class(samples, grouping, classification)
    rng = random.Random(seed)
    fold_of = [0] * len(samples)
    for label in sorted(strata, key=str):
        groups = strata[label]
        rng.shuffle(groups)
        groups.sort(key=lambda g: -len(members[g]))  # stable: equal sizes keep the shuffled order
        load = [0] * folds
        start = rng.randrange(folds)  # which fold gets the first (largest) group varies per class
        for g in groups:
            k = min(range(folds), key=lambda f: (load[f], (f - start) % folds))
            load[k] += len(members[g])
            for i in members[g]:
                fold_of[i] = k
    return fold_of


def holdout_fold(samples: list[Sample], grouping: Grouping, val_fraction: float, seed: int,
                 classification: bool) -> list[bool]:
    """sample index -> is validation, about `val_fraction` of each class, whole groups only."""
    members, strata = _groups_by_class(samples, grouping, classification)
    rng = random.Random(seed)
    is_val = [False] * len(samples)
    for label in sorted(strata, key=str):
        groups = strata[label]
        rng.shuffle(groups)
        total = sum(len(members[g]) for g in groups)
        want = int(round(total * val_fraction))
        if len(groups) >= 2:
            want = max(want, 1)  # every class with two groups gets a validation sample
        taken = 0
        for n, g in enumerate(groups):
            if taken >= want or n == len(groups) - 1:
                break  # the last group always stays in training
            taken += len(members[g])
            for i in members[g]:
                is_val[i] = True
    return is_val


def make_splits(task: TaskData, ft) -> list[tuple[list[Sample], list[Sample]]]:
    """[(train, val)] once, or once per fold with `finetune.folds` >= 2."""
    classification = task.class_names is not None
    samples = task.samples
    grouping = group_samples(samples, ft.split_similarity, classification)
    log.info("split groups: %d samples in %d groups (%d merged as exact duplicates, %d as near-duplicates "
             "at pHash similarity >= %.2f)", len(samples), grouping.num_groups, grouping.exact_pairs,
             grouping.near_pairs, ft.split_similarity)
    if grouping.conflicting_groups:
        log.warning("%d duplicate group(s) carry different class labels (the same scan filed under two "
                    "classes); they stay on one side of the split but their labels disagree",
                    grouping.conflicting_groups)
    if ft.folds >= 2:
        if grouping.num_groups < ft.folds:
            raise DataError(f"finetune.folds={ft.folds} but the data has only {grouping.num_groups} distinct "
                            f"image group(s) after duplicate grouping")
        fold_of = assign_folds(samples, grouping, ft.folds, ft.seed, classification)
        parts = [([s for s, f in zip(samples, fold_of) if f != k], [s for s, f in zip(samples, fold_of) if f == k])
                 for k in range(ft.folds)]
    else:
        is_val = holdout_fold(samples, grouping, ft.val_fraction, ft.seed, classification)
        parts = [([s for s, v in zip(samples, is_val) if not v], [s for s, v in zip(samples, is_val) if v])]
    for k, (train, val) in enumerate(parts):
        if not train or not val:
            raise DataError(f"the split{f' (fold {k + 1})' if len(parts) > 1 else ''} leaves {len(train)} training "
                            f"and {len(val)} validation samples (of {len(samples)}, {grouping.num_groups} groups); "
                            f"both must be non-empty")
    return parts


def splits_for(task: TaskData, ft, resolve_path) -> list[tuple[list[Sample], list[Sample]]]:
    """The user's split file when set (one split), else the group-aware seeded split(s)."""
    if ft.split_file:
        return [read_split_file(task, resolve_path(ft.split_file))]
    return make_splits(task, ft)
