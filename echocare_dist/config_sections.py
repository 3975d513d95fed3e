"""One dataclass per config section, each validating its own values.

`validate(prefix)` takes the section's dotted name ("data", "data.augment", ...) so every
message names the full key. Checks that relate two sections live in `Config.validate`
(echocare_dist/config.py). Every value the report leaves ambiguous is a field here, never a
constant in code.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

# ConfigError / require / parse_device and TrainConfig (with train.stages) live in modules of their
# own; imported here so every `from .config_sections import ...` keeps working.
from .config_base import DEVICE_VOCABULARY, ConfigError, parse_device, require  # noqa: F401
from .config_train import StageConfig, TrainConfig  # noqa: F401
from .models.archs import UnknownArchError, swin_layout
from .paths import DEFAULT_ONTOLOGY


@dataclass
class OntologyConfig:
    path: str = str(DEFAULT_ONTOLOGY)  # the packaged one; in a config file, relative to that file

    def validate(self, prefix: str = "ontology") -> None:
        """Nothing to check here: load_ontology reads the file and names what is wrong in it."""


@dataclass
class CurationConfig:
    """Shard building (SPEC 6)."""
    frame_stride: int = 10            # keep every Nth frame of videos and DICOM cine
    min_nonzero: int = 1000           # drop frames with fewer non-zero pixels after cropping
    dark_threshold: int = 12          # gray level under which a pixel counts as background for the crop
    crop_margin: int = 2              # pixels kept around the detected ultrasound content
    crop_min_feature: float = 0.04    # content is thicker than this share of the short side; thinner = overlay
    crop_component_fraction: float = 0.2  # a textured group far from the main one is kept (a 2nd view) from this share of its area
    crop_min_texture: float = 0.004   # speckle contrast below which a blob is graphics, not B-mode (0 = no test; BUSI tissue >= 0.0065)
    crop_blank_outside: bool = True   # zero what lies inside the crop box but outside the content (corner text)
    crop_max_discard: float = 0.05    # a crop leaving out more of the textured content than this share -> crop_failed
    crop_min_content: float = 0.01    # textured content under this share of the frame -> crop_failed (near-empty)
    mask_name_patterns: tuple[str, ...] = ("*_mask*", "mask_*", "*_seg*", "*label*")  # file names of masks
    label_conflict: Literal["union", "first", "drop"] = "drop"  # duplicates filed under different labels
    max_side: int = 1024              # larger frames are downscaled (keeps shards lean); 0 = never
    # Frames of more pixels are rejected as `too_large` from the file header, before decoding (a
    # 12000x12000 image costs ~6 GB and ~45 s to decode); 0 = no cap of ours (Pillow's own remains).
    max_pixels: int = 64_000_000
    near_dedup: bool = True           # perceptual-hash near-duplicate removal (calipers on/off, small shifts)
    near_dedup_similarity: float = 0.95
    jpeg_quality: int = 95
    shard_max_samples: int = 1000
    shard_max_bytes: int = 256 * 1024 * 1024
    workers: int = 2
    seed: int = 0
    chunk_files: int = 64             # files per staged work unit (the granularity of resume after a crash)
    staging_dir: str = ""             # where decoded JPEGs are spilled before sharding; "" = {out}/.staging
    # Share of each source's samples held out (group-aware: frames of a file and near-duplicates
    # stay together) as the validation shard set {out}/val/ (curation/valsplit.py); 0 = none.
    val_fraction: float = 0.0
    # De-identification (docs/deid.md): sample keys and stored paths become salted hashes, the
    # originals go only to the restricted path map; false = already-public data (or per source:
    # `deid: false` in the mapping).
    deid: bool = True
    deid_map: str = ""                # the restricted path map (salt + originals); "" = {out}.paths.json beside {out}
    burned_in_text: Literal["off", "flag", "blank"] = "flag"  # text found inside the kept region: audit / zero it

    def validate(self, prefix: str = "curation") -> None:
        require(self.frame_stride >= 1, f"{prefix}.frame_stride must be >= 1, got {self.frame_stride}")
        require(1 <= self.jpeg_quality <= 100, f"{prefix}.jpeg_quality must be 1..100, got {self.jpeg_quality}")
        require(0.0 < self.near_dedup_similarity <= 1.0,
                f"{prefix}.near_dedup_similarity must be in (0, 1], got {self.near_dedup_similarity}")
        require(self.shard_max_samples > 0,
                f"{prefix}.shard_max_samples must be positive, got {self.shard_max_samples}")
        require(self.workers >= 1, f"{prefix}.workers must be >= 1, got {self.workers}")
        require(self.shard_max_bytes > 0, f"{prefix}.shard_max_bytes must be positive, got {self.shard_max_bytes}")
        require(self.chunk_files >= 1, f"{prefix}.chunk_files must be >= 1, got {self.chunk_files}")
        require(0 <= self.dark_threshold < 255,
                f"{prefix}.dark_threshold must be in [0, 255), got {self.dark_threshold}")
        require(self.crop_margin >= 0, f"{prefix}.crop_margin must be >= 0, got {self.crop_margin}")
        require(0.0 <= self.crop_min_feature < 0.5,
                f"{prefix}.crop_min_feature must be in [0, 0.5), got {self.crop_min_feature}")
        require(self.crop_min_texture >= 0, f"{prefix}.crop_min_texture must be >= 0, got {self.crop_min_texture}")
        require(0.0 < self.crop_component_fraction <= 1.0,
                f"{prefix}.crop_component_fraction must be in (0, 1], got {self.crop_component_fraction}")
        require(self.max_side >= 0, f"{prefix}.max_side must be >= 0 (0 = never downscale), got {self.max_side}")
        require(self.max_pixels >= 0, f"{prefix}.max_pixels must be >= 0 (0 = no cap), got {self.max_pixels}")
        require(self.min_nonzero >= 0, f"{prefix}.min_nonzero must be >= 0, got {self.min_nonzero}")
        require(0.0 <= self.crop_max_discard < 1.0,
                f"{prefix}.crop_max_discard must be in [0, 1), got {self.crop_max_discard}")
        require(0.0 <= self.crop_min_content < 1.0,
                f"{prefix}.crop_min_content must be in [0, 1), got {self.crop_min_content}")
        require(all(isinstance(p, str) and p for p in self.mask_name_patterns),
                f"{prefix}.mask_name_patterns must be non-empty glob strings, got {list(self.mask_name_patterns)}")
        require(0.0 <= self.val_fraction <= 0.5, f"{prefix}.val_fraction must be in [0, 0.5], got {self.val_fraction}")
        require(self.burned_in_text in ("off", "flag", "blank"),
                f"{prefix}.burned_in_text must be off, flag or blank, got {self.burned_in_text!r}")


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

    def validate(self, prefix: str = "synth") -> None:
        require(96 <= self.min_size <= self.max_size <= 8192,
                f"{prefix}.min_size/max_size must satisfy 96 <= min_size <= max_size <= 8192, "
                f"got {self.min_size}/{self.max_size}")
        for k in ("num_images", "num_videos", "num_dicom", "num_dicom_single"):
            require(getattr(self, k) >= 0, f"{prefix}.{k} must be >= 0, got {getattr(self, k)}")
        for k in ("video_frames", "dicom_frames"):
            require(getattr(self, k) >= 1, f"{prefix}.{k} must be >= 1, got {getattr(self, k)}")
        require(self.video_fps > 0, f"{prefix}.video_fps must be positive, got {self.video_fps}")
        require(1 <= self.jpeg_quality <= 100, f"{prefix}.jpeg_quality must be 1..100, got {self.jpeg_quality}")
        for k in ("near_empty_fraction", "duplicate_fraction", "near_duplicate_fraction", "corrupt_fraction"):
            require(0.0 <= getattr(self, k) <= 0.5, f"{prefix}.{k} must be in [0, 0.5], got {getattr(self, k)}")


MASK_STRATEGIES = ("random", "hpm")


@dataclass
class MaskConfig:
    mask_patch_size: int = 32
    mask_ratio: float = 0.5
    # random: SimMIM's masks. hpm: hard patch mining (docs/hpm.md): a loss predictor ranks the mask
    # units and a growing share of the masked ones are the hardest (same mask ratio).
    strategy: Literal["random", "hpm"] = "random"
    hpm_ratio: float = 0.5            # final share of the masked units chosen by predicted difficulty
    hpm_warmup_steps: Optional[int] = None   # linear ramp 0 -> hpm_ratio over this many steps; None = train.steps
    hpm_loss_weight: float = 1.0      # weight of the predictor's ranking loss in L_PRE

    def validate(self, prefix: str = "mask") -> None:
        require(self.mask_patch_size > 0, f"{prefix}.mask_patch_size must be positive, got {self.mask_patch_size}")
        require(0.0 <= self.mask_ratio <= 1.0, f"{prefix}.mask_ratio must be in [0, 1], got {self.mask_ratio}")
        require(self.strategy in MASK_STRATEGIES,
                f"{prefix}.strategy must be one of {', '.join(MASK_STRATEGIES)}, got {self.strategy!r}")
        require(0.0 <= self.hpm_ratio <= 1.0, f"{prefix}.hpm_ratio must be in [0, 1], got {self.hpm_ratio}")
        require(self.hpm_warmup_steps is None or self.hpm_warmup_steps >= 0,
                f"{prefix}.hpm_warmup_steps must be >= 0 (or null = train.steps), got {self.hpm_warmup_steps}")
        require(self.hpm_loss_weight >= 0, f"{prefix}.hpm_loss_weight must be >= 0, got {self.hpm_loss_weight}")
        if self.strategy == "hpm":
            size = self.mask_patch_size
            # The fused loss writes per-unit sums by reshaping a tile into whole units.
            require(size & (size - 1) == 0,
                    f"{prefix}.mask_patch_size={size} must be a power of two with {prefix}.strategy=hpm")
            require(self.mask_ratio > 0, f"{prefix}.strategy=hpm needs {prefix}.mask_ratio > 0 (nothing to mine)")


@dataclass
class AugmentConfig:
    """SPEC 5; identical semantics on the DALI and the fallback path."""
    rrc_prob: float = 0.5
    rrc_scale: tuple[float, float] = (0.67, 1.0)
    rrc_ratio: tuple[float, float] = (0.75, 1.3333333)
    hflip_prob: float = 0.5
    vflip_prob: float = 0.5
    jitter_prob: float = 0.2
    brightness: float = 0.1
    contrast: float = 0.1
    norm_mean: float = 0.5
    norm_std: float = 0.5

    def validate(self, prefix: str = "data.augment") -> None:
        require(self.norm_std > 0, f"{prefix}.norm_std must be positive, got {self.norm_std}")
        require(0.0 <= self.brightness < 1.0 and 0.0 <= self.contrast < 1.0,
                f"{prefix}.brightness/contrast must be in [0, 1), got {self.brightness}/{self.contrast}")
        require(len(self.rrc_ratio) == 2 and 0 < self.rrc_ratio[0] <= self.rrc_ratio[1],
                f"{prefix}.rrc_ratio must be [lo, hi] with 0 < lo <= hi, got {list(self.rrc_ratio)}")
        for k in ("rrc_prob", "hflip_prob", "vflip_prob", "jitter_prob"):
            v = getattr(self, k)
            require(0.0 <= v <= 1.0, f"{prefix}.{k} must be in [0, 1], got {v}")
        require(len(self.rrc_scale) == 2 and 0 < self.rrc_scale[0] <= self.rrc_scale[1] <= 1.0,
                f"{prefix}.rrc_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(self.rrc_scale)}")


@dataclass
class DataConfig:
    shards: str = ""                   # directory holding shard-*.tar (+ .idx, manifest.json)
    loader: Literal["auto", "dali", "pil"] = "auto"   # auto: DALI when decoding on a GPU, else the PIL fallback
    device: str = "auto"               # where DALI decodes: auto | cuda | cpu (gpu = cuda); auto: cuda if training on CUDA
    num_threads: int = 2               # DALI CPU threads / DataLoader workers
    hw_decoder_load: float = 0.65      # share of JPEG decoding done by the hardware decoder (A100/H100)
    prefetch: int = 2
    shuffle_buffer: int = 256          # shards are shuffled globally on write; this is extra local mixing
    seed: int = 0
    use_mmap: bool = False             # mmap the tars (local disks); plain reads survive truncated files on network FS
    max_quarantine_fraction: float = 0.1  # stop the run when more shards than this are damaged (systematic fault)
    # Check each sample's .jpg against the CRC-32 in its .json (shardfmt CHECKSUM_KEY) as it is read;
    # a mismatch is a damaged sample (quarantined, skipped). The PIL reader checks it (one more small
    # read per sample); the DALI reader leaves it to `echocare shards verify`. Shards built before
    # the checksum existed fail it: rebuild them (a rerun of `shards build` restages them).
    verify_samples: bool = False
    # The validation shard set (train.val_every): "" = {shards}/val when the build held one out
    # (curation.val_fraction), "none" = no validation, else a shard directory of its own.
    val_shards: str = ""
    # Per-source mixture of each epoch (docs/data.md): {source: weight} (every source of the shards,
    # 0 leaves one out), or source_alpha: weights proportional to source size^alpha (1 = as stored,
    # 0 = sources alike). At most one of the two; none = every sample once per epoch.
    source_weights: Optional[dict] = None
    source_alpha: Optional[float] = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def validate(self, prefix: str = "data") -> None:
        self._validate_mixture(prefix)
        # No index: DALI decodes on the rank's own training GPU.
        parse_device(self.device, f"{prefix}.device", allow_index=False)
        require(self.num_threads >= 0,
                f"{prefix}.num_threads must be >= 0 (0 = fallback loader in-process), got {self.num_threads}")
        require(self.prefetch >= 1, f"{prefix}.prefetch must be >= 1, got {self.prefetch}")
        require(0.0 <= self.hw_decoder_load <= 1.0,
                f"{prefix}.hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        require(self.shuffle_buffer >= 0, f"{prefix}.shuffle_buffer must be >= 0, got {self.shuffle_buffer}")
        require(0.0 <= self.max_quarantine_fraction <= 1.0,
                f"{prefix}.max_quarantine_fraction must be in [0, 1], got {self.max_quarantine_fraction}")
        self.augment.validate(f"{prefix}.augment")

    def _validate_mixture(self, prefix: str) -> None:
        require(self.source_weights is None or self.source_alpha is None,
                f"{prefix}.source_weights and {prefix}.source_alpha are exclusive: set one of them")
        if self.source_alpha is not None:
            a = self.source_alpha
            require(isinstance(a, (int, float)) and not isinstance(a, bool) and 0.0 <= a <= 4.0,
                    f"{prefix}.source_alpha must be a number in [0, 4], got {a!r}")
        if self.source_weights is None:
            return
        w = self.source_weights
        require(isinstance(w, dict) and bool(w),
                f"{prefix}.source_weights must be a mapping source -> weight, got {w!r}")
        for name, value in w.items():
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < float("inf")
            require(ok, f"{prefix}.source_weights.{name} must be a finite number >= 0, got {value!r}")
        require(any(v > 0 for v in w.values()), f"{prefix}.source_weights gives every source weight 0")


@dataclass
class ModelConfig:
    arch: str = "swin_large_patch4_window7_224"  # timm name; embed_dim/depths/heads come from it
    img_size: int = 256
    patch_size: int = 4
    window_size: int = 8
    in_chans: int = 1
    embed_dim: Optional[int] = None    # override timm's value (tiny test models)
    depths: Optional[tuple[int, ...]] = None
    num_heads: Optional[tuple[int, ...]] = None
    drop_path_rate: float = 0.1
    grad_checkpointing: bool = False
    fused_attn: bool = True            # window attention through torch SDPA (timm's default for Swin is the explicit softmax)
    decoder: Literal["multiscale", "linear"] = "multiscale"
    decoder_dim: int = 256
    hie_head: bool = True
    # torch.compile: blocks = each Swin block on its own (regional: small graphs, one recompile per
    # block shape), full = the whole model; auto = blocks on CUDA, none on the CPU.
    compile: Literal["auto", "none", "blocks", "full"] = "auto"

    def validate(self, prefix: str = "model") -> None:
        require(self.img_size > 0, f"{prefix}.img_size must be positive, got {self.img_size}")
        require(self.patch_size > 0, f"{prefix}.patch_size must be positive, got {self.patch_size}")
        require(self.in_chans in (1, 3), f"{prefix}.in_chans must be 1 or 3, got {self.in_chans}")
        require(self.img_size % self.patch_size == 0,
                f"{prefix}.img_size={self.img_size} is not divisible by {prefix}.patch_size={self.patch_size}")
        try:
            layout = swin_layout(self)
        except UnknownArchError as exc:
            raise ConfigError(str(exc)) from None
        self._validate_stages(prefix, layout)
        require(0.0 <= self.drop_path_rate < 1.0,
                f"{prefix}.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        require(self.decoder_dim > 0, f"{prefix}.decoder_dim must be positive, got {self.decoder_dim}")

    def _validate_stages(self, prefix: str, layout: dict) -> None:
        depths, heads = layout["depths"], layout["num_heads"]
        require(len(depths) == len(heads),
                f"{prefix}.depths {depths} and {prefix}.num_heads {heads} must have the same length")
        grid = self.img_size // self.patch_size
        for stage in range(len(depths)):
            g = grid // (2 ** stage)
            require(g * (2 ** stage) == grid and g > 0,
                    f"stage {stage} grid of {grid}/2^{stage} is not whole ({prefix}.img_size={self.img_size}, "
                    f"{prefix}.patch_size={self.patch_size})")
            # timm shrinks the window to the grid when the grid is smaller; otherwise it must divide.
            require(g <= self.window_size or g % self.window_size == 0,
                    f"{prefix}.window_size={self.window_size} does not divide the stage-{stage} grid {g}x{g} "
                    f"(img_size {self.img_size} / patch {self.patch_size} / 2^{stage})")
            dim = layout["embed_dim"] * 2 ** stage
            require(dim % heads[stage] == 0, f"stage {stage}: dim {dim} not divisible by num_heads {heads[stage]}")


@dataclass
class LossConfig:
    hie_weight: float = 1.0            # lambda in L_PRE = L_MIM + lambda * L_HIE
    impl: Literal["auto", "triton", "torch"] = "auto"

    def validate(self, prefix: str = "loss") -> None:
        require(self.hie_weight >= 0, f"{prefix}.hie_weight must be >= 0, got {self.hie_weight}")


@dataclass
class OptimConfig:
    lr: float = 1e-4                   # peak LR at `lr_batch_ref`
    lr_batch_ref: int = 256            # LR scales linearly with global batch / this
    min_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.05
    warmup_steps: int = 10000
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 5.0
    fused: bool = True                 # torch's fused AdamW when the optimizer state lives on a GPU

    def validate(self, prefix: str = "optim") -> None:
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                f"{prefix}.betas must be two numbers in [0, 1), got {list(self.betas)}")
        require(self.lr > 0, f"{prefix}.lr must be positive, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, f"{prefix}.min_lr must be in [0, {prefix}.lr={self.lr}], got {self.min_lr}")
        require(self.lr_batch_ref > 0, f"{prefix}.lr_batch_ref must be positive, got {self.lr_batch_ref}")
        require(self.weight_decay >= 0, f"{prefix}.weight_decay must be >= 0, got {self.weight_decay}")
        require(self.eps > 0, f"{prefix}.eps must be positive, got {self.eps}")
        require(self.warmup_steps >= 0, f"{prefix}.warmup_steps must be >= 0, got {self.warmup_steps}")
        require(self.grad_clip >= 0, f"{prefix}.grad_clip must be >= 0, got {self.grad_clip}")


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""                      # empty -> $MLFLOW_TRACKING_URI, else sqlite under run_dir
    experiment: str = "echocare-pretrain"
    run_name: str = ""                 # empty -> the run directory's name
    image_rows: int = 4                # images per reconstruction grid (input/masked/recon/target)
    system_metrics_interval: float = 10.0  # seconds between CPU/memory/GPU samples; 0 = off (docs/tracking.md)

    def validate(self, prefix: str = "tracking") -> None:
        require(self.image_rows >= 1, f"{prefix}.image_rows must be >= 1, got {self.image_rows}")
        require(self.system_metrics_interval >= 0,
                f"{prefix}.system_metrics_interval must be >= 0 (0 = off), got {self.system_metrics_interval}")


@dataclass
class FinetuneConfig:
    """Downstream fine-tuning of an exported encoder (SPEC 7; docs in echocare_dist/finetune)."""
    task: Literal["classification", "segmentation", "regression", "landmarks", "detection",
                  "enhancement"] = "classification"  # the last three: finetune/tasks/, docs/finetune.md
    data: str = ""                     # folder: class sub-folders | images/ + masks/; base of CSV paths
    csv: str = ""                      # CSV with a header: path,label | path,mask | path,value
    split_file: str = ""               # CSV path,split (train/val; other values ignored); "" = seeded split
    val_fraction: float = 0.2          # seeded split (stratified per class for classification)
    folds: int = 1                     # >= 2: K-fold cross-validation (group-aware), mean +- std per metric
    split_similarity: float = 0.95     # pHash similarity that keeps near-duplicates on one side; 1.0 = exact only
    checkpoint: str = ""               # exported encoder (.safetensors, or the export directory)
    run_dir: str = "runs/finetune"
    mode: Literal["full", "linear_probe"] = "full"
    init: Literal["pretrained", "random"] = "pretrained"  # random = the same architecture from scratch
    epochs: int = 10
    early_stop_patience: int = 5       # stop after this many epochs without a better monitor value; 0 = off
    batch_size: int = 16
    lr: float = 1e-4                   # peak LR of the head; encoder layers get lr * layer_decay^depth
    min_lr: float = 1e-6               # end of the cosine schedule
    warmup_epochs: float = 1.0         # linear warmup, in epochs (fractions allowed)
    layer_decay: float = 0.75          # per Swin block, from the last block (1.0 = off)
    weight_decay: float = 0.05
    drop_path_rate: float = 0.1        # stochastic depth of the encoder during full fine-tuning
    grad_clip: float = 5.0             # max global grad norm; 0 = off
    img_size: int = 0                  # square training size; 0 = the export's pretraining img_size
    hflip_prob: float = 0.5            # training augmentation (images and masks together)
    augment: bool = True               # + random scale/rotation/shift and brightness/contrast (finetune/augment.py)
    balance: Literal["none", "loss", "sampler"] = "loss"  # classification: class-weighted CE or balanced sampling
    num_classes: int = 0               # 0 = inferred from the data
    monitor: str = "auto"              # metric that picks the best epoch; auto = macro_f1 / dice_lesion / mae
    mask_mode: Literal["auto", "binary", "ids"] = "auto"  # see echocare_dist/finetune/data.py
    mask_suffix: str = "_mask"         # masks/<stem><suffix>.<any ext> also matches images/<stem>.<ext>
    image_pattern: str = ""            # with mask_pattern: pair stems by an {id}, e.g. Test_Image_{id} / mask_{id}
    mask_pattern: str = ""
    empty_masks: Literal["keep", "skip"] = "keep"  # all-background masks: keep (normal cases) or skip; counted
    skip_mask_like: bool = True        # classification: leave mask files (curation rule) out of class folders
    bootstrap: int = 1000              # resamples for the 95% CIs of the final metrics; 0 = off
    seg_decoder_dim: int = 64          # width of the segmentation / landmark / detection decoder
    dice_loss_weight: float = 1.0      # segmentation loss = CE + w * soft Dice
    nsd_tolerance: float = 2.0         # NSD tolerance in pixels of the original mask
    heatmap_sigma: float = 2.0         # landmarks: Gaussian target width, pixels at img_size
    max_detections: int = 20           # detection: boxes kept per image (CenterNet peaks)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    num_workers: int = 0
    seed: int = 0
    device: str = "auto"               # auto | cpu | cuda | cuda:N (gpu = cuda)
    experiment: str = "echocare-finetune"  # MLflow experiment (tracking.uri / tracking.enabled apply)

    def validate(self, prefix: str = "finetune") -> None:
        require(0.0 < self.val_fraction < 1.0, f"{prefix}.val_fraction must be in (0, 1), got {self.val_fraction}")
        for k in ("epochs", "batch_size"):
            require(getattr(self, k) > 0, f"{prefix}.{k} must be positive, got {getattr(self, k)}")
        require(self.img_size >= 0, f"{prefix}.img_size must be 0 (the export's) or positive, got {self.img_size}")
        require(self.folds >= 1, f"{prefix}.folds must be >= 1, got {self.folds}")
        require(0.5 <= self.split_similarity <= 1.0,
                f"{prefix}.split_similarity must be in [0.5, 1], got {self.split_similarity}")
        require(self.early_stop_patience >= 0,
                f"{prefix}.early_stop_patience must be >= 0, got {self.early_stop_patience}")
        require(self.bootstrap >= 0, f"{prefix}.bootstrap must be >= 0, got {self.bootstrap}")
        require(bool(self.image_pattern) == bool(self.mask_pattern),
                f"{prefix}.image_pattern and {prefix}.mask_pattern must be set together, got "
                f"{self.image_pattern!r} / {self.mask_pattern!r}")
        for k in ("image_pattern", "mask_pattern"):
            v = getattr(self, k)
            require(not v or v.count("{id}") == 1,
                    f"{prefix}.{k} must hold {{id}} exactly once (e.g. mask_{{id}}), got {v!r}")
        require(self.lr > 0 and 0 <= self.min_lr <= self.lr,
                f"{prefix}.lr must be > 0 and 0 <= min_lr <= lr, got {self.lr}/{self.min_lr}")
        require(self.warmup_epochs >= 0, f"{prefix}.warmup_epochs must be >= 0, got {self.warmup_epochs}")
        require(0.0 < self.layer_decay <= 1.0, f"{prefix}.layer_decay must be in (0, 1], got {self.layer_decay}")
        require(self.weight_decay >= 0, f"{prefix}.weight_decay must be >= 0, got {self.weight_decay}")
        require(0.0 <= self.drop_path_rate < 1.0,
                f"{prefix}.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        require(self.grad_clip >= 0, f"{prefix}.grad_clip must be >= 0, got {self.grad_clip}")
        require(0.0 <= self.hflip_prob <= 1.0, f"{prefix}.hflip_prob must be in [0, 1], got {self.hflip_prob}")
        require(self.num_classes >= 0 and self.num_classes != 1,
                f"{prefix}.num_classes must be 0 (infer) or >= 2, got {self.num_classes}")
        require(self.seg_decoder_dim > 0, f"{prefix}.seg_decoder_dim must be positive, got {self.seg_decoder_dim}")
        require(self.dice_loss_weight >= 0,
                f"{prefix}.dice_loss_weight must be >= 0, got {self.dice_loss_weight}")
        require(self.nsd_tolerance >= 0, f"{prefix}.nsd_tolerance must be >= 0, got {self.nsd_tolerance}")
        require(self.heatmap_sigma > 0, f"{prefix}.heatmap_sigma must be positive, got {self.heatmap_sigma}")
        require(self.max_detections >= 1, f"{prefix}.max_detections must be >= 1, got {self.max_detections}")
        require(self.num_workers >= 0, f"{prefix}.num_workers must be >= 0, got {self.num_workers}")
        parse_device(self.device, f"{prefix}.device")
