"""The checks an export runs on what the checkpoint says about itself: the run's resolved config
(client state, else config.resolved.yaml), the ontology it trained with, and that the weights fit
the architecture the config names (built on the meta device: no memory for the reference)."""
from __future__ import annotations

import logging

from .export_load import ExportError

log = logging.getLogger(__name__)


def run_config(ref, info):
    """The resolved config the run trained with (export.CheckpointRef / CheckpointInfo): client state,
    else {run_dir}/config.resolved.yaml."""
    import yaml

    from .config import ConfigError, config_from_dict

    states = info.rank0_states
    data, source = None, None
    for key in ("config", "resolved_config", "cfg"):
        if isinstance(states.get(key), dict):
            data, source = states[key], f"{ref.tag_dir} (client state '{key}')"
            break
    if data is None and ref.run_dir is not None and (ref.run_dir / "config.resolved.yaml").is_file():
        path = ref.run_dir / "config.resolved.yaml"
        data, source = yaml.safe_load(path.read_text()), str(path)
    if data is None:
        raise ExportError(f"{ref.tag_dir}: the checkpoint's client state has no resolved config and no "
                          f"config.resolved.yaml was found next to it; cannot tell the architecture")
    try:
        return config_from_dict(data, validate_now=False), source
    except ConfigError as exc:
        raise ExportError(f"the run config in {source} is not valid: {exc}") from exc


def ontology_info(cfg, trained_hash: str | None) -> dict:
    """Hash the run trained with, and the node names when the ontology file still has that hash."""
    from .ontology import OntologyError, load_ontology

    nodes, note = None, None
    try:
        onto = load_ontology(cfg.resolve_path(cfg.ontology.path))
        if trained_hash is None or onto.hash == trained_hash:
            trained_hash, nodes = onto.hash, list(onto.names)
        else:
            note = (f"{cfg.ontology.path} now has hash {onto.hash}, the run trained with {trained_hash}: "
                    f"node names not recorded")
    except (OntologyError, OSError) as exc:
        note = f"ontology {cfg.ontology.path} unreadable ({exc}): node names not recorded"
    if note:
        log.warning(note)
    return dict(hash=trained_hash, nodes=nodes, note=note)


def check_shapes(weights: dict, reference: dict, what: str, source: str) -> None:
    missing = sorted(set(reference) - set(weights))
    unexpected = sorted(set(weights) - set(reference))
    wrong = sorted(k for k in set(reference) & set(weights) if tuple(reference[k].shape) != tuple(weights[k].shape))
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch " + ", ".join(
                f"{k}: checkpoint {tuple(weights[k].shape)} vs config {tuple(reference[k].shape)}" for k in wrong[:5]))
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        raise ExportError(f"the {what} weights do not match the architecture in {source}: " + "; ".join(parts))


def reference_state_dict(model_cfg, num_classes: int) -> dict:
    """Parameter names and shapes of the model the config describes, built without allocating memory."""
    import torch

    from .models import build_model
    with torch.device("meta"):
        model = build_model(model_cfg, num_classes)
    return model.state_dict()
