"""Typed configuration: YAML presets -> nested dataclasses, `--set a.b=c` overrides, validation.

The public face of the config: import everything config-related from here. The sections (one
dataclass per component, each validating itself) live in `config_sections`, the typed
dict <-> dataclass conversion and the typed reading of `--set` text in `config_coerce`, the
packaged presets and the rule for relative paths in `paths` (docs/configuration.md).
`load_config` refuses unknown keys and wrong types with the full dotted key in the message,
then `Config.validate` checks every section and the constraints between sections before any
work starts.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .atomic import atomic_write_text
from .config_coerce import field_type, from_dict, parse_text, to_plain
from .config_sections import (AugmentConfig, ConfigError, CurationConfig, DataConfig, FinetuneConfig, LossConfig,
                              MaskConfig, ModelConfig, OntologyConfig, OptimConfig, SynthConfig, TrackingConfig,
                              TrainConfig, require)
from .config_train import validate_stages
from .paths import CONFIG_DIR, FILE_RELATIVE_KEYS, REPO_ROOT, relative_to_file, resolve_path

__all__ = [
    "Config", "ConfigError", "load_config", "config_from_dict", "validate", "save_resolved", "find_preset",
    "apply_overrides", "parse_override", "preset_names", "REPO_ROOT", "CONFIG_DIR",
    "OntologyConfig", "CurationConfig", "SynthConfig", "MaskConfig", "AugmentConfig", "DataConfig", "ModelConfig",
    "LossConfig", "OptimConfig", "TrainConfig", "TrackingConfig", "FinetuneConfig",
]

# Old values still accepted for a while: {dotted key: {old value: new value}}. Rewritten (with a
# warning naming the key) before typing, so presets, --set and saved configs all keep loading.
DEPRECATED_VALUES = {
    "data.loader": {"wds": "pil"},  # the fallback is a PIL reader over the DALI index, not webdataset
}


@dataclass
class Config:
    name: str = "default"
    ontology: OntologyConfig = field(default_factory=OntologyConfig)
    curation: CurationConfig = field(default_factory=CurationConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict:
        return to_plain(dataclasses.asdict(self))

    def resolve_path(self, p: str) -> Path:
        """A path of this config: relative ones are relative to the working directory (paths.py;
        the FILE_RELATIVE_KEYS of a config file were already made absolute when it was read)."""
        return resolve_path(p)

    def validate(self) -> "Config":
        # The tiling chain first: when it is broken, the stage-grid errors of the model section
        # would only be its symptoms.
        self._validate_tiling()
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate(f.name)
        validate_stages(self.train, self.model, self.mask)  # train.stages against the model's tiling
        return self

    def _validate_tiling(self) -> None:
        """image = whole mask patches, mask patch = whole model patches (SPEC 1)."""
        m, mk = self.model, self.mask
        if m.patch_size <= 0 or mk.mask_patch_size <= 0:
            return  # the sections name the non-positive size
        require(m.img_size % mk.mask_patch_size == 0,
                f"model.img_size={m.img_size} is not divisible by mask.mask_patch_size={mk.mask_patch_size}")
        require(mk.mask_patch_size % m.patch_size == 0,
                f"mask.mask_patch_size={mk.mask_patch_size} is not divisible by model.patch_size={m.patch_size}")


def validate(cfg: Config) -> Config:
    return cfg.validate()


# --------------------------------------------------------------------------------------
# Presets, overrides, loading
# --------------------------------------------------------------------------------------
def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """Read a preset; `base: other.yaml` inherits from another preset (relative to this file)."""
    if path in seen:
        raise ConfigError(f"{path}: circular 'base' chain {' -> '.join(map(str, seen + (path,)))}")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    _anchor_file_relative_keys(data, path)
    base = data.pop("base", None)
    if base:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        data = _merge(_read_yaml(base_path.resolve(), seen + (path,)), data)
    return data


def _anchor_file_relative_keys(data: dict, path: Path) -> None:
    """FILE_RELATIVE_KEYS written in the config file `path` become absolute against its folder."""
    for key in FILE_RELATIVE_KEYS:
        *sections, leaf = key.split(".")
        node = data
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), str) and node[leaf]:
            node[leaf] = relative_to_file(node[leaf], path)


def preset_names() -> list[str]:
    """The presets shipped in the package (configs/*.yaml), by name."""
    return sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))


def find_preset(name_or_path: str) -> Path:
    """A path, or the name of a preset in configs/ (with or without .yaml)."""
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p.resolve()
    for cand in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if cand.exists():
            return cand.resolve()
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a preset; presets: {preset_names()}")


def parse_override(item: str, schema: type | None = None) -> tuple[list[str], Any]:
    """`key.sub=text` -> (["key", "sub"], value), the text read with the type of the field it sets
    in `schema` (default: Config): strings stay strings, lists are element-checked."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or "" in key.split("."):
        raise ConfigError(f"override {item!r} has an empty key")
    parts = key.split(".")
    return parts, parse_text(raw, field_type(schema or Config, parts), key)


def apply_overrides(data: dict, overrides: list[str] | None, schema: type | None = None) -> dict:
    data = _merge({}, data)
    for item in overrides or []:
        parts, value = parse_override(item, schema)
        node = data
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = value
    return data


def _replace_deprecated_values(data: dict) -> dict:
    """`data` with every DEPRECATED_VALUES entry renamed (a copy: the caller's dict stays as it was)."""
    data = copy.deepcopy(data)
    for key, renames in DEPRECATED_VALUES.items():
        *sections, leaf = key.split(".")
        node = data
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        old = node.get(leaf)
        if isinstance(old, str) and old in renames:
            # FutureWarning, not DeprecationWarning: Python shows it to users by default.
            warnings.warn(f"{key}={old!r} is deprecated, use {key}={renames[old]!r}",
                          FutureWarning, stacklevel=3)
            node[leaf] = renames[old]
    return data


def config_from_dict(data: dict, validate_now: bool = True) -> Config:
    cfg = from_dict(Config, _replace_deprecated_values(data))
    if validate_now:
        cfg.validate()
    return cfg


def load_config(preset: str | None = None, overrides: list[str] | None = None,
                validate_now: bool = True) -> Config:
    data = _read_yaml(find_preset(preset)) if preset else {}
    return config_from_dict(apply_overrides(data, overrides), validate_now)


def save_resolved(cfg: Config, directory: str | os.PathLike, name: str = "config.resolved.yaml") -> Path:
    """Write the fully resolved config next to an output, so every artifact says how it was made.

    Credentials in URIs (tracking.uri = https://user:password@host) are written as *** (redact.py):
    the file travels with checkpoints, shards and MLflow artifacts."""
    from .redact import redact_tree
    path = Path(directory) / name
    atomic_write_text(path, yaml.safe_dump(redact_tree(cfg.to_dict()), sort_keys=False))
    return path
