"""The command-line arguments every subcommand shares: which config, its overrides, resume.

Components import these helpers from here, never from `echocare_dist.cli` (the entry point,
which only wires subcommands together).
"""
from __future__ import annotations

import argparse

from .config import Config, load_config


def add_config_args(parser: argparse.ArgumentParser, default: str | None = "tiny_cpu",
                    resume: bool = False) -> None:
    """--config and --set; with `resume`, also --resume (a shorthand of --set train.resume=...)."""
    parser.add_argument("--config", "-c", default=default,
                        help="preset name in configs/ or a YAML path (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.steps=100 (repeatable)")
    if resume:
        parser.add_argument("--resume", default=None, metavar="auto|none|DIR",
                            help="overrides train.resume: 'auto' = latest complete checkpoint of the run dir")
    else:
        parser.set_defaults(resume=None)


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The --set items, then --resume as the train.resume override it stands for."""
    return list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated config that the parsed arguments of `add_config_args` name."""
    return load_config(args.config, config_overrides(args))
