"""`echocare synth --config tiny_cpu --out DIR [--set synth.num_images=...] [--tasks N]`."""
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
    if args.tasks and args.tasks < 4:
        print(f"echocare synth: error: --tasks {args.tasks}: need at least 4 images per task set (or 0)",
              file=sys.stderr)
        return 2
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
    if args.tasks:
        from .tasks import generate_task_sets
        counts = generate_task_sets(out / "tasks", args.tasks, seed=cfg.synth.seed)
        print(f"fine-tuning task sets in {out / 'tasks'}: " + ", ".join(f"{k} {v} images" for k, v in counts.items()))
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
    p.add_argument("--tasks", type=int, default=0, metavar="N",
                   help="also write N annotated breast scans per fine-tuning task set (landmarks, detection "
                        "boxes, low/high enhancement pairs) into OUT/tasks/ (N >= 4; 0 = none)")
    p.set_defaults(func=_synth)
