"""EchoCareMIM: Swin encoder + mask token + reconstruction decoder + hierarchical head (SPEC 2)."""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers import trunc_normal_
from timm.models.swin_transformer import WindowAttention
from torch import nn

from ..config import ModelConfig
from ..ontology import Ontology
from .anatomy import AnatomyPrediction, anatomy_from_logits
from .decoders import build_decoder
from .encoder import create_encoder, run_stages, set_encoder_input_size, stage_dims
from .hpm import LossPredictor


class HierarchicalHead(nn.Module):
    """Global average pool of the last stage -> LayerNorm -> Linear to one logit per ontology node."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, last_stage: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(last_stage.mean(dim=(1, 2))))


class EchoCareMIM(nn.Module):
    """One forward of the masked image feeds both the pixel decoder and the anatomy head.

    forward(input (B,in_chans,H,W), mask (B,H/p,W/p), 1 = masked token) ->
    dict(recon=(B,in_chans,H,W) float32 in [0,1], logits=(B,C) float32 or None,
         difficulty=(B,u,u) float32 scores of the hard-patch-mining predictor, or None).
    forward(input, None, difficulty_only=True) -> dict(difficulty=...) of the unmasked images: the
    pass that chooses the masks under mask.strategy=hpm (models/hpm.py).
    """

    def __init__(self, model_cfg: ModelConfig, num_classes: int, hpm_units: int = 0):
        super().__init__()
        if model_cfg.hie_head and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 with model.hie_head=true, got {num_classes}")
        self.patch_size = model_cfg.patch_size
        self.img_size = model_cfg.img_size
        self.in_chans = model_cfg.in_chans
        self.window_size = model_cfg.window_size
        # Pixels per mask unit of the hpm predictor's grid; the grid follows the input size.
        self.mask_unit = model_cfg.img_size // hpm_units if hpm_units else 0
        dims = stage_dims(model_cfg)

        self.encoder = create_encoder(model_cfg)
        for module in self.encoder.modules():
            if isinstance(module, WindowAttention):
                # Switches the kernel only (same parameters, same math): SDPA never materialises
                # the (windows x heads x N x N) attention probabilities that backward would keep.
                module.fused_attn = model_cfg.fused_attn
        self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, dims[0]))
        trunc_normal_(self.mask_token, std=0.02)
        self.decoder = build_decoder(model_cfg.decoder, dims, model_cfg.decoder_dim,
                                     model_cfg.patch_size, model_cfg.in_chans)
        self.hie_head = HierarchicalHead(dims[-1], num_classes) if model_cfg.hie_head else None
        # Named outside "encoder.", so the export leaves it out like the decoder.
        self.loss_predictor = LossPredictor(dims[-1], hpm_units) if hpm_units else None
        self.set_grad_checkpointing(model_cfg.grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each Swin block in backward instead of keeping its activations."""
        self.encoder.set_grad_checkpointing(enable)

    def set_input_size(self, img_size: int) -> None:
        """Train on square images of `img_size` from now on (train.stages). Buffers only: raises
        ValueError, before changing anything, when a parameter would have to change shape."""
        if img_size <= 0 or img_size % self.patch_size:
            raise ValueError(f"input size {img_size} is not a positive multiple of the patch size {self.patch_size}")
        if self.mask_unit and img_size % self.mask_unit:
            raise ValueError(f"input size {img_size} is not a whole number of {self.mask_unit}-px mask units")
        set_encoder_input_size(self.encoder, img_size, self.window_size)
        self.img_size = img_size
        if self.loss_predictor is not None:
            self.loss_predictor.units_per_side = img_size // self.mask_unit

    def _check_inputs(self, input: torch.Tensor, mask: Optional[torch.Tensor]) -> None:
        expected = (self.in_chans, self.img_size, self.img_size)
        if input.dim() != 4 or tuple(input.shape[1:]) != expected:
            raise ValueError(f"input must be (B, {', '.join(map(str, expected))}), got {tuple(input.shape)}")
        if mask is not None:
            grid = self.img_size // self.patch_size
            if tuple(mask.shape) != (input.shape[0], grid, grid):
                raise ValueError(f"mask must be (B, {grid}, {grid}) at token resolution "
                                 f"(img {self.img_size} / patch {self.patch_size}), got {tuple(mask.shape)}")

    def encode(self, input: torch.Tensor, mask: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        """The four NHWC stage outputs (last one after encoder.norm), masked tokens replaced first."""
        self._check_inputs(input, mask)
        tokens = self.encoder.patch_embed(input)  # (B, h, w, C)
        if mask is not None:
            # Equals x*(1-w) + token*w for a 0/1 mask, but selects instead of multiplying, so the
            # hidden embedding contributes exactly nothing (not even a NaN/inf or a rounding bit).
            masked = mask.to(torch.bool).unsqueeze(-1)
            tokens = torch.where(masked, self.mask_token.to(tokens.dtype), tokens)
        return run_stages(self.encoder, tokens)

    def forward(self, input: torch.Tensor, mask: Optional[torch.Tensor], difficulty_only: bool = False) -> dict:
        features = self.encode(input, mask)
        predictor = self.loss_predictor
        if difficulty_only:
            if predictor is None:
                raise ValueError("difficulty_only needs the loss predictor (mask.strategy=hpm)")
            return dict(difficulty=predictor(features[-1]))
        # Sigmoid and logits in fp32: the losses compare them to targets at full precision, and
        # these tensors are tiny next to the activations.
        recon = torch.sigmoid(self.decoder(features).float())
        logits = self.hie_head(features[-1]).float() if self.hie_head is not None else None
        difficulty = predictor(features[-1]) if predictor is not None else None
        return dict(recon=recon, logits=logits, difficulty=difficulty)

    @torch.no_grad()
    def predict_anatomy(self, input: torch.Tensor, ontology: Ontology, impl: str = "auto") -> AnatomyPrediction:
        """Anatomy of whole (unmasked) images: hierarchy-coherent probabilities per ontology node.

        Train/eval mode stays the caller's choice; call eval() first for deterministic output."""
        if self.hie_head is None:
            raise ValueError("predict_anatomy needs the hierarchical head; this model was built with "
                             "model.hie_head=false")
        logits = self.hie_head(self.encode(input)[-1]).float()
        return anatomy_from_logits(logits, ontology, impl)


def build_model(model_cfg: ModelConfig, num_classes: int, hpm_units: int = 0) -> EchoCareMIM:
    """hpm_units > 0 adds the hard-patch-mining loss predictor over that many mask units per side."""
    return EchoCareMIM(model_cfg, num_classes, hpm_units)
