"""`echocare export`: DeepSpeed checkpoints of ZeRO 0/2/3 (1 and 2 ranks) -> encoder files.

The checkpoints are written by the pretraining loop itself (`Pretrainer`: build_components,
train_step, its checkpoint), in a subprocess so this pytest process never joins a process group,
after two optimizer steps on real shards so the weights differ from their initialisation. The
script also records the training model's encoder features on a probe batch: the exported encoder
must reproduce them.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import train_launch as tl  # shared launcher environment of the multi-process tests

from echocare_dist.export import (ENCODER_FILE, HEADS_FILE, META_FILE, ExportError, export_checkpoint,
                                  load_encoder, timm_kwargs)

MAKE_CHECKPOINTS = textwrap.dedent('''
    import contextlib, sys
    from pathlib import Path
    import deepspeed, torch
    from echocare_dist.config import load_config
    from echocare_dist.data.testing import write_shards
    from echocare_dist.ontology import load_ontology
    from echocare_dist.train import distributed
    from echocare_dist.train.preemption import PreemptionHandler
    from echocare_dist.train.trainer import Pretrainer

    out, stages = Path(sys.argv[1]), [int(s) for s in sys.argv[2:]]
    env = distributed.init_distributed(600)  # generous: CI cores are shared
    shards = out / "shards"
    if env.is_main:
        base = load_config("tiny_cpu")
        write_shards(shards, load_ontology(base.resolve_path(base.ontology.path)), counts=(8, 8))
    distributed.barrier()
    for stage in stages:
        run_dir = out / f"zero{stage}_w{env.world_size}"
        # A large first step (no warmup, LR not scaled down to the tiny batch): the weights move.
        cfg = load_config("tiny_cpu", [
            f"data.shards={shards}", f"train.run_dir={run_dir}", f"train.zero_stage={stage}",
            "train.micro_batch=2", "train.steps=2", "train.ckpt_every=1000", "train.log_every=1",
            "train.image_every=1000", "train.resume=none", "tracking.enabled=false",
            "optim.lr=1e-2", "optim.lr_batch_ref=2", "optim.warmup_steps=0"])
        trainer = Pretrainer(cfg, env)
        trainer.setup()
        assert trainer.train(PreemptionHandler([])) == 0 and trainer.step == 2
        engine = trainer.components.engine
        probe = torch.rand(3, 1, cfg.model.img_size, cfg.model.img_size, generator=torch.Generator().manual_seed(7))
        gather = (deepspeed.zero.GatheredParameters(list(engine.module.parameters()))
                  if stage == 3 else contextlib.nullcontext())
        with gather, torch.no_grad():
            # named_parameters, not state_dict: under ZeRO-3 the latter holds the empty partitions.
            # Copied before any forward: ZeRO-3's hooks re-partition what a forward touched.
            state = {k: v.detach().clone() for k, v in engine.module.named_parameters()}
            persistent = set(engine.module.state_dict())
            state.update({k: v.detach().clone() for k, v in engine.module.named_buffers() if k in persistent})
            engine.module.eval()
            features = engine.module.encoder.forward_features(probe)
            full = engine.module.encode(probe)[-1]
        if env.is_main:
            torch.save(dict(probe=probe, features=features, encode_last=full, state_dict=state),
                       run_dir / "reference.pt")
        trainer.close()
        distributed.barrier()
    distributed.shutdown()
''')


def _make_checkpoints(out: Path, stages: list[int], nproc: int) -> None:
    script = out / "make_checkpoints.py"
    script.write_text(MAKE_CHECKPOINTS)
    env = {k: v for k, v in tl.env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if nproc == 1:
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={tl.free_port()}", str(script)]
    proc = subprocess.run(cmd + [str(out)] + [str(s) for s in stages], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds ckpts")  # a space in the path on purpose
    _make_checkpoints(out, [0, 2, 3], nproc=1)
    return out


def _probe_features(encoder, reference: dict) -> torch.Tensor:
    with torch.no_grad():
        return encoder.forward_features(reference["probe"])


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_export_reproduces_training_encoder(ckpts, tmp_path, stage):
    run_dir = ckpts / f"zero{stage}_w1"
    reference = torch.load(run_dir / "reference.pt", weights_only=True)
    meta = export_checkpoint(run_dir, tmp_path / "export", progress=False)

    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / "export" / ENCODER_FILE))
    expected = {k[len("encoder."):]: v for k, v in reference["state_dict"].items() if k.startswith("encoder.")}
    assert set(weights) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor.float()), name

    encoder = load_encoder(tmp_path / "export" / ENCODER_FILE)
    features = _probe_features(encoder, reference)
    torch.testing.assert_close(features, reference["features"], rtol=0, atol=1e-6)
    torch.testing.assert_close(features, reference["encode_last"], rtol=0, atol=1e-6)

    src = meta["source"]
    assert (src["step"], src["zero_stage"], src["world_size"], src["tag"]) == (2, stage, 1, "step_00000002")
    assert meta["files"]["encoder"]["sha256"] == __import__("hashlib").sha256(
        (tmp_path / "export" / ENCODER_FILE).read_bytes()).hexdigest()
    on_disk = json.loads((tmp_path / "export" / META_FILE).read_text())
    assert on_disk == json.loads(json.dumps(meta))
    assert not (tmp_path / "export" / HEADS_FILE).exists()


def test_export_json_describes_architecture_and_ontology(ckpts, tmp_path, tiny_config, ontology):
    meta = export_checkpoint(ckpts / "zero2_w1" / "checkpoints", tmp_path, progress=False)
    m = tiny_config.model
    assert (meta["arch"], meta["img_size"], meta["patch_size"], meta["window_size"], meta["in_chans"]) == \
        (m.arch, m.img_size, m.patch_size, m.window_size, m.in_chans)
    assert (meta["embed_dim"], meta["depths"], meta["num_heads"]) == (m.embed_dim, list(m.depths), list(m.num_heads))
    assert meta["ontology"]["hash"] == ontology.hash
    assert meta["ontology"]["nodes"] == list(ontology.names)
    assert meta["dtype"] == "fp32" and meta["echocare_version"]
    assert meta["source"]["run_dir"] == str((ckpts / "zero2_w1").resolve())


def test_timm_loads_export_with_pretrained_cfg_overlay(ckpts, tmp_path):
    import timm
    reference = torch.load(ckpts / "zero3_w1" / "reference.pt", weights_only=True)
    meta = export_checkpoint(ckpts / "zero3_w1", tmp_path, progress=False)
    kwargs = timm_kwargs(meta)
    del kwargs["model_name"], kwargs["pretrained"]
    model = timm.create_model(meta["arch"], pretrained=True, **kwargs,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / ENCODER_FILE))).eval()
    torch.testing.assert_close(_probe_features(model, reference), reference["features"], rtol=0, atol=1e-6)


def test_timm_local_dir_alone_reproduces_the_training_encoder(ckpts, tmp_path):
    """timm's own layout of a real ZeRO-3 export: no arguments, the trained features, our data config."""
    import timm
    import timm.data
    reference = torch.load(ckpts / "zero3_w1" / "reference.pt", weights_only=True)
    meta = export_checkpoint(ckpts / "zero3_w1", tmp_path, progress=False)
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    torch.testing.assert_close(_probe_features(model, reference), reference["features"], rtol=0, atol=1e-6)
    data = timm.data.resolve_data_config(model=model)
    assert data["input_size"] == (1, meta["img_size"], meta["img_size"])
    assert tuple(data["mean"]) == (meta["norm_mean"],) and tuple(data["std"]) == (meta["norm_std"],)


def test_bf16_export_and_heads(ckpts, tmp_path):
    from safetensors.torch import load_file
    reference = torch.load(ckpts / "zero2_w1" / "reference.pt", weights_only=True)
    meta = export_checkpoint(ckpts / "zero2_w1", tmp_path, dtype="bf16", with_heads=True, progress=False)
    enc = load_file(str(tmp_path / ENCODER_FILE))
    assert meta["dtype"] == "bf16" and all(v.dtype == torch.bfloat16 for v in enc.values() if v.is_floating_point())
    heads = load_file(str(tmp_path / HEADS_FILE))
    expected_heads = {k: v for k, v in reference["state_dict"].items() if not k.startswith("encoder.")}
    assert set(heads) == set(expected_heads) and "mask_token" in heads
    assert any(k.startswith("decoder.") for k in heads) and any(k.startswith("hie_head.") for k in heads)
    for k, v in expected_heads.items():
        assert torch.equal(heads[k], v.to(torch.bfloat16)), k
    features = _probe_features(load_encoder(tmp_path), reference)
    torch.testing.assert_close(features, reference["features"], rtol=0.05, atol=0.05)
    # A later export without heads must not leave the old heads next to the new encoder.
    export_checkpoint(ckpts / "zero2_w1", tmp_path, progress=False)
    assert not (tmp_path / HEADS_FILE).exists()


# ------------------------------------------------------------------------------ refusals
def _copy_run(ckpts: Path, name: str, dst: Path) -> Path:
    return Path(shutil.copytree(ckpts / name, dst / name))


def test_refuses_run_without_latest(ckpts, tmp_path):
    run = _copy_run(ckpts, "zero2_w1", tmp_path)
    (run / "checkpoints" / "latest").unlink()
    with pytest.raises(ExportError, match="no 'latest'"):
        export_checkpoint(run, tmp_path / "out", progress=False)
    # An explicit tag still works.
    assert export_checkpoint(run, tmp_path / "out", tag="step_00000002", progress=False)["source"]["step"] == 2


def test_refuses_partial_checkpoints(ckpts, tmp_path):
    run = _copy_run(ckpts, "zero3_w1", tmp_path)
    tag_dir = run / "checkpoints" / "step_00000002"
    (tag_dir / "meta.json").unlink()
    with pytest.raises(ExportError, match="no meta.json"):
        export_checkpoint(run, tmp_path / "out", progress=False)
    optim = next(tag_dir.glob("*optim_states.pt"))
    optim.unlink()
    with pytest.raises(ExportError, match=r"missing \[0\]"):
        export_checkpoint(run, tmp_path / "out", progress=False, require_marker=False)
    for f in tag_dir.glob("*model_states.pt"):
        f.unlink()
    with pytest.raises(ExportError, match="no model states file"):
        export_checkpoint(tag_dir, tmp_path / "out", progress=False, require_marker=False)
    assert not (tmp_path / "out" / ENCODER_FILE).exists()


def test_refuses_truncated_file(ckpts, tmp_path):
    run = _copy_run(ckpts, "zero0_w1", tmp_path)
    tag_dir = run / "checkpoints" / "step_00000002"
    f = tag_dir / "mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    # The completion marker recorded every file's size and SHA-256: the damage is named before any load.
    with pytest.raises(ExportError, match=r"mp_rank_00_model_states.pt: \d+ bytes, .*meta.json recorded"):
        export_checkpoint(run, tmp_path / "out", progress=False)
    (tag_dir / "meta.json").unlink()  # a plain DeepSpeed checkpoint: the load itself must refuse it
    with pytest.raises(ExportError, match="cannot read"):
        export_checkpoint(run, tmp_path / "out", progress=False, require_marker=False)


def _rerecord(tag_dir: Path) -> None:
    """Make the marker vouch for files a test rewrote on purpose."""
    from echocare_dist.train.checkpoint import hash_files
    marker = json.loads((tag_dir / "meta.json").read_text())
    marker["files"] = hash_files(tag_dir)
    (tag_dir / "meta.json").write_text(json.dumps(marker))


def test_refuses_weights_that_do_not_match_the_config(ckpts, tmp_path):
    run = _copy_run(ckpts, "zero0_w1", tmp_path)
    f = run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    from echocare_dist.safe_load import torch_load_safe
    states = dict(torch_load_safe(f))
    states["config"]["model"]["embed_dim"] = 48  # the run's config now names a wider Swin
    torch.save(states, f.with_suffix(".new"))  # not over `f`: its tensors are memory-mapped from it
    f.with_suffix(".new").replace(f)
    _rerecord(f.parent)
    with pytest.raises(ExportError, match=r"do not match the architecture.*shape mismatch.*vs config"):
        export_checkpoint(run, tmp_path / "out", progress=False)


def test_load_encoder_detects_corrupt_file(ckpts, tmp_path):
    export_checkpoint(ckpts / "zero0_w1", tmp_path, progress=False)
    blob = bytearray((tmp_path / ENCODER_FILE).read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / ENCODER_FILE).write_bytes(bytes(blob))
    with pytest.raises(ExportError, match="SHA-256"):
        load_encoder(tmp_path)


def test_cli(ckpts, tmp_path, capsys):
    from echocare_dist.cli import main
    assert main(["export", str(ckpts / "zero0_w1"), "--out", str(tmp_path / "cli out"), "--no-progress",
                 "--license", "cc-by-4.0"]) == 0
    out = capsys.readouterr().out
    assert "encoder.safetensors" in out and "model.safetensors" in out and "config.json" in out
    assert (tmp_path / "cli out" / META_FILE).is_file()
    assert json.loads((tmp_path / "cli out" / "config.json").read_text())["pretrained_cfg"]["license"] == "cc-by-4.0"
    assert "license: cc-by-4.0" in (tmp_path / "cli out" / "README.md").read_text()
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "no 'latest'" in capsys.readouterr().err


# ------------------------------------------------------------------------------ world size 2
@pytest.mark.slow
def test_two_rank_zero3_checkpoint_exports_identically(tmp_path):
    _make_checkpoints(tmp_path, [3], nproc=2)
    run = tmp_path / "zero3_w2"
    reference = torch.load(run / "reference.pt", weights_only=True)
    meta = export_checkpoint(run, tmp_path / "export", progress=False)
    assert (meta["source"]["world_size"], meta["source"]["zero_stage"]) == (2, 3)
    features = _probe_features(load_encoder(tmp_path / "export"), reference)
    torch.testing.assert_close(features, reference["features"], rtol=0, atol=1e-6)

    tag_dir = run / "checkpoints" / "step_00000002"
    next(tag_dir.glob("zero_pp_rank_1_*optim_states.pt")).unlink()
    # The completion marker lists every file: its check names the missing one first ...
    with pytest.raises(ExportError, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt: No such file"):
        export_checkpoint(run, tmp_path / "export2", progress=False)
    # ... and without the marker, the per-rank inventory still names the missing rank.
    (tag_dir / "meta.json").unlink()
    with pytest.raises(ExportError, match=r"missing \[1\]"):
        export_checkpoint(run, tmp_path / "export3", progress=False, require_marker=False)
