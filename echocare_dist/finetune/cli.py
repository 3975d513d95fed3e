"""`echocare finetune` (runner.py) and `echocare evaluate` (evaluate.py: pretrained vs random init vs a
raw-pixel baseline). Both take the same config; torch is imported only when a command runs."""
from __future__ import annotations

import argparse
import logging
import sys


def _run(command: str, args) -> int:
    """Run `echocare finetune|evaluate`; bad data or a bad export is exit 2 with one line."""
    from ..cli_args import config_from_args
    from ..export import ExportError
    from .data import DataError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    try:
        if command == "evaluate":
            from .evaluate import run_evaluate
            run_evaluate(cfg)
        else:
            from .runner import run_finetune
            run_finetune(cfg)
    except (DataError, ExportError) as exc:
        print(f"echocare {command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_finetune(args) -> int:
    return _run("finetune", args)


def _cmd_evaluate(args) -> int:
    return _run("evaluate", args)


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli_args import add_config_args, add_progress_arg

    p = sub.add_parser("finetune", help="fine-tune an exported encoder (classification, segmentation, "
                                        "regression, landmarks, detection, enhancement)",
                       description="Fine-tune an exported encoder. Everything is a config value: "
                                   "--set finetune.task=classification|segmentation|regression|"
                                   "landmarks|detection|enhancement (docs/finetune.md) "
                                   "--set finetune.data=DIR (or finetune.csv=FILE) "
                                   "--set finetune.checkpoint=EXPORT_DIR/encoder.safetensors "
                                   "[--set finetune.mode=linear_probe] [--set finetune.run_dir=DIR]")
    add_config_args(p)
    add_progress_arg(p)
    p.set_defaults(func=_cmd_finetune)

    p = sub.add_parser("evaluate", help="pretrained vs random init vs a raw-pixel baseline on one split, one table",
                       description="Fine-tune the export (init=pretrained) and the same architecture from scratch "
                                   "(init=random) with one recipe, fit a linear model on raw pixels, all on the same "
                                   "group-aware split (or finetune.folds), and print one table of the task's "
                                   "metrics. Takes the same --set finetune.* values as `echocare finetune`; writes "
                                   "evaluate.txt / evaluate.json under finetune.run_dir.")
    add_config_args(p)
    add_progress_arg(p)
    p.set_defaults(func=_cmd_evaluate)
