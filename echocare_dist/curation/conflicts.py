"""Duplicate groups whose files carry different labels (the same scan filed as benign and as
malignant; an unlabeled copy is no conflict): reported in the manifest's `label_conflicts` and
settled by curation.label_conflict:

  drop   (default) the kept image loses its anatomy labels (every node ignored): it still trains
         the MIM loss, and no arbitrary file order decides a diagnosis;
  first  the first file's labels (in sorted discovery order), the behaviour before this option;
  union  all labels of the group (their closure: a scan filed as two findings shows both).
"""
from __future__ import annotations

import json

POLICIES = ("union", "first", "drop")


def resolve(groups: dict[int, list[int]], labels_of, ref_of, policy: str) -> tuple[dict[int, tuple], list[dict]]:
    """`groups`: kept sample -> the samples dropped as its (near-)duplicates. Returns
    (kept sample -> its new labels, for groups that conflict) and the report entries."""
    if policy not in POLICIES:
        raise ValueError(f"curation.label_conflict must be one of {POLICIES}, got {policy!r}")
    overrides: dict[int, tuple] = {}
    report: list[dict] = []
    for kept, dropped in groups.items():
        kept_labels = labels_of(kept)
        # An unlabeled copy (a file in an "unsorted" folder) says nothing: only two different
        # label sets conflict.
        if len({labels_of(m) for m in [kept, *dropped]} - {()}) < 2:
            continue
        members = [kept] + list(dropped)
        union = tuple(dict.fromkeys(name for m in members for name in labels_of(m)))
        resolved = {"drop": (), "first": kept_labels, "union": union}[policy]
        if resolved != kept_labels:
            overrides[kept] = resolved
        report.append({**ref_of(kept), "labels": list(kept_labels), "resolved": list(resolved), "policy": policy,
                       "others": [{**ref_of(d), "labels": list(labels_of(d))} for d in dropped]})
    return overrides, report


def relabel(members: dict[str, bytes], labels: tuple, vector: bytes) -> dict[str, bytes]:
    """A sample's tar members with its label vector and the provenance's `labels` replaced."""
    prov = json.loads(members["json"])
    prov["labels_original"] = prov.get("labels", [])
    prov["labels"] = list(labels)
    return {**members, "lbl": vector, "json": json.dumps(prov, sort_keys=True, separators=(",", ":")).encode()}
