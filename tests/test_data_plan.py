"""Epoch plan (rank split, equal steps), manifest checks, preflight, quarantine file, and the shard
format the loaders read (index rule, manifest versions)."""
import dataclasses
import json

import numpy as np
import pytest

from data_fixtures import truncate_file, write_shards
from echocare_dist.data.quarantine import Quarantine
from echocare_dist.data.shards import (DataLoaderError, ShardError, ShardIndex, ShardSet, TarReader,
                                       buffer_shuffle, make_plan)
from echocare_dist.shardfmt import MANIFEST, MANIFEST_FORMAT, Manifest, ShardReader, read_index

COUNTS = (13, 11, 9, 8, 1)  # 42 samples, uneven shards


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, ontology):
    root = tmp_path_factory.mktemp("plan_shards")
    labels = write_shards(root, ontology, COUNTS, size=(40, 30))
    return root, labels


def _keys(plan, reader):
    return [reader.key(seg.shard, i) for seg in plan.segments() for i in range(seg.first, seg.last)]


@pytest.mark.parametrize("world_size,micro_batch", [(1, 4), (2, 4), (3, 5), (4, 2)])
def test_ranks_disjoint_complete_and_equal_steps(shard_dir, ontology, world_size, micro_batch):
    root, labels = shard_dir
    ss = ShardSet.open(root, ontology)
    reader = TarReader(len(ontology))
    plans = [make_plan(ss, [], epoch=1, seed=0, rank=r, world_size=world_size, micro_batch=micro_batch)
             for r in range(world_size)]
    per_rank = [_keys(p, reader) for p in plans]
    flat = [k for ks in per_rank for k in ks]
    assert len(flat) == len(set(flat)) == sum(COUNTS) and set(flat) == set(labels)
    assert len({p.steps for p in plans}) == 1, "every rank must run the same number of steps"
    assert plans[0].steps == (sum(COUNTS) // world_size) // micro_batch
    assert all(p.steps * micro_batch <= p.end - p.start for p in plans)
    assert len({tuple(s.name for s in p.shards) for p in plans}) == 1, "tar order must agree across ranks"


def test_epoch_order_changes_and_is_reproducible(shard_dir, ontology):
    ss = ShardSet.open(shard_dir[0], ontology)
    orders = {e: tuple(s.name for s in make_plan(ss, [], epoch=e, seed=0, rank=0, world_size=2, micro_batch=2).shards)
              for e in range(6)}
    assert len(set(orders.values())) > 1
    again = make_plan(ss, [], epoch=3, seed=0, rank=0, world_size=2, micro_batch=2)
    assert tuple(s.name for s in again.shards) == orders[3]
    other_world = make_plan(ss, [], epoch=3, seed=0, rank=0, world_size=3, micro_batch=2)
    assert other_world.order_seed != again.order_seed


def test_excluded_shards_and_too_small(shard_dir, ontology):
    ss = ShardSet.open(shard_dir[0], ontology)
    plan = make_plan(ss, ["shard-000000.tar"], epoch=0, seed=0, rank=0, world_size=1, micro_batch=4)
    assert "shard-000000.tar" not in {s.name for s in plan.shards} and plan.total == sum(COUNTS) - 13
    smaller = plan.without(["shard-000001.tar"])
    assert smaller.steps == plan.steps and smaller.total == plan.total - 11
    with pytest.raises(DataLoaderError, match="fewer than train.micro_batch=64"):
        make_plan(ss, [], epoch=0, seed=0, rank=0, world_size=1, micro_batch=64)


@pytest.mark.parametrize("streams", [1, 2, 3])
def test_stream_chunks_cover_the_rank_range(shard_dir, ontology, streams):
    ss = ShardSet.open(shard_dir[0], ontology)
    plan = make_plan(ss, [], epoch=0, seed=0, rank=1, world_size=2, micro_batch=3)
    reader = TarReader(len(ontology))
    chunks = [[reader.key(seg.shard, i) for seg in segs for i in range(seg.first, seg.last)]
              for segs in plan.stream_segments(streams)]
    assert sum(chunks, []) == _keys(plan, reader)
    for chunk, quota in zip(chunks, plan.stream_quotas(streams)):
        assert len(chunk) >= quota * plan.micro_batch
    assert sum(plan.stream_quotas(streams)) == plan.steps


def test_buffer_shuffle_is_a_seeded_permutation():
    items = list(range(100))
    a = list(buffer_shuffle(items, 16, np.random.default_rng(1)))
    assert sorted(a) == items and a != items
    assert a == list(buffer_shuffle(items, 16, np.random.default_rng(1)))
    assert list(buffer_shuffle(items, 0, np.random.default_rng(1))) == items


def test_index_parsing_matches_the_tar(shard_dir, ontology):
    root, labels = shard_dir
    idx = ShardIndex.read(root / "shard-000001.idx")
    assert len(idx.keys) == COUNTS[1] and idx.end <= (root / "shard-000001.tar").stat().st_size
    reader = TarReader(len(ontology))
    shard = ShardSet.open(root, ontology).by_name["shard-000001.tar"]
    for i, key in enumerate(idx.keys):
        jpg, lbl = reader.read(shard, i)
        assert jpg[:2] == b"\xff\xd8" and np.array_equal(lbl, labels[key])


def test_manifest_errors(tmp_path, ontology, shard_dir):
    with pytest.raises(ShardError, match="not a directory"):
        ShardSet.open(tmp_path / "nope", ontology)
    with pytest.raises(ShardError, match="manifest.json is missing"):
        ShardSet.open(tmp_path, ontology)
    other = tmp_path / "other"
    write_shards(other, ontology, (3,), size=(40, 30), ontology_hash="0123456789abcdef")
    with pytest.raises(ShardError, match=r"ontology_hash '0123456789abcdef' differs .*" + ontology.hash):
        ShardSet.open(other, ontology)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest.update(ontology_hash=ontology.hash, ontology_nodes=len(ontology) + 1)
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="ontology_nodes"):
        ShardSet.open(other, ontology)


def test_preflight_finds_missing_and_truncated_files(tmp_path, ontology):
    write_shards(tmp_path, ontology, (3, 3, 3), size=(40, 30))
    ss = ShardSet.open(tmp_path, ontology)
    assert ss.preflight(ss.shards) == {}
    truncate_file(tmp_path / "shard-000001.tar", 0.6)
    (tmp_path / "shard-000002.idx").unlink()
    bad = ss.preflight(ss.shards)
    assert set(bad) == {"shard-000001.tar", "shard-000002.tar"}
    assert "manifest recorded" in bad["shard-000001.tar"] and "missing" in bad["shard-000002.tar"]


def test_quarantine_file_merges_ranks(tmp_path):
    q0, q1 = Quarantine(tmp_path), Quarantine(tmp_path)  # two ranks, one run directory
    q0.add(shards={"a.tar": {"reason": "x", "rank": 0}})
    q1.add(shards={"b.tar": {"reason": "y", "rank": 1}}, samples={"b.tar/k": {"reason": "y"}})
    data = json.loads((tmp_path / "quarantine.json").read_text())
    assert set(data["shards"]) == {"a.tar", "b.tar"} and set(data["samples"]) == {"b.tar/k"}
    assert q0.shards() == {"a.tar", "b.tar"}
    mem = Quarantine(None)
    mem.add(shards={"c.tar": {"reason": "z"}})
    assert mem.shards() == {"c.tar"}


# ------------------------------------------------------------------------------------ shard format
def _v11(text: str) -> str:
    """The same index as DALI's older v1.1 writes it: no member names."""
    lines = text.splitlines()
    out = ["v1.1" + lines[0][4:]]
    for line in lines[1:]:
        tok = line.split()
        out.append(" ".join(" ".join(tok[i:i + 3]) for i in range(0, len(tok), 4)))
    return "\n".join(out) + "\n"


def test_index_reader_accepts_v1_1_and_v1_2_only(shard_dir, tmp_path):
    root, _ = shard_dir
    v12 = (root / "shard-000001.idx").read_text()
    named = read_index(root / "shard-000001.idx")
    assert [s.key for s in named] == list(ShardIndex.read(root / "shard-000001.idx").keys)
    old = tmp_path / "old.idx"
    old.write_text(_v11(v12))
    unnamed = read_index(old)
    assert [s.components for s in unnamed] == [s.components for s in named]
    assert all(s.key is None for s in unnamed)
    assert ShardIndex.read(old).keys[3] == "old#3"  # the position stands in for the missing name
    head, first, *rest = v12.splitlines()
    tok = first.split()
    off_by_one = "\n".join([head, " ".join([tok[0], str(int(tok[1]) + 1), *tok[2:]]), *rest])
    for text, where in ((v12.replace("v1.2", "v1.0", 1), ":1:"), (v12.replace("v1.2", "v2.2", 1), ":1:"),
                        ("", ":1:"), (v12.replace(" lbl ", " lbl x ", 1), ":2:"), (off_by_one, ":2:")):
        bad = tmp_path / "bad.idx"
        bad.write_text(text)
        with pytest.raises(ShardError, match=f"bad.idx{where}"):
            read_index(bad)
    short = tmp_path / "short.idx"
    short.write_text("\n".join(v12.splitlines()[:-1]) + "\n")
    with pytest.raises(ShardError, match="header says 11 samples, the index lists 10"):
        read_index(short)


def test_shard_reader_reads_what_the_writer_wrote(shard_dir, ontology):
    root, labels = shard_dir
    with ShardReader(root / "shard-000002.tar") as reader:
        for i, sample in enumerate(reader.samples):
            parts = reader.read(i)
            assert set(parts) == {"jpg", "lbl", "json"}
            assert np.array_equal(np.frombuffer(parts["lbl"], np.int8), labels[sample.key])
            assert reader.member_at(sample.components["json"][0]) == (f"{sample.key}.json", len(parts["json"]))


def test_manifest_round_trip_and_versions(shard_dir, tmp_path):
    root, _ = shard_dir
    manifest = Manifest.read(root)
    assert manifest.format == MANIFEST_FORMAT and manifest.num_samples == sum(COUNTS)
    assert [s.name for s in manifest.shards] == [f"shard-{i:06d}.tar" for i in range(len(COUNTS))]
    manifest.write(tmp_path)
    assert Manifest.read(tmp_path) == manifest
    raw = json.loads((root / MANIFEST).read_text())
    del raw["format"]  # written before the manifest carried its version: format 1
    (tmp_path / MANIFEST).write_text(json.dumps(raw))
    old = Manifest.read(tmp_path)
    assert old.format == 1 and dataclasses.replace(old, format=manifest.format) == manifest
    for change, needle in (({"format": MANIFEST_FORMAT + 1}, f"format={MANIFEST_FORMAT + 1}"),
                           ({"per_node": None}, "per_node"),
                           ({"num_samples": "42"}, "num_samples must be an integer"),
                           ({"shards": [{"name": "x.tar"}]}, r"shards\[0\] needs name, samples, bytes and sha256"),
                           ({"shards": [{**raw["shards"][0], "name": "../x.tar"}]}, "not a file name")):
        broken = {k: v for k, v in {**raw, **change}.items() if v is not None}
        (tmp_path / MANIFEST).write_text(json.dumps(broken))
        with pytest.raises(ShardError, match=needle) as err:
            Manifest.read(tmp_path)
        assert str(tmp_path / MANIFEST) in str(err.value)
    (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(ShardError, match="invalid JSON"):
        Manifest.read(tmp_path)
