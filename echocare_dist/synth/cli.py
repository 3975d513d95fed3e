"""`echocare synth --config tiny_cpu --out DIR [--set synth.num_images=...]`."""
from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path


def _synth(args) -> int:
    from ..cli_args import config_from_args
    from ..config import save_resolved
    from ..ontology import load_ontology
    from .dataset import generate_dataset

    cfg = config_from_args(args)
    ontology = load_ontology(cfg.resolve_path(cfg.ontology.path))
    out = Path(args.out).expanduser()
    start = time.perf_counter()
    try:
        result = generate_dataset(out, cfg.synth, ontology)
    except FileExistsError as exc:
        print(f"echocare synth: error: {exc}", file=sys.stderr)
        return 2
    save_resolved(cfg, out)
    print(f"synthesized {result.summary()} in {time.perf_counter() - start:.1f}s")
    print(f"next: echocare shards build --mapping {shlex.quote(str(result.mapping))} --out SHARD_DIR")
    return 0


def register(sub) -> None:
    from ..cli_args import add_config_args
    p = sub.add_parser("synth", help="generate a synthetic ultrasound collection and its label mapping",
                       description="Write synthetic B-mode images, clips, DICOM, masks and labels.yaml into "
                                   "--out (for tests and the demo; never a substitute for real data).")
    add_config_args(p)
    p.add_argument("--out", "-o", required=True, help="output folder (created; a previous synthetic set there "
                                                      "is replaced, any other non-empty folder is refused)")
    p.set_defaults(func=_synth)
