"""`echocare export`: a pretraining checkpoint -> plain encoder weights anyone can load.

Input: a run directory, its `checkpoints/` directory, or one tag directory, written by any ZeRO
stage (0-3) and any world size. ZeRO 1-3 shards are consolidated with DeepSpeed's own
`get_fp32_state_dict_from_zero_checkpoint` (the fp32 master weights); ZeRO 0 keeps the whole
module in `mp_rank_00_model_states.pt`.

Output directory:
  encoder.safetensors  keys exactly as the timm SwinTransformer's state_dict (num_classes=0)
  heads.safetensors    optional (--with-heads): decoder.*, hie_head.*, mask_token
  encoder.json         architecture, normalisation, ontology, provenance (incl. the pretraining
                       MLflow run id), SHA-256 of each file
  config.json + model.safetensors + README.md: timm's own layout and a model card (export_timm.py)

Loading, anywhere: `timm.create_model("local-dir:OUT", pretrained=True)` (no other argument; the
data config comes along), or `load_encoder(".../encoder.safetensors")` (reads encoder.json,
verifies the hash). The export is logged to the pretraining run's MLflow run (export_tracking.py).

Refused, with the reason: no `latest` (and no --tag), a tag directory without the trainer's
completion marker or with missing rank files, a file whose SHA-256 differs from the one the
marker recorded, a pickle that references anything but tensors, containers and the few numpy /
DeepSpeed types a checkpoint holds (it could run code: we load with `weights_only=True` and scan
every file before DeepSpeed's own loader sees it), weights whose shapes do not match the
architecture the run's config names. Loading refuses an encoder.json without the architecture
keys or the hash of the weights, and a truncated or garbage safetensors file, naming the file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .export_checks import check_shapes, ontology_info, reference_state_dict, run_config
from .export_load import (ENCODER_FILE, HEADS_FILE, META_FILE, ExportError, check_export_meta,  # noqa: F401
                          load_encoder, read_export_meta, timm_kwargs)  # (re-exported: the public API)
from .export_timm import DEFAULT_LICENSE, push_to_hub, write_timm_layout
from .safe_load import check_pickle, torch_load_safe

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ENCODER_PREFIX = "encoder."
TRAINING_ONLY_PREFIX = "loss_predictor."   # never exported, not even with --with-heads
# Prefixes a wrapper may add in front of the model's own names (DDP, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_OPTIM_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
_ZERO3_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
STAGE012_MODEL_FILE = "mp_rank_00_model_states.pt"
ZERO3_RANK0_MODEL_FILE = "zero_pp_rank_0_mp_rank_00_model_states.pt"


# --------------------------------------------------------------------------------------
# Locating and checking the checkpoint
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointRef:
    root: Path          # the directory holding `latest` and the tag directories
    tag: str
    run_dir: Path | None

    @property
    def tag_dir(self) -> Path:
        return self.root / self.tag


def _looks_like_tag_dir(path: Path) -> bool:
    from .train.checkpoint import META, step_of
    return (step_of(path.name) is not None or (path / META).is_file()
            or any(path.glob("*_model_states.pt")) or any(path.glob("*_optim_states.pt")))


def resolve_checkpoint(path: str | Path, tag: str | None = None) -> CheckpointRef:
    """A run dir, its checkpoints/ dir, or a tag dir -> which tag directory to export."""
    from .train.checkpoint import LATEST

    path = Path(path).expanduser().resolve()
    if not path.exists():
        raise ExportError(f"{path} does not exist")
    if (path / "checkpoints").is_dir():
        root, run_dir = path / "checkpoints", path
    elif path.is_dir() and _looks_like_tag_dir(path):
        if tag is not None and tag != path.name:
            raise ExportError(f"{path} is the tag directory {path.name!r}, but --tag {tag!r} was given")
        root, tag = path.parent, path.name
        run_dir = root.parent if root.name == "checkpoints" else None
    elif path.is_dir():
        root = path
        run_dir = path.parent if path.name == "checkpoints" else None
    else:
        raise ExportError(f"{path} is not a directory (give a run directory, its checkpoints/ "
                          f"directory or one checkpoint tag directory)")
    if tag is None:
        latest = root / LATEST
        if not latest.is_file():
            raise ExportError(f"no '{LATEST}' file in {root}: the run has not completed a checkpoint "
                              f"(or this is not a checkpoint directory); pass --tag to pick one explicitly")
        tag = latest.read_text().strip()
        if not tag:
            raise ExportError(f"{latest} is empty")
    if not (root / tag).is_dir():
        available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        raise ExportError(f"checkpoint tag directory {root / tag} does not exist (available: {available})")
    return CheckpointRef(root, tag, run_dir)


@dataclass
class CheckpointInfo:
    zero_stage: int
    world_size: int
    rank0_states: dict           # the rank-0 model-states dict (module weights, client state, DS metadata)
    marker: dict | None          # the trainer's meta.json (completion marker), if any


def inspect_checkpoint(ref: CheckpointRef, require_marker: bool = True) -> CheckpointInfo:
    """Refuse a tag directory that is incomplete: no marker, missing model or optimizer rank files."""
    from .train.checkpoint import META

    tag_dir = ref.tag_dir
    marker = None
    if (tag_dir / META).is_file():
        try:
            marker = json.loads((tag_dir / META).read_text())
        except ValueError as exc:
            raise ExportError(f"{tag_dir / META} is not valid JSON: {exc}") from exc
    elif require_marker:
        raise ExportError(f"{tag_dir} has no {META}: the trainer writes it only after every rank finished "
                          f"saving, so this checkpoint is partial (a crash or preemption mid-save). Export "
                          f"the previous checkpoint (--tag), or pass --allow-unmarked for a DeepSpeed "
                          f"checkpoint that was not written by `echocare pretrain`")
    if marker is not None:
        from .train.checkpoint import verify_files
        if "files" not in marker:
            log.warning("%s records no file hashes (a checkpoint older than them): files not verified",
                        tag_dir / META)
        damaged = verify_files(tag_dir, marker)
        if damaged:
            raise ExportError(f"{tag_dir} is damaged: " + "; ".join(damaged[:5]))
    names = {p.name for p in tag_dir.iterdir() if p.is_file()}
    optim_ranks = sorted(int(m.group(1)) for n in names if (m := _OPTIM_RE.match(n)))
    zero3_ranks = sorted(int(m.group(1)) for n in names if (m := _ZERO3_MODEL_RE.match(n)))
    if STAGE012_MODEL_FILE in names:
        rank0_file = tag_dir / STAGE012_MODEL_FILE
    elif ZERO3_RANK0_MODEL_FILE in names:
        rank0_file = tag_dir / ZERO3_RANK0_MODEL_FILE
    else:
        raise ExportError(f"{tag_dir} holds no model states file ({STAGE012_MODEL_FILE} or "
                          f"{ZERO3_RANK0_MODEL_FILE}): incomplete checkpoint")
    states = torch_load_safe(rank0_file)
    ds_zero = (states.get("ds_config") or {}).get("zero_optimization") or {}
    stage = int(ds_zero.get("stage", 3 if rank0_file.name == ZERO3_RANK0_MODEL_FILE else 0))
    world = int(states.get("dp_world_size") or 1)
    if marker is not None:
        for key, have in (("zero_stage", stage), ("world_size", world)):
            if key in marker and int(marker[key]) != have:
                raise ExportError(f"{tag_dir / META} says {key}={marker[key]} but the DeepSpeed files say "
                                  f"{have}: the directory mixes two saves")

    expected = list(range(world))
    if stage >= 1:
        if optim_ranks != expected:
            missing = sorted(set(expected) - set(optim_ranks))
            raise ExportError(f"{tag_dir}: ZeRO-{stage} checkpoint of {world} rank(s) but optimizer shard files "
                              f"exist for ranks {optim_ranks} (missing {missing}): partial checkpoint")
    if stage == 3 and zero3_ranks != expected:
        missing = sorted(set(expected) - set(zero3_ranks))
        raise ExportError(f"{tag_dir}: ZeRO-3 checkpoint of {world} rank(s) but model-states files exist for "
                          f"ranks {zero3_ranks} (missing {missing}): partial checkpoint")
    if stage == 0 and not isinstance(states.get("module"), dict):
        raise ExportError(f"{rank0_file} has no module weights")
    return CheckpointInfo(stage, world, states, marker)


def consolidated_state_dict(ref: CheckpointRef, info: CheckpointInfo, progress: bool = True) -> dict:
    """fp32 weights of the whole model, on the CPU, with the model's own parameter names."""
    import torch

    from .progress import progress_bar

    if info.zero_stage == 0:
        tensors = dict(info.rank0_states["module"])
        low = sorted({str(t.dtype) for t in tensors.values() if t.is_floating_point() and t.dtype != torch.float32})
        if low:
            # Without ZeRO the module holds what the engine trained; with DeepSpeed's own fp16/bf16
            # mode that is the 16-bit copy (our trainer keeps fp32 weights and uses autocast).
            log.warning("%s holds %s module weights: exporting those (no fp32 master copy without ZeRO)",
                        ref.tag_dir, "/".join(low))
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        for f in sorted(ref.tag_dir.glob("*.pt")):
            check_pickle(f)  # DeepSpeed's consolidator loads with weights_only=False
        try:
            # lazy: shards are gathered tensor by tensor below, never two full copies at once.
            tensors = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag, lazy_mode=True)
        except (ValueError, FileNotFoundError, KeyError, RuntimeError) as exc:
            raise ExportError(f"DeepSpeed could not consolidate {ref.tag_dir}: {exc}") from exc
    out = {}
    for name, tensor in progress_bar(tensors.items(), desc="consolidating", unit="tensor", enabled=progress):
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        tensor = tensor.contiguous()  # materialises a lazy ZeRO tensor
        out[name] = tensor.float() if tensor.is_floating_point() else tensor
    if not out:
        raise ExportError(f"{ref.tag_dir}: the checkpoint holds no weights")
    return out


# --------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _save_safetensors(path: Path, tensors: dict, metadata: dict) -> dict:
    from safetensors.torch import save

    from .atomic import atomic_write_bytes
    blob = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, blob)
    return dict(file=path.name, sha256=_sha256(blob), bytes=len(blob), tensors=len(tensors))


def export_checkpoint(source: str | Path, out: str | Path, tag: str | None = None, dtype: str = "fp32",
                      with_heads: bool = False, progress: bool = True, require_marker: bool = True,
                      license: str = DEFAULT_LICENSE, track: bool = True) -> dict:
    """Export a DeepSpeed checkpoint's encoder (and optionally heads); returns the encoder.json content."""
    if dtype not in ("fp32", "bf16"):
        raise ExportError(f"--dtype must be fp32 or bf16, got {dtype!r}")
    t0 = time.time()
    ref = resolve_checkpoint(source, tag)
    info = inspect_checkpoint(ref, require_marker=require_marker)
    cfg, cfg_source = run_config(ref, info)
    weights = consolidated_state_dict(ref, info, progress=progress)
    step = info.rank0_states.get("step", (info.marker or {}).get("step"))
    if step is None:
        from .train.checkpoint import step_of
        step = step_of(ref.tag)
    provenance = dict(run_dir=str(ref.run_dir) if ref.run_dir else None, checkpoint_dir=str(ref.tag_dir),
                      tag=ref.tag, step=step, zero_stage=info.zero_stage, world_size=info.world_size,
                      deepspeed_version=str(info.rank0_states.get("ds_version")), config=cfg_source,
                      mlflow_run_id=info.rank0_states.get("mlflow_run_id") or (info.marker or {}).get("mlflow_run_id"))
    ontology = ontology_info(cfg, info.rank0_states.get("ontology_hash") or (info.marker or {}).get("ontology_hash"))
    meta = write_export(weights, cfg, out, dtype=dtype, with_heads=with_heads, provenance=provenance,
                        ontology=ontology, config_source=cfg_source, license=license)
    if track:
        from .export_tracking import log_export
        log_export(meta, Path(out), cfg, ref.run_dir)
    log.info("exported %s (step %s, ZeRO-%d x %d ranks) to %s in %.1f s", ref.tag_dir, step,
             info.zero_stage, info.world_size, out, time.time() - t0)
    return meta


def write_export(weights: dict, cfg, out: str | Path, dtype: str = "fp32", with_heads: bool = False,
                 provenance: dict | None = None, ontology: dict | None = None,
                 config_source: str = "the config", license: str = DEFAULT_LICENSE) -> dict:
    """Check full-model `weights` (EchoCareMIM names) against `cfg.model` and write the export files.

    Also the way to export a model trained without DeepSpeed: `write_export(model.state_dict(), cfg, out)`.
    """
    import torch

    from . import __version__
    from .atomic import atomic_write_json
    from .models.encoder import encoder_kwargs

    if dtype not in ("fp32", "bf16"):
        raise ExportError(f"dtype must be fp32 or bf16, got {dtype!r}")
    onto = ontology or ontology_info(cfg, None)
    hie = weights.get("hie_head.fc.weight")
    num_classes = int(hie.shape[0]) if hie is not None else len(onto["nodes"] or [])
    if onto["nodes"] is not None and hie is not None and len(onto["nodes"]) != num_classes:
        raise ExportError(f"hie_head has {num_classes} outputs but the ontology {cfg.ontology.path} has "
                          f"{len(onto['nodes'])} nodes")
    # The hard-patch-mining loss predictor (mask.strategy=hpm) only steers pretraining's masks.
    weights = {k: v for k, v in weights.items() if not k.startswith(TRAINING_ONLY_PREFIX)}
    check_shapes(weights, reference_state_dict(cfg.model, max(num_classes, 1)), "model", config_source)

    encoder = {k[len(ENCODER_PREFIX):]: v for k, v in weights.items() if k.startswith(ENCODER_PREFIX)}
    heads = {k: v for k, v in weights.items() if not k.startswith(ENCODER_PREFIX)}
    target = torch.bfloat16 if dtype == "bf16" else torch.float32

    def cast(tensors):
        return {k: (v.detach().to("cpu", target) if v.is_floating_point() else v.detach().cpu())
                for k, v in tensors.items()}

    kwargs = encoder_kwargs(cfg.model)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    st_meta = {"format": "pt", "arch": cfg.model.arch, "echocare_export": str(FORMAT_VERSION)}
    if with_heads and onto["nodes"] is None:
        raise ExportError(f"--with-heads needs the ontology node names: {onto['note']}")
    files = {"encoder": _save_safetensors(out / ENCODER_FILE, cast(encoder), st_meta)}
    if with_heads:
        files["heads"] = _save_safetensors(out / HEADS_FILE, cast(heads), st_meta)
    elif (out / HEADS_FILE).exists():
        (out / HEADS_FILE).unlink()  # never leave heads of an older export next to this encoder

    meta = dict(
        format_version=FORMAT_VERSION,
        arch=cfg.model.arch,
        img_size=cfg.model.img_size,
        patch_size=cfg.model.patch_size,
        window_size=cfg.model.window_size,
        in_chans=cfg.model.in_chans,
        embed_dim=kwargs["embed_dim"],
        depths=list(kwargs["depths"]),
        num_heads=list(kwargs["num_heads"]),
        num_features=int(kwargs["embed_dim"] * 2 ** (len(kwargs["depths"]) - 1)),
        model=cfg.to_dict()["model"],
        norm_mean=cfg.data.augment.norm_mean,
        norm_std=cfg.data.augment.norm_std,
        ontology=onto,
        source=provenance or {},
        dtype=dtype,
        files=files,
        echocare_version=__version__,
        exported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    run_dir = (provenance or {}).get("run_dir")
    files.update(write_timm_layout(out, meta, cfg, Path(run_dir) if run_dir else None, license=license))
    atomic_write_json(out / META_FILE, meta)  # written last: its hashes vouch for the files above
    return meta


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------
def _cmd_export(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        meta = export_checkpoint(args.source, args.out, tag=args.tag, dtype=args.dtype,
                                 with_heads=args.with_heads, progress=not args.no_progress,
                                 require_marker=not args.allow_unmarked, license=args.license,
                                 track=not args.no_track)
        if args.push_to_hub:
            print(f"pushed to {push_to_hub(Path(args.out), args.push_to_hub, private=not args.public)}")
    except ExportError as exc:
        print(f"echocare export: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    print(f"exported {meta['arch']} (step {meta['source']['step']}, ZeRO-{meta['source']['zero_stage']} "
          f"x {meta['source']['world_size']} ranks, {meta['dtype']}) ->")
    for entry in meta["files"].values():
        print(f"  {out / entry['file']}  {entry['bytes'] / 2**20:.1f} MiB  sha256 {entry['sha256'][:16]}...")
    print(f"  {out / META_FILE}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="pretraining checkpoint -> encoder (ours and timm's layout) + model card",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="run directory, its checkpoints/ directory, or one checkpoint tag directory")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one `latest` names)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--with-heads", action="store_true",
                   help="also write heads.safetensors (reconstruction decoder, hierarchical head, mask token)")
    p.add_argument("--allow-unmarked", action="store_true",
                   help="accept a tag directory without the trainer's meta.json completion marker "
                        "(plain DeepSpeed checkpoints); rank-file checks still apply")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--license", default=DEFAULT_LICENSE,
                   help="licence of the weights in config.json and the model card (default: %(default)s)")
    p.add_argument("--no-track", action="store_true", help="do not log the export to the pretraining MLflow run")
    p.add_argument("--push-to-hub", metavar="ORG/NAME", default="",
                   help="upload the export to the Hugging Face Hub (needs huggingface_hub and a token)")
    p.add_argument("--public", action="store_true", help="with --push-to-hub: a public repository")
    p.set_defaults(func=_cmd_export)
