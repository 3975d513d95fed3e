"""Label mappings: which ontology nodes each source file names.

A mapping YAML lists source datasets; each gives a folder and the labels of its files, refined
by glob rules and an optional per-file CSV (most specific wins: CSV row > first matching rule >
source default):

    sources:
      - name: "Thyroid US"          # provenance and per-source counts
        root: "Thyroid US"          # relative to the mapping file, or absolute
        labels: [thyroid]           # ontology node names; [] = unlabeled (trains the MIM loss only)
        device: "linear probe"      # optional
        frame_stride: 10            # optional, overrides curation.frame_stride
        rules:                      # optional, first match wins
          - glob: "nodules/*"
            labels: [thyroid_nodule]
        csv: "labels.csv"           # optional, relative to root: columns path,labels (';'-separated)
        exclude: ["masks/**", "*_overlay.png"]  # optional: files never read (globs, as for rules)
        allow_mask_like: false      # optional: true keeps files that look like segmentation masks
        deid: false                 # optional: already-public data keeps its paths (docs/deid.md)
    exclude: ["**/Thumbs.db", "**/annotations/**"]  # optional: excluded from every source above

Excluded files are not decoded and not counted as rejected (the manifest lists them under
`excluded`). Independently, the builder rejects files that look like segmentation masks as
`mask_like`: by file name (curation.mask_name_patterns: `*_mask*`, `mask_*`, `*_seg*`, `*label*`)
or by content (nearly all pixels at two or a few levels, no speckle; see masklike.py). A source
whose images really are named or look so sets `allow_mask_like: true`.

Globs match the path relative to root with fnmatch semantics (case-sensitive, `*` also crosses
`/`), a leading `**/` also matches at the top level, and a glob that matches a folder applies to
everything below it. Everything is checked when the mapping is loaded, so an unknown node, key or
folder fails before any file is decoded, naming the mapping file.
"""
from __future__ import annotations

import csv
import fnmatch
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import yaml

from ..config import ConfigError
from ..ontology import Ontology

SOURCE_KEYS = {"name", "root", "labels", "device", "frame_stride", "rules", "csv", "exclude", "allow_mask_like",
               "deid"}
TOP_KEYS = {"sources", "exclude"}
RULE_KEYS = {"glob", "labels"}


class MappingError(ConfigError):
    """A label mapping is invalid; the message names the mapping file and the offending entry."""


@dataclass(frozen=True)
class Rule:
    glob: str
    labels: tuple[str, ...]
    _regex: re.Pattern = field(compare=False, repr=False, default=None)

    def matches(self, relpath: str) -> bool:
        if self._regex.match(relpath):
            return True
        # A glob naming a folder labels the whole subtree.
        parts = relpath.split("/")
        return any(self._regex.match("/".join(parts[:i])) for i in range(1, len(parts)))


@dataclass(frozen=True)
class Source:
    name: str
    root: Path
    labels: tuple[str, ...]
    mapping: Path
    device: str | None = None
    frame_stride: int | None = None
    rules: tuple[Rule, ...] = ()
    csv_labels: dict = field(default_factory=dict, compare=False, repr=False)
    exclude: tuple[Rule, ...] = ()     # globs (per source and the mapping's global ones)
    allow_mask_like: bool = False
    deid: bool = True                  # false: public data, paths kept (curation.deid=false turns all off)

    def excluded(self, relpath: str) -> str | None:
        """The exclude glob that matches `relpath`, or None."""
        for rule in self.exclude:
            if rule.matches(relpath):
                return rule.glob
        return None

    def labels_for(self, relpath: str) -> tuple[str, ...]:
        """Labels of the file at `relpath` (posix, relative to root)."""
        if relpath in self.csv_labels:
            return self.csv_labels[relpath]
        for rule in self.rules:
            if rule.matches(relpath):
                return rule.labels
        return self.labels


def _compile_glob(pattern: str) -> re.Pattern:
    alternatives = [fnmatch.translate(pattern)]
    if pattern.startswith("**/"):
        alternatives.append(fnmatch.translate(pattern[3:]))
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


def _node_list(value, where: str, ontology: Ontology) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise MappingError(f"{where}: labels must be a list of ontology node names, got {value!r}")
    unknown = [v for v in value if v not in ontology.index]
    if unknown:
        raise MappingError(f"{where}: unknown ontology node(s) {', '.join(map(repr, unknown))} "
                           f"(ontology {ontology.title!r} has {len(ontology)} nodes; "
                           f"see `echocare config ontology --tree`)")
    return tuple(dict.fromkeys(value))


def _read_csv(path: Path, where: str, ontology: Ontology) -> dict[str, tuple[str, ...]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise MappingError(f"{where}: cannot read csv {path}: {exc.strerror}") from exc
    reader = csv.DictReader(text.splitlines())
    if reader.fieldnames is None or not {"path", "labels"} <= {f.strip() for f in reader.fieldnames}:
        raise MappingError(f"{where}: csv {path} needs a header with columns 'path,labels', "
                           f"got {reader.fieldnames}")
    out: dict[str, tuple[str, ...]] = {}
    for line, row in enumerate(reader, start=2):
        row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        if not row["path"]:
            raise MappingError(f"{where}: csv {path} line {line}: empty path")
        names = [n.strip() for n in row["labels"].split(";") if n.strip()]
        rel = PurePosixPath(row["path"].replace("\\", "/")).as_posix()  # drops "./" parts
        out[rel] = _node_list(names, f"{where}: csv {path} line {line}", ontology)
    return out


def _globs(value, where: str) -> tuple[Rule, ...]:
    """An `exclude:` value: a glob string or a list of them."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip("/") for v in value):
        raise MappingError(f"{where}: exclude must be a list of non-empty glob strings, got {value!r}")
    return tuple(Rule(g.strip("/"), (), _compile_glob(g.strip("/"))) for g in value)


def _check_entry(entry, allowed: set, where: str, expected: str) -> None:
    if not isinstance(entry, dict):
        raise MappingError(f"{where}: expected {expected}, got {entry!r}")
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise MappingError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; allowed: {sorted(allowed)}")


def _load_source(entry, i: int, mapping: Path, ontology: Ontology, global_exclude: tuple[Rule, ...] = ()) -> Source:
    where = f"{mapping}: sources[{i}]"
    _check_entry(entry, SOURCE_KEYS, where, "a mapping with name/root/labels")
    for key in ("name", "root"):
        if not isinstance(entry.get(key), str) or not entry[key].strip():
            raise MappingError(f"{where}: '{key}' must be a non-empty string, got {entry.get(key)!r}")
    name = entry["name"]
    where = f"{mapping}: source {name!r}"
    root = Path(entry["root"]).expanduser()
    root = root if root.is_absolute() else mapping.parent / root
    if not root.is_dir():
        raise MappingError(f"{where}: root folder {str(root)!r} does not exist")
    stride = entry.get("frame_stride")
    if stride is not None and (isinstance(stride, bool) or not isinstance(stride, int) or stride < 1):
        raise MappingError(f"{where}: frame_stride must be an integer >= 1, got {stride!r}")
    device = entry.get("device")
    if device is not None and not isinstance(device, str):
        raise MappingError(f"{where}: device must be a string, got {device!r}")
    rules = []
    raw_rules = entry.get("rules") or []
    if not isinstance(raw_rules, list):
        raise MappingError(f"{where}: rules must be a list of {{glob, labels}}, got {raw_rules!r}")
    for j, rule in enumerate(raw_rules):
        rwhere = f"{where} rules[{j}]"
        _check_entry(rule, RULE_KEYS, rwhere, "{glob, labels}")
        if not isinstance(rule.get("glob"), str) or not rule["glob"]:
            raise MappingError(f"{rwhere}: 'glob' must be a non-empty string, got {rule.get('glob')!r}")
        if "labels" not in rule:
            raise MappingError(f"{rwhere}: missing 'labels'")
        glob = rule["glob"].strip("/")
        rules.append(Rule(glob, _node_list(rule["labels"], rwhere, ontology), _compile_glob(glob)))
    csv_labels = {}
    if entry.get("csv") is not None:
        if not isinstance(entry["csv"], str):
            raise MappingError(f"{where}: csv must be a path string, got {entry['csv']!r}")
        csv_path = Path(entry["csv"]).expanduser()
        csv_labels = _read_csv(csv_path if csv_path.is_absolute() else root / csv_path, where, ontology)
    allow = entry.get("allow_mask_like", False)
    if not isinstance(allow, bool):
        raise MappingError(f"{where}: allow_mask_like must be true or false, got {allow!r}")
    deid = entry.get("deid", True)
    if not isinstance(deid, bool):
        raise MappingError(f"{where}: deid must be true or false, got {deid!r}")
    return Source(name=name, root=root.resolve(), labels=_node_list(entry.get("labels"), where, ontology),
                  mapping=mapping, device=device, frame_stride=stride, rules=tuple(rules),
                  csv_labels=csv_labels, exclude=_globs(entry.get("exclude"), f"{where}: exclude") + global_exclude,
                  allow_mask_like=allow, deid=deid)


def load_mapping(path: str | Path, ontology: Ontology) -> list[Source]:
    mapping = Path(path).expanduser().resolve()
    try:
        data = yaml.safe_load(mapping.read_text(encoding="utf-8"))
    except OSError as exc:
        raise MappingError(f"cannot read label mapping {mapping}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise MappingError(f"{mapping}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise MappingError(f"{mapping}: expected a top-level 'sources:' list")
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise MappingError(f"{mapping}: unknown top-level key(s) {', '.join(map(repr, unknown))}; "
                           f"allowed: {sorted(TOP_KEYS)}")
    if "sources" not in data:
        raise MappingError(f"{mapping}: expected a top-level 'sources:' list")
    if not isinstance(data["sources"], list) or not data["sources"]:
        raise MappingError(f"{mapping}: 'sources' must be a non-empty list")
    global_exclude = _globs(data.get("exclude"), f"{mapping}: exclude")
    return [_load_source(e, i, mapping, ontology, global_exclude) for i, e in enumerate(data["sources"])]


def load_mappings(paths, ontology: Ontology) -> list[Source]:
    """All sources of all mapping files, validated; source names must be unique across them."""
    if not paths:
        raise MappingError("no label mapping given (--mapping FILE.yaml)")
    sources: list[Source] = []
    seen: dict[str, Path] = {}
    for path in paths:
        for src in load_mapping(path, ontology):
            if src.name in seen:
                raise MappingError(f"{src.mapping}: source name {src.name!r} is already used in {seen[src.name]}")
            seen[src.name] = src.mapping
            sources.append(src)
    return sources
