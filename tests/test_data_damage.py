"""Damaged data at run time: a truncated JPEG inside a tar, a truncated tar; both loaders go on."""
import json
import logging

import numpy as np
import pytest

from data_fixtures import loader_config, take, truncate_file, write_shards
from echocare_dist.data import DataLoaderError, build_loader
from echocare_dist.data.shards import ShardIndex

LOADERS = ["dali", "pil"]
COUNTS = (10, 10, 10, 10)
BAD_SHARD, BAD_INDEX = 1, 3


@pytest.fixture()
def damaged(tmp_path, ontology):
    root = tmp_path / "shards"
    labels = write_shards(root, ontology, COUNTS, truncated_jpeg=(BAD_SHARD, BAD_INDEX))
    bad_key = ShardIndex.read(root / f"shard-{BAD_SHARD:06d}.idx").keys[BAD_INDEX]
    return root, labels, bad_key


def _loader(root, kind, ontology, run_dir, rank=0, world_size=1, *overrides):
    cfg = loader_config(root, kind, *overrides)
    return build_loader(cfg, ontology, rank=rank, world_size=world_size, device="cpu", run_dir=run_dir)


def _epoch_keys(loader):
    return [k for b in take(loader, loader.steps_per_epoch) for k in b["keys"]]


def test_dali_quarantines_shard_with_corrupt_jpeg(damaged, ontology, tmp_path, caplog):
    root, labels, bad_key = damaged
    run_dir = tmp_path / "run"
    loader = _loader(root, "dali", ontology, run_dir)
    with caplog.at_level(logging.WARNING, logger="echocare_dist.data"):
        first = take(loader, loader.steps_per_epoch)          # the run does not die
    bad_shard = f"shard-{BAD_SHARD:06d}.tar"
    assert loader.quarantined == [bad_shard] and loader.bad_samples == 1
    assert "quarantining shard" in caplog.text and bad_key in caplog.text
    record = json.loads((run_dir / "quarantine.json").read_text())
    assert record["shards"][bad_shard]["key"] == bad_key and record["shards"][bad_shard]["loader"] == "dali"
    assert f"{bad_shard}/{bad_key}" in record["samples"]
    assert all(len(b["keys"]) == 4 for b in first) and bad_key not in {k for b in first for k in b["keys"]}
    for b in first:
        for key, row in zip(b["keys"], b["labels"]):
            assert np.array_equal(row, labels[key])
    # The next epoch leaves the shard out on every rank (read back from quarantine.json).
    second = _epoch_keys(loader)
    assert loader.plan.excluded == (bad_shard,)
    shard_keys = set(ShardIndex.read(root / f"shard-{BAD_SHARD:06d}.idx").keys)
    assert not set(second) & shard_keys
    state = loader.state_dict()
    loader.close()
    other_rank = _loader(root, "dali", ontology, run_dir)
    assert other_rank.quarantined == [bad_shard], "a new loader on the same run directory must skip it"
    other_rank.close()
    assert state["bad_samples"] == 1 and state["quarantined"] == [bad_shard]


def test_fallback_skips_corrupt_jpeg_and_counts_it(damaged, ontology, tmp_path, caplog):
    root, labels, bad_key = damaged
    run_dir = tmp_path / "run"
    loader = _loader(root, "pil", ontology, run_dir)
    with caplog.at_level(logging.WARNING, logger="echocare_dist.data"):
        keys = [_epoch_keys(loader) for _ in range(2)]
    assert loader.bad_samples == 1 and loader.quarantined == []
    assert bad_key in caplog.text
    assert all(bad_key not in ks and len(ks) == loader.steps_per_epoch * 4 for ks in keys)
    record = json.loads((run_dir / "quarantine.json").read_text())
    assert list(record["samples"]) == [f"shard-{BAD_SHARD:06d}.tar/{bad_key}"]
    loader.close()


@pytest.mark.parametrize("kind", LOADERS)
def test_resume_after_damage_is_exact(damaged, ontology, tmp_path, kind):
    root, _, _ = damaged
    full = _loader(root, kind, ontology, tmp_path / "a")
    want = [b["keys"] for b in take(full, 14)]
    full.close()
    first = _loader(root, kind, ontology, tmp_path / "b")
    got = [b["keys"] for b in take(first, 6)]
    state = first.state_dict()
    first.close()
    second = _loader(root, kind, ontology, tmp_path / "b")
    second.load_state_dict(state)
    got += [b["keys"] for b in take(second, 8)]
    second.close()
    assert got == want and second.bad_samples == 1


@pytest.mark.parametrize("kind", LOADERS)
def test_truncated_tar_is_quarantined_before_reading(tmp_path, ontology, kind):
    root = tmp_path / "shards"
    write_shards(root, ontology, COUNTS)
    truncate_file(root / "shard-000002.tar", 0.4)
    truncated = set(ShardIndex.read(root / "shard-000002.idx").keys)
    loader = _loader(root, kind, ontology, tmp_path / "run")
    assert loader.quarantined == ["shard-000002.tar"]
    keys = _epoch_keys(loader)
    assert len(keys) == 28 and not set(keys) & truncated
    record = json.loads((tmp_path / "run" / "quarantine.json").read_text())
    assert "manifest recorded" in record["shards"]["shard-000002.tar"]["reason"]
    loader.close()


@pytest.mark.parametrize("kind", LOADERS)
def test_tar_truncated_during_the_run(tmp_path, ontology, kind):
    """A shard damaged while the run reads it: the epoch completes, the next one leaves it out."""
    root = tmp_path / "shards"
    write_shards(root, ontology, COUNTS)
    loader = _loader(root, kind, ontology, tmp_path / "run")
    take(loader, 1)
    truncate_file(root / loader.plan.shards[-1].tar.name, 0.3)   # a tar this epoch has not reached yet
    damaged = loader.plan.shards[-1].name
    take(loader, loader.steps_per_epoch - 1)
    assert loader.epoch == 0 and loader.position == loader.steps_per_epoch
    take(loader, 1)
    assert damaged in loader.quarantined and loader.epoch == 1
    loader.close()


def test_too_many_damaged_shards_stop_the_run(tmp_path, ontology):
    root = tmp_path / "shards"
    write_shards(root, ontology, COUNTS)
    for s in range(3):
        truncate_file(root / f"shard-{s:06d}.tar", 0.5)
    with pytest.raises(DataLoaderError, match="3 of 4 shards .* damaged"):
        _loader(root, "pil", ontology, tmp_path / "run")


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("damage", ["missing_label", "short_label"])
def test_sample_with_bad_label(tmp_path, ontology, kind, damage):
    """DALI quarantines the shard (refused at reader build, or seen in a batch) and rebuilds; the
    fallback skips the sample."""
    root = tmp_path / "shards"
    write_shards(root, ontology, COUNTS, **{damage: (2, 4)})
    bad_key = ShardIndex.read(root / "shard-000002.idx").keys[4]
    loader = _loader(root, kind, ontology, tmp_path / "run")
    keys = _epoch_keys(loader)
    assert bad_key not in keys and loader.bad_samples == 1
    assert loader.quarantined == (["shard-000002.tar"] if kind == "dali" else [])
    loader.close()


def test_dali_finds_the_bad_sample_when_the_error_does_not_name_it(damaged, ontology, tmp_path):
    """Fallback of the DALI recovery: CPU-decode the samples in flight (here: the whole range)."""
    root, _, bad_key = damaged
    loader = _loader(root, "dali", ontology, tmp_path / "run", 0, 1, "data.shuffle_buffer=64")
    loader.start()
    loader.reader.recover("Critical error in pipeline: something opaque happened", position=0)
    assert loader.quarantined == [f"shard-{BAD_SHARD:06d}.tar"] and loader.bad_samples == 1
    assert loader.quarantine.bad_keys == {f"shard-{BAD_SHARD:06d}.tar/{bad_key}"}
    assert len(take(loader, 3)) == 3
    with pytest.raises(DataLoaderError, match="no damaged shard could be identified"):
        loader.reader.recover("Critical error in pipeline: something else", position=3)
    loader.close()
