"""`echocare` console entry point.

Each subcommand lives with its component and registers itself through a `register(sub)`
function; this module only wires them together. The arguments they share (--config, --set,
--resume) come from `cli_args`. Heavy imports (torch, DALI, DeepSpeed) stay inside the command
functions so `echocare --help` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that defines `register(subparsers)`
COMMANDS = {
    "config": "echocare_dist.cli_config",
    "synth": "echocare_dist.synth.cli",
    "shards": "echocare_dist.curation.cli",
    "pretrain": "echocare_dist.train.cli",
    "export": "echocare_dist.export",
    "finetune": "echocare_dist.finetune.cli",
    "demo": "echocare_dist.demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="echocare", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real missing dependency inside the module: surface it
                raise
            continue
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .config import ConfigError
    from .ontology import OntologyError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ConfigError, OntologyError) as exc:
        print(f"echocare {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
