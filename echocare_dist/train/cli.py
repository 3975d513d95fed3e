"""`echocare pretrain`: run the pretraining in this process, or spawn N local ranks.

    echocare pretrain --config tiny_cpu --set data.shards=/data/shards            # one process
    echocare pretrain --nproc 2 --config tiny_cpu --set data.shards=/data/shards  # 2 local ranks

Under a launcher (deepspeed, torchrun, srun) use launch/pretrain.py, which runs the same worker.
`--nproc N` is our own local launcher (launcher.py): it forwards SIGTERM/SIGUSR1 (and Ctrl-C) to
the ranks, which checkpoint and exit 124; its ranks die with it, even on SIGKILL; it holds the
run-directory lock.

Exit codes: 0 finished; train.requeue_exit_code (default 124) preempted after a complete
checkpoint, requeue; 2 bad config, failed pre-flight (incl. a run directory in use by another
run) or incompatible checkpoint; 3 stopped after train.max_bad_steps consecutive non-finite
(NaN/Inf) steps, `latest` on the last finite checkpoint; 1 or anything else is a crash (a rank
whose peer failed exits 1 too, naming the peer's error).
"""
from __future__ import annotations

import argparse
import os
import sys

from ..cli_args import add_config_args, config_from_args


def add_pretrain_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, resume=True, required=True)
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
    from .control import EXIT_NONFINITE, NonFiniteError
    from .faults import EXIT_PEER_FAILED, PeerFailed
    try:
        from .trainer import pretrain
        return pretrain(cfg)
    except (ConfigError, OntologyError, ResumeError, TrackingError) as exc:
        return _user_error(exc)
    except NonFiniteError as exc:
        print(f"echocare pretrain: error: {exc}", file=sys.stderr)
        return EXIT_NONFINITE
    except PeerFailed as exc:  # the cause is another rank's: its traceback is in its own log
        print(f"echocare pretrain: error: {exc}", file=sys.stderr)
        return EXIT_PEER_FAILED


def worker_argv(args) -> list[str]:
    argv = ["--config", args.config] if args.config else []
    for item in args.overrides:
        argv += ["--set", item]
    if args.resume:
        argv += ["--resume", args.resume]
    return argv


def spawn_local(args, nproc: int) -> int:
    """N ranks on this machine through our local launcher (launcher.py); returns the job's exit code:
    the requeue code after a preemption, the first failing rank's code after a failure."""
    from ..preflight import run_preflight
    from .launcher import LocalLauncher

    # Fail here, once, before any rank starts: on a bad config and on anything the ranks' own
    # pre-flight would stop at (the message would otherwise come N times, after N torch imports).
    cfg = config_from_args(args)
    run_preflight(cfg)
    launcher = LocalLauncher(worker_argv(args), nproc, cfg.resolve_path(cfg.train.run_dir),
                             requeue_code=cfg.train.requeue_exit_code, forward_signals=cfg.train.preempt_signals)
    return launcher.run()


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
