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


def add_pretrain_args(parser: argparse.ArgumentParser) -> None:
    from ..cli import add_config_args
    add_config_args(parser)
    parser.add_argument("--resume", default=None, metavar="auto|none|DIR",
                        help="overrides train.resume: 'auto' = latest complete checkpoint of the run dir")
    # The DeepSpeed launcher appends --local_rank=N; the rank layout is read from the environment.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def config_from_args(args):
    from ..config import load_config
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    return load_config(args.config, overrides)


def run_worker(args) -> int:
    """One rank: config -> pretrain(). Known user errors become exit code 2 with a one-line message."""
    from ..config import ConfigError
    from ..ontology import OntologyError
    from .checkpoint import ResumeError
    from .tracking import TrackingError
    try:
        cfg = config_from_args(args)
        from .trainer import pretrain
        return pretrain(cfg)
    except (ConfigError, OntologyError, ResumeError, TrackingError) as exc:
        print(f"echocare pretrain: error: {exc}", file=sys.stderr)
        return 2


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
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    cfg = config_from_args(args)  # fail here, once, on a bad config
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
