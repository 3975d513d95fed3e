"""The validation hold-out of the shard builder (curation/valsplit.py, curation.val_fraction).

Fast: grouping (same file, near-duplicate pHash), the stratified group-aware choice, the group file.
Slow: a real build of the synthetic dataset (tiny_val_shards) read back: disjoint from the training
shards, no file on both sides, every source held out, up to date on a rerun, a damaged val shard
rebuilt byte-identical, val_fraction=0 removing the old val set, the fingerprint check of a val set.
"""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from echocare_dist.config import ConfigError, load_config
from echocare_dist.curation import build_shards
from echocare_dist.curation import valsplit
from echocare_dist.shardfmt import Manifest, ShardError, ShardReader
from echocare_dist.train.validation import _check_beside, resolve_val_shards


# ------------------------------------------------------------------ fast
def test_groups_join_frames_of_one_file_and_near_duplicates():
    base = 0x0123456789ABCDEF
    file_ids = np.array([0, 0, 1, 2, 3, 4])
    phashes = [base ^ (1 << 40), base ^ (1 << 50), 0xFFFF0000FFFF0000, base, 0x00000000FFFFFFFF, 0xAAAAAAAAAAAAAAAA]
    groups = valsplit.sample_groups(file_ids, phashes, similarity=0.95)  # within 3 bits
    # 0,1: one file; 3 is within 2 bits of 0 -> same group; 2, 4, 5 alone.
    assert groups.tolist() == [0, 0, 2, 0, 4, 5]
    far = valsplit.sample_groups(file_ids, phashes, similarity=1.0)  # identical hashes only
    assert far.tolist() == [0, 0, 2, 3, 4, 5]


def test_hold_out_is_stratified_group_aware_and_deterministic():
    n = 200
    groups = np.repeat(np.arange(0, n, 4), 4)            # 50 groups of 4 samples
    sources = ["a" if i < 120 else "b" for i in range(n)]
    keys = np.arange(n, dtype=np.uint64) * np.uint64(2654435761)
    held = valsplit.choose_held_out(groups, sources, keys, 0.1, seed=0)
    for g in np.unique(groups):  # a group is wholly in or wholly out
        assert len(set(held[groups == g])) == 1
    a, b = held[:120].sum(), held[120:].sum()
    assert 0 < a <= 12 and 0 < b <= 8 and a % 4 == 0 and b % 4 == 0
    assert (held == valsplit.choose_held_out(groups, sources, keys, 0.1, seed=0)).all()
    assert (held != valsplit.choose_held_out(groups, sources, keys, 0.1, seed=1)).any()
    assert not valsplit.choose_held_out(groups, sources, keys, 0.0, seed=0).any()


def test_a_source_keeps_a_group_to_train_and_gives_one_when_all_are_large():
    groups = np.array([0, 0, 0, 3, 3, 3, 6])          # source "a": two groups of 3; "b": one sample
    sources = ["a"] * 6 + ["b"]
    keys = np.arange(7, dtype=np.uint64)
    held = valsplit.choose_held_out(groups, sources, keys, 0.1, seed=0)
    assert held[:6].sum() == 3            # target 1 < 3: the smallest group, never both
    assert not held[6]                    # a one-group source always trains


def test_group_file_errors_name_the_file(tmp_path):
    (tmp_path / valsplit.GROUPS_FILE).write_text(json.dumps({"format": 1, "groups": {"abc": "x"}}))
    with pytest.raises(ShardError, match="groups.json: group ids must be integers"):
        valsplit.read_groups(tmp_path)
    assert valsplit.read_groups(tmp_path / "elsewhere") is None


def test_config_keys_of_the_hold_out_are_checked():
    with pytest.raises(ConfigError, match="curation.val_fraction must be in"):
        load_config("tiny_cpu", ["curation.val_fraction=0.7"])
    cfg = load_config("tiny_cpu", ["data.val_shards=/nonexistent/val"])
    with pytest.raises(ConfigError, match="data.val_shards='/nonexistent/val'"):
        resolve_val_shards(cfg)
    assert resolve_val_shards(load_config("tiny_cpu", ["data.val_shards=none"])) is None


# ------------------------------------------------------------------ slow: a real build
def _samples(shard_dir):
    """{key: provenance} of every sample of a shard directory."""
    out = {}
    for entry in Manifest.read(shard_dir).shards:
        with ShardReader(shard_dir / entry.name) as reader:
            for i, sample in enumerate(reader.samples):
                out[sample.key] = json.loads(reader.read(i)["json"])
    return out


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.slow
def test_built_hold_out_is_disjoint_group_aware_and_rebuilt_when_damaged(tiny_val_shards, synth_dataset, ontology,
                                                                          tmp_path):
    main, val = Manifest.read(tiny_val_shards), Manifest.read(tiny_val_shards / "val")
    train_samples, val_samples = _samples(tiny_val_shards), _samples(tiny_val_shards / "val")
    assert val.num_samples == len(val_samples) > 0 and main.num_samples == len(train_samples)
    assert not set(train_samples) & set(val_samples)
    # Frames of one file never cross (exact duplicates were dropped before the split).
    files = lambda samples: {p["path"] for p in samples.values()}  # noqa: E731
    assert not files(train_samples) & files(val_samples)
    total = {s: main.per_source[s] + val.per_source[s] for s in main.per_source}
    for source, count in val.per_source.items():
        assert 1 <= count <= max(1, round(0.2 * total[source])) or count == min_group(val_samples, source), source
        assert main.per_source[source] > 0
    groups = valsplit.read_groups(tiny_val_shards / "val")
    assert set(groups) == set(val_samples)
    assert val.fingerprint == main.fingerprint
    _check_beside(load_config("tiny_cpu", [f"data.shards={tiny_val_shards}"]), tiny_val_shards / "val")

    # A copy to damage: a rerun calls it up to date, a truncated val shard is rebuilt identically.
    work = tmp_path / "shards"
    shutil.copytree(tiny_val_shards, work)
    for path_map in tiny_val_shards.parent.glob(f"{tiny_val_shards.name}.*"):  # de-identification's, beside it
        shutil.copy2(path_map, work.parent / path_map.name.replace(tiny_val_shards.name, work.name, 1))
    before = _digest(work / "val")
    cfg = load_config("tiny_cpu", ["curation.val_fraction=0.2"])
    build_shards([synth_dataset.mapping], work, cfg, ontology, progress=False)
    assert _digest(work / "val") == before
    tar = work / "val" / val.shards[0].name
    tar.write_bytes(tar.read_bytes()[:1024])
    build_shards([synth_dataset.mapping], work, cfg, ontology, progress=False)
    assert _digest(work / "val") == before

    # Another build's val set beside these shards is refused.
    other = Manifest.read(work / "val")
    other.fingerprint = "0" * 64
    other.write(work / "val")
    with pytest.raises(ShardError, match="validation set is from another build"):
        _check_beside(load_config("tiny_cpu", [f"data.shards={work}"]), work / "val")

    # Without a hold-out the old val set goes: its samples train now.
    build_shards([synth_dataset.mapping], work, load_config("tiny_cpu"), ontology, progress=False)
    assert not (work / "val").exists()
    assert Manifest.read(work).num_samples == main.num_samples + val.num_samples


def min_group(samples: dict, source: str) -> int:
    """Samples of the smallest file of `source` in `samples` (the one-group fallback)."""
    counts: dict[str, int] = {}
    for p in samples.values():
        if p["source"] == source:
            counts[p["path"]] = counts.get(p["path"], 0) + 1
    return min(counts.values())
