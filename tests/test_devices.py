"""Devices without a GPU: the one vocabulary, why CUDA is unusable (every CUDA query faked), the
pre-flight's exit-2 report, rank -> GPU mapping by faked device counts, the loss-implementation
report and the interpreter refusal, ZeRO buckets and the autocast config, the start-up line, and
model.compile's resolution."""
from __future__ import annotations

import os
import stat
import subprocess
import types
import warnings
from pathlib import Path

import pytest
import torch

from echocare_dist import devices, preflight
from echocare_dist.config import ConfigError, load_config
from echocare_dist.config_sections import parse_device
from echocare_dist.finetune import runner as finetune_runner
from echocare_dist.kernels import functional
from echocare_dist.models import build_model
from echocare_dist.models.compile import apply_compile, resolve_compile, swin_blocks
from echocare_dist.train import distributed
from echocare_dist.train.optim import BUCKET_MAX, BUCKET_MIN, bucket_sizes, deepspeed_config
from echocare_dist.train.step import startup_line


# ------------------------------------------------------------------ vocabulary
@pytest.mark.parametrize("given,canonical", [("auto", "auto"), ("cpu", "cpu"), ("cuda", "cuda"), ("gpu", "cuda"),
                                             ("GPU", "cuda"), (" cuda:3 ", "cuda:3"), ("cuda:01", "cuda:1")])
def test_one_vocabulary_with_gpu_as_an_alias(given, canonical):
    assert parse_device(given, "train.device") == canonical


def test_bad_device_values_name_the_key():
    with pytest.raises(ConfigError, match=r"train.device='tpu': expected auto, cuda, cpu"):
        load_config("tiny_cpu", ["train.device=tpu"])
    with pytest.raises(ConfigError, match=r"data.device='cuda:1': a device index is not allowed"):
        load_config("tiny_cpu", ["data.device=cuda:1"])
    with pytest.raises(ConfigError, match="finetune.device='cuda0'"):
        load_config("tiny_cpu", ["finetune.device=cuda0"])
    for key in ("train.device", "data.device", "finetune.device"):
        load_config("tiny_cpu", [f"{key}=gpu"])  # the alias is accepted everywhere


def test_finetune_device_speaks_the_vocabulary(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "torch_cuda_available", lambda: False)
    monkeypatch.setattr(devices, "torch_cuda_version", lambda: None)
    assert finetune_runner.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="finetune.device='cuda' but CUDA is not usable: this torch is a CPU-only"):
        finetune_runner.pick_device("gpu")


# ------------------------------------------------------------------ was CUDA asked for?
@pytest.mark.parametrize("sets,environ,expected", [
    (["train.device=gpu"], {}, ("train.device", "cuda")),
    ([], {"ECHOCARE_DEVICE": "gpu"}, ("ECHOCARE_DEVICE", "cuda")),
    ([], {"SLURM_GPUS_ON_NODE": "4"}, ("SLURM_GPUS_ON_NODE", "4")),
    ([], {"SLURM_JOB_GPUS": "0,1"}, ("SLURM_JOB_GPUS", "0,1")),
    ([], {"SLURM_GPUS_PER_TASK": "h100:1"}, ("SLURM_GPUS_PER_TASK", "h100:1")),
    ([], {"CUDA_VISIBLE_DEVICES": "0,1"}, None),   # what `deepspeed --num_gpus 2` exports on a CPU machine
    ([], {"SLURM_GPUS_ON_NODE": "0", "CUDA_VISIBLE_DEVICES": ""}, None),
    ([], {}, None),
    (["train.device=cpu"], {"SLURM_GPUS_ON_NODE": "8"}, None),      # explicit cpu leaves them idle
    ([], {"ECHOCARE_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": "0"}, None),
    (["train.device=cuda:1"], {"ECHOCARE_DEVICE": "cpu"}, ("train.device", "cuda:1")),  # the config wins
])
def test_cuda_request(sets, environ, expected):
    assert devices.cuda_request(load_config("tiny_cpu", sets), environ) == expected


# ------------------------------------------------------------------ why CUDA is unusable
def fake_machine(monkeypatch, *, available=False, built="13.0", driver=True, driver_cuda=13000, count=1):
    monkeypatch.setattr(devices, "torch_cuda_available", lambda: available)
    monkeypatch.setattr(devices, "torch_cuda_version", lambda: built)
    monkeypatch.setattr(devices, "driver_present", lambda: driver)
    monkeypatch.setattr(devices, "driver_cuda_version", lambda: driver_cuda if driver else None)
    monkeypatch.setattr(devices, "driver_device_count", lambda: count if driver else None)
    monkeypatch.setattr(devices, "torch_device_count", lambda: count if available else 0)


def test_each_cause_is_named(monkeypatch):
    fake_machine(monkeypatch, available=True)
    assert devices.cuda_problem({}) is None
    fake_machine(monkeypatch, built=None)
    assert "CPU-only build" in devices.cuda_problem({})
    fake_machine(monkeypatch, driver=False)
    reason = devices.cuda_problem({})
    assert reason.startswith("no NVIDIA driver") and "/proc/driver/nvidia/version" in reason and "--gpus" in reason
    fake_machine(monkeypatch, driver_cuda=12040)
    reason = devices.cuda_problem({})
    assert "driver too old" in reason and "CUDA 12.4" in reason and "13.0" in reason and "R580" in reason
    fake_machine(monkeypatch, driver_cuda=13000, count=0)
    assert devices.cuda_problem({}).startswith("no visible CUDA device (the driver shows 0")
    fake_machine(monkeypatch, driver_cuda=13010, count=2)
    assert "no visible CUDA device" in devices.cuda_problem({"CUDA_VISIBLE_DEVICES": ""})
    reason = devices.cuda_problem({"CUDA_VISIBLE_DEVICES": "0"})
    assert "is_available() is false" in reason and "driver CUDA 13.1" in reason and "2 device(s)" in reason


def test_preflight_stops_a_cuda_job_with_exit_2_and_the_cause(tmp_path, monkeypatch, ontology):
    from echocare_dist.data.testing import write_shards
    write_shards(tmp_path / "shards", ontology, counts=(2,), size=(32, 24))
    cfg = load_config("tiny_cpu", [f"data.shards={tmp_path / 'shards'}", f"train.run_dir={tmp_path / 'run'}",
                                   "tracking.enabled=false"])
    fake_machine(monkeypatch, driver_cuda=12020)
    with pytest.raises(preflight.PreflightError) as err:
        preflight.run_preflight(cfg, environ={"SLURM_GPUS_ON_NODE": "8"})
    assert isinstance(err.value, ConfigError)  # every CLI turns it into exit code 2
    (problem,) = err.value.problems
    assert problem.key == "SLURM_GPUS_ON_NODE" and "driver too old" in problem.reason and "12.2" in problem.reason
    assert "cuda" in [c.name for c in preflight.CHECKS]
    # Nothing asked for CUDA: the same machine passes (a CPU run there is what the user chose).
    preflight.run_preflight(cfg, environ={})
    only_cuda = (preflight.Check("cuda", preflight.check_cuda),)
    (bad_env,) = preflight.find_problems(cfg, environ={"ECHOCARE_DEVICE": "tpu"}, checks=only_cuda)
    assert bad_env.key == "ECHOCARE_DEVICE" and "expected auto, cuda" in bad_env.reason
    # CUDA usable but fewer GPUs than the node's ranks: caught before any process group too.
    fake_machine(monkeypatch, available=True, count=4)
    (shared,) = preflight.find_problems(cfg, environ={"CUDA_VISIBLE_DEVICES": "0,1,2,3", "LOCAL_RANK": "5",
                                                      "LOCAL_WORLD_SIZE": "8", "WORLD_SIZE": "8"}, checks=only_cuda)
    assert "4 CUDA devices are visible" in shared.reason and "8 local ranks" in shared.reason


# ------------------------------------------------------------------ rank -> device
def place(spec="auto", *, local_rank=0, local_ranks=None, world_size=1, visible=0):
    return devices.rank_device(spec, local_rank=local_rank, local_ranks=local_ranks, world_size=world_size,
                               visible=visible)


def test_rank_to_device():
    assert place(visible=0).kind == "cpu"
    assert place("cpu", visible=8).kind == "cpu"
    # Per-task binding: every rank sees exactly its own GPU, whatever its local rank.
    assert (place(local_rank=3, local_ranks=4, world_size=8, visible=1).index) == 0
    for rank in range(8):
        assert place(local_rank=rank, local_ranks=8, world_size=16, visible=8).index == rank
    assert place("cuda:2", visible=4).index == 2
    with pytest.raises(devices.DeviceError, match="2 CUDA devices are visible but this node runs 4 local ranks"):
        place(local_rank=1, local_ranks=4, world_size=4, visible=2)
    with pytest.raises(devices.DeviceError, match="3 CUDA devices are visible but this node runs 4"):
        place(local_rank=3, local_ranks=None, world_size=4, visible=3)  # the launcher did not say: LOCAL_RANK tells
    with pytest.raises(devices.DeviceError, match="a single process, this run has 2 ranks"):
        place("cuda:0", world_size=2, visible=2)
    with pytest.raises(devices.DeviceError, match="only 2 CUDA device"):
        place("cuda:2", visible=2)
    with pytest.raises(devices.DeviceError, match="0 visible devices"):
        place("cuda", visible=0)
    assert issubclass(devices.DeviceError, ConfigError)


@pytest.mark.parametrize("environ,expected", [({"LOCAL_WORLD_SIZE": "4"}, 4), ({"LOCAL_SIZE": "2"}, 2),
                                              ({"SLURM_STEP_TASKS_PER_NODE": "8(x2)"}, 8), ({}, None)])
def test_local_world_size_from_each_launcher(environ, expected):
    assert devices.local_world_size(environ) == expected


def test_pick_device_with_faked_visible_counts(monkeypatch):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    env = {"LOCAL_WORLD_SIZE": "4"}
    assert distributed.pick_device(2, "auto", world_size=4, environ=env) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.pick_device(2, "gpu", world_size=4, environ=env) == torch.device("cuda", 2)
    assert chosen == [0, 2]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(devices.DeviceError, match="2 CUDA devices are visible but this node runs 4"):
        distributed.pick_device(1, "auto", world_size=4, environ=env)
    assert distributed.pick_device(1, "auto", world_size=4, environ={**env, "ECHOCARE_DEVICE": "cpu"}).type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.pick_device(0, "auto", environ={}) == torch.device("cpu")


# ------------------------------------------------------------------ loss implementation
class FakeTensor:
    def __init__(self, is_cuda: bool):
        self.is_cuda = is_cuda


def test_impl_report_and_interpreter_refusal(monkeypatch):
    assert functional.describe_impl("torch", "cuda") == "torch reference"
    assert functional.describe_impl("auto", "cpu") == "torch reference"
    monkeypatch.setattr(functional, "HAS_TRITON", True)
    monkeypatch.setattr(functional, "TRITON_INTERPRETED", False)
    assert functional.describe_impl("auto", "cuda:0") == "triton compiled"
    monkeypatch.setattr(functional, "TRITON_INTERPRETED", True)
    assert functional.describe_impl("triton", "cpu") == "triton interpreted"
    assert functional.use_triton("triton", FakeTensor(False)) is True  # the CPU interpreter tests
    for impl in ("auto", "triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 is set.*on CUDA"):
            functional.use_triton(impl, FakeTensor(True))


def test_auto_without_triton_on_cuda_warns_once(monkeypatch):
    monkeypatch.setattr(functional, "HAS_TRITON", False)
    monkeypatch.setattr(functional, "TRITON_IMPORT_ERROR", "ImportError: no triton")
    monkeypatch.setattr(functional, "_warned_fallback", False)
    assert "Triton does not import: ImportError: no triton" in functional.describe_impl("auto", "cuda")
    with pytest.warns(RuntimeWarning, match="uses the PyTorch reference losses: Triton cannot be imported"):
        assert functional.use_triton("auto", FakeTensor(True)) is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert functional.use_triton("auto", FakeTensor(True)) is False  # once only
        assert functional.use_triton("auto", FakeTensor(False)) is False  # CPU: the reference is the plan


# ------------------------------------------------------------------ ZeRO buckets and autocast
def test_buckets_are_derived_from_the_model_and_configurable():
    cfg = load_config("tiny_cpu")
    assert bucket_sizes(cfg, 195_000_000) == {"reduce": 24_375_000, "allgather": 24_375_000, "prefetch": 24_375_000}
    assert bucket_sizes(cfg, 880_000)["reduce"] == BUCKET_MIN
    assert bucket_sizes(cfg, 2_000_000_000)["reduce"] == BUCKET_MAX
    cfg = load_config("tiny_cpu", ["train.reduce_bucket_size=30000000", "train.prefetch_bucket_size=1000"])
    assert bucket_sizes(cfg, 195_000_000) == {"reduce": 30_000_000, "allgather": 30_000_000, "prefetch": 1000}
    with pytest.raises(ConfigError, match="train.allgather_bucket_size must be >= 0"):
        load_config("tiny_cpu", ["train.allgather_bucket_size=-1"])


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_config_buckets_overlap_and_reduction_dtype(stage):
    cfg = load_config("tiny_cpu", [f"train.zero_stage={stage}", "train.precision=bf16"])
    zero = deepspeed_config(cfg, 8, torch.device("cuda", 0), n_params=195_000_000)["zero_optimization"]
    assert zero["overlap_comm"] is True
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == 24_375_000
    assert zero.get("stage3_prefetch_bucket_size") == (24_375_000 if stage == 3 else None)
    ds = deepspeed_config(cfg, 8, torch.device("cuda", 0), n_params=195_000_000)
    # One communication dtype (fp32) for every gradient: no second set of buckets.
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "communication_data_type" not in ds


def test_fp16_is_autocast_with_fp32_weights():
    ds = deepspeed_config(load_config("tiny_cpu", ["train.precision=fp16"]), 2, torch.device("cpu"))
    assert ds["torch_autocast"]["dtype"] == "float16" and ds["torch_autocast"]["enabled"] is True
    assert "fp16" not in ds and "bf16" not in ds  # DeepSpeed's fp16 section would halve the weights


# ------------------------------------------------------------------ start-up line, compile
def test_startup_line_names_everything(monkeypatch):
    cfg = load_config("tiny_cpu", ["train.zero_stage=3", "train.precision=bf16", "loss.impl=torch"])
    env = distributed.DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"), launcher="single")
    c = types.SimpleNamespace(cfg=cfg, env=env, n_params=195_000_000, compile="none",
                              ds_config=deepspeed_config(cfg, 2, env.device, n_params=195_000_000))
    line = startup_line(c)
    for part in ("device cpu", "loader pil, decode on cpu", "loss kernels torch reference",
                 "precision bf16 autocast, fp32 reduction", "ZeRO-3", "reduce 2.44e+07", "prefetch 2.44e+07",
                 "overlap off", "compile none"):
        assert part in line, (part, line)
    assert "\n" not in line


def test_compile_modes_resolve_per_device_and_keep_state_dict_keys(ontology):
    assert resolve_compile("auto", "cuda:0") == "blocks" and resolve_compile("auto", "cpu") == "none"
    assert resolve_compile("full", "cpu") == "full"
    with pytest.raises(ConfigError, match="model.compile: value 'regional' is not one of"):
        load_config("tiny_cpu", ["model.compile=regional"])
    cfg = load_config("tiny_cpu")
    model = build_model(cfg.model, len(ontology))
    keys = list(model.state_dict())
    assert apply_compile(model, "blocks", "cpu") == "blocks"
    blocks = swin_blocks(model)
    assert len(blocks) == sum(cfg.model.depths)
    assert all(b._compiled_call_impl is not None for b in blocks)  # compiled in place, lazily
    assert model._compiled_call_impl is None                       # regional: the rest stays eager
    assert list(model.state_dict()) == keys and not any("_orig_mod" in k for k in keys)


# ------------------------------------------------------------------ slurm/pretrain.sh -> Python
def _batch_script(tmp_path, **env_extra) -> subprocess.CompletedProcess:
    """slurm/pretrain.sh with stub srun/scontrol: the stub srun prints what a task would inherit."""
    repo = Path(__file__).resolve().parent.parent
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    for name, body in (("srun", 'echo "task ECHOCARE_DEVICE=${ECHOCARE_DEVICE-unset} CVD=${CUDA_VISIBLE_DEVICES-unset}"'),
                       ("scontrol", 'echo node1')):
        path = stubs / name
        path.write_text(f"#!/bin/bash\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "ECHOCARE_", "CUDA_VISIBLE"))}
    env.update(PATH=f"{stubs}:{env['PATH']}", SLURM_JOB_ID="7", SLURM_NTASKS="2", SLURM_JOB_NODELIST="node1",
               SLURM_JOB_NUM_NODES="1", ECHOCARE_ROOT=str(repo), **env_extra)
    return subprocess.run(["bash", str(repo / "slurm" / "pretrain.sh"), "--config", "tiny_cpu"], env=env,
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)


@pytest.mark.parametrize("env_extra,seen", [
    ({"ECHOCARE_DEVICE": "gpu"}, "ECHOCARE_DEVICE=cuda CVD=unset"),
    ({"SLURM_GPUS_ON_NODE": "4"}, "ECHOCARE_DEVICE=cuda CVD=unset"),
    ({}, "ECHOCARE_DEVICE=cpu CVD="),
    ({"ECHOCARE_DEVICE": "auto"}, "ECHOCARE_DEVICE=auto CVD=unset"),
])
def test_slurm_device_reaches_the_ranks(tmp_path, env_extra, seen):
    result = _batch_script(tmp_path, **env_extra)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"task {seen}\n" in result.stdout, result.stdout


def test_slurm_rejects_a_device_index_for_many_tasks(tmp_path):
    result = _batch_script(tmp_path, ECHOCARE_DEVICE="cuda:1")
    assert result.returncode == 2 and "ECHOCARE_DEVICE=cuda:1: expected cuda, cpu or auto" in result.stderr
    assert "task " not in result.stdout
