"""`echocare config show|presets|ontology`: inspect what a run will use."""
from __future__ import annotations

import sys

import yaml

from .cli_args import add_config_args, config_from_args


def _show(args) -> int:
    from .redact import redact_tree
    cfg = config_from_args(args)
    yaml.safe_dump(redact_tree(cfg.to_dict()), sys.stdout, sort_keys=False)
    return 0


def _presets(args) -> int:
    from .config import CONFIG_DIR, preset_names
    for name in preset_names():
        print(name)
    print(f"(in {CONFIG_DIR}; `--config NAME` or `--config path/to/your.yaml`)", file=sys.stderr)
    return 0


def _ontology(args) -> int:
    from collections import Counter

    from .ontology import load_ontology
    cfg = config_from_args(args)
    onto = load_ontology(cfg.resolve_path(cfg.ontology.path))
    levels = Counter(onto.depth)
    print(f"ontology {onto.title!r}: {len(onto)} nodes, hash {onto.hash}, "
          f"per level {dict(sorted(levels.items()))}")
    if args.tree:
        def show(v, indent):
            print("  " * indent + onto.names[v])
            for c in onto.children[v]:
                show(c, indent + 1)
        for r in onto.roots:
            show(r, 0)
    return 0


def register(sub) -> None:
    p = sub.add_parser("config", help="show the resolved config or the ontology")
    csub = p.add_subparsers(dest="config_command", required=True)
    show = csub.add_parser("show", help="print the resolved config (after --set overrides) and validate it")
    add_config_args(show)
    show.set_defaults(func=_show)
    presets = csub.add_parser("presets", help="list the presets shipped with the package")
    presets.set_defaults(func=_presets)
    onto = csub.add_parser("ontology", help="summarize the ontology of a config")
    add_config_args(onto)
    onto.add_argument("--tree", action="store_true", help="print the whole tree")
    onto.set_defaults(func=_ontology)
