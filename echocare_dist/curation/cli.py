"""`echocare shards build | verify | inspect | audit | lookup`."""
from __future__ import annotations

import logging
import sys
from pathlib import Path


def _ontology_of(cfg):
    from ..ontology import load_ontology
    return load_ontology(cfg.resolve_path(cfg.ontology.path))


def _build(args) -> int:
    from ..cli_args import config_from_args
    from ..shardfmt import ShardError
    from . import CurationError, build_shards
    from .report import format_summary, printable
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Source file names may hold any bytes; report.printable renders them, and this catches the rest.
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(errors="backslashreplace")
    cfg = config_from_args(args)
    try:
        manifest = build_shards([Path(m) for m in args.mapping], Path(args.out), cfg, _ontology_of(cfg),
                                progress=not args.no_progress, verify=args.verify)
    except (CurationError, ShardError) as exc:
        print(f"echocare shards build: error: {printable(str(exc))}", file=sys.stderr)
        return 2
    print(f"shards in {printable(str(Path(args.out).resolve()))}")
    print(format_summary(manifest))
    if manifest.num_samples == 0:
        print("echocare shards build: error: no usable sample (see 'rejected' in the manifest)", file=sys.stderr)
        return 1
    return 0


def _verify(args) -> int:
    from ..cli_args import config_from_args
    from . import verify_shards
    ontology = _ontology_of(config_from_args(args)) if args.config else None
    report = verify_shards(Path(args.shards), ontology, workers=args.workers)
    print(report.summary(), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def _inspect(args) -> int:
    from ..cli_args import config_from_args
    from ..shardfmt import Manifest, ShardError
    from .report import contact_sheet, format_summary
    shard_dir = Path(args.shards)
    try:
        manifest = Manifest.read(shard_dir)
    except ShardError as exc:
        print(f"echocare shards inspect: error: {exc}", file=sys.stderr)
        return 2
    print(format_summary(manifest, top_nodes=args.top))
    ontology = _ontology_of(config_from_args(args)) if args.config else None
    out = Path(args.out or "contact_sheet.png")
    contact_sheet(shard_dir, out, num=args.num, ontology=ontology, seed=args.seed)
    print(f"contact sheet: {out}")
    return 0


def _audit(args) -> int:
    from ..shardfmt import Manifest, ShardError
    from .audit import crop_audit, text_flagged
    try:
        out, items = crop_audit(Path(args.shards), Path(args.out), num=args.num,
                                map_path=Path(args.map) if args.map else None)
        flagged = text_flagged(Manifest.read(Path(args.shards)))
    except (ShardError, ValueError) as exc:
        print(f"echocare shards audit: error: {exc}", file=sys.stderr)
        return 2
    print(f"burned-in text: {len(flagged)} sample(s) flagged" + (":" if flagged else ""))
    for f in flagged:
        frame = f" frame {f['frame']}" if f.get("frame") is not None else ""
        print(f"  {f['key']}  {f['path']}{frame}  boxes {f['boxes']}")
    failed = sum(it.crop is None for it in items)
    worst = next((it for it in items if it.crop is not None), None)
    print(f"crop audit: {out} ({len(items)} frames, worst first; {failed} crop_failed shown"
          + (f"; worst kept crop leaves out {worst.discarded:.1%}: {worst.path})" if worst else ")"))
    return 0


def _lookup(args) -> int:
    from ..shardfmt import ShardError
    from .deid import lookup
    from .outdir import CurationError
    from .report import printable
    try:
        found = lookup(Path(args.shards), args.ids, Path(args.map) if args.map else None)
    except (CurationError, ShardError) as exc:
        print(f"echocare shards lookup: error: {printable(str(exc))}", file=sys.stderr)
        return 2
    for ident, f in found.items():
        frame = f"\tframe {f['frame']}" if "frame" in f else ""
        print(printable(f"{ident}\t{f['source']}\t{f['path']}{frame}"))
    return 0


def register(sub) -> None:
    from ..cli_args import add_config_args
    p = sub.add_parser("shards", help="build, verify and inspect WebDataset shards")
    ssub = p.add_subparsers(dest="shards_command", required=True)

    b = ssub.add_parser("build", help="curate label-mapped sources into shuffled shards + manifest")
    add_config_args(b, required=True)
    b.add_argument("--mapping", "-m", action="append", required=True, metavar="YAML",
                   help="label mapping file (repeatable)")
    b.add_argument("--out", "-o", required=True, help="shard directory (created; reruns resume)")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.add_argument("--verify", action="store_true",
                   help="before calling an existing build up to date, check every tar's SHA-256 against the "
                        "manifest (sizes and indexes are always checked); damaged shards are rebuilt")
    b.set_defaults(func=_build)

    v = ssub.add_parser("verify", help="decode every sample and check tars, indexes and manifest agree")
    v.add_argument("shards", help="shard directory")
    add_config_args(v, default=None)
    v.add_argument("--workers", type=int, default=1, help="parallel processes (default: %(default)s)")
    v.set_defaults(func=_verify)

    i = ssub.add_parser("inspect", help="print the manifest summary and write a PNG contact sheet")
    i.add_argument("shards", help="shard directory")
    add_config_args(i, default=None)
    i.add_argument("--out", "-o", default="contact_sheet.png", help="PNG path (default: %(default)s)")
    i.add_argument("--num", "-n", type=int, default=16, help="samples on the sheet (default: %(default)s)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--top", type=int, default=12, help="ontology nodes listed in the summary")
    i.set_defaults(func=_inspect)

    a = ssub.add_parser("audit", help="PNG of original frames with their crop boxes, worst crops first")
    a.add_argument("shards", help="shard directory")
    a.add_argument("--out", "-o", default="audit.png", help="PNG path (default: %(default)s)")
    a.add_argument("--num", "-n", type=int, default=24, help="frames on the sheet (default: %(default)s)")
    a.add_argument("--map", help="the restricted path map of a de-identified set (default: DIR.paths.json)")
    a.set_defaults(func=_audit)

    k = ssub.add_parser("lookup", help="original file of sample keys / path ids of a de-identified shard set "
                                       "(needs read access to its restricted path map)")
    k.add_argument("shards", help="shard directory")
    k.add_argument("ids", nargs="+", metavar="ID", help="sample key (16 hex) or path id (24 hex)")
    k.add_argument("--map", help="the path map (default: DIR.paths.json beside the shard directory)")
    k.set_defaults(func=_lookup)
