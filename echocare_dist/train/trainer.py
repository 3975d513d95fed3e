"""The pretraining loop: the step (step.py) wrapped in the run's bookkeeping, nothing more.

    step         -> components, one optimizer step   distributed -> ranks, device, seeds
    checkpoint   -> save / resume / universal        preemption  -> signal flag, collective vote
    metrics      -> memory, log window, JSONL        images      -> reconstruction grids
    echocare_dist.tracking -> MLflow (rank 0)

`pretrain(cfg)` returns the process exit code: 0 when the run reached train.steps,
train.requeue_exit_code after a preemption checkpoint.
"""
from __future__ import annotations

import logging
import sys
import time

import torch

from ..atomic import atomic_write_bytes
from ..config import Config, save_resolved
from ..ontology import load_ontology
from ..tracking import Tracker, TrackingError, flatten
from . import distributed
from .checkpoint import CheckpointManager, ResumePlan, model_fingerprint
from .images import reconstruction_grid
from .metrics import MetricsFile, Window, memory_gb
from .optim import global_batch, scaled_lr
from .preemption import PreemptionHandler
from .step import DS_CONFIG_FILE, Components, StepResult, build_components, train_step

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


class Pretrainer:
    def __init__(self, cfg: Config, env: distributed.DistEnv):
        self.cfg, self.env = cfg, env
        self.run_dir = cfg.resolve_path(cfg.train.run_dir).resolve()
        self.ontology = load_ontology(cfg.resolve_path(cfg.ontology.path))
        self.ckpts = CheckpointManager(self.run_dir / "checkpoints", env, cfg.train.keep_last,
                                       cfg.train.universal_workers)
        self.metrics_file = MetricsFile(self.run_dir / "metrics.jsonl")
        self.global_batch = global_batch(cfg, env.world_size)
        self.step = 0
        self.last_saved_step = -1
        self.tracker = Tracker(False)         # the run's own once setup() has started it
        self.components: Components | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, env = self.cfg, self.env
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, self.run_dir)
        plan = self.ckpts.plan_resume(cfg.train.resume, cfg, self.ontology.hash)
        self._start_tracking(plan)
        self.components = c = build_components(cfg, env, ontology=self.ontology, run_dir=self.run_dir,
                                                load_universal=bool(plan and plan.universal))
        if plan is not None:
            self._restore(plan)  # last: nothing may draw from the restored RNG streams before step 1
        if env.is_main:
            self.metrics_file.truncate_after(self.step)
            peak_lr, min_lr = scaled_lr(cfg, env.world_size)
            log.info("model %s: %.2f M params, %.2f GFLOP forward / image; %d ranks (%s) x micro-batch %d x "
                     "accumulation %d = global batch %d; peak LR %.3g (min %.3g); ZeRO-%d %s; peak %.1f TFLOP/s "
                     "per device (%s); starting at step %d of %d", cfg.model.arch, c.n_params / 1e6,
                     c.flops["forward"] / 1e9, env.world_size, env.launcher, cfg.train.micro_batch,
                     cfg.train.grad_accum, self.global_batch, peak_lr, min_lr, cfg.train.zero_stage,
                     cfg.train.precision, c.peak_tflops, c.peak_source, self.step, cfg.train.steps)
            params = flatten(cfg.to_dict())
            params.update({"run.world_size": str(env.world_size), "run.global_batch": str(self.global_batch),
                           "run.peak_lr": str(peak_lr), "run.params": str(c.n_params),
                           "run.flops_per_image_forward": str(c.flops["forward"]),
                           "run.ontology_hash": self.ontology.hash})
            self.tracker.log_params(params)
            self.tracker.log_artifact(self.run_dir / DS_CONFIG_FILE, "config")
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
        c = self.components
        client = self.ckpts.load(c.engine, plan)
        c.scheduler.apply()  # DeepSpeed restores the optimizer after the scheduler
        self.step = self.last_saved_step = int(client["step"])
        same_world = int(client["world_size"]) == self.env.world_size
        loader_states = client["loader"]
        if same_world:
            c.loader.load_state_dict(loader_states[self.env.rank])
            distributed.set_rng_state(client["rng"][self.env.rank])
        else:
            # The loader sees the saved world size in its state and restarts the epoch with a new
            # split; the per-rank RNG streams cannot be mapped, so they are re-derived from the step.
            c.loader.load_state_dict(loader_states[min(self.env.rank, len(loader_states) - 1)])
            distributed.seed_everything(self.cfg.train.seed + 1 + self.env.rank + 7919 * self.step)
        log.info("resumed from %s at step %d (saved by %d ranks%s)", plan.source, self.step,
                 client["world_size"], ", universal checkpoint" if plan.universal else "")

    # ------------------------------------------------------------------ loop
    def train(self, preempt: PreemptionHandler) -> int:
        t = self.cfg.train
        window = Window()
        stopped_by = None
        while self.step < t.steps:
            result = train_step(self.components)
            window.add(result.loss, result.mim, result.hie, result.data_wait_s)
            self.step += 1
            if self.step % t.log_every == 0 or self.step == t.steps:
                self._log(window, result.lr)
            if self.step % t.image_every == 0:
                with window.excluded():
                    self._log_images(result)
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

    def _log(self, window: Window, lr: float) -> None:
        env, c = self.env, self.components
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)
        elapsed = window.elapsed()
        n = window.steps
        (loss, mim, hie, wait), (mem, wait_max) = distributed.reduce_stats(
            [window.loss.item(), window.mim.item(), window.hie.item(), window.data_wait],
            [memory_gb(env.device), window.data_wait], env.device)
        per = env.world_size * n
        images_per_s = self.global_batch * n / elapsed
        grad_norm = c.engine.get_global_grad_norm()
        record = {
            "step": self.step, "time": time.time(),
            "loss": loss / per, "loss_mim": mim / per, "loss_hie": hie / per, "lr": lr,
            "images_per_s": images_per_s, "step_time_s": elapsed / n,
            "data_wait_s": wait / per, "data_wait_max_s": wait_max / n,
            "mem_gb": mem,
            "tflops_per_device": c.flops["train"] * images_per_s / env.world_size / 1e12,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "epoch": c.loader.epoch,
            "loader_bad_samples": c.loader.bad_samples,
            "loader_quarantined": len(c.loader.quarantined),
        }
        record["mfu"] = record["tflops_per_device"] / c.peak_tflops
        window.reset()
        if not env.is_main:
            return
        log.info("step %d/%d loss %.4f (mim %.4f hie %.4f) lr %.3g | %.1f img/s, %.3f s/step, data %.3f s, "
                 "MFU %.1f%%, mem %.2f GB", self.step, self.cfg.train.steps, record["loss"], record["loss_mim"],
                 record["loss_hie"], lr, images_per_s, record["step_time_s"], record["data_wait_s"],
                 100 * record["mfu"], mem)
        self.metrics_file.append(record)
        self.tracker.log_metrics({k: v for k, v in record.items() if k not in ("step", "time")}, self.step)

    def _log_images(self, result: StepResult) -> None:
        if not self.env.is_main:
            return
        a, batch = self.cfg.data.augment, result.batch
        png = reconstruction_grid(batch["input"], batch["mask"], result.out["recon"], batch["target"],
                                  a.norm_mean, a.norm_std, self.cfg.tracking.image_rows)
        path = self.run_dir / "images" / f"recon_step_{self.step:08d}.png"
        atomic_write_bytes(path, png)
        self.tracker.log_artifact(path, "reconstructions")

    def close(self) -> None:
        if self.components is not None:
            self.components.loader.close()

    # ------------------------------------------------------------------ checkpoint
    def save(self) -> None:
        env, cfg = self.env, self.cfg
        fingerprint = model_fingerprint(cfg.model)
        client_state = dict(
            format=CHECKPOINT_FORMAT, step=self.step, world_size=env.world_size,
            loader=distributed.all_gather_object(self.components.loader.state_dict()),
            rng=distributed.all_gather_object(distributed.rng_state()),
            config=cfg.to_dict(), ontology_hash=self.ontology.hash, model=fingerprint,
            mlflow_run_id=self.run_id,
            # Required by DeepSpeed's ds_to_universal (world-size changes); no tensor parallelism here.
            universal_checkpoint_info={})
        meta = dict(format=CHECKPOINT_FORMAT, world_size=env.world_size, zero_stage=cfg.train.zero_stage,
                    precision=cfg.train.precision, global_batch=self.global_batch,
                    ontology_hash=self.ontology.hash, model=fingerprint, mlflow_run_id=self.run_id)
        self.ckpts.save(self.components.engine, self.step, client_state, meta)
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
            trainer.tracker.finish("FAILED")
            raise
        trainer.close()
        # Launchers tear the group down as soon as one rank exits non-zero (a preemption's 124):
        # leave together, after rank 0 has updated the pointer and MLflow.
        distributed.barrier()
        distributed.shutdown()
        return code
    finally:
        preempt.restore()
