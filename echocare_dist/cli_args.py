"""The command-line arguments every subcommand shares: which config, its overrides, resume.

Components import these helpers from here, never from `echocare_dist.cli` (the entry point,
which only wires subcommands together).
"""
from __future__ import annotations

import argparse

from .config import Config, ConfigError, load_config, preset_names


def add_config_args(parser: argparse.ArgumentParser, default: str | None = "tiny_cpu",
                    resume: bool = False, required: bool = False) -> None:
    """--config and --set; with `resume`, also --resume (a shorthand of --set train.resume=...).

    `required`: no default preset (pretraining, shard building: a tiny_cpu default would silently
    run the wrong model or image size); config_from_args then refuses a missing --config."""
    if required:
        default = None
        where = "required"
    else:
        where = "default: %(default)s" if default else "optional"
    parser.add_argument("--config", "-c", default=default,
                        help=f"preset name (echocare config presets) or a YAML path ({where})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, read with the type of its key, e.g. "
                             "--set train.steps=100 (repeatable; docs/configuration.md)")
    parser.set_defaults(config_required=required)
    if resume:
        parser.add_argument("--resume", default=None, metavar="auto|none|DIR",
                            help="overrides train.resume: 'auto' = latest complete checkpoint of the run dir")
    else:
        parser.set_defaults(resume=None)


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    """--no-progress (echocare_dist/progress.py; the entry point applies it to the whole process).
    Bars are drawn only on a terminal anyway; this also silences them there."""
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (they are only drawn when stderr is a terminal)")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The --set items, then --resume as the train.resume override it stands for."""
    return list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated config that the parsed arguments of `add_config_args` name."""
    if args.config is None and getattr(args, "config_required", False):
        raise ConfigError(f"--config is required: a preset ({', '.join(preset_names())}) or a YAML file")
    return load_config(args.config, config_overrides(args))
