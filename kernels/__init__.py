"""Fused Triton kernels (installed as echocare_dist.kernels)."""
