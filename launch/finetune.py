#!/usr/bin/env python
"""Fine-tuning entry point (one process; GPU if available, else CPU). Same arguments as `echocare finetune`:

    python launch/finetune.py --config tiny_cpu --set finetune.task=classification \
        --set finetune.data="/data/my classes" --set finetune.checkpoint=runs/export/encoder.safetensors

Exit codes: 0 = done; 2 = bad config, data or checkpoint (the message names the file/key).
"""
import sys
from pathlib import Path

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echocare_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune"] + sys.argv[1:]))
