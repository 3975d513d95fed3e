"""Resume on another world size (issue 15 item 3): the unconsumed rest of the epoch is split over the
new ranks, nothing read twice, nothing skipped; a same-world resume stays bit-exact; the global-batch
rule. Ranks are simulated in one process (the loader for rank r of W), for both loaders."""
import logging
import pickle

import numpy as np
import pytest

from data_fixtures import loader_config, take, write_shards
from echocare_dist.config import ConfigError
from echocare_dist.data import build_loader
from echocare_dist.data.elastic import held_batch
from echocare_dist.data.resume import EXACT, RESTART, SPLIT

LOADERS = ["dali", "pil"]
COUNTS = (14, 12, 10, 12)  # 48 samples: with micro-batch 4 the rests below split without leftover
B = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ontology):
    root = tmp_path_factory.mktemp("elastic_shards")
    return root, write_shards(root, ontology, COUNTS, distinct_images=6)


def _loader(root, kind, ontology, rank, world_size, *overrides):
    # PIL in-process (no worker processes: CPU is scarce); the worker path is covered by test_data_loaders.
    cfg = loader_config(root, kind, "data.num_threads=0" if kind == "pil" else "data.num_threads=1", *overrides,
                        micro_batch=B)
    return build_loader(cfg, ontology, rank=rank, world_size=world_size, device="cpu", run_dir=None)


def _run(root, kind, ontology, world_size, steps, states=None):
    """`steps` batches on each rank of `world_size` (None: to the end of the epoch), optionally
    resumed from `states`; returns (keys read, the ranks' states afterwards, loaders' resume modes)."""
    keys, out_states, modes = [], [], []
    for rank in range(world_size):
        ld = _loader(root, kind, ontology, rank, world_size)
        try:
            if states is not None:
                ld.resume(pickle.loads(pickle.dumps(states)))  # as the checkpoint stores them
            modes.append(ld.resumed_as)
            n = ld.steps_per_epoch - ld.position if steps is None else steps
            epoch = ld.epoch
            batches = take(ld, n)
            assert all(b["epoch"] == epoch for b in batches)
            keys += [k for b in batches for k in b["keys"]]
            out_states.append(ld.state_dict())
        finally:
            ld.close()
    return keys, out_states, modes


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("old,new,first_steps", [(2, 1, 2), (1, 2, 4), (2, 3, 3)])
def test_mid_epoch_resume_on_another_world_size_reads_the_epoch_exactly_once(shards, ontology, kind, old, new,
                                                                            first_steps):
    root, labels = shards
    head, states, _ = _run(root, kind, ontology, old, first_steps)
    assert all(s["position"] == first_steps for s in states)
    tail, _, modes = _run(root, kind, ontology, new, None, states)
    assert modes == [SPLIT] * new
    union = head + tail
    assert len(union) == len(set(union)), "a sample was read twice in the epoch"
    assert set(union) == set(labels), "the epoch's samples were not all read"


@pytest.mark.parametrize("kind", LOADERS)
def test_chained_resumes_2_3_1_and_the_recorded_positions(shards, ontology, kind):
    root, labels = shards
    a, states, _ = _run(root, kind, ontology, 2, 1)          # 8 of 48
    b, states, modes = _run(root, kind, ontology, 3, 1, states)  # 40 left: 13/13/14 per rank, 12 read
    assert modes == [SPLIT] * 3
    consumed = set()
    for s in states:  # every rank carries what was consumed before its split, and its own positions
        assert s["order_world"] == 2 and s["consumed_before"]
        for lo, hi in s["consumed_before"] + s["consumed"]:
            consumed |= set(range(lo, hi))
    assert len(consumed) == len(a) + len(b) == 20
    c, _, modes = _run(root, kind, ontology, 1, None, states)   # 28 left: 7 steps
    assert modes == [SPLIT]
    union = a + b + c
    assert len(union) == len(set(union)) == sum(COUNTS) and set(union) == set(labels)


@pytest.mark.parametrize("kind", LOADERS)
def test_same_world_resume_inside_a_split_epoch_is_bit_exact(shards, ontology, kind):
    root, _ = shards
    _, states, _ = _run(root, kind, ontology, 2, 2)
    full = _loader(root, kind, ontology, 0, 1)
    full.resume(states)
    want = take(full, 10)  # the split rest of epoch 0 has 32 samples = 8 steps: crosses into epoch 1
    full.close()
    first = _loader(root, kind, ontology, 0, 1)
    first.resume(states)
    got = take(first, 3)
    saved = pickle.loads(pickle.dumps(first.state_dict()))
    first.close()
    second = _loader(root, kind, ontology, 0, 1)
    second.resume([saved])
    assert second.resumed_as == EXACT
    got += take(second, 7)
    second.close()
    assert [g["keys"] for g in got] == [w["keys"] for w in want]
    assert [g["epoch"] for g in got] == [w["epoch"] for w in want] and want[-1]["epoch"] == 1
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["target"], w["target"])
        np.testing.assert_array_equal(g["mask"], w["mask"])


def test_finished_epoch_continues_with_the_next_one(shards, ontology):
    root, _ = shards
    _, states, _ = _run(root, "pil", ontology, 2, 6)   # 6 steps = the whole epoch on 2 ranks
    assert states[0]["position"] == states[0]["steps_per_epoch"]
    ld = _loader(root, "pil", ontology, 0, 3)
    ld.resume(states)
    try:
        assert ld.resumed_as == SPLIT and ld.epoch == 1 and ld.position == 0
        assert ld.plan.total == sum(COUNTS) and ld.steps_per_epoch == (sum(COUNTS) // 3) // B
    finally:
        ld.close()


def test_states_without_positions_or_missing_ranks_restart_the_epoch(shards, ontology, caplog):
    root, _ = shards
    _, states, _ = _run(root, "pil", ontology, 2, 2)
    old = [{k: v for k, v in s.items() if k not in ("consumed", "consumed_before")} for s in states]
    for given, why in ((old, "no consumed positions"), (states[:1], "1 loader state(s) for the 2 rank(s)")):
        ld = _loader(root, "pil", ontology, 0, 1)
        with caplog.at_level(logging.WARNING, logger="echocare_dist.data"):
            ld.resume(given)
        ld.close()
        assert ld.resumed_as == RESTART and ld.restarted_epoch and ld.position == 0
        assert why in caplog.text and "world size changed from 2 to 1" in caplog.text


def test_a_changed_seed_cannot_be_split(shards, ontology, caplog):
    root, _ = shards
    _, states, _ = _run(root, "pil", ontology, 2, 2)
    cfg = loader_config(root, "pil", "data.num_threads=0", "data.seed=7", micro_batch=B)
    ld = build_loader(cfg, ontology, rank=0, world_size=1, device="cpu", run_dir=None)
    with caplog.at_level(logging.WARNING, logger="echocare_dist.data"):
        ld.resume(states)
    ld.close()
    assert ld.resumed_as == RESTART and "data.seed changed" in caplog.text


def test_a_shard_damaged_since_the_save_is_left_out_of_the_rest(tmp_path, ontology):
    root = tmp_path / "shards"
    labels = write_shards(root, ontology, COUNTS, distinct_images=6)
    head, states, _ = _run(root, "pil", ontology, 2, 2)
    (root / "shard-000001.tar").write_bytes(b"")   # truncated on the file system
    tail, _, modes = _run(root, "pil", ontology, 1, None, states)
    assert modes == [SPLIT]
    damaged = {k for k in labels if int(k[4:], 16) in range(COUNTS[0], COUNTS[0] + COUNTS[1])}
    assert len(damaged) == COUNTS[1] and len(tail) == len(set(tail))
    rest = set(labels) - damaged - set(head)
    assert set(tail) <= rest and len(rest - set(tail)) < B, "only the end-of-epoch remainder may be left"


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_split_plans_cover_the_unconsumed_rest_disjointly_with_equal_steps(shards, ontology, world_size):
    from echocare_dist.data.listing import positions_from_ranges, ranges_from_positions
    from echocare_dist.data.shards import ShardSet, make_plan
    ss = ShardSet.open(shards[0], ontology)
    consumed = np.zeros(sum(COUNTS), bool)
    consumed[np.random.default_rng(1).choice(sum(COUNTS), 19, replace=False)] = True
    ranges = ranges_from_positions(np.flatnonzero(consumed))
    assert np.array_equal(positions_from_ranges(ranges), np.flatnonzero(consumed))
    plans = [make_plan(ss, [], epoch=2, seed=0, rank=r, world_size=world_size, micro_batch=2, order_world=2,
                       consumed=consumed, consumed_ranges=ranges) for r in range(world_size)]
    split = np.concatenate([p.positions() for p in plans])
    assert np.array_equal(np.sort(split), np.flatnonzero(~consumed)), "the rest, each position once"
    assert len({p.steps for p in plans}) == 1 and plans[0].steps == (29 // world_size) // 2
    fresh = make_plan(ss, [], epoch=2, seed=0, rank=0, world_size=2, micro_batch=2)
    assert [s.name for s in plans[0].shards] == [s.name for s in fresh.shards], "the saved epoch's tar order"
    assert not plans[0].whole_shards
    smaller = plans[0].without([plans[0].shards[0].name])
    assert set(smaller.positions(0, smaller.total)) < set(plans[0].positions(0, plans[0].total))


def test_global_batch_rule():
    assert held_batch(16, 2, 4, 2) == (4, 2)       # already holds it
    assert held_batch(16, 1, 4, 2) == (4, 4)       # 2 -> 1 rank: more accumulation
    assert held_batch(16, 4, 4, 1) == (4, 1)
    assert held_batch(24, 2, 8, 1) == (6, 2)       # 8 x 2 does not divide 24 on 2 ranks: largest m' < 8
    assert held_batch(8, 8, 4, 1) == (1, 1)
    with pytest.raises(ConfigError, match=r"global batch 16 .*train.micro_batch x train.grad_accum.* 3 rank"):
        held_batch(16, 3, 4, 2)



def test_the_trainer_holds_the_checkpoint_global_batch(tmp_path):
    from types import SimpleNamespace

    from echocare_dist.config import load_config
    from echocare_dist.train.trainer import Pretrainer
    cfg = load_config("tiny_cpu", ["train.micro_batch=4", "train.grad_accum=1"])
    trainer = SimpleNamespace(cfg=cfg, env=SimpleNamespace(world_size=1, is_main=False), run_dir=tmp_path,
                              global_batch=4)
    Pretrainer._hold_global_batch(trainer, SimpleNamespace(meta={"global_batch": 8, "world_size": 2}))
    assert (cfg.train.micro_batch, cfg.train.grad_accum, trainer.global_batch) == (4, 2, 8)
    trainer.env.world_size = 3
    with pytest.raises(ConfigError, match="global batch 8"):
        Pretrainer._hold_global_batch(trainer, SimpleNamespace(meta={"global_batch": 8, "world_size": 2}))

@pytest.mark.slow
def test_trainer_resume_from_two_ranks_on_one_reads_the_epoch_once(tmp_path, tiny_shards):
    """Through the real trainer: 2 ranks stop mid-epoch 0 with a checkpoint, 1 rank resumes it (global
    batch held: micro-batch 4 x accumulation 2); the keys both runs trained on in epoch 0
    ($ECHOCARE_SAMPLE_LOG) hold no repeat and all of the epoch but its end remainder."""
    import json

    import train_launch as tl
    from echocare_dist.train.sample_log import ENV_VAR, read_sample_logs

    total = json.loads((tiny_shards / "manifest.json").read_text())["num_samples"]
    first_steps = 2                      # 2 ranks x 4 = 8 samples per step: 16 consumed
    assert total // 2 // B > first_steps, "the fixture's epoch must outlast the first run"
    rest_steps = (total - 16) // (2 * B) + 1   # 1 rank x 4 x 2 per step: into epoch 1
    run_dir, logs = tmp_path / "run", tmp_path / "samples"
    common = dict(train__zero_stage=0, train__ckpt_every=first_steps)
    rc = tl.run("torchrun", tl.base_overrides(run_dir, tiny_shards, train__steps=first_steps, **common),
                tmp_path / "two.log", nproc=2, extra_env={ENV_VAR: str(logs / "two")})
    assert rc == 0, tl.tail(tmp_path / "two.log")
    rc = tl.run("python", tl.base_overrides(run_dir, tiny_shards, train__steps=first_steps + rest_steps, **common),
                tmp_path / "one.log", nproc=1, extra_env={ENV_VAR: str(logs / "one")})
    text = (tmp_path / "one.log").read_text()
    assert rc == 0, tl.tail(tmp_path / "one.log")
    assert "holding the checkpoint's global batch 8 with train.micro_batch=4 x train.grad_accum=2" in text
    two = [k for rows in read_sample_logs(logs / "two").values() for e, k in rows if e == 0]
    one = [k for rows in read_sample_logs(logs / "one").values() for e, k in rows if e == 0]
    assert len(two) == 16
    epoch0 = two + one
    assert len(epoch0) == len(set(epoch0)), "a sample was trained on twice in epoch 0"
    assert total - len(epoch0) < B, f"{total - len(epoch0)} samples of epoch 0 were skipped"
    assert any(e == 1 for rows in read_sample_logs(logs / "one").values() for e, _ in rows)
