"""The pretraining loop: components wired together, nothing more.

    distributed  -> ranks, device, seeds          optim       -> AdamW, schedule, DeepSpeed JSON
    checkpoint   -> save / resume / universal     preemption  -> signal flag, collective vote
    tracking     -> MLflow (rank 0)               metrics     -> MFU, memory, JSONL
    loss         -> L_MIM + lambda * L_HIE        images      -> reconstruction grids

`pretrain(cfg)` returns the process exit code: 0 when the run reached train.steps,
train.requeue_exit_code after a preemption checkpoint.
"""
from __future__ import annotations

import logging
import sys
import time

import torch

from ..atomic import atomic_write_bytes, atomic_write_json
from ..config import Config, save_resolved
from . import distributed
from .checkpoint import CheckpointManager, ResumePlan, model_fingerprint
from .images import reconstruction_grid
from .loss import PretrainLoss
from .metrics import MetricsFile, Window, memory_gb, peak_tflops
from .optim import build_optimizer, deepspeed_config, global_batch, scaled_lr
from .preemption import PreemptionHandler
from .tracking import Tracker, TrackingError, flatten

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(name)s: %(message)s", "%H:%M:%S"))
    ours = logging.getLogger("echocare_dist")
    ours.handlers[:] = [handler]
    ours.setLevel(level)
    ours.propagate = False
    # DeepSpeed dumps its whole config at INFO on every rank; ours is in run_dir/deepspeed_config.json.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def _count(x) -> int:
    if x is None:
        return 0
    return len(x) if hasattr(x, "__len__") else int(x)


class Pretrainer:
    def __init__(self, cfg: Config, env: distributed.DistEnv):
        from ..ontology import load_ontology

        self.cfg, self.env = cfg, env
        self.run_dir = cfg.resolve_path(cfg.train.run_dir).resolve()
        self.ontology = load_ontology(cfg.resolve_path(cfg.ontology.path))
        self.ckpts = CheckpointManager(self.run_dir / "checkpoints", env, cfg.train.keep_last,
                                       cfg.train.universal_workers)
        self.metrics_file = MetricsFile(self.run_dir / "metrics.jsonl")
        self.global_batch = global_batch(cfg, env.world_size)
        self.step = 0
        self.last_saved_step = -1

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        from ..data import build_loader
        from ..models import build_model, flops_per_image

        cfg, env = self.cfg, self.env
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, self.run_dir)
        distributed.configure_determinism(cfg.train.deterministic)
        plan = self.ckpts.plan_resume(cfg.train.resume, cfg, self.ontology.hash)
        self._start_tracking(plan)

        # Same seed on every rank: identical initial weights (ZeRO-3 partitions what each rank built).
        distributed.seed_everything(cfg.train.seed)
        model = build_model(cfg.model, len(self.ontology))
        self.flops = flops_per_image(cfg.model, len(self.ontology))
        self.n_params = sum(p.numel() for p in model.parameters())
        optimizer, scheduler = build_optimizer(model, cfg, env.world_size, env.device)
        self.ds_config = deepspeed_config(cfg, env.world_size, env.device, load_universal=bool(plan and plan.universal))
        if env.is_main:
            atomic_write_json(self.run_dir / "deepspeed_config.json", self.ds_config)
            log.info("DeepSpeed config (%s): %s", self.run_dir / "deepspeed_config.json", self.ds_config)

        import deepspeed
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config,
            dist_init_required=False)
        self.loss_fn = PretrainLoss(cfg, self.ontology)
        self.loader = build_loader(cfg, self.ontology, rank=env.rank, world_size=env.world_size,
                                   device=env.device, run_dir=self.run_dir)
        # Per-rank stream for stochastic depth etc.; a resume on the same world size restores it exactly.
        distributed.seed_everything(cfg.train.seed + 1 + env.rank)
        self.peak_tflops, peak_source = peak_tflops(env.device, cfg.train.precision, cfg.train.peak_tflops)
        if plan is not None:
            self._restore(plan)  # last: nothing may draw from the restored RNG streams before step 1
        if env.is_main:
            self.metrics_file.truncate_after(self.step)
            peak_lr, min_lr = scaled_lr(cfg, env.world_size)
            log.info("model %s: %.2f M params, %.2f GFLOP forward / image; %d ranks (%s) x micro-batch %d x "
                     "accumulation %d = global batch %d; peak LR %.3g (min %.3g); ZeRO-%d %s; peak %.1f TFLOP/s "
                     "per device (%s); starting at step %d of %d", cfg.model.arch, self.n_params / 1e6,
                     self.flops["forward"] / 1e9, env.world_size, env.launcher, cfg.train.micro_batch,
                     cfg.train.grad_accum, self.global_batch, peak_lr, min_lr, cfg.train.zero_stage,
                     cfg.train.precision, self.peak_tflops, peak_source, self.step, cfg.train.steps)
            params = flatten(cfg.to_dict())
            params.update({"run.world_size": str(env.world_size), "run.global_batch": str(self.global_batch),
                           "run.peak_lr": str(peak_lr), "run.params": str(self.n_params),
                           "run.flops_per_image_forward": str(self.flops["forward"]),
                           "run.ontology_hash": self.ontology.hash})
            self.tracker.log_params(params)
            self.tracker.log_artifact(self.run_dir / "deepspeed_config.json", "config")
            self.tracker.log_artifact(self.run_dir / "config.resolved.yaml", "config")

    def _start_tracking(self, plan: ResumePlan | None) -> None:
        t = self.cfg.tracking
        self.tracker = Tracker(self.env.is_main and t.enabled, t.uri, t.experiment, t.run_name, self.run_dir)
        error = None
        try:
            self.tracker.start(plan.meta.get("mlflow_run_id") if plan else None)
        except TrackingError as exc:
            error = str(exc)
        error = distributed.broadcast_object(error)  # all ranks stop together, none waits in a collective
        if error:
            raise TrackingError(error)
        self.run_id = distributed.broadcast_object(self.tracker.run_id)

    def _restore(self, plan: ResumePlan) -> None:
        client = self.ckpts.load(self.engine, plan)
        self.scheduler.apply()  # DeepSpeed restores the optimizer after the scheduler
        self.step = self.last_saved_step = int(client["step"])
        same_world = int(client["world_size"]) == self.env.world_size
        loader_states = client["loader"]
        if same_world:
            self.loader.load_state_dict(loader_states[self.env.rank])
            distributed.set_rng_state(client["rng"][self.env.rank])
        else:
            # The loader sees the saved world size in its state and restarts the epoch with a new
            # split; the per-rank RNG streams cannot be mapped, so they are re-derived from the step.
            self.loader.load_state_dict(loader_states[min(self.env.rank, len(loader_states) - 1)])
            distributed.seed_everything(self.cfg.train.seed + 1 + self.env.rank + 7919 * self.step)
        log.info("resumed from %s at step %d (saved by %d ranks%s)", plan.source, self.step,
                 client["world_size"], ", universal checkpoint" if plan.universal else "")

    # ------------------------------------------------------------------ loop
    def train(self, preempt: PreemptionHandler) -> int:
        t = self.cfg.train
        window = Window()
        stopped_by = None
        while self.step < t.steps:
            last_batch, last_out, lr = self._train_step(window)
            self.step += 1
            if self.step % t.log_every == 0 or self.step == t.steps:
                self._log(window, lr)
            if self.step % t.image_every == 0:
                with window.excluded():
                    self._log_images(last_batch, last_out)
            if preempt.should_stop():
                stopped_by = preempt.requested_by
                break
            if self.step % t.ckpt_every == 0:
                with window.excluded():
                    self.save()
        if self.last_saved_step != self.step:
            self.save()
        if stopped_by is not None:
            log.warning("preempted (%s): checkpoint at step %d complete; exiting with %d for requeue",
                        stopped_by, self.step, t.requeue_exit_code)
            self.tracker.finish("SCHEDULED")
            return t.requeue_exit_code
        log.info("training complete at step %d", self.step)
        self.tracker.finish("FINISHED")
        return 0

    def _train_step(self, window: Window):
        engine, accum = self.engine, self.cfg.train.grad_accum
        total = mim_sum = hie_sum = None
        data_wait = 0.0
        lr = self.optimizer.param_groups[0]["lr"]  # the LR this step's update uses
        for _ in range(accum):
            t0 = time.perf_counter()
            with self._isolated_rng():
                batch = next(self.loader)  # an infinite iterator (echocare_dist.data contract)
            data_wait += time.perf_counter() - t0
            out = engine(batch["input"], batch["mask"])
            loss, mim, hie = self.loss_fn(out, batch)
            engine.backward(loss)
            engine.step()
            total = loss.detach() if total is None else total + loss.detach()
            mim_sum = mim.detach() if mim_sum is None else mim_sum + mim.detach()
            hie_sum = hie.detach() if hie_sum is None else hie_sum + hie.detach()
        window.add(total / accum, mim_sum / accum, hie_sum / accum, data_wait)
        return batch, out, lr

    def _isolated_rng(self):
        """The loader has its own seeded randomness; whatever it draws from torch's global streams
        (a reader starting lazily after a resume does) must not shift stochastic depth."""
        devices = [self.env.device.index] if self.env.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def _log(self, window: Window, lr: float) -> None:
        env = self.env
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        elapsed = window.elapsed()
        n = window.steps
        (loss, mim, hie, wait), (mem, wait_max) = distributed.reduce_stats(
            [window.loss.item(), window.mim.item(), window.hie.item(), window.data_wait],
            [memory_gb(env.device), window.data_wait], env.device)
        per = env.world_size * n
        images_per_s = self.global_batch * n / elapsed
        grad_norm = self.engine.get_global_grad_norm()
        record = {
            "step": self.step, "time": time.time(),
            "loss": loss / per, "loss_mim": mim / per, "loss_hie": hie / per, "lr": lr,
            "images_per_s": images_per_s, "step_time_s": elapsed / n,
            "data_wait_s": wait / per, "data_wait_max_s": wait_max / n,
            "mem_gb": mem,
            "tflops_per_device": self.flops["train"] * images_per_s / env.world_size / 1e12,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "epoch": getattr(self.loader, "epoch", None),
            "loader_bad_samples": _count(getattr(self.loader, "bad_samples", 0)),
            "loader_quarantined": _count(getattr(self.loader, "quarantined", 0)),
        }
        record["mfu"] = record["tflops_per_device"] / self.peak_tflops
        window.reset()
        if not env.is_main:
            return
        log.info("step %d/%d loss %.4f (mim %.4f hie %.4f) lr %.3g | %.1f img/s, %.3f s/step, data %.3f s, "
                 "MFU %.1f%%, mem %.2f GB", self.step, self.cfg.train.steps, record["loss"], record["loss_mim"],
                 record["loss_hie"], lr, images_per_s, record["step_time_s"], record["data_wait_s"],
                 100 * record["mfu"], mem)
        self.metrics_file.append(record)
        self.tracker.log_metrics({k: v for k, v in record.items() if k not in ("step", "time")}, self.step)

    def _log_images(self, batch: dict, out: dict) -> None:
        if not self.env.is_main:
            return
        a = self.cfg.data.augment
        png = reconstruction_grid(batch["input"], batch["mask"], out["recon"], batch["target"],
                                  a.norm_mean, a.norm_std, self.cfg.tracking.image_rows)
        path = self.run_dir / "images" / f"recon_step_{self.step:08d}.png"
        atomic_write_bytes(path, png)
        self.tracker.log_artifact(path, "reconstructions")

    def close(self) -> None:
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()

    # ------------------------------------------------------------------ checkpoint
    def save(self) -> None:
        env, cfg = self.env, self.cfg
        fingerprint = model_fingerprint(cfg.model)
        client_state = dict(
            format=CHECKPOINT_FORMAT, step=self.step, world_size=env.world_size,
            loader=distributed.all_gather_object(self.loader.state_dict()),
            rng=distributed.all_gather_object(distributed.rng_state()),
            config=cfg.to_dict(), ontology_hash=self.ontology.hash, model=fingerprint,
            mlflow_run_id=self.run_id,
            # Required by DeepSpeed's ds_to_universal (world-size changes); no tensor parallelism here.
            universal_checkpoint_info={})
        meta = dict(format=CHECKPOINT_FORMAT, world_size=env.world_size, zero_stage=cfg.train.zero_stage,
                    precision=cfg.train.precision, global_batch=self.global_batch,
                    ontology_hash=self.ontology.hash, model=fingerprint, mlflow_run_id=self.run_id)
        self.ckpts.save(self.engine, self.step, client_state, meta)
        self.last_saved_step = self.step


def pretrain(cfg: Config) -> int:
    """Run (or continue) the pretraining described by `cfg` in this process; returns the exit code."""
    # Installed first: a preemption signal during the (slow) setup must still end in a checkpoint
    # and the requeue exit code, not in a plain death.
    preempt = PreemptionHandler(cfg.train.preempt_signals)
    try:
        env = distributed.init_distributed(cfg.train.dist_timeout_s)
        setup_logging(env.rank)
        trainer = Pretrainer(cfg, env)
        try:
            trainer.setup()
            code = trainer.train(preempt)
        except BaseException:
            tracker = getattr(trainer, "tracker", None)
            if tracker is not None:
                tracker.finish("FAILED")
            raise
        trainer.close()
        # Launchers tear the group down as soon as one rank exits non-zero (a preemption's 124):
        # leave together, after rank 0 has updated the pointer and MLflow.
        distributed.barrier()
        distributed.shutdown()
        return code
    finally:
        preempt.restore()
