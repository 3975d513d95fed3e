"""timm's own layout of an export, beside ours: config.json + model.safetensors (+ README.md).

`timm.create_model("local-dir:DIR", pretrained=True)` needs nothing else: config.json names the
architecture and its arguments (`model_args`) and carries the data config timm's
`resolve_data_config` reads (`pretrained_cfg`: one input channel, our mean/std, input size,
interpolation, crop), so nothing has to be passed by hand and no ImageNet default leaks in.
The same directory is what `push_to_hub` uploads (Hugging Face's `hf-hub:` prefix reads it too).

model.safetensors holds exactly the bytes of encoder.safetensors (a hard link where the file
system allows one, else a copy), so encoder.json's SHA-256 vouches for both.

The pretraining pipeline's preprocessing, which the data config has to state (data/augment.py,
finetune/data.py): the whole frame resized to img_size x img_size (bilinear, no crop), gray
scaled to [0, 1], then (x - norm_mean) / norm_std.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

TIMM_CONFIG_FILE = "config.json"
TIMM_WEIGHTS_FILE = "model.safetensors"
TIMM_TAG = "echocare_simmim_us"   # timm's "pretrained tag": the method and the data (ultrasound)
DEFAULT_LICENSE = "other"          # the weights' terms follow the pretraining data's, which only the user knows
INTERPOLATION = "bilinear"        # data/augment.py resizes with PIL's bilinear filter
SWIN_FIRST_CONV, SWIN_CLASSIFIER = "patch_embed.proj", "head.fc"


def timm_config(meta: dict, license: str = DEFAULT_LICENSE, description: str = "") -> dict:
    """config.json content for an export described by `meta` (encoder.json's content)."""
    chans = int(meta["in_chans"])
    size = int(meta["img_size"])
    source = meta.get("source") or {}
    ontology = meta.get("ontology") or {}
    pretrained_cfg = dict(
        tag=TIMM_TAG,
        custom_load=False,
        input_size=[chans, size, size],
        fixed_input_size=True,          # Swin's window attention is built for this size
        interpolation=INTERPOLATION,
        crop_pct=1.0,                   # the whole frame, resized; never a centre crop
        crop_mode="center",
        mean=[float(meta["norm_mean"])] * chans,
        std=[float(meta["norm_std"])] * chans,
        num_classes=0,
        pool_size=None,
        first_conv=SWIN_FIRST_CONV,
        classifier=SWIN_CLASSIFIER,
        license=license,
        description=description or (f"EchoCare SimMIM-pretrained {meta['arch']} encoder for grayscale "
                                     f"ultrasound (step {source.get('step')})"),
    )
    return dict(
        architecture=meta["arch"],
        num_classes=0,
        num_features=int(meta["num_features"]),
        global_pool="avg",
        model_args=dict(img_size=size, patch_size=int(meta["patch_size"]), window_size=int(meta["window_size"]),
                        in_chans=chans, embed_dim=int(meta["embed_dim"]), depths=list(meta["depths"]),
                        num_heads=list(meta["num_heads"])),
        pretrained_cfg=pretrained_cfg,
        # Not read by timm (it ignores unknown top-level keys): where the weights come from.
        echocare=dict(format_version=meta.get("format_version"), step=source.get("step"),
                      mlflow_run_id=source.get("mlflow_run_id"), ontology_hash=ontology.get("hash"),
                      encoder_sha256=meta["files"]["encoder"]["sha256"], dtype=meta.get("dtype")),
    )


def link_or_copy(src: Path, dst: Path) -> None:
    """dst becomes the same bytes as src, atomically (a temp name, then a rename): a hard link
    costs no space; file systems without them (some FUSE/object stores) get a streamed copy."""
    from .atomic import atomic_open

    tmp = dst.with_name(f".{dst.name}.link-{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
        return
    except OSError:
        tmp.unlink(missing_ok=True)
    with open(src, "rb") as fin, atomic_open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, 1 << 22)


def write_timm_layout(out: Path, meta: dict, cfg=None, run_dir: Path | None = None,
                      license: str = DEFAULT_LICENSE) -> dict:
    """Write model.safetensors, config.json and the model card next to encoder.safetensors;
    returns their `files` entries for encoder.json (file, sha256, bytes)."""
    from .atomic import atomic_write_json, atomic_write_text, file_sha256
    from .export_card import model_card
    from .export_load import ENCODER_FILE

    out = Path(out)
    link_or_copy(out / ENCODER_FILE, out / TIMM_WEIGHTS_FILE)
    config = timm_config(meta, license)
    atomic_write_json(out / TIMM_CONFIG_FILE, config)
    card = model_card(meta, config, cfg=cfg, run_dir=run_dir)
    atomic_write_text(out / card.name, card.text)
    entries = {}
    for key, name in (("timm_weights", TIMM_WEIGHTS_FILE), ("timm_config", TIMM_CONFIG_FILE),
                      ("model_card", card.name)):
        path = out / name
        entries[key] = dict(file=name, sha256=file_sha256(path), bytes=path.stat().st_size)
    return entries


def push_to_hub(export_dir: Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Upload an export directory to the Hugging Face Hub (huggingface_hub must be installed);
    returns the repository URL. `timm.create_model("hf-hub:" + repo_id, pretrained=True)` loads it."""
    from .export_load import ExportError
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ExportError("--push-to-hub needs the huggingface_hub package (pip install huggingface_hub)") from None
    export_dir = Path(export_dir)
    for name in (TIMM_CONFIG_FILE, TIMM_WEIGHTS_FILE):
        if not (export_dir / name).is_file():
            raise ExportError(f"{export_dir / name} is missing: re-export with `echocare export` first")
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(export_dir), commit_message="echocare export",
                          allow_patterns=["*.json", "*.safetensors", "README.md"])
    except Exception as exc:  # noqa: BLE001 - network, auth and permission errors all end the same way
        raise ExportError(f"uploading {export_dir} to the Hugging Face Hub as {repo_id!r} failed: "
                          f"{type(exc).__name__}: {exc}") from None
    return str(url)
