"""Synthetic B-mode ultrasound collections for tests and the demo (never a substitute for real data).

`generate_dataset(out_dir, cfg.synth, ontology)` writes images (PNG/JPEG/BMP, gray, RGB,
16-bit), clips (mp4/avi), DICOM (cine and single frame), masks, near-empty frames, duplicates
and corrupt files in folders named like public datasets, plus the label mapping `labels.yaml`.
patterns.py makes single frames for tests and benchmarks (noise, ramp, a B-mode still, a fan
sector in a known box): the project's one synthetic image source.
"""
from .dataset import SynthFile, SynthResult, generate_dataset, plan_dataset

__all__ = ["SynthFile", "SynthResult", "generate_dataset", "plan_dataset"]
