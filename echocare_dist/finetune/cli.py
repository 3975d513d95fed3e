"""`echocare finetune`: fine-tune an exported encoder (see echocare_dist/finetune/runner.py)."""
from __future__ import annotations

import argparse
import logging
import sys


def _cmd_finetune(args) -> int:
    from ..cli_args import config_from_args
    from ..export import ExportError
    from .data import DataError
    from .runner import run_finetune

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = config_from_args(args)
    try:
        run_finetune(cfg)
    except (DataError, ExportError) as exc:
        print(f"echocare finetune: error: {exc}", file=sys.stderr)
        return 2
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from ..cli_args import add_config_args

    p = sub.add_parser("finetune", help="fine-tune an exported encoder (classification, segmentation, regression)",
                       description="Fine-tune an exported encoder. Everything is a config value: "
                                   "--set finetune.task=classification|segmentation|regression "
                                   "--set finetune.data=DIR (or finetune.csv=FILE) "
                                   "--set finetune.checkpoint=EXPORT_DIR/encoder.safetensors "
                                   "[--set finetune.mode=linear_probe] [--set finetune.run_dir=DIR]")
    add_config_args(p)
    p.set_defaults(func=_cmd_finetune)
