"""The pretraining loop: the step (step.py) wrapped in the run's bookkeeping, nothing more.

    step         -> components, one optimizer step   distributed -> ranks, device, seeds
    checkpoint   -> save / resume / universal        preemption  -> signal flag, collective vote
    metrics      -> memory, log window, JSONL        images      -> reconstruction grids
    echocare_dist.tracking -> MLflow (rank 0)

    control      -> the step-control vote          faults      -> failure reports, watchdog, injection
    ../runlock   -> one run per run directory

`pretrain(cfg)` returns the process exit code: 0 when the run reached train.steps,
train.requeue_exit_code after a preemption checkpoint; it raises NonFiniteError (exit code 3)
after train.max_bad_steps consecutive non-finite steps and any other error as it came. Loader
workers are stopped, and the run-directory lock released, on every way out.
"""
from __future__ import annotations

import logging
import sys
import time

import torch

from ..atomic import atomic_write_bytes, atomic_write_json
from ..config import Config, ConfigError, save_resolved
from ..data.elastic import held_batch
from ..data.mixture import MIXTURE_FILE, mixture_params
from ..ontology import OntologyError, load_ontology
from ..redact import redact_tree
from ..runlock import RunDirLock, RunDirLocked
from ..tracking import Tracker, TrackingError, flatten
from . import distributed
from .checkpoint import CheckpointManager, ResumeError, ResumePlan, model_fingerprint
from .control import NonFiniteError, StepControl
from .faults import FailureBoard, FaultPlan, PeerFailed, PeerWatchdog, describe_failure
from .images import reconstruction_grid
from .metrics import MetricsFile, Window, memory_gb
from .optim import global_batch, scaled_lr
from .preemption import Preempted, PreemptionHandler
from .sample_log import wrap_from_env
from .stages import StageSchedule
from .step import DS_CONFIG_FILE, Components, StepResult, build_components, train_step
from .validation import Validator

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
# Raised by every rank together (a broadcast decision or the same global value): no failure report,
# and never read as "caused by a peer".
COLLECTIVE_ERRORS = (ConfigError, OntologyError, ResumeError, TrackingError, NonFiniteError, PeerFailed,
                     Preempted)


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
    def __init__(self, cfg: Config, env: distributed.DistEnv, preempt: PreemptionHandler | None = None):
        self.cfg, self.env = cfg, env
        self.preempt = preempt if preempt is not None else PreemptionHandler(())
        self.faults = FaultPlan.from_env(env.rank)
        self.lock: RunDirLock | None = None
        self.board: FailureBoard | None = None
        self.watchdog: PeerWatchdog | None = None
        self.control: StepControl | None = None
        self.peer_failure: dict | None = None
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
        self.validator: Validator | None = None  # train.val_every on the held-out shards (validation.py)
        self.stages = StageSchedule(cfg, env, self.run_dir)  # train.stages (stages.py)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, env = self.cfg, self.env
        self._lock_run_dir()
        self._start_watchdog()
        if env.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_resolved(cfg, self.run_dir)
        plan = self.ckpts.plan_resume(cfg.train.resume, cfg, self.ontology.hash)
        if plan is not None and int(plan.meta.get("world_size", env.world_size)) != env.world_size:
            self._hold_global_batch(plan)
        self._start_tracking(plan)
        self.components = c = build_components(cfg, env, ontology=self.ontology, run_dir=self.run_dir,
                                                load_universal=bool(plan and plan.universal))
        if env.is_main:
            self._record_mixture(c.loader)
        self.validator = Validator.create(cfg, env, self.ontology)  # draws from no RNG stream
        c.loader = wrap_from_env(c.loader, env.rank)  # $ECHOCARE_SAMPLE_LOG: the keys each rank trained on
        if plan is not None:
            self._restore(plan)  # last: nothing may draw from the restored RNG streams before step 1
        # The stage of the next step (a pure function of it): a resume inside a stage continues it.
        self.stages.enter(c, self.step + 1)  # draws from no RNG stream
        self.control = StepControl(cfg.train.preempt_check_every, cfg.train.max_bad_steps, self.preempt,
                                   first_step=self.step + 1)
        self.control.peer_failure = self.peer_failure
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

    def _lock_run_dir(self) -> None:
        """Rank 0 holds the run directory for the run's life (unless our launcher holds it for us)."""
        error = None
        if self.env.is_main:
            try:
                self.lock = RunDirLock(self.run_dir).acquire()
                if self.lock.took_over:
                    log.warning("run directory lock %s: took over a stale lock (%s)", self.lock.path,
                                self.lock.took_over)
            except RunDirLocked as exc:
                error = str(exc)
        error = distributed.broadcast_object(error)  # all ranks stop together
        if error:
            raise RunDirLocked(error)

    def _start_watchdog(self) -> None:
        attempt = distributed.broadcast_object(FailureBoard.new_attempt() if self.env.is_main else None)
        self.board = FailureBoard(self.run_dir, attempt, self.env.rank)
        self.board.prepare(self.env.is_main)
        self.watchdog = PeerWatchdog(self.board, self._on_peer_failure)
        self.watchdog.start()

    def _on_peer_failure(self, report: dict) -> None:  # the watchdog's thread
        self.peer_failure = report
        if self.control is not None:
            self.control.peer_failure = report

    def _start_tracking(self, plan: ResumePlan | None) -> None:
        self.tracker = Tracker.from_config(self.env.is_main, self.cfg.tracking, self.run_dir,
                                           source="echocare pretrain", launcher=self.env.launcher,
                                           world_size=self.env.world_size)
        error = None
        try:
            # MLflow may retry an unanswering server for minutes: a preemption signal must end it.
            with self.preempt.interruptible():
                self.tracker.start(plan.meta.get("mlflow_run_id") if plan else None)
        except TrackingError as exc:
            error = ("tracking", str(exc))
        except Preempted as exc:
            error = ("preempted", str(exc))
        error = distributed.broadcast_object(error)  # all ranks stop together, none waits in a collective
        if error and error[0] == "preempted":
            raise Preempted(f"{error[1]} before the first step")
        if error:
            raise TrackingError(error[1])
        self.run_id = distributed.broadcast_object(self.tracker.run_id)

    def _hold_global_batch(self, plan: ResumePlan) -> None:
        """On another world size keep the checkpoint's global batch (data/elastic.py: the rule)."""
        t, saved = self.cfg.train, int(plan.meta.get("global_batch", self.global_batch))
        micro, accum = held_batch(saved, self.env.world_size, t.micro_batch, t.grad_accum)
        if (micro, accum) != (t.micro_batch, t.grad_accum):
            if self.env.is_main:
                log.warning("resume on %d rank(s): holding the checkpoint's global batch %d with train.micro_batch=%d "
                            "x train.grad_accum=%d (configured %d x %d)", self.env.world_size, saved, micro, accum,
                            t.micro_batch, t.grad_accum)
            t.micro_batch, t.grad_accum = micro, accum
            if self.env.is_main:
                save_resolved(self.cfg, self.run_dir)
        self.global_batch = global_batch(self.cfg, self.env.world_size)

    def _record_mixture(self, loader) -> None:
        """The effective per-source mixture (data.source_weights / source_alpha) with the run: the shard
        manifest predates the training config, so the run directory and MLflow hold it."""
        mixture = getattr(loader, "effective_mixture", lambda: None)()
        if not mixture:
            return
        atomic_write_json(self.run_dir / MIXTURE_FILE, mixture)
        self.tracker.log_params(mixture_params(mixture))
        self.tracker.log_artifact(self.run_dir / MIXTURE_FILE, "data")

    def _restore(self, plan: ResumePlan) -> None:
        c = self.components
        client = self.ckpts.load(c.engine, plan)
        c.scheduler.apply()  # DeepSpeed restores the optimizer after the scheduler
        self.step = self.last_saved_step = int(client["step"])
        if self.validator is not None:
            self.validator.load_state_dict(client.get("validation"))
        same_world = int(client["world_size"]) == self.env.world_size
        # Every rank's loader state: on another world size the loader splits the epoch's unconsumed
        # samples over the new ranks (data/resume.py), on the same one it continues exactly.
        c.loader.resume(client["loader"])
        if same_world:
            distributed.set_rng_state(client["rng"][self.env.rank])
        else:
            # The per-rank RNG streams cannot be mapped, so they are re-derived from the step.
            distributed.seed_everything(self.cfg.train.seed + 1 + self.env.rank + 7919 * self.step)
        log.info("resumed from %s at step %d (saved by %d ranks%s)", plan.source, self.step,
                 client["world_size"], ", universal checkpoint" if plan.universal else "")

    # ------------------------------------------------------------------ loop
    def train(self, preempt: PreemptionHandler | None = None) -> int:
        """`preempt` replaces the handler given at construction (callers that build their own)."""
        if preempt is not None:
            self.preempt = self.control.preempt = preempt
        t, control = self.cfg.train, self.control
        window = Window()
        stopped_by = None
        while self.step < t.steps:
            step = self.step + 1
            self.faults.before_step(step)
            with window.excluded():
                self.stages.enter(self.components, step)  # a no-op inside a stage
            result = train_step(self.components, nan_loss=self.faults.nan_loss(step))
            window.add(result.loss, result.mim, result.hie, result.data_wait_s)
            self.step = step
            # The same decision on every rank (control.py); raises NonFiniteError at the limit.
            detail = ""
            if result.skipped:  # reading the loss synchronises the device: only for a skipped step
                detail = (f"loss or gradient norm on some rank (loss here {float(result.loss):.4g}, global "
                          f"gradient norm {self.components.engine.get_global_grad_norm()})")
            control.record(step, result.skipped, detail)
            validation = None
            if self.validator is not None and self.step % t.val_every == 0:
                with window.excluded(), self.stages.at_model_size(self.components):
                    validation = self.validator.run(self.components, self.step)
            if (self.step % t.log_every == 0 or self.step == t.steps or validation
                    or self.stages.is_last_step(self.step)):  # a log window never spans two stages
                self._log(window, result.lr, validation)
            if self.step % t.image_every == 0:
                with window.excluded():
                    self._log_images(result)
            if control.vote(self.step).preempt:
                stopped_by = self.preempt.requested_by
                break
            if self.step % t.ckpt_every == 0 and control.checkpoint_safe:
                with window.excluded():
                    self.save()
        if self.last_saved_step != self.step:
            if control.checkpoint_safe:
                self.save()
            else:  # never a checkpoint right after a skipped step: the weights may be what went wrong
                log.warning("step %d was skipped (non-finite): no checkpoint; `latest` stays at step %d",
                            self.step, self.last_saved_step)
        if stopped_by is not None:
            log.warning("preempted (%s): checkpoint at step %d complete; exiting with %d for requeue",
                        stopped_by, self.last_saved_step, t.requeue_exit_code)
            self.tracker.finish("SCHEDULED")
            return t.requeue_exit_code
        log.info("training complete at step %d", self.step)
        self.tracker.finish("FINISHED")
        return 0

    def _log(self, window: Window, lr: float, validation: dict | None = None) -> None:
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
            "bad_steps": self.control.bad_total if self.control is not None else 0,
            "stage": self.stages.current.index, "img_size": self.stages.current.img_size,
        }
        record["mfu"] = record["tflops_per_device"] / c.peak_tflops
        if c.miner is not None:  # mask.strategy=hpm: this rank's last ranking loss and mined share
            rank_loss = c.loss_fn.last_rank
            record.update(hpm_rank_loss=float(rank_loss) if rank_loss is not None else None,
                          hpm_share=c.miner.last_share)
        record.update(validation or {})
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
        self.tracker.log_image(png, "reconstruction", self.step)  # the UI's step slider

    def close(self) -> None:
        """Idempotent, on every way out: loader workers stopped (bounded), watchdog and lock released."""
        if self.components is not None:
            self.components.loader.close()
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.lock is not None:
            self.lock.release()

    def report_failure(self, exc: BaseException) -> BaseException:
        """This rank is failing with `exc`: tell the peers (failure board), or, when a peer failed
        first and `exc` is only the consequence (a collective with the dead rank), name that peer."""
        if self.board is None or isinstance(exc, COLLECTIVE_ERRORS):
            return exc
        peers = self.board.peer_failures()
        if peers:
            return PeerFailed(f"rank {self.env.rank} stopping: {describe_failure(peers[0])} "
                              f"(here: {type(exc).__name__}: {exc})")
        self.board.report(exc)
        return exc

    # ------------------------------------------------------------------ checkpoint
    def save(self) -> None:
        env, cfg = self.env, self.cfg
        fingerprint = model_fingerprint(cfg.model)
        client_state = dict(
            format=CHECKPOINT_FORMAT, step=self.step, world_size=env.world_size,
            loader=distributed.all_gather_object(self.components.loader.state_dict()),
            rng=distributed.all_gather_object(distributed.rng_state()),
            config=redact_tree(cfg.to_dict()), ontology_hash=self.ontology.hash, model=fingerprint,
            mlflow_run_id=self.run_id,
            # Required by DeepSpeed's ds_to_universal (world-size changes); no tensor parallelism here.
            universal_checkpoint_info={},
            validation=self.validator.state_dict() if self.validator is not None else None)
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
    trainer = None
    try:
        env = distributed.init_distributed(cfg.train.dist_timeout_s, cfg.train.device)
        setup_logging(env.rank)
        trainer = Pretrainer(cfg, env, preempt)
        try:
            trainer.setup()
            code = trainer.train()
        except Preempted as exc:  # during the MLflow start: nothing trained yet, nothing to save
            log.warning("preempted (%s): exiting with %d for requeue", exc, cfg.train.requeue_exit_code)
            code = cfg.train.requeue_exit_code
        except BaseException as exc:
            trainer.tracker.finish("FAILED")
            error = trainer.report_failure(exc)
            trainer.close()  # before the traceback is printed: the peers are already leaving
            if error is not exc:
                raise error from exc
            raise
        trainer.close()
        # Launchers tear the group down as soon as one rank exits non-zero (a preemption's 124):
        # leave together, after rank 0 has updated the pointer and MLflow.
        distributed.barrier()
        distributed.shutdown()
        return code
    finally:
        if trainer is not None:
            trainer.close()  # workers that ignore SIGTERM must never reach Python's exit handler
        preempt.restore()
