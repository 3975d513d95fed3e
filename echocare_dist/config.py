"""Typed configuration: YAML presets -> nested dataclasses, `--set a.b=c` overrides, validation.

One small dataclass per component (data, mask, model, loss, optim, train, tracking, curation,
synth, finetune). Every value the report leaves ambiguous is a field here, never a constant in
code. `load_config` refuses unknown keys and wrong types with the full dotted key in the
message, then `validate` checks the cross-field constraints before any work starts.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .atomic import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class ConfigError(ValueError):
    """Raised for any invalid configuration; the message names the key and the value."""


# --------------------------------------------------------------------------------------
# Component configs
# --------------------------------------------------------------------------------------
@dataclass
class OntologyConfig:
    path: str = "configs/ontology/default.yaml"


@dataclass
class CurationConfig:
    """Shard building (SPEC 6)."""
    frame_stride: int = 10            # keep every Nth frame of videos and DICOM cine
    min_nonzero: int = 1000           # drop frames with fewer non-zero pixels after cropping
    dark_threshold: int = 12          # gray level under which a pixel counts as background for the crop
    crop_margin: int = 2              # pixels kept around the detected ultrasound content
    crop_min_feature: float = 0.04    # content is thicker than this share of the short side; thinner = overlay
    crop_component_fraction: float = 0.05  # content pieces smaller than this share of the largest are dropped
    crop_min_texture: float = 0.02    # speckle contrast below which a blob is flat graphics (logo, bar), not B-mode
    crop_blank_outside: bool = True   # zero what lies inside the crop box but outside the content (corner text)
    max_side: int = 1024              # larger frames are downscaled (keeps shards lean); 0 = never
    near_dedup: bool = False          # perceptual-hash near-duplicate removal
    near_dedup_similarity: float = 0.95
    jpeg_quality: int = 95
    shard_max_samples: int = 1000
    shard_max_bytes: int = 256 * 1024 * 1024
    workers: int = 2
    seed: int = 0
    chunk_files: int = 64             # files per staged work unit (the granularity of resume after a crash)
    staging_dir: str = ""             # where decoded JPEGs are spilled before sharding; "" = {out}/.staging


@dataclass
class SynthConfig:
    """Synthetic B-mode data for tests and the demo (never a replacement for real data)."""
    num_images: int = 120             # still image files, the special cases below included
    num_videos: int = 2               # clips, alternately mp4 (cardiac, RGB) and avi (lung, gray)
    video_frames: int = 30
    video_fps: float = 25.0
    num_dicom: int = 1                # multi-frame DICOM cine loops
    dicom_frames: int = 20
    num_dicom_single: int = 1         # single-frame (RGB) DICOM images
    min_size: int = 180               # both sides of every image lie in [min_size, max_size]
    max_size: int = 640
    jpeg_quality: int = 90
    # Shares of num_images that exercise the shard builder's rejection paths; each kind that is
    # > 0 gets at least one file of each of its variants.
    near_empty_fraction: float = 0.03     # < 1000 non-zero pixels
    duplicate_fraction: float = 0.03      # exact pixel duplicates (byte copy, PNG re-save, BMP export)
    near_duplicate_fraction: float = 0.02  # tiny noise / brightness change of another image
    corrupt_fraction: float = 0.03        # truncated JPEG / PNG, garbage bytes
    seed: int = 0


@dataclass
class MaskConfig:
    mask_patch_size: int = 32
    mask_ratio: float = 0.5


@dataclass
class AugmentConfig:
    """SPEC 5; identical semantics on the DALI and the fallback path."""
    rrc_prob: float = 0.5
    rrc_scale: tuple = (0.67, 1.0)
    rrc_ratio: tuple = (0.75, 1.3333333)
    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    jitter_prob: float = 0.2
    brightness: float = 0.1
    contrast: float = 0.1
    norm_mean: float = 0.5
    norm_std: float = 0.5


@dataclass
class DataConfig:
    shards: str = ""                   # directory holding shard-*.tar (+ .idx, manifest.json)
    loader: Literal["auto", "dali", "wds"] = "auto"   # auto: DALI when decoding on a GPU, else the PIL fallback
    device: Literal["auto", "gpu", "cpu"] = "auto"    # where DALI decodes; auto: gpu if training on CUDA
    num_threads: int = 2               # DALI CPU threads / DataLoader workers
    hw_decoder_load: float = 0.65      # share of JPEG decoding done by the hardware decoder (A100/H100)
    prefetch: int = 2
    shuffle_buffer: int = 256          # shards are shuffled globally on write; this is extra local mixing
    seed: int = 0
    use_mmap: bool = False             # mmap the tars (local disks); plain reads survive truncated files on network FS
    max_quarantine_fraction: float = 0.1  # stop the run when more shards than this are damaged (systematic fault)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    arch: str = "swin_large_patch4_window7_224"  # timm name; embed_dim/depths/heads come from it
    img_size: int = 256
    patch_size: int = 4
    window_size: int = 8
    in_chans: int = 1
    embed_dim: Optional[int] = None    # override timm's value (tiny test models)
    depths: Optional[tuple] = None
    num_heads: Optional[tuple] = None
    drop_path_rate: float = 0.1
    grad_checkpointing: bool = False
    fused_attn: bool = True            # window attention through torch SDPA (timm's default for Swin is the explicit softmax)
    decoder: Literal["multiscale", "linear"] = "multiscale"
    decoder_dim: int = 256
    hie_head: bool = True


@dataclass
class LossConfig:
    hie_weight: float = 1.0            # lambda in L_PRE = L_MIM + lambda * L_HIE
    impl: Literal["auto", "triton", "torch"] = "auto"


@dataclass
class OptimConfig:
    lr: float = 1e-4                   # peak LR at `lr_batch_ref`
    lr_batch_ref: int = 256            # LR scales linearly with global batch / this
    min_lr: float = 1e-6
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup_steps: int = 10000
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 5.0
    fused: bool = True                 # torch's fused AdamW when the optimizer state lives on a GPU


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 1_000_000
    micro_batch: int = 32              # per rank
    grad_accum: int = 1
    zero_stage: int = 2
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    seed: int = 0
    deterministic: bool = False
    log_every: int = 50
    ckpt_every: int = 5000
    keep_last: int = 3
    image_every: int = 5000
    resume: str = "auto"               # "auto" | "none" | path to a checkpoint dir
    preempt_signals: tuple = ("SIGTERM", "SIGUSR1")
    requeue_exit_code: int = 124       # documented: trainer exits with this after a preemption checkpoint
    offload_optimizer: bool = False    # ZeRO-Offload of optimizer state to CPU (needs zero_stage >= 1)
    dist_timeout_s: int = 1800
    overlap_comm: bool = True          # overlap gradient reduction with backward (GPU only)
    reduce_bucket_size: int = 500_000_000
    peak_tflops: float = 0.0           # per device for MFU; 0 = GPU spec table, or measured on CPU
    universal_workers: int = 2         # processes for the world-size-change checkpoint conversion


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""                      # empty -> $MLFLOW_TRACKING_URI, else sqlite under run_dir
    experiment: str = "echocare-pretrain"
    run_name: str = ""
    image_rows: int = 4                # images per reconstruction grid (input/masked/recon/target)


@dataclass
class FinetuneConfig:
    """Downstream fine-tuning of an exported encoder (SPEC 7; docs in echocare_dist/finetune)."""
    task: Literal["classification", "segmentation", "regression"] = "classification"
    data: str = ""                     # folder: class sub-folders | images/ + masks/; base of CSV paths
    csv: str = ""                      # CSV with a header: path,label | path,mask | path,value
    split_file: str = ""               # CSV path,split (train/val; other values ignored); "" = seeded split
    val_fraction: float = 0.2          # seeded split (stratified per class for classification)
    checkpoint: str = ""               # exported encoder (.safetensors, or the export directory)
    run_dir: str = "runs/finetune"
    mode: Literal["full", "linear_probe"] = "full"
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-4                   # peak LR of the head; encoder layers get lr * layer_decay^depth
    min_lr: float = 1e-6               # end of the cosine schedule
    warmup_epochs: float = 1.0         # linear warmup, in epochs (fractions allowed)
    layer_decay: float = 0.75          # per Swin block, from the last block (1.0 = off)
    weight_decay: float = 0.05
    drop_path_rate: float = 0.1        # stochastic depth of the encoder during full fine-tuning
    grad_clip: float = 5.0             # max global grad norm; 0 = off
    img_size: int = 256                # images (and masks for training) are resized to this square
    hflip_prob: float = 0.5            # training augmentation (images and masks together)
    num_classes: int = 0               # 0 = inferred from the data
    monitor: str = "auto"              # metric that picks the best epoch; auto = macro_f1 / dice / mae
    mask_mode: Literal["auto", "binary", "ids"] = "auto"  # see echocare_dist/finetune/data.py
    mask_suffix: str = "_mask"         # masks/<stem><suffix>.<any ext> also matches images/<stem>.<ext>
    seg_decoder_dim: int = 64          # width of the segmentation decoder
    dice_loss_weight: float = 1.0      # segmentation loss = CE + w * soft Dice
    nsd_tolerance: float = 2.0         # NSD tolerance in pixels of the original mask
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    experiment: str = "echocare-finetune"  # MLflow experiment (tracking.uri / tracking.enabled apply)


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
        return _to_plain(dataclasses.asdict(self))

    def resolve_path(self, p: str) -> Path:
        """Relative paths in configs are relative to the repository root (where configs/ lives)."""
        path = Path(os.path.expanduser(p))
        if path.is_absolute() or path.exists():
            return path
        candidate = REPO_ROOT / path
        return candidate if candidate.exists() else path


# Swin stage layouts of the timm names we accept, used to validate without importing timm.
SWIN_ARCHS = {
    "swin_tiny_patch4_window7_224": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "swin_small_patch4_window7_224": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "swin_base_patch4_window7_224": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "swin_large_patch4_window7_224": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
}


def swin_layout(model: ModelConfig) -> dict:
    """embed_dim / depths / num_heads after applying the config's overrides."""
    if model.arch not in SWIN_ARCHS:
        raise ConfigError(f"model.arch={model.arch!r} is not one of {sorted(SWIN_ARCHS)}")
    layout = dict(SWIN_ARCHS[model.arch])
    for key in ("embed_dim", "depths", "num_heads"):
        value = getattr(model, key)
        if value is not None:
            layout[key] = tuple(value) if isinstance(value, (list, tuple)) else value
    return layout


# --------------------------------------------------------------------------------------
# dict <-> dataclass
# --------------------------------------------------------------------------------------
def _to_plain(obj):
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: value {value!r} does not match {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: value {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, key)
    if tp is tuple or origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-4" (no dot) as a string; accept what Python reads as a number.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = prefix or "top level"
        raise ConfigError(f"unknown key(s) {', '.join(repr(prefix + '.' + u if prefix else u) for u in unknown)} "
                          f"in {where}; allowed: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _coerce(value, hints[name], key)
    obj = cls()
    for name, value in kwargs.items():
        if dataclasses.is_dataclass(getattr(obj, name)) and isinstance(value, dict):
            value = _from_dict(type(getattr(obj, name)), value, f"{prefix}.{name}" if prefix else name)
        setattr(obj, name, value)
    return obj


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
    base = data.pop("base", None)
    if base:
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        data = _merge(_read_yaml(base_path.resolve(), seen + (path,)), data)
    return data


def find_preset(name_or_path: str) -> Path:
    """A path, or the name of a preset in configs/ (with or without .yaml)."""
    p = Path(name_or_path)
    if p.exists():
        return p.resolve()
    for cand in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if cand.exists():
            return cand.resolve()
    presets = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a preset; presets: {presets}")


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    data = _merge({}, data)
    for item in overrides or []:
        parts, value = parse_override(item)
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


def load_config(preset: str | None = None, overrides: list[str] | None = None,
                validate_now: bool = True) -> Config:
    data = _read_yaml(find_preset(preset)) if preset else {}
    data = apply_overrides(data, overrides)
    cfg = _from_dict(Config, data)
    if validate_now:
        validate(cfg)
    return cfg


def config_from_dict(data: dict, validate_now: bool = True) -> Config:
    cfg = _from_dict(Config, data)
    if validate_now:
        validate(cfg)
    return cfg


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------
def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def validate(cfg: Config) -> Config:
    m, mk = cfg.model, cfg.mask
    _require(m.img_size > 0, f"model.img_size must be positive, got {m.img_size}")
    _require(m.patch_size > 0, f"model.patch_size must be positive, got {m.patch_size}")
    _require(m.in_chans in (1, 3), f"model.in_chans must be 1 or 3, got {m.in_chans}")
    _require(m.img_size % mk.mask_patch_size == 0,
             f"model.img_size={m.img_size} is not divisible by mask.mask_patch_size={mk.mask_patch_size}")
    _require(mk.mask_patch_size % m.patch_size == 0,
             f"mask.mask_patch_size={mk.mask_patch_size} is not divisible by model.patch_size={m.patch_size}")
    _require(0.0 <= mk.mask_ratio <= 1.0, f"mask.mask_ratio must be in [0, 1], got {mk.mask_ratio}")
    _require(m.img_size % m.patch_size == 0,
             f"model.img_size={m.img_size} is not divisible by model.patch_size={m.patch_size}")
    layout = swin_layout(m)
    depths, heads = layout["depths"], layout["num_heads"]
    _require(len(depths) == len(heads),
             f"model.depths {depths} and model.num_heads {heads} must have the same length")
    grid = m.img_size // m.patch_size
    for stage in range(len(depths)):
        g = grid // (2 ** stage)
        _require(g * (2 ** stage) == grid and g > 0,
                 f"stage {stage} grid of {grid}/2^{stage} is not whole (model.img_size={m.img_size}, "
                 f"model.patch_size={m.patch_size})")
        # timm shrinks the window to the grid when the grid is smaller; otherwise it must divide.
        _require(g <= m.window_size or g % m.window_size == 0,
                 f"model.window_size={m.window_size} does not divide the stage-{stage} grid {g}x{g} "
                 f"(img_size {m.img_size} / patch {m.patch_size} / 2^{stage})")
        _require((layout["embed_dim"] * 2 ** stage) % heads[stage] == 0,
                 f"stage {stage}: dim {layout['embed_dim'] * 2 ** stage} not divisible by num_heads {heads[stage]}")
    _require(0.0 <= m.drop_path_rate < 1.0, f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}")
    _require(m.decoder_dim > 0, f"model.decoder_dim must be positive, got {m.decoder_dim}")
    t, o = cfg.train, cfg.optim
    _require(t.zero_stage in (0, 1, 2, 3), f"train.zero_stage must be 0..3, got {t.zero_stage}")
    _require(t.micro_batch > 0, f"train.micro_batch must be positive, got {t.micro_batch}")
    _require(t.grad_accum > 0, f"train.grad_accum must be positive, got {t.grad_accum}")
    _require(t.steps > 0, f"train.steps must be positive, got {t.steps}")
    for k in ("log_every", "ckpt_every", "image_every", "keep_last"):
        _require(getattr(t, k) > 0, f"train.{k} must be positive, got {getattr(t, k)}")
    _require(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
             f"optim.betas must be two numbers in [0, 1), got {list(o.betas)}")
    _require(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    _require(o.eps > 0, f"optim.eps must be positive, got {o.eps}")
    _require(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _require(o.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {o.grad_clip}")
    _require(not t.offload_optimizer or t.zero_stage >= 1,
             f"train.offload_optimizer=true needs train.zero_stage >= 1, got {t.zero_stage}")
    _require(t.requeue_exit_code not in (0, 1) and 0 < t.requeue_exit_code < 256,
             f"train.requeue_exit_code must be in 2..255 (0/1 mean success/crash), got {t.requeue_exit_code}")
    _require(t.resume in ("auto", "none") or bool(t.resume.strip()),
             f"train.resume must be 'auto', 'none' or a checkpoint directory, got {t.resume!r}")
    import signal as _signal
    for name in t.preempt_signals:
        _require(isinstance(name, str) and name in _signal.Signals.__members__,
                 f"train.preempt_signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
    _require(t.peak_tflops >= 0, f"train.peak_tflops must be >= 0, got {t.peak_tflops}")
    _require(t.universal_workers >= 1, f"train.universal_workers must be >= 1, got {t.universal_workers}")
    _require(cfg.tracking.image_rows >= 1, f"tracking.image_rows must be >= 1, got {cfg.tracking.image_rows}")
    d = cfg.data
    _require(d.num_threads >= 0, f"data.num_threads must be >= 0 (0 = fallback loader in-process), got {d.num_threads}")
    _require(d.prefetch >= 1, f"data.prefetch must be >= 1, got {d.prefetch}")
    _require(0.0 <= d.hw_decoder_load <= 1.0, f"data.hw_decoder_load must be in [0, 1], got {d.hw_decoder_load}")
    _require(d.shuffle_buffer >= 0, f"data.shuffle_buffer must be >= 0, got {d.shuffle_buffer}")
    _require(0.0 <= d.max_quarantine_fraction <= 1.0,
             f"data.max_quarantine_fraction must be in [0, 1], got {d.max_quarantine_fraction}")
    _require(d.augment.norm_std > 0, f"data.augment.norm_std must be positive, got {d.augment.norm_std}")
    _require(0.0 <= d.augment.brightness < 1.0 and 0.0 <= d.augment.contrast < 1.0,
             f"data.augment.brightness/contrast must be in [0, 1), got {d.augment.brightness}/{d.augment.contrast}")
    _require(len(d.augment.rrc_ratio) == 2 and 0 < d.augment.rrc_ratio[0] <= d.augment.rrc_ratio[1],
             f"data.augment.rrc_ratio must be [lo, hi] with 0 < lo <= hi, got {list(d.augment.rrc_ratio)}")
    a = cfg.data.augment
    for k in ("rrc_prob", "hflip_prob", "vflip_prob", "jitter_prob"):
        v = getattr(a, k)
        _require(0.0 <= v <= 1.0, f"data.augment.{k} must be in [0, 1], got {v}")
    _require(len(a.rrc_scale) == 2 and 0 < a.rrc_scale[0] <= a.rrc_scale[1] <= 1.0,
             f"data.augment.rrc_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(a.rrc_scale)}")
    c = cfg.curation
    _require(c.frame_stride >= 1, f"curation.frame_stride must be >= 1, got {c.frame_stride}")
    _require(1 <= c.jpeg_quality <= 100, f"curation.jpeg_quality must be 1..100, got {c.jpeg_quality}")
    _require(0.0 < c.near_dedup_similarity <= 1.0,
             f"curation.near_dedup_similarity must be in (0, 1], got {c.near_dedup_similarity}")
    _require(c.shard_max_samples > 0, f"curation.shard_max_samples must be positive, got {c.shard_max_samples}")
    _require(c.workers >= 1, f"curation.workers must be >= 1, got {c.workers}")
    _require(c.shard_max_bytes > 0, f"curation.shard_max_bytes must be positive, got {c.shard_max_bytes}")
    _require(c.chunk_files >= 1, f"curation.chunk_files must be >= 1, got {c.chunk_files}")
    _require(0 <= c.dark_threshold < 255, f"curation.dark_threshold must be in [0, 255), got {c.dark_threshold}")
    _require(c.crop_margin >= 0, f"curation.crop_margin must be >= 0, got {c.crop_margin}")
    _require(0.0 <= c.crop_min_feature < 0.5,
             f"curation.crop_min_feature must be in [0, 0.5), got {c.crop_min_feature}")
    _require(c.crop_min_texture >= 0, f"curation.crop_min_texture must be >= 0, got {c.crop_min_texture}")
    _require(0.0 < c.crop_component_fraction <= 1.0,
             f"curation.crop_component_fraction must be in (0, 1], got {c.crop_component_fraction}")
    _require(c.max_side >= 0, f"curation.max_side must be >= 0 (0 = never downscale), got {c.max_side}")
    _require(c.min_nonzero >= 0, f"curation.min_nonzero must be >= 0, got {c.min_nonzero}")
    _require(cfg.loss.hie_weight >= 0, f"loss.hie_weight must be >= 0, got {cfg.loss.hie_weight}")
    _validate_finetune(cfg.finetune)
    sy = cfg.synth
    _require(96 <= sy.min_size <= sy.max_size <= 8192,
             f"synth.min_size/max_size must satisfy 96 <= min_size <= max_size <= 8192, got {sy.min_size}/{sy.max_size}")
    for k in ("num_images", "num_videos", "num_dicom", "num_dicom_single"):
        _require(getattr(sy, k) >= 0, f"synth.{k} must be >= 0, got {getattr(sy, k)}")
    for k in ("video_frames", "dicom_frames"):
        _require(getattr(sy, k) >= 1, f"synth.{k} must be >= 1, got {getattr(sy, k)}")
    _require(sy.video_fps > 0, f"synth.video_fps must be positive, got {sy.video_fps}")
    _require(1 <= sy.jpeg_quality <= 100, f"synth.jpeg_quality must be 1..100, got {sy.jpeg_quality}")
    for k in ("near_empty_fraction", "duplicate_fraction", "near_duplicate_fraction", "corrupt_fraction"):
        _require(0.0 <= getattr(sy, k) <= 0.5, f"synth.{k} must be in [0, 0.5], got {getattr(sy, k)}")
    return cfg


def _validate_finetune(f: FinetuneConfig) -> None:
    _require(0.0 < f.val_fraction < 1.0, f"finetune.val_fraction must be in (0, 1), got {f.val_fraction}")
    for k in ("epochs", "batch_size", "img_size"):
        _require(getattr(f, k) > 0, f"finetune.{k} must be positive, got {getattr(f, k)}")
    _require(f.lr > 0 and 0 <= f.min_lr <= f.lr, f"finetune.lr must be > 0 and 0 <= min_lr <= lr, got {f.lr}/{f.min_lr}")
    _require(f.warmup_epochs >= 0, f"finetune.warmup_epochs must be >= 0, got {f.warmup_epochs}")
    _require(0.0 < f.layer_decay <= 1.0, f"finetune.layer_decay must be in (0, 1], got {f.layer_decay}")
    _require(f.weight_decay >= 0, f"finetune.weight_decay must be >= 0, got {f.weight_decay}")
    _require(0.0 <= f.drop_path_rate < 1.0, f"finetune.drop_path_rate must be in [0, 1), got {f.drop_path_rate}")
    _require(f.grad_clip >= 0, f"finetune.grad_clip must be >= 0, got {f.grad_clip}")
    _require(0.0 <= f.hflip_prob <= 1.0, f"finetune.hflip_prob must be in [0, 1], got {f.hflip_prob}")
    _require(f.num_classes >= 0 and f.num_classes != 1,
             f"finetune.num_classes must be 0 (infer) or >= 2, got {f.num_classes}")
    _require(f.seg_decoder_dim > 0, f"finetune.seg_decoder_dim must be positive, got {f.seg_decoder_dim}")
    _require(f.dice_loss_weight >= 0, f"finetune.dice_loss_weight must be >= 0, got {f.dice_loss_weight}")
    _require(f.nsd_tolerance >= 0, f"finetune.nsd_tolerance must be >= 0, got {f.nsd_tolerance}")
    _require(f.num_workers >= 0, f"finetune.num_workers must be >= 0, got {f.num_workers}")
    _require(f.device == "auto" or f.device == "cpu" or f.device.startswith("cuda"),
             f"finetune.device must be auto, cpu, cuda or cuda:N, got {f.device!r}")


def save_resolved(cfg: Config, directory: str | os.PathLike, name: str = "config.resolved.yaml") -> Path:
    """Write the fully resolved config next to an output, so every artifact says how it was made."""
    path = Path(directory) / name
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path
