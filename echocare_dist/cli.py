"""`echocare` console entry point.

Each subcommand lives with its component and registers itself through a `register(sub)`
function; this module only wires them together. The arguments they share (--config, --set,
--resume) come from `cli_args`. Only the module of the command on the command line is imported,
and heavy imports (torch, DALI, DeepSpeed) stay inside the command functions, so `--help` is
instant (tests/test_cli.py checks that no `--help` imports torch, timm or DeepSpeed).
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys

from . import __version__
from .progress import disable_progress, progress_enabled

# subcommand -> (module whose `register(subparsers)` adds it, its line in `echocare --help`).
# That line lives here, not in the module, so `echocare --help` imports none of the modules
# (curation and synth alone take half a second: NumPy, OpenCV, PIL); it replaces the `help=`
# a module passes, so the listing reads the same whichever modules were imported.
COMMANDS = {
    "config": ("echocare_dist.cli_config", "show the resolved config or the ontology"),
    "synth": ("echocare_dist.synth.cli", "generate a synthetic ultrasound collection and its label mapping"),
    "shards": ("echocare_dist.curation.cli", "build, verify and inspect WebDataset shards"),
    "pretrain": ("echocare_dist.train.cli", "masked-image + hierarchical pretraining (DeepSpeed)"),
    "export": ("echocare_dist.export", "pretraining checkpoint -> encoder (ours and timm's layout) + model card"),
    "finetune": ("echocare_dist.finetune.cli", "fine-tune an exported encoder (classification, segmentation, "
                                               "regression, landmarks, detection, enhancement)"),
    "evaluate": ("echocare_dist.finetune.cli",
                 "pretrained vs random init vs a raw-pixel baseline on one split, one table"),
    "demo": ("echocare_dist.demo", "run the whole chain on synthetic data (the README's main job)"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with `only`, that command's module alone is imported and the
    others are listed by name and help (enough for `echocare --help` and usage errors)."""
    parser = argparse.ArgumentParser(prog="echocare", description=sys.modules[__package__].__doc__)
    parser.add_argument("--version", action="version", version=f"echocare-dist {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None if only is None else COMMANDS.get(only, ("", ""))[0]
    for name, (module, help_text) in COMMANDS.items():
        if name in sub.choices:
            continue  # registered with another command of its module
        if wanted is not None and module != wanted:
            sub.add_parser(name, help=help_text)
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real missing dependency inside the module: surface it
                raise
            continue
        mod.register(sub)
    for listed in sub._choices_actions:  # argparse keeps one pseudo-action per listed command
        if listed.dest in COMMANDS:
            listed.help = COMMANDS[listed.dest][1]
    return parser


def _command_of(argv: list[str]) -> str:
    """The subcommand `argv` names ("" when none: `echocare --help`, `echocare --version`)."""
    return next((a for a in argv if not a.startswith("-")), "")


def main(argv: list[str] | None = None) -> int:
    """Run one command; output cut short by its reader (`echocare ... | head`) ends it quietly."""
    try:
        try:
            code = _run(argv)
        except SystemExit:  # argparse's --help / --version / usage error: flush what it printed first
            sys.stdout.flush()
            raise
        sys.stdout.flush()
    except BrokenPipeError:
        # Python would print "Exception ignored ... BrokenPipeError" when flushing at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + signal.SIGPIPE  # what a tool killed by SIGPIPE returns, e.g. `yes | head`
    return code


def _run(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_of(argv)
    parser = build_parser(only=command if command in COMMANDS else "")
    args = parser.parse_args(argv)
    # Only now: the ontology pulls in NumPy, which --help and --version never need.
    from .config import ConfigError
    from .ontology import OntologyError

    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    # "shards build", "config show": the nested command's dest is `<command>_command`.
    name = " ".join(filter(None, (args.command, getattr(args, f"{args.command}_command", None))))
    try:
        if getattr(args, "no_progress", False):
            disable_progress()
        progress_enabled()  # a bad $ECHOCARE_PROGRESS stops here, not in the middle of a build
    except ValueError as exc:
        print(f"echocare {name}: error: {exc}", file=sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, OntologyError) as exc:
        print(f"echocare {name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
