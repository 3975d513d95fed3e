"""Loading an `echocare export` (encoder.safetensors + encoder.json), the contract of export.py
with fine-tuning and any other consumer.

Everything is checked before any weight is used, and every failure is an ExportError naming the
file: encoder.json must describe the architecture (META_TYPES) and record the SHA-256 of the
weights, which is always compared (there is no switch to skip it); a truncated or garbage
safetensors file is refused as such.
"""
from __future__ import annotations

import json
from pathlib import Path

ENCODER_FILE = "encoder.safetensors"
HEADS_FILE = "heads.safetensors"
META_FILE = "encoder.json"


class ExportError(RuntimeError):
    """The checkpoint cannot be exported, or an export cannot be loaded; the message says which file and why."""


def read_export_meta(path: str | Path) -> tuple[Path, dict]:
    """(encoder.safetensors path, encoder.json content) from either file or their directory."""
    path = Path(path).expanduser()
    weights = path / ENCODER_FILE if path.is_dir() else path
    meta_path = weights.parent / META_FILE
    if not weights.is_file():
        raise ExportError(f"{weights} does not exist (expected an `echocare export` output)")
    if not meta_path.is_file():
        raise ExportError(f"{meta_path} is missing: it describes the architecture of {weights.name}")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError) as exc:
        raise ExportError(f"{meta_path} is not valid JSON: {exc}") from exc
    check_export_meta(meta, meta_path)
    return weights, meta


# What loading needs from encoder.json: the architecture, the normalisation, the weights' hash.
META_TYPES = {"arch": str, "img_size": int, "patch_size": int, "window_size": int, "in_chans": int,
              "embed_dim": int, "depths": list, "num_heads": list, "norm_mean": (int, float),
              "norm_std": (int, float)}


def check_export_meta(meta, meta_path: Path) -> None:
    """ExportError naming encoder.json and the key when anything loading relies on is missing."""
    if not isinstance(meta, dict):
        raise ExportError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    for key, kind in META_TYPES.items():
        if key not in meta:
            raise ExportError(f"{meta_path} has no {key!r}: it does not describe the encoder "
                              f"(re-export it with `echocare export`)")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise ExportError(f"{meta_path}: {key}={meta[key]!r:.80} has the wrong type")
    sha = (meta.get("files") or {}).get("encoder", {}).get("sha256") if isinstance(meta.get("files"), dict) else None
    if not isinstance(sha, str) or len(sha) != 64:
        # Never load unverified weights: an encoder.json without the hash vouches for nothing.
        raise ExportError(f"{meta_path} has no files.encoder.sha256: the weights cannot be verified "
                          f"(re-export them with `echocare export`)")


def timm_kwargs(meta: dict, img_size: int | None = None, drop_path_rate: float = 0.0) -> dict:
    """The `timm.create_model` arguments that rebuild an exported encoder (pretrained=False)."""
    return dict(model_name=meta["arch"], pretrained=False, num_classes=0,
                img_size=img_size or meta["img_size"], patch_size=meta["patch_size"],
                window_size=meta["window_size"], in_chans=meta["in_chans"], embed_dim=meta["embed_dim"],
                depths=tuple(meta["depths"]), num_heads=tuple(meta["num_heads"]), drop_path_rate=drop_path_rate)


def load_encoder(path: str | Path, img_size: int | None = None, drop_path_rate: float = 0.0):
    """An exported encoder as a plain timm SwinTransformer (fp32, CPU, eval mode), after checking
    its SHA-256 against encoder.json (always: there is no switch to skip it).

    `img_size` other than the pretraining one is allowed when the window still tiles every
    stage; timm's Swin checkpoint filter resizes what depends on it.
    """
    import timm
    from safetensors.torch import load_file
    from timm.models.swin_transformer import checkpoint_filter_fn

    from .atomic import file_sha256

    weights, meta = read_export_meta(path)
    expected = meta["files"]["encoder"]["sha256"]  # read_export_meta made sure it is there
    actual = file_sha256(weights)
    if actual != expected:
        raise ExportError(f"{weights}: SHA-256 {actual} differs from {expected} in "
                          f"{META_FILE} (a corrupt or replaced file)")
    model = timm.create_model(**timm_kwargs(meta, img_size, drop_path_rate))
    try:
        loaded = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError for bad headers
        raise ExportError(f"{weights} is not a readable safetensors file ({type(exc).__name__}: {exc}): "
                          f"truncated or not an `echocare export` output") from exc
    state = {k: v.float() if v.is_floating_point() else v for k, v in loaded.items()}
    state = checkpoint_filter_fn(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{weights} does not fit {meta['arch']} as described in {META_FILE}: {exc}") from exc
    model.echocare_meta = meta  # the runner reads normalisation and provenance from here
    return model.eval()


