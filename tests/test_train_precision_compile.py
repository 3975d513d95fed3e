"""fp16 and model.compile on the CPU (tiny preset).

- train.precision=fp16 (autocast + DeepSpeed's loss scaler, ZeRO-2) trains one process: losses
  finite and falling, step 1 equal to fp32's within autocast rounding.
- model.compile=blocks (inductor, the machine's g++): compiled and eager losses and gradients
  agree; a run trained with compile on resumes with compile on, its checkpoint holds plain
  state_dict keys (no `_orig_mod.`), and the export loads into a plain timm encoder.

Inductor's first compile of the tiny model takes minutes on a busy 2-core machine (its FX-graph
cache makes reruns ~20 s); drop_path is off and the micro-batch is the same everywhere so every
test reuses the same graphs.
"""
from __future__ import annotations

import math

import pytest
import torch
import train_launch as tl

from echocare_dist.config import load_config
from echocare_dist.export import ENCODER_FILE, export_checkpoint, load_encoder
from echocare_dist.models import build_model
from echocare_dist.models.compile import apply_compile
from echocare_dist.train.loss import PretrainLoss

pytestmark = pytest.mark.slow

BATCH = 4
SAME_GRAPHS = ["model.drop_path_rate=0.0", f"train.micro_batch={BATCH}"]


def _run(tmp_path, tiny_shards, name: str, *sets: str, steps: int = 3, resume: str = "none"):
    run_dir, log = tmp_path / name, tmp_path / f"{name}.log"
    extra = {"train.steps": steps, "train.resume": resume, "train.ckpt_every": 2}
    overrides = tl.base_overrides(run_dir, tiny_shards, **{k.replace(".", "__"): v for k, v in extra.items()})
    rc = tl.run("python", overrides + SAME_GRAPHS + list(sets), log, nproc=1, timeout=900)
    assert rc == 0, tl.tail(log)
    return run_dir, log.read_text()


def test_fp16_trains_like_fp32_on_cpu(tmp_path, tiny_shards):
    fp32, _ = _run(tmp_path, tiny_shards, "fp32", "train.precision=fp32")
    fp16, log = _run(tmp_path, tiny_shards, "fp16", "train.precision=fp16")
    l32, l16 = tl.losses(fp32), tl.losses(fp16)
    assert sorted(l16) == [1, 2, 3] and all(math.isfinite(v) for v in l16.values()), l16
    assert l16[3] < l16[1], l16
    # Step 1 runs the same weights on the same batch: only fp16 rounding inside autocast differs.
    assert abs(l16[1] - l32[1]) < 0.02 * l32[1], (l16, l32)
    assert l16 != l32  # autocast really ran in fp16
    assert "precision fp16 autocast, fp32 reduction" in log


def test_compiled_blocks_match_eager_loss_and_gradients(ontology):
    cfg = load_config("tiny_cpu", SAME_GRAPHS)
    torch.manual_seed(0)
    eager = build_model(cfg.model, len(ontology))
    compiled = build_model(cfg.model, len(ontology))
    compiled.load_state_dict(eager.state_dict())
    assert apply_compile(compiled, "blocks", "cpu") == "blocks"
    g = torch.Generator().manual_seed(1)
    side, grid = cfg.model.img_size, cfg.model.img_size // cfg.model.patch_size
    target = torch.rand(BATCH, 1, side, side, generator=g)
    batch = dict(input=(target - 0.5) / 0.5, target=target,
                 mask=(torch.rand(BATCH, grid, grid, generator=g) > 0.5).to(torch.uint8),
                 labels=torch.randint(-1, 2, (BATCH, len(ontology)), generator=g).to(torch.int8))
    loss_fn = PretrainLoss(cfg, ontology)
    losses = []
    for model in (eager, compiled):
        loss, _, _ = loss_fn(model(batch["input"], batch["mask"]), batch)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert a.grad is not None and b.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_resume_and_export_with_compile_on(tmp_path, tiny_shards):
    run_dir, log = _run(tmp_path, tiny_shards, "compiled", "model.compile=blocks", steps=2)
    assert "compile blocks" in log
    assert tl.latest(run_dir) == "step_00000002"
    run_dir, log = _run(tmp_path, tiny_shards, "compiled", "model.compile=blocks", steps=3, resume="auto")
    assert "resumed from" in log and "at step 2" in log, log[-3000:]
    assert sorted(tl.losses(run_dir)) == [1, 2, 3]
    assert tl.latest(run_dir) == "step_00000003"
    from echocare_dist.safe_load import torch_load_safe  # weights_only=True (issue 11: no torch.load runs code)
    states = torch_load_safe(run_dir / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt")
    keys = list(states["module"])
    assert keys and not any("_orig_mod" in k for k in keys), keys[:5]
    export_checkpoint(run_dir, tmp_path / "export", progress=False)
    encoder = load_encoder(tmp_path / "export" / ENCODER_FILE)
    assert sum(p.numel() for p in encoder.parameters()) > 0
