"""`echocare pretrain`: run the pretraining in this process, or spawn N local ranks.

    echocare pretrain --config tiny_cpu --set data.shards=/data/shards            # one process
    echocare pretrain --nproc 2 --config tiny_cpu --set data.shards=/data/shards  # 2 ranks (torchrun-style)

Under a launcher (deepspeed, torchrun, srun) use launch/pretrain.py, which runs the same worker.
Exit codes: 0 finished; train.requeue_exit_code (default 124) preempted after a complete
checkpoint, requeue; 2 bad config / incompatible checkpoint; anything else is a crash.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..cli_args import add_config_args, config_from_args


def add_pretrain_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, resume=True)
    # The DeepSpeed launcher appends --local_rank=N; the rank layout is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _user_error(exc: Exception) -> int:
    print(f"echocare pretrain: error: {exc}", file=sys.stderr)
    return 2


def run_worker(args) -> int:
    """One rank: config -> pre-flight -> pretrain(). Known user errors become exit code 2 and a message."""
    from ..config import ConfigError
    from ..ontology import OntologyError
    from ..preflight import run_preflight
    try:
        cfg = config_from_args(args)
        # Every rank checks for itself rather than rank 0 alone: there is no process group yet to
        # tell the others, which would wait in the rendezvous until train.dist_timeout_s; and on
        # several nodes each host must see the shards and run directory through its own mounts.
        # The checks are cheap (a manifest read, a temporary file, one TCP connect).
        run_preflight(cfg)
    except (ConfigError, OntologyError) as exc:
        return _user_error(exc)
    # Imported only now: they pull in torch and DeepSpeed, which a failed pre-flight need not wait for.
    from ..tracking import TrackingError
    from .checkpoint import ResumeError
    try:
        from .trainer import pretrain
        return pretrain(cfg)
    except (ConfigError, OntologyError, ResumeError, TrackingError) as exc:
        return _user_error(exc)


def worker_argv(args) -> list[str]:
    argv = ["--config", args.config] if args.config else []
    for item in args.overrides:
        argv += ["--set", item]
    if args.resume:
        argv += ["--resume", args.resume]
    return argv


def spawn_local(args, nproc: int) -> int:
    """N ranks on this machine through torch.distributed.run; returns the ranks' exit code.

    torchrun itself reports any failed rank as exit 1; a preemption (every failed rank exited with
    the requeue code) is passed through as that code so wrappers can requeue.
    """
    from ..preflight import run_preflight

    # Fail here, once, before any rank starts: on a bad config and on anything the ranks' own
    # pre-flight would stop at (the message would otherwise come N times, after N torch imports).
    cfg = config_from_args(args)
    run_preflight(cfg)

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launch_args = get_args_parser().parse_args(
        ["--standalone", f"--nproc_per_node={nproc}", "--max_restarts=0", "--monitor_interval=1",
         "--module", "echocare_dist.train.cli", *worker_argv(args)])
    try:
        run(launch_args)
    except ChildFailedError as exc:
        codes = {f.exitcode for f in exc.failures.values()}
        if codes == {cfg.train.requeue_exit_code}:
            return cfg.train.requeue_exit_code
        positive = sorted(c for c in codes if c > 0)  # negative = killed by a signal
        return positive[0] if positive else 1
    return 0


def _command(args) -> int:
    if args.nproc > 1 and "RANK" not in os.environ:
        return spawn_local(args, args.nproc)
    return run_worker(args)


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="masked-image + hierarchical pretraining (DeepSpeed)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pretrain_args(p)
    p.add_argument("--nproc", type=int, default=1, help="local ranks to spawn (default: 1, this process)")
    p.set_defaults(func=_command)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="echocare-pretrain-worker")
    add_pretrain_args(parser)
    return run_worker(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
