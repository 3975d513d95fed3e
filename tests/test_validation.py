"""Validation during pretraining (train/validation.py, train/probe.py, docs/validation.md).

Fast: the k-NN probe (clusters found, own-group neighbours never used, level labels), the config keys.
Slow: 2 CPU ranks on the synthetic shards with a hold-out (tiny_val_shards): validation every 2
steps lands in metrics.jsonl and MLflow; a run without validation trains bit-identically; a run
stopped at step 3 and resumed gives the same validation figures (and warning state) as the
uninterrupted one; under ZeRO-3 the rank with fewer samples runs a padded batch instead of hanging.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import train_launch as tl
from echocare_dist.config import ConfigError, load_config
from echocare_dist.train.probe import knn_predict, level_labels, probe_accuracy

TIMINGS = ("val/time_s", "val/cost_fraction")


# ------------------------------------------------------------------ fast
def _clusters(n_per: int = 6, dim: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:3] * 5
    features = np.concatenate([c + rng.normal(0, 0.3, (n_per, dim)) for c in centres])
    labels = np.repeat(np.arange(3), n_per)
    return features, labels


def test_knn_finds_clusters_and_never_asks_the_own_group():
    features, labels = _clusters()
    alone = np.arange(len(labels))
    assert (knn_predict(features, labels, alone, k=3) == labels).all()
    # Each cluster one group: every neighbour outside the group is of another class -> all wrong.
    pred = knn_predict(features, labels, labels.copy(), k=3)
    assert (pred != labels).all() and (pred >= 0).all()
    # Unlabelled samples are never neighbours; a query with no labelled neighbour gets -1.
    partial = labels.copy()
    partial[1:] = -1
    assert knn_predict(features, partial, alone, k=3)[0] == -1


def test_level_labels_take_the_single_positive_node_of_each_depth():
    depth = (0, 1, 1, 2)
    labels = np.array([[1, 1, 0, 1],     # level 0 -> 0, level 1 -> 1, level 2 -> 3
                       [1, 1, 1, -1],    # two positives at level 1 -> none; no positive at 2
                       [0, 0, 0, 0]])
    out = level_labels(labels, depth)
    assert out[0].tolist() == [0, 0, -1] and out[1].tolist() == [1, -1, -1] and out[2].tolist() == [3, -1, -1]


def test_probe_skips_levels_with_one_class():
    features, labels = _clusters()
    multi = np.zeros((len(labels), 4), np.int8)
    multi[:, 0] = 1                                  # level 0: everyone the same node
    multi[np.arange(len(labels)), 1 + labels] = 1     # level 1: three classes
    acc = probe_accuracy(features, multi, np.arange(len(labels)), (0, 1, 1, 1), k=3)
    assert set(acc) == {1}
    correct, counted = acc[1]
    assert counted.all() and correct.all()


@pytest.mark.parametrize("override, key", [("train.val_every=-1", "train.val_every"),
                                           ("train.val_samples=0", "train.val_samples"),
                                           ("train.val_knn_k=0", "train.val_knn_k"),
                                           ("train.val_batch=-2", "train.val_batch")])
def test_validation_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config("tiny_cpu", [override])


def _bare_validator(patience: int):
    """A Validator without a val set: only its early-warning state machine is exercised."""
    import torch
    from echocare_dist.train.distributed import DistEnv
    from echocare_dist.train.validation import Validator
    v = Validator.__new__(Validator)
    v.cfg = load_config("tiny_cpu", [f"train.val_patience={patience}"])
    v.env = DistEnv(0, 1, 0, torch.device("cpu"), "single")
    v.best, v.since_best, v.evaluations = {}, {}, 0
    return v


def _record(overall: float, a: float, b: float) -> dict:
    return {"val/loss": overall, "val/a/loss": a, "val/b/loss": b, "val/loss_mim": 0.0, "val/loss_hie": 0.0,
            "val/feature_std": 0.0, "val/time_s": 0.0}


def test_early_warning_names_a_stalled_source_and_its_state_survives_a_checkpoint(caplog):
    v = _bare_validator(patience=2)
    series = [(1.0, 1.0, 1.0), (0.9, 1.1, 0.8), (0.8, 1.2, 0.7), (0.85, 0.9, 0.6)]
    records = []
    with caplog.at_level("WARNING", logger="echocare_dist.train.validation"):
        for step, values in enumerate(series[:3], 1):
            records.append(_record(*values))
            v._warn(step, records[-1])
    assert [r["val/a/degraded"] for r in records] == [0.0, 0.0, 1.0]
    assert all(r["val/degraded"] == 0.0 and r["val/b/degraded"] == 0.0 for r in records)
    assert "val/a/loss 1.2000 (best 1.0000, 2 validations ago)" in caplog.text
    resumed = _bare_validator(patience=2)
    resumed.load_state_dict(v.state_dict())
    last, again = _record(*series[3]), _record(*series[3])
    v._warn(4, last)
    resumed._warn(4, again)
    assert last == again and last["val/a/degraded"] == 0.0 and last["val/evaluations"] == 4.0
    assert last["val/best_loss"] == 0.8 and last["val/degraded"] == 0.0  # 0.85 is 1 validation past the best


# ------------------------------------------------------------------ slow: 2 ranks
def _overrides(run_dir, shards, **extra):
    values = dict(data__loader="pil", train__steps=6, train__ckpt_every=1000, train__val_every=2,
                  train__val_batch=3, train__val_patience=1)
    values.update(extra)
    return tl.base_overrides(run_dir, shards, **values)


def _run(tmp_path, name, shards, **extra) -> dict[int, dict]:
    run_dir, log = tmp_path / name, tmp_path / f"{name}.log"
    rc = tl.run("echocare", _overrides(run_dir, shards, **extra), log, timeout=600)
    assert rc == 0, tl.tail(log)
    return {m["step"]: m for m in tl.metrics(run_dir)}


def _val(record: dict) -> dict:
    return {k: v for k, v in record.items() if k.startswith("val/") and k not in TIMINGS}


@pytest.mark.slow
def test_validation_on_two_ranks_is_logged_exact_on_resume_and_leaves_training_alone(tmp_path, tiny_val_shards):
    full = _run(tmp_path, "full", tiny_val_shards, tracking__enabled="true")
    assert sorted(s for s, r in full.items() if "val/loss" in r) == [2, 4, 6]
    v2 = full[2]
    assert v2["val/samples"] > 0 and math.isfinite(v2["val/loss"]) and v2["val/loss_mim"] > 0
    assert v2["val/loss"] == pytest.approx(v2["val/loss_mim"] + v2["val/loss_hie"])  # tiny_cpu: hie_weight 1
    knn = {k: v for k, v in v2.items() if k.startswith("val/knn_acc/level")}
    assert knn and all(0 <= v <= 1 for v in knn.values()), sorted(v2)
    assert v2["val/feature_std"] > 0
    per_source = [k for k in v2 if k.count("/") == 2 and k.endswith("/loss_mim")]
    assert len(per_source) >= 2, sorted(v2)
    assert 0 < v2["val/cost_fraction"] and v2["val/time_s"] > 0
    assert [full[s]["val/evaluations"] for s in (2, 4, 6)] == [1, 2, 3]

    # The curves are in MLflow (the run's own SQLite store).
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'full' / 'mlflow.db'}")
    run = client.search_runs(client.get_experiment_by_name("echocare-pretrain").experiment_id)[0]
    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert sorted((m.step, m.value) for m in history) == [(s, full[s]["val/loss"]) for s in (2, 4, 6)]

    # Without validation: the same training trajectory, bit for bit.
    plain = _run(tmp_path, "plain", tiny_val_shards, train__val_every=0)
    assert {s: r["loss"] for s, r in plain.items()} == {s: r["loss"] for s, r in full.items()}
    assert not any("val/loss" in r for r in plain.values())

    # Stopped after step 3 (a checkpoint), resumed to 6: the same validation figures and warning state.
    _run(tmp_path, "resumed", tiny_val_shards, train__steps=3)
    resumed = _run(tmp_path, "resumed", tiny_val_shards)
    assert {s: r["loss"] for s, r in resumed.items()} == {s: r["loss"] for s, r in full.items()}
    for step in (2, 4, 6):
        assert _val(resumed[step]) == _val(full[step]), step


@pytest.mark.slow
def test_validation_under_zero3_with_a_padded_rank_finishes(tmp_path, tiny_val_shards):
    """ZeRO-3 gathers parameters in every forward: with 19 samples, 2 ranks and batches of 3, rank 1
    has one batch fewer and must run a padded one, or both ranks hang in the collective."""
    records = _run(tmp_path, "zero3", tiny_val_shards, train__steps=2, train__zero_stage=3)
    assert records[2]["val/samples"] == sum(1 for _ in _val_keys(tiny_val_shards))
    assert math.isfinite(records[2]["val/loss"])


def _val_keys(shards):
    from echocare_dist.shardfmt import Manifest, read_index
    for entry in Manifest.read(shards / "val").shards:
        yield from (s.key for s in read_index((shards / "val" / entry.name).with_suffix(".idx")))
