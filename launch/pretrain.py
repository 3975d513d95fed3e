#!/usr/bin/env python
"""EchoCare pretraining entry point, the same under every launcher.

    deepspeed --num_gpus 8 launch/pretrain.py --config echocare_swin_l --set data.shards=/data/shards
    torchrun --nproc_per_node 8 launch/pretrain.py --config echocare_swin_l --set ...
    srun --ntasks-per-node 8 python launch/pretrain.py --config echocare_swin_l --set ...   (one task per GPU)
    python launch/pretrain.py --config tiny_cpu --set data.shards=...                     (one process)

Ranks come from the launcher's environment (RANK/WORLD_SIZE/LOCAL_RANK, or SLURM_PROCID/...).
`--resume auto` (the default, train.resume) continues from run_dir/checkpoints/latest.

Exit codes: 0 = reached train.steps; 124 (train.requeue_exit_code) = preempted by SIGTERM/SIGUSR1
after writing a complete checkpoint, requeue the job; 2 = bad config, failed pre-flight (shards,
run directory, tracking server, device: echocare_dist/preflight.py, checked by every rank before any
process group, incl. a run directory locked by another run) or incompatible checkpoint; 3 = stopped
after train.max_bad_steps consecutive non-finite (NaN/Inf) steps; 1 or anything else = crash (a rank
whose peer failed exits 1 within seconds, naming the peer's error). (torchrun reports a failed rank
as 1; the deepspeed launcher and srun pass the rank's code through.)
"""
import sys
from pathlib import Path

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from echocare_dist.train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
