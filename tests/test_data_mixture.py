"""Per-source mixture (issue 19 item 2): the shares, the epoch plan that realises them on 2 ranks, both
loaders reading the same mixture, resume (exact and on another world size), the run's record."""
import collections
import json
import logging
import pickle
from types import SimpleNamespace

import numpy as np
import pytest

from data_fixtures import loader_config, take, write_shards
from echocare_dist.config import ConfigError, load_config
from echocare_dist.data import DataLoaderError, build_loader
from echocare_dist.data.mixture import Mixture, effective_mixture, epoch_counts, mixture_params
from echocare_dist.data.resume import EXACT, RESTART, SPLIT
from echocare_dist.data.shards import ShardSet, make_plan

COUNTS = (20, 16, 12)  # 48 samples
B = 4
WEIGHTS = "data.source_weights={big: 1, mid: 1, small: 2}"   # shares 1/4, 1/4, 1/2 of 48: 12, 12, 24


def _sources(seed=3):
    names = ["big"] * 32 + ["mid"] * 12 + ["small"] * 4
    return [names[i] for i in np.random.default_rng(seed).permutation(len(names))]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ontology):
    root = tmp_path_factory.mktemp("mixture_shards")
    sources = _sources()
    labels = write_shards(root, ontology, COUNTS, distinct_images=6, sources=sources)
    source_of = dict(zip(labels, sources))   # write order = key order
    return root, source_of


def _loader(root, kind, ontology, rank=0, world_size=1, *overrides):
    cfg = loader_config(root, kind, "data.num_threads=0" if kind == "pil" else "data.num_threads=1", WEIGHTS,
                        *overrides, micro_batch=B)
    return build_loader(cfg, ontology, rank=rank, world_size=world_size, device="cpu", run_dir=None)


def test_shares_counts_and_alpha():
    sizes = {"a": 900, "b": 90, "c": 10}
    natural = effective_mixture(sizes, SimpleNamespace(source_weights=None, source_alpha=1.0))
    assert {s: r["per_epoch"] for s, r in natural.items()} == sizes
    flat = effective_mixture(sizes, SimpleNamespace(source_weights=None, source_alpha=0.0))
    assert [r["per_epoch"] for r in flat.values()] == [334, 333, 333] and sum(r["share"] for r in flat.values()) == 1
    half = effective_mixture(sizes, SimpleNamespace(source_weights=None, source_alpha=0.5))
    assert half["c"]["share"] == pytest.approx(10 ** 0.5 / (900 ** 0.5 + 90 ** 0.5 + 10 ** 0.5))
    assert half["c"]["reads_per_sample"] > 1 > half["a"]["reads_per_sample"]
    assert epoch_counts({"x": 5, "y": 5}, {"x": 0.22, "y": 0.78}) == {"x": 2, "y": 8}  # largest remainder
    dropped = effective_mixture(sizes, SimpleNamespace(source_weights={"a": 1, "b": 1, "c": 0}, source_alpha=None))
    assert dropped["c"]["per_epoch"] == 0 and dropped["a"]["per_epoch"] == 500


def test_the_plan_realises_the_configured_counts_on_two_ranks(shards, ontology):
    root, source_of = shards
    cfg = loader_config(root, "pil", WEIGHTS)
    ss = ShardSet.open(root, ontology)
    mix = Mixture(ss, cfg.data)
    assert mix.sizes(ss.shards) == {"big": 32, "mid": 12, "small": 4}
    drawn = {}
    for epoch in (0, 1):
        plans = [make_plan(ss, [], epoch=epoch, seed=0, rank=r, world_size=2, micro_batch=B, mixture=mix)
                 for r in range(2)]
        refs = [(shard.name, i, int(c)) for p in plans
                for (shard, i), c in zip(p.refs(p.positions()), p.listing.copies(p.positions()))]
        assert len(refs) == 48 and len(set(refs)) == 48, "each (sample, copy) once per epoch"
        per_source = collections.Counter(mix.source_of(ss.by_name[name], i) for name, i, _ in refs)
        assert per_source == {"big": 12, "mid": 12, "small": 24}
        small = collections.Counter((n, i) for n, i, _ in refs if mix.source_of(ss.by_name[n], i) == "small")
        assert sorted(small.values()) == [6, 6, 6, 6], "an up-weighted source: every sample 6 times"
        drawn[epoch] = {(n, i) for n, i, _ in refs if mix.source_of(ss.by_name[n], i) == "big"}
        assert all(p.steps == 6 for p in plans)
    assert drawn[0] != drawn[1], "a down-weighted source draws other samples each epoch"


def test_both_loaders_read_the_mixture_alike_on_two_ranks(shards, ontology):
    root, source_of = shards
    seen = {}
    for kind in ("dali", "pil"):
        keys, per_rank = [], []
        for rank in range(2):
            ld = _loader(root, kind, ontology, rank, 2)
            try:
                assert ld.steps_per_epoch == 6
                batches = take(ld, 6)
            finally:
                ld.close()
            rank_keys = [k for b in batches for k in b["keys"]]
            per_rank.append(collections.Counter(rank_keys))
            keys += rank_keys
            masks = collections.defaultdict(list)
            for b in batches:
                for k, m in zip(b["keys"], b["mask"]):
                    masks[k].append(m.tobytes())
            repeated = [k for k, ms in masks.items() if len(ms) > 1]
            assert repeated and all(len(set(masks[k])) == len(masks[k]) for k in repeated), \
                f"{kind}: a repeat gets its own mask"
        assert collections.Counter(source_of[k] for k in keys) == {"big": 12, "mid": 12, "small": 24}, kind
        seen[kind] = per_rank
    assert seen["dali"] == seen["pil"], "the same samples (and repeats) per rank in both loaders"


@pytest.mark.parametrize("kind", ["dali", "pil"])
def test_mixture_resume_exact_and_on_one_rank(shards, ontology, kind):
    root, source_of = shards
    full = _loader(root, kind, ontology, 1, 2)
    want = take(full, 8)                     # crosses into epoch 1
    full.close()
    states, head, got = [], [], []
    for rank in range(2):
        ld = _loader(root, kind, ontology, rank, 2)
        batches = take(ld, 2)
        head += [k for b in batches for k in b["keys"]]
        got = batches if rank == 1 else got
        states.append(pickle.loads(pickle.dumps(ld.state_dict())))
        ld.close()
    again = _loader(root, kind, ontology, 1, 2)
    again.resume(states)
    assert again.resumed_as == EXACT
    got += take(again, 6)
    again.close()
    assert [g["keys"] for g in got] == [w["keys"] for w in want]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["target"], w["target"])
        np.testing.assert_array_equal(g["mask"], w["mask"])
    one = _loader(root, kind, ontology, 0, 1)
    one.resume(states)
    try:
        assert one.resumed_as == SPLIT and one.steps_per_epoch == (48 - 16) // B
        tail = [k for b in take(one, one.steps_per_epoch) for k in b["keys"]]
    finally:
        one.close()
    assert collections.Counter(source_of[k] for k in head + tail) == {"big": 12, "mid": 12, "small": 24}


def test_a_changed_mixture_restarts_the_epoch(shards, ontology, caplog):
    root, _ = shards
    ld = _loader(root, "pil", ontology)
    take(ld, 2)
    state = ld.state_dict()
    ld.close()
    other = _loader(root, "pil", ontology, 0, 1, "data.source_weights=null", "data.source_alpha=0")
    with caplog.at_level(logging.WARNING, logger="echocare_dist.data"):
        other.load_state_dict(state)
    other.close()
    # Same world size but another epoch list: the saved position is meaningless.
    assert other.resumed_as == RESTART and "data.source_weights / data.source_alpha changed" in caplog.text


def test_mixture_errors_name_the_key(shards, ontology):
    root, _ = shards
    for weights, match in (("{big: 1, mid: 1}", r"has no weight for source\(s\) \['small'\]"),
                           ("{big: 1, mid: 1, small: 1, video: 3}", r"names source\(s\) \['video'\]")):
        cfg = loader_config(root, "pil", f"data.source_weights={weights}")
        with pytest.raises(DataLoaderError, match=rf"data.source_weights {match}"):
            build_loader(cfg, ontology, rank=0, world_size=1, device="cpu", run_dir=None)
    with pytest.raises(ConfigError, match="data.source_weights and data.source_alpha are exclusive"):
        load_config("tiny_cpu", ["data.source_weights={a: 1}", "data.source_alpha=0.5"])
    with pytest.raises(ConfigError, match=r"data.source_weights.a must be a finite number >= 0"):
        load_config("tiny_cpu", ["data.source_weights={a: -1}"])
    with pytest.raises(ConfigError, match=r"data.source_alpha must be a number in \[0, 4\]"):
        load_config("tiny_cpu", ["data.source_alpha=7"])


def test_the_run_records_the_effective_mixture(shards, ontology, tmp_path):
    from echocare_dist.train.trainer import Pretrainer
    root, _ = shards
    ld = _loader(root, "pil", ontology)
    logged = {}
    stub = SimpleNamespace(run_dir=tmp_path, tracker=SimpleNamespace(
        log_params=logged.update, log_artifact=lambda path, where: logged.setdefault("artifact", (path, where))))
    try:
        Pretrainer._record_mixture(stub, ld)
    finally:
        ld.close()
    record = json.loads((tmp_path / "mixture.json").read_text())
    assert record["small"]["per_epoch"] == 24 and record["small"]["share"] == 0.5
    assert record["big"]["natural_share"] == pytest.approx(32 / 48)
    assert logged["data.mixture.small.share"] == "0.5" and logged["data.mixture.big.per_epoch"] == "12"
    assert logged["artifact"] == (tmp_path / "mixture.json", "data")
    assert mixture_params({"a b/c:d": record["small"]}).keys() >= {"data.mixture.a b/c_d.share"}


def test_the_source_table_is_cached_in_the_run_dir(shards, ontology, tmp_path):
    root, _ = shards
    cfg = loader_config(root, "pil", WEIGHTS)
    ss = ShardSet.open(root, ontology)
    Mixture(ss, cfg.data, tmp_path / "sources.json")
    table = json.loads((tmp_path / "sources.json").read_text())
    assert sorted(table["names"]) == ["big", "mid", "small"] and sum(map(len, table["sources"].values())) == 48
    table["names"] = ["x" + n for n in table["names"]]          # proves the next start reads the table
    (tmp_path / "sources.json").write_text(json.dumps(table))
    assert set(Mixture(ss, cfg.data, tmp_path / "sources.json").names) == {"xbig", "xmid", "xsmall"}
    table["shards"]["shard-000000.tar"][1] += 1                  # stale: the shards changed since
    (tmp_path / "sources.json").write_text(json.dumps(table))
    assert set(Mixture(ss, cfg.data, tmp_path / "sources.json").names) == {"big", "mid", "small"}
    (tmp_path / "sources.json").write_text("{not json")
    assert set(Mixture(ss, cfg.data, tmp_path / "sources.json").names) == {"big", "mid", "small"}
