"""Peak FLOP/s of a device: the one table that every MFU in the project divides by.

`peak_tflops(device, precision)` answers, in order: `train.peak_tflops` when configured, the
vendor's dense figure for a known GPU (matched from torch.cuda.get_device_name()), else a short
matmul measurement (CPU, unknown GPU), which makes MFU a "fraction of achievable matmul rate".
"""
from __future__ import annotations

import re
import time

import torch

# Dense (no 2:4 sparsity) peak TFLOP/s per device. NVIDIA's datasheets print the tensor-core
# figures with sparsity and mark them "*"; the dense value is half of that. "fp32" is the CUDA-core
# rate torch uses for fp32 matmuls unless TF32 is allowed, "tf32" the tensor-core rate when it is.
#   H100 SXM / PCIe / NVL: NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100)
#     SXM  BF16/FP16 1,979*, TF32 989*, FP32 67;  PCIe 1,513*, 756*, 51;  NVL 1,671*, 835*, 60
#     (the H100 whitepaper gives the dense SXM5 figures to one decimal: 989.4 and 494.7)
#   H200 SXM / NVL: NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200)
#     SXM BF16/FP16 1,979*, TF32 989*, FP32 67;  NVL 1,671*, 835*, 60
#   GH200: NVIDIA GH200 Grace Hopper Superchip datasheet: the H100 SXM figures
#   A100 40GB / 80GB, PCIe and SXM alike: NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100)
#     BF16/FP16 312 (624*), TF32 156 (312*), FP32 19.5
#   B200 (HGX, 1,000 W): NVIDIA HGX platform page (nvidia.com/en-us/data-center/hgx), per GPU
#     FP16/BF16 4.5 PFLOPS*, TF32 2.2 PFLOPS*, FP32 75 TFLOPS
#   L40S: NVIDIA L40S datasheet: BF16/FP16 362.05 (733*), TF32 183 (366*), FP32 91.6
#   A10: NVIDIA A10 datasheet: BF16/FP16 125 (250*), TF32 62.5 (125*), FP32 31.2
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H100 PCIe": {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "H100 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "H200 SXM": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200 NVL": {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0},
    "GH200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "B200": {"bf16": 2250.0, "fp16": 2250.0, "tf32": 1100.0, "fp32": 75.0},
    "L40S": {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6},
    "A10": {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2},
}

# torch.cuda.get_device_name() -> table key; the first match wins, so the form factors that add a
# word to the name come before the plain one (an SXM H100 reports "NVIDIA H100 80GB HBM3"). Word
# boundaries keep "GH200" off "H200", "A100" off "A10" and "A10G" (another chip) off both.
_DEVICE_NAMES: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p, re.IGNORECASE), key) for p, key in (
    (r"\bGH200\b", "GH200"),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe"),
    (r"\bH100\b.*\bNVL\b", "H100 NVL"),
    (r"\bH100\b", "H100 SXM"),
    (r"\bH200\b.*\bNVL\b", "H200 NVL"),
    (r"\bH200\b", "H200 SXM"),
    (r"\bA100\b", "A100"),
    (r"\bB200\b", "B200"),
    (r"\bL40S\b", "L40S"),
    (r"\bA10\b", "A10"),
))


def match_device(name: str) -> str | None:
    """The PEAK_TFLOPS key for a CUDA device name, or None when the table does not know it."""
    for pattern, key in _DEVICE_NAMES:
        if pattern.search(name):
            return key
    return None


def precision_key(precision: str) -> str:
    """The table column a training precision runs its matmuls in."""
    if precision in ("bf16", "fp16"):
        return precision
    if precision != "fp32":
        raise ValueError(f"precision {precision!r}: expected bf16, fp16 or fp32")
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 1024,
                          seconds: float = 0.2) -> float:
    # A private generator: the global RNG streams belong to training (a resume restores them).
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    torch.mm(a, b)  # warm-up (threads, kernels)
    iters, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        iters += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return 2 * n ** 3 * iters / elapsed / 1e12


def peak_tflops(device: torch.device, precision: str, configured: float = 0.0) -> tuple[float, str]:
    """(peak TFLOP/s per device, where the number came from)."""
    if configured > 0:
        return configured, "train.peak_tflops"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key, column = match_device(name), precision_key(precision)
        if key is not None:
            return PEAK_TFLOPS[key][column], f"spec table ({key} {column} dense)"
        return measure_matmul_tflops(device, dtype, n=4096), f"measured ({name} not in the table)"
    # CPU matmuls have no fp16 fast path worth measuring; fp16 training there runs fp32 math.
    cpu_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measure_matmul_tflops(device, cpu_dtype), "measured CPU matmul"


# HBM bandwidth per device, GB/s (10^9 bytes/s), from the same datasheets as PEAK_TFLOPS:
#   H100 SXM 3.35 TB/s, PCIe 2 TB/s, NVL 3.9 TB/s; H200 SXM / NVL 4.8 TB/s; GH200 (HBM3, 96 GB) 4 TB/s;
#   A100 80GB SXM 2,039 GB/s (40GB: 1,555; 80GB PCIe: 1,935); B200 8 TB/s; L40S 864 GB/s; A10 600 GB/s.
# Memory-bound kernels (the masked L1) are judged against this figure.
HBM_GBPS: dict[str, float] = {
    "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H200 SXM": 4800.0, "H200 NVL": 4800.0,
    "GH200": 4000.0, "A100": 2039.0, "B200": 8000.0, "L40S": 864.0, "A10": 600.0,
}


def hbm_bandwidth_gbps(index: int = 0) -> tuple[float, str]:
    """(HBM peak GB/s of CUDA device `index`, where it came from): the datasheet table for a known
    GPU, else 2 x memory clock x bus width from the device properties (NaN when torch lacks them)."""
    name = torch.cuda.get_device_name(index)
    key = match_device(name)
    if key == "A100" and re.search(r"\b40GB\b", name, re.IGNORECASE):
        return 1555.0, "spec table (A100 40GB)"
    if key is not None:
        return HBM_GBPS[key], f"spec table ({key})"
    props = torch.cuda.get_device_properties(index)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, f"device properties ({name}: DDR clock x bus width)"
    return float("nan"), f"unknown ({name} not in the table, no memory clock in its properties)"
