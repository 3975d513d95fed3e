"""The model card (README.md) of an export: what the encoder is, how to load it, what it was
pretrained on (from the shards' manifest.json), for how long, how far the losses went (from the
run's metrics.jsonl), and where it came from (MLflow run, checkpoint, hashes).

Hugging Face reads the YAML front matter (library, licence, tags); everything else is for
people. A missing manifest or metrics file is said so in the card, never guessed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CARD_FILE = "README.md"
TOP_SOURCES = 20   # rows of the per-source table (the rest are summed)


@dataclass(frozen=True)
class ModelCard:
    name: str
    text: str


def _manifest(cfg) -> tuple[object | None, str]:
    """(Manifest or None, where it was looked for / why not)."""
    from .shardfmt import Manifest

    shards = getattr(getattr(cfg, "data", None), "shards", "") if cfg is not None else ""
    if not shards:
        return None, "the run config names no data.shards"
    path = cfg.resolve_path(shards)
    try:
        return Manifest.read(path), str(path)
    except Exception as exc:  # noqa: BLE001 - a card is written whatever state the shards are in
        return None, f"{path}: {type(exc).__name__}: {exc}"


def _losses(run_dir: Path | None) -> tuple[dict | None, dict | None, str]:
    """First and last metrics.jsonl records that carry a loss."""
    if run_dir is None:
        return None, None, "no run directory"
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return None, None, f"{path} does not exist"
    first = last = None
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash mid-write
        if isinstance(rec, dict) and "loss" in rec:
            first = first or rec
            last = rec
    return first, last, str(path)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _data_section(manifest, where: str) -> list[str]:
    if manifest is None:
        return ["## Pretraining data", "", f"Not recorded ({where}).", ""]
    lines = ["## Pretraining data", "",
             f"{manifest.num_samples} grayscale ultrasound frames in {len(manifest.shards)} WebDataset shards "
             f"(`{where}`), labelled with an ontology of {manifest.ontology_nodes} nodes "
             f"(hash `{manifest.ontology_hash}`).", "", "| source | frames |", "|---|---:|"]
    ranked = sorted(manifest.per_source.items(), key=lambda kv: (-kv[1], kv[0]))
    for name, count in ranked[:TOP_SOURCES]:
        lines.append(f"| {name} | {count} |")
    if len(ranked) > TOP_SOURCES:
        lines.append(f"| ({len(ranked) - TOP_SOURCES} more) | {sum(c for _, c in ranked[TOP_SOURCES:])} |")
    rejected = {k: (v or {}).get("count", 0) for k, v in (manifest.rejected or {}).items()}
    if rejected:
        lines += ["", "Left out by curation: " + ", ".join(f"{k} {v}" for k, v in sorted(rejected.items())) + "."]
    return lines + [""]


def model_card(meta: dict, timm_config: dict, cfg=None, run_dir: Path | None = None) -> ModelCard:
    """README.md for the export described by encoder.json (`meta`) and config.json (`timm_config`)."""
    pcfg = timm_config["pretrained_cfg"]
    source = meta.get("source") or {}
    onto = meta.get("ontology") or {}
    manifest, where = _manifest(cfg)
    first, last, metrics_where = _losses(run_dir)
    front = ["---", "library_name: timm", f"license: {pcfg['license']}", "pipeline_tag: image-feature-extraction",
             "tags:", "- timm", "- image-feature-extraction", "- ultrasound", "- medical-imaging", "- simmim",
             "- echocare", "---", ""]
    body = [f"# EchoCare encoder: {meta['arch']}", "",
            f"{pcfg['description']}. A Swin Transformer pretrained with SimMIM masked-image reconstruction and a "
            f"hierarchical anatomy classifier; this is the encoder alone (no classifier head, "
            f"{meta['num_features']} features after average pooling).", "",
            "## Usage", "", "```python", "import timm", "",
            'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", pretrained=True)  # or "hf-hub:ORG/NAME"',
            "data_config = timm.data.resolve_data_config(model=model)",
            "transform = timm.data.create_transform(**data_config)  # expects a single-channel (L mode) image",
            "features = model(transform(image).unsqueeze(0))", "```", "",
            "| input | value |", "|---|---|",
            "| size | {} x {} x {} (channels x H x W) |".format(*pcfg["input_size"]),
            f"| preprocessing | whole frame resized ({pcfg['interpolation']}, no crop), scaled to [0, 1], "
            f"then (x - {pcfg['mean'][0]}) / {pcfg['std'][0]} |",
            f"| patch / window | {meta['patch_size']} / {meta['window_size']} |",
            f"| embed dim, depths, heads | {meta['embed_dim']}, {meta['depths']}, {meta['num_heads']} |", ""]
    body += _data_section(manifest, where)
    body += ["## Ontology", "",
             f"Hash `{onto.get('hash')}`" + (f", {len(onto['nodes'])} nodes." if onto.get("nodes") else ".")
             + (f" {onto['note']}" if onto.get("note") else ""), ""]
    body += ["## Training", "", "| | |", "|---|---|", f"| steps | {source.get('step')} |",
             f"| ranks x ZeRO stage | {source.get('world_size')} x ZeRO-{source.get('zero_stage')} |"]
    if cfg is not None:
        t = cfg.train
        body += [f"| micro-batch x accumulation | {t.micro_batch} x {t.grad_accum} per rank |",
                 f"| precision | {t.precision} |",
                 f"| mask ratio, mask patch | {cfg.mask.mask_ratio}, {cfg.mask.mask_patch_size} px |"]
    if last is not None:
        for key in ("loss", "loss_mim", "loss_hie"):
            if key in last:
                body.append(f"| {key} (step {first.get('step')} -> {last.get('step')}) | "
                            f"{_fmt(first.get(key))} -> {_fmt(last.get(key))} |")
    else:
        body.append(f"| losses | not recorded ({metrics_where}) |")
    body += ["", "## Provenance", "", "| | |", "|---|---|",
             f"| MLflow pretraining run | `{source.get('mlflow_run_id')}` |",
             f"| checkpoint | `{source.get('checkpoint_dir')}` |",
             f"| weights SHA-256 | `{meta['files']['encoder']['sha256']}` |",
             f"| dtype | {meta.get('dtype')} |",
             f"| echocare-dist | {meta.get('echocare_version')}, exported {meta.get('exported_at')} |", "",
             "encoder.safetensors + encoder.json are the same weights in echocare's own layout "
             "(`echocare_dist.export.load_encoder`).", ""]
    return ModelCard(CARD_FILE, "\n".join(front + body))
