"""Both loaders: batch contract, rank split, exact resume, world-size change, DALI vs fallback,
the registry of loader kinds and the protocols they implement."""
import logging
import pickle

import numpy as np
import pytest
import torch

from data_fixtures import RAMP_X, loader_config, take, write_shards
from echocare_dist.data import (READERS, DataLoaderError, PretrainLoaderProtocol, Reader, build_loader,
                                resolve_loader_kind)
from echocare_dist.data.masking import MaskGenerator
from echocare_dist.data.pil_loader import PilReader
from echocare_dist.data.placement import decode_on_gpu

LOADERS = ["dali", "pil"]
COUNTS = (13, 11, 9, 8)  # 41 samples: rank ranges of 20 and 21 on 2 ranks


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ontology):
    root = tmp_path_factory.mktemp("loader_shards")
    return root, write_shards(root, ontology, COUNTS)


def _loader(root, kind, ontology, rank=0, world_size=1, run_dir=None, *overrides, micro_batch=4):
    cfg = loader_config(root, kind, *overrides, micro_batch=micro_batch)
    return build_loader(cfg, ontology, rank=rank, world_size=world_size, device="cpu", run_dir=run_dir)


@pytest.mark.parametrize("kind", LOADERS)
def test_batch_contract(shards, ontology, kind):
    root, labels = shards
    loader = _loader(root, kind, ontology)
    try:
        b = next(loader)
        cfg = loader.cfg
        B, S, p = 4, cfg.model.img_size, cfg.model.patch_size
        assert b["target"].shape == (B, 1, S, S) and b["target"].dtype == torch.float32
        assert 0.0 <= b["target"].min() and b["target"].max() <= 1.0 and b["target"].std() > 0.05
        a = cfg.data.augment
        assert torch.allclose(b["input"], (b["target"] - a.norm_mean) / a.norm_std)
        assert b["mask"].shape == (B, S // p, S // p) and b["mask"].dtype == torch.uint8
        assert b["labels"].shape == (B, len(ontology)) and b["labels"].dtype == torch.int8
        assert len(b["keys"]) == B and len(set(b["keys"])) == B
        for key, row in zip(b["keys"], b["labels"].numpy()):
            assert np.array_equal(row, labels[key]), f"labels of {key} differ from the shard's .lbl"
        expected = MaskGenerator.from_config(cfg).token_masks(b["keys"], epoch=0)
        assert torch.equal(b["mask"], expected)
        assert loader.global_batch_size == B * cfg.train.grad_accum
    finally:
        loader.close()


@pytest.mark.parametrize("kind", LOADERS)
def test_two_ranks_disjoint_equal_steps(shards, ontology, kind):
    root, labels = shards
    loaders = [_loader(root, kind, ontology, r, 2) for r in range(2)]
    try:
        steps = {ld.steps_per_epoch for ld in loaders}
        assert steps == {(sum(COUNTS) // 2) // 4}
        epochs = [[take(ld, ld.steps_per_epoch) for _ in range(2)] for ld in loaders]
        for e in range(2):
            per_rank = [[k for b in epochs[r][e] for k in b["keys"]] for r in range(2)]
            for keys in per_rank:
                assert len(keys) == len(set(keys)), "a sample repeated within an epoch on one rank"
            assert not set(per_rank[0]) & set(per_rank[1]), "ranks must see disjoint samples"
            assert set(per_rank[0]) | set(per_rank[1]) <= set(labels)
        assert all(ld.epoch == 1 and ld.position == ld.steps_per_epoch for ld in loaders)
        first = [k for b in epochs[0][0] for k in b["keys"]]
        second = [k for b in epochs[0][1] for k in b["keys"]]
        assert first != second, "the order must change between epochs"
    finally:
        for ld in loaders:
            ld.close()


@pytest.mark.parametrize("kind", LOADERS)
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("n_first", [3, 5])
def test_resume_is_exact(shards, ontology, kind, world_size, n_first, tmp_path):
    """N steps, save, restart (new loader object), M steps == N + M uninterrupted steps, per rank."""
    root, _ = shards
    n_second = 9  # crosses at least one epoch boundary (5 or 10 steps per epoch)
    for rank in range(world_size):
        full_loader = _loader(root, kind, ontology, rank, world_size, tmp_path)
        full = take(full_loader, n_first + n_second)
        full_loader.close()
        before = _loader(root, kind, ontology, rank, world_size, tmp_path)
        head = take(before, n_first)
        state = pickle.loads(pickle.dumps(before.state_dict()))  # as the checkpoint stores it
        before.close()
        after = _loader(root, kind, ontology, rank, world_size, tmp_path)
        after.load_state_dict(state)
        tail = take(after, n_second)
        after.close()
        assert not after.restarted_epoch
        got, want = head + tail, full
        assert [b["keys"] for b in got] == [b["keys"] for b in want]
        assert [b["epoch"] for b in got] == [b["epoch"] for b in want]
        for g, w in zip(got, want):  # same augmentation and masks, not only the same images
            np.testing.assert_array_equal(g["target"], w["target"])
            np.testing.assert_array_equal(g["mask"], w["mask"])


@pytest.mark.parametrize("kind", LOADERS)
def test_world_size_change_restarts_epoch(shards, ontology, kind, caplog):
    root, _ = shards
    two = _loader(root, kind, ontology, 0, 2)
    take(two, 3)
    state = two.state_dict()
    two.close()
    one = _loader(root, kind, ontology, 0, 1)
    with caplog.at_level(logging.WARNING, logger="echocare_dist.data"):
        one.load_state_dict(state)
    assert one.restarted_epoch and one.epoch == state["epoch"] and one.position == 0
    assert "world size changed from 2 to 1" in caplog.text and "new seed" in caplog.text
    keys = [k for b in take(one, one.steps_per_epoch) for k in b["keys"]]
    one.close()
    assert len(keys) == len(set(keys)) == one.steps_per_epoch * 4


def test_dali_and_fallback_agree_on_labels_and_masks(shards, ontology):
    """Same epoch plan -> same per-rank sample set; same key -> same labels and same mask."""
    root, labels = shards
    seen = {}
    for kind in LOADERS:
        ld = _loader(root, kind, ontology, 1, 2)
        seen[kind] = {k: (b["labels"][i], b["mask"][i]) for b in take(ld, ld.steps_per_epoch)
                      for i, k in enumerate(b["keys"])}
        ld.close()
    common = set(seen["dali"]) & set(seen["pil"])
    assert len(common) >= 12  # both draw 20 of the rank's 21 samples
    for key in common:
        assert np.array_equal(seen["dali"][key][0], seen["pil"][key][0])
        assert np.array_equal(seen["dali"][key][0], labels[key])
        assert np.array_equal(seen["dali"][key][1], seen["pil"][key][1])
    masked = {kind: np.mean([m.mean() for _, m in seen[kind].values()]) for kind in LOADERS}
    assert masked["dali"] == pytest.approx(0.5) and masked["pil"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def ramp_shards(tmp_path_factory, ontology):
    root = tmp_path_factory.mktemp("ramp_shards")
    write_shards(root, ontology, (80, 80, 80, 80), size=(96, 72), pattern="ramp")
    return root


def _aug_stats(batches):
    t = np.concatenate([b["target"][:, 0] for b in batches])          # (N, S, S)
    dx = t[:, :, -1].mean(1) - t[:, :, 0].mean(1)                      # + unless flipped horizontally
    dy = t[:, -1, :].mean(1) - t[:, 0, :].mean(1)                      # + unless flipped vertically
    span = np.abs(dx) / (RAMP_X / 255.0)                               # ~ crop width fraction (x jitter)
    return dict(hflip=float((dx < 0).mean()), vflip=float((dy < 0).mean()), span=float(span.mean()),
                cropped=float((span < 0.93).mean()), mean=float(t.mean()), std_of_means=float(t.mean((1, 2)).std()))


def test_augmentation_statistics_match(ramp_shards, ontology):
    """Over 320 images: flip rates, crop-size distribution and intensity agree within tolerance."""
    stats = {}
    for kind in LOADERS:
        ld = _loader(ramp_shards, kind, ontology, 0, 1, None, micro_batch=16)
        stats[kind] = _aug_stats(take(ld, ld.steps_per_epoch))
        ld.close()
    d, w = stats["dali"], stats["pil"]
    for s in (d, w):
        assert abs(s["hflip"] - 0.5) < 0.1 and abs(s["vflip"] - 0.5) < 0.1, stats
        assert 0.3 < s["cropped"] < 0.6, stats  # rrc_prob 0.5, most random crops narrower than the image
    assert abs(d["hflip"] - w["hflip"]) < 0.12 and abs(d["vflip"] - w["vflip"]) < 0.12, stats
    assert abs(d["cropped"] - w["cropped"]) < 0.12, stats
    assert abs(d["span"] - w["span"]) < 0.04, stats
    assert abs(d["mean"] - w["mean"]) < 0.02, stats
    assert abs(d["std_of_means"] - w["std_of_means"]) < 0.02, stats


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("threads", [0, 3])
def test_fallback_resume_with_other_worker_counts(shards, ontology, threads):
    """In-process (0 workers) and 3 workers (streams that do not divide the epoch evenly)."""
    root, _ = shards
    opt = f"data.num_threads={threads}"
    full = _loader(root, "pil", ontology, 1, 2, None, opt)
    want = [b["keys"] for b in take(full, 12)]
    full.close()
    first = _loader(root, "pil", ontology, 1, 2, None, opt)
    got = [b["keys"] for b in take(first, 4)]
    state = first.state_dict()
    first.close()
    second = _loader(root, "pil", ontology, 1, 2, None, opt)
    second.load_state_dict(state)
    got += [b["keys"] for b in take(second, 8)]
    second.close()
    assert got == want
    flat = [k for ks in want[:5] for k in ks]
    assert len(flat) == len(set(flat))


def test_state_before_first_batch_and_thread_change(shards, ontology, caplog):
    root, _ = shards
    fresh = _loader(root, "dali", ontology)
    state = fresh.state_dict()           # saved before any batch (e.g. a checkpoint at step 0)
    want = take(fresh, 2)
    fresh.close()
    again = _loader(root, "dali", ontology)
    again.load_state_dict(state)
    assert [b["keys"] for b in take(again, 2)] == [b["keys"] for b in want]
    again.close()
    pil = _loader(root, "pil", ontology)
    take(pil, 2)
    state = pil.state_dict()
    pil.close()
    other = _loader(root, "pil", ontology, 0, 1, None, "data.num_threads=1")
    with caplog.at_level(logging.INFO, logger="echocare_dist.data"):
        other.load_state_dict(state)
    # Other worker streams cannot continue the order exactly; the epoch's unconsumed samples are
    # split again instead of restarting it (resume.py): nothing read twice.
    assert other.resumed_as == "split" and not other.restarted_epoch and "data.num_threads" in caplog.text
    pil_again = _loader(root, "pil", ontology)
    consumed = {k for b in take(pil_again, 2) for k in b["keys"]}
    pil_again.close()
    rest = [k for b in take(other, other.steps_per_epoch) for k in b["keys"]]
    other.close()
    assert not consumed & set(rest) and len(rest) == len(set(rest))


def test_jitter_factors_match(ramp_shards, ontology):
    """Brightness only, always on: target mean / plain mean = b ~ U[0.7, 1.3] in both loaders."""
    opts = ["data.augment.rrc_prob=0", "data.augment.hflip_prob=0", "data.augment.vflip_prob=0",
            "data.augment.jitter_prob=1", "data.augment.brightness=0.3", "data.augment.contrast=0"]
    plain_opts = opts[:3] + ["data.augment.jitter_prob=0"]
    factors = {}
    for kind in LOADERS:
        plain = _loader(ramp_shards, kind, ontology, 0, 1, None, *plain_opts, micro_batch=16)
        base = {k: t.mean() for b in take(plain, 6) for k, t in zip(b["keys"], b["target"])}
        plain.close()
        ld = _loader(ramp_shards, kind, ontology, 0, 1, None, *opts, micro_batch=16)
        got = {k: t.mean() for b in take(ld, 6) for k, t in zip(b["keys"], b["target"])}
        ld.close()
        # Clamping at 1 only bites above b ~ 1.2 on the ramp's brightest column; use the ratio of means.
        factors[kind] = np.array([got[k] / base[k] for k in got.keys() & base.keys()])
    for kind, f in factors.items():
        assert len(f) > 30 and 0.68 < f.min() and f.max() < 1.31, kind
        assert abs(f.mean() - 1.0) < 0.06 and abs(f.std() - 0.6 / np.sqrt(12)) < 0.05, (kind, f.mean(), f.std())


def test_registry_resolves_kinds(shards):
    root, _ = shards
    cfg = loader_config(root, "dali")
    assert {k: r.kind for k, r in READERS.items()} == {"dali": "dali", "pil": "pil"}
    for kind in ("dali", "pil"):
        cfg.data.loader = kind
        assert resolve_loader_kind(cfg, "cpu") == kind
    cfg.data.loader = "auto"
    assert resolve_loader_kind(cfg, "cpu") == "pil"   # DALI only when it decodes on the GPU
    for device, on_gpu in (("cpu", False), ("auto", False), ("gpu", True)):
        cfg.data.device = device
        assert decode_on_gpu(cfg.data, "cpu") is on_gpu, device
    if not torch.cuda.is_available():
        assert resolve_loader_kind(cfg, "cpu") == "pil"   # data.device=gpu without CUDA: not DALI's
    cfg.data.loader = "webdataset"
    with pytest.raises(DataLoaderError, match="data.loader='webdataset': unknown loader"):
        resolve_loader_kind(cfg, "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_dali_refuses_gpu_decoding_without_cuda(shards, ontology):
    root, _ = shards
    with pytest.raises(DataLoaderError, match="data.device=gpu but CUDA is not available"):
        _loader(root, "dali", ontology, 0, 1, None, "data.device=gpu")


def test_wds_alias_warns_and_builds_the_pil_loader(shards, ontology):
    root, _ = shards
    cfg = loader_config(root, "pil")
    cfg.data.loader = "wds"  # a config built without load_config, which renames it itself
    with pytest.warns(FutureWarning, match=r"data\.loader='wds' is deprecated, use data\.loader='pil'"):
        loader = build_loader(cfg, ontology, rank=0, world_size=1, device="cpu", run_dir=None)
    try:
        assert loader.kind == "pil" and isinstance(loader.reader, PilReader)
        assert loader.state_dict()["loader"] == "pil"
    finally:
        loader.close()


def test_state_saved_by_the_wds_loader_resumes_exactly(shards, ontology, caplog):
    """Runs started before the rename saved loader="wds": the PIL loader continues them exactly."""
    root, _ = shards
    full = _loader(root, "pil", ontology, 1, 2)
    want = take(full, 8)  # 5 steps per epoch: crosses an epoch boundary
    full.close()
    first = _loader(root, "pil", ontology, 1, 2)
    got = take(first, 3)
    state = pickle.loads(pickle.dumps(first.state_dict()))
    first.close()
    assert state["loader"] == "pil"
    state["loader"] = "wds"
    second = _loader(root, "pil", ontology, 1, 2)
    second.load_state_dict(state)
    got += take(second, 5)
    second.close()
    assert not second.restarted_epoch
    assert [b["keys"] for b in got] == [b["keys"] for b in want]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["target"], w["target"])
        np.testing.assert_array_equal(g["mask"], w["mask"])
    dali = _loader(root, "dali", ontology, 1, 2)
    with caplog.at_level(logging.WARNING, logger="echocare_dist.data"):
        dali.load_state_dict(state)
    dali.close()
    assert dali.restarted_epoch and "saved by the 'wds' loader, this is 'dali'" in caplog.text


@pytest.mark.parametrize("kind", LOADERS)
def test_loaders_implement_the_protocols(shards, ontology, kind):
    """What the trainer reads without getattr, and the reader contract behind it."""
    root, _ = shards
    loader = _loader(root, kind, ontology)
    try:
        assert isinstance(loader, PretrainLoaderProtocol)
        assert isinstance(loader.reader, Reader) and type(loader.reader) is READERS[kind]
        assert loader.kind == loader.reader.kind == kind
        next(loader)
        assert (loader.epoch, loader.bad_samples, loader.quarantined) == (0, 0, [])
        assert loader.steps_per_epoch == sum(COUNTS) // 4
        assert loader.state_dict()["loader"] == kind
    finally:
        loader.close()
