"""`verify_shards`: prove a shard directory is what its manifest says, sample by sample.

Checks, each reported as a readable problem rather than an exception:
- the manifest lists exactly the tars on disk; sizes and sha256 match; counts add up;
- each index is the text `wds2idx` would write for its tar, and every offset in it points at
  the tar header of the member it names (read back from the raw bytes);
- every sample has jpg + lbl + json; the key is 16 hex chars and unique across all shards;
  the .jpg matches the checksum its provenance records (shardfmt CHECKSUM_KEY);
  the JPEG decodes to 8-bit grayscale of the size the provenance states; the label vector has
  C entries in {-1, 0, 1}, and (given the ontology) equals the closure of the provenance labels;
  the ontology hash matches everywhere; in a de-identified set (manifest `deid`), every sample of
  a hidden source stores a path id, never a path (docs/deid.md);
- per-source and per-node counts recomputed from the samples equal the manifest's.
Whatever a damaged file does (offsets 0 or past the end, garbage, wrong counts, unreadable), it
is a finding of its shard, never an exception out of `verify_shards`.
"""
from __future__ import annotations

import json
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np

from ..atomic import file_sha256
from ..ontology import Ontology
from ..shardfmt import (PROVENANCE_KEYS, SAMPLE_EXTS, SAMPLE_KEY_RE, SHARD_RE, Manifest, SampleError, ShardEntry,
                        ShardError, ShardReader, checksum_problem, index_text, keys_digest)
from .deid import PATH_ID_RE

MAX_PROBLEMS_PER_SHARD = 20


class ShardVerifyError(RuntimeError):
    pass


@dataclass
class VerifyReport:
    shard_dir: Path
    problems: list[str] = field(default_factory=list)
    num_shards: int = 0
    num_samples: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"{self.shard_dir}: OK ({self.num_samples} samples in {self.num_shards} shards verified)"
        lines = [f"{self.shard_dir}: {len(self.problems)} problem(s):"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)

    def raise_if_failed(self) -> "VerifyReport":
        if not self.ok:
            raise ShardVerifyError(self.summary())
        return self


def verify_shard(tar: Path, entry: ShardEntry, num_nodes: int, ontology_hash: str,
                 ontology: Ontology | None, hidden_sources: frozenset = frozenset()) -> dict:
    """Check one tar + index against its manifest entry; returns problems and what it holds."""
    problems: list[str] = []
    out = {"problems": problems, "keys": [], "per_source": Counter(),
           "positives": np.zeros(num_nodes, dtype=np.int64), "samples": 0}
    name = tar.name
    idx = tar.with_suffix(".idx")
    if not tar.is_file():
        problems.append(f"{name}: missing")
        return out
    if not idx.is_file():
        problems.append(f"{name}: index {idx.name} missing")
        return out
    size = tar.stat().st_size
    if size != entry.bytes:
        problems.append(f"{name}: {size} bytes, manifest says {entry.bytes}")
    if file_sha256(tar) != entry.sha256:
        problems.append(f"{name}: sha256 differs from the manifest")
    try:
        expected_idx = index_text(tar)
    except Exception as exc:  # noqa: BLE001 - an unreadable tar is a finding, not a crash
        problems.append(f"{name}: cannot read as a tar: {type(exc).__name__}: {exc}")
        return out
    if idx.read_bytes() != expected_idx.encode():
        problems.append(f"{idx.name}: differs from the index of {name} (as wds2idx would write it)")
    reader = ShardReader(tar, idx)
    try:
        samples = reader.samples
    except ShardError as exc:
        problems.append(str(exc))
        return out
    out["samples"] = len(samples)
    if any(s.key is None for s in samples):
        problems.append(f"{idx.name}: a v1.1 index (no member names): the samples cannot be matched to "
                        f"their keys; the builder writes v1.2 (rebuild, or rewrite it with wds2idx)")
        return out
    if len(samples) != entry.samples:
        problems.append(f"{name}: {len(samples)} samples, manifest says {entry.samples}")
    keys = [s.key for s in samples]
    out["keys"] = keys
    if entry.keys_sha256 is not None and keys_digest(keys) != entry.keys_sha256:
        problems.append(f"{name}: sample keys differ from the manifest")

    def bad(msg: str) -> None:
        if len(problems) < MAX_PROBLEMS_PER_SHARD:
            problems.append(f"{name}: {msg}")
        elif len(problems) == MAX_PROBLEMS_PER_SHARD:
            problems.append(f"{name}: further problems not listed")

    with reader:
        for key, comps, _ in samples:
            if not SAMPLE_KEY_RE.match(key or ""):
                bad(f"key {key!r} is not 16 hex characters")
            missing = [e for e in SAMPLE_EXTS if e not in comps]
            if missing:
                bad(f"sample {key} lacks {missing}")
                continue
            data = {}
            try:
                for ext, (offset, length) in comps.items():
                    member, member_size = reader.member_at(offset)
                    if member != f"{key}.{ext}" or member_size != length:
                        bad(f"index entry {key}.{ext} at {offset} points at {member!r} ({member_size} bytes)")
                    data[ext] = reader.read_at(offset, length, f"{name}/{key}.{ext}")
            except SampleError as exc:
                bad(str(exc))
                continue
            try:
                prov = json.loads(data["json"])
            except ValueError as exc:
                bad(f"sample {key}: provenance is not JSON ({exc})")
                continue
            missing_keys = [k for k in PROVENANCE_KEYS if k not in prov]
            if missing_keys:
                bad(f"sample {key}: provenance lacks {missing_keys}")
                continue
            if prov["source"] in hidden_sources and not (prov.get("deid") and PATH_ID_RE.match(str(prov["path"]))):
                bad(f"sample {key}: source {prov['source']!r} is de-identified, but the sample stores a path, "
                    f"not a path id")
            if prov["ontology_hash"] != ontology_hash:
                bad(f"sample {key}: ontology hash {prov['ontology_hash']} != {ontology_hash}")
            damaged = checksum_problem(data["jpg"], prov)
            if damaged:
                bad(f"sample {key}: {damaged}")
            img = cv2.imdecode(np.frombuffer(data["jpg"], np.uint8), cv2.IMREAD_UNCHANGED)
            if img is None:
                bad(f"sample {key}: JPEG does not decode")
            elif img.ndim != 2 or img.dtype != np.uint8:
                bad(f"sample {key}: JPEG is not 8-bit grayscale ({img.dtype}, shape {img.shape})")
            elif (img.shape[1], img.shape[0]) != (prov["width"], prov["height"]):
                bad(f"sample {key}: JPEG is {img.shape[1]}x{img.shape[0]}, provenance says "
                    f"{prov['width']}x{prov['height']}")
            lbl = np.frombuffer(data["lbl"], np.int8)
            if lbl.size != num_nodes:
                bad(f"sample {key}: label vector has {lbl.size} entries, the ontology {num_nodes}")
                continue
            if not np.isin(lbl, (-1, 0, 1)).all():
                bad(f"sample {key}: label values outside {{-1, 0, 1}}")
            if ontology is not None:
                try:
                    expected = ontology.label_vector(prov["labels"])
                except ValueError as exc:
                    bad(f"sample {key}: {exc}")
                else:
                    if not np.array_equal(expected, lbl):
                        bad(f"sample {key}: label vector is not the closure of {prov['labels']}")
            out["positives"] += lbl == 1
            out["per_source"][prov["source"]] += 1
    return out


def _verify_shard_star(args) -> dict:
    try:
        return verify_shard(*args)
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file raises is a finding of its shard
        num_nodes = args[2]
        return {"problems": [f"{args[0].name}: cannot be verified: {type(exc).__name__}: {exc}"], "keys": [],
                "per_source": Counter(), "positives": np.zeros(num_nodes, dtype=np.int64), "samples": 0}


def verify_shards(shard_dir: Path, ontology: Ontology | None = None, workers: int = 1) -> VerifyReport:
    """Decode and check every sample of a shard directory; never raises for what it finds."""
    shard_dir = Path(shard_dir)
    report = VerifyReport(shard_dir)
    problems = report.problems
    try:
        manifest = Manifest.read(shard_dir)
    except ShardError as exc:
        problems.append(str(exc))
        return report
    onto_hash, num_nodes = manifest.ontology_hash, manifest.ontology_nodes
    if ontology is not None and ontology.hash != onto_hash:
        problems.append(f"ontology hash {ontology.hash} of the given ontology != {onto_hash} of the shards "
                        f"({len(ontology)} vs {num_nodes} nodes); label checks use the manifest only")
        ontology = None  # every label would 'differ': one clear problem instead of thousands

    listed = [s.name for s in manifest.shards]
    on_disk = sorted(p.name for p in shard_dir.iterdir() if SHARD_RE.match(p.name) and p.suffix == ".tar")
    for extra in sorted(set(on_disk) - set(listed)):
        problems.append(f"{extra}: on disk but not in the manifest")
    deid = manifest.deid or {}
    hidden = frozenset(deid.get("sources", [])) if deid.get("enabled") else frozenset()
    jobs = [(shard_dir / s.name, s, num_nodes, onto_hash, ontology, hidden) for s in manifest.shards]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(_verify_shard_star, jobs))
    else:
        results = [_verify_shard_star(job) for job in jobs]

    seen: dict[str, str] = {}
    positives = np.zeros(num_nodes, dtype=np.int64)
    per_source: Counter = Counter()
    for job, res in zip(jobs, results):
        problems += res["problems"]
        report.num_samples += res["samples"]
        positives += res["positives"]
        per_source.update(res["per_source"])
        for key in res["keys"]:
            if key in seen:
                problems.append(f"key {key} appears in {seen[key]} and {job[0].name}")
            seen.setdefault(key, job[0].name)
    report.num_shards = len(jobs)
    if report.num_samples != manifest.num_samples:
        problems.append(f"{report.num_samples} samples in the shards, manifest says {manifest.num_samples}")
    names = manifest.ontology_names or (list(ontology.names) if ontology is not None else None)
    if names is not None and len(names) == num_nodes:
        recount = {n: int(v) for n, v in zip(names, positives)}
        diff = [n for n in names if recount[n] != manifest.per_node.get(n, 0)]
        if diff:
            problems.append(f"per_node counts differ from the samples for {diff[:10]}")
    manifest_sources = {k: v for k, v in manifest.per_source.items() if v}
    if dict(per_source) != manifest_sources:
        problems.append(f"per_source counts {dict(per_source)} differ from the manifest {manifest_sources}")
    return report
