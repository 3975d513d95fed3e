"""EchoCare model: timm Swin + mask token, reconstruction decoders, hierarchical head, FLOPs."""
from .encoder import create_encoder, encoder_kwargs
from .flops import flops_per_image
from .mim import EchoCareMIM, HierarchicalHead, build_model
from .param_groups import param_groups

__all__ = ["EchoCareMIM", "HierarchicalHead", "build_model", "create_encoder", "encoder_kwargs",
           "flops_per_image", "param_groups"]
