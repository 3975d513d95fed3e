"""Crash-safe writes honour the umask (shared storage, containers running as another UID)."""
import os
import stat
import subprocess
import textwrap

import pytest
import train_launch as tl  # the launcher environment of the process tests

from echocare_dist.atomic import atomic_open, atomic_write_bytes, atomic_write_json, create_temp


@pytest.mark.parametrize("umask, want", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, want):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json(tmp_path / "sub" / "m.json", {"a": 1})
    finally:
        os.umask(old)
    for p in (tmp_path / "a.bin", tmp_path / "sub" / "m.json"):
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "keep.txt"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as fh:
            fh.write(b"new, half")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_create_temp_is_exclusive_and_beside_the_target(tmp_path):
    fd1, p1 = create_temp(tmp_path / "x.tar", ".partial")
    fd2, p2 = create_temp(tmp_path / "x.tar", ".partial")
    os.close(fd1), os.close(fd2)
    assert p1 != p2 and p1.parent == tmp_path and p1.name.startswith(".x.tar.") and p1.name.endswith(".partial")


# What the chain writes, end to end, under umask 022: every file 0644, every folder 0755.
DEEPSPEED_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")
CHAIN = textwrap.dedent('''
    import os, sys
    from pathlib import Path
    os.umask(0o022)
    from echocare_dist.cli import main
    out = Path(sys.argv[1])
    tiny = ["--config", "tiny_cpu", "--set", "synth.num_images=40", "--set", "synth.num_videos=1",
            "--set", "synth.video_frames=4", "--set", "synth.num_dicom=1", "--set", "synth.dicom_frames=2"]
    steps = [
        ["synth", *tiny, "--out", str(out / "synth")],
        ["shards", "build", *tiny, "--mapping", str(out / "synth" / "labels.yaml"), "--out", str(out / "shards"),
         "--no-progress"],
        ["shards", "inspect", str(out / "shards"), "--num", "4", "--out", str(out / "png" / "sheet.png")],
        ["pretrain", *tiny, "--set", f"data.shards={out / 'shards'}", "--set", f"train.run_dir={out / 'run'}",
         "--set", "train.steps=2", "--set", "train.ckpt_every=1", "--set", "train.image_every=1",
         "--set", "train.micro_batch=2", "--set", "tracking.enabled=false", "--set", "train.resume=none",
         "--set", "data.loader=pil", "--set", "data.num_threads=1"],
        ["export", str(out / "run"), "--out", str(out / "export"), "--with-heads", "--no-progress"],
    ]
    for argv in steps:
        rc = main(argv)
        assert rc == 0, (argv, rc)
''')


@pytest.mark.slow
def test_every_artifact_of_the_chain_is_0644_in_0755_folders(tmp_path, python_exe):
    """Shards, .idx, manifest.json, PNGs, the checkpoint files and `latest`, the export: readable by
    another user's job (shared storage) or a container running under another UID."""
    script = tmp_path / "chain.py"
    script.write_text(CHAIN)
    out = tmp_path / "out"
    env = {k: v for k, v in tl.env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([python_exe, str(script), str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    wrong = []
    for root in ("shards", "png", "run", "export"):
        for path in [out / root, *(out / root).rglob("*")]:
            if path.is_symlink():
                continue
            want = 0o755 if path.is_dir() else 0o644
            if path.name in DEEPSPEED_SCRIPTS:
                want = 0o744  # DeepSpeed copies its converters beside the checkpoints and adds u+x
            mode = stat.S_IMODE(path.lstat().st_mode)
            if mode != want:
                wrong.append(f"{path.relative_to(out)}: {mode:o}")
    assert not wrong, wrong
    names = {p.name for p in out.rglob("*")}
    for expected in ("shard-000000.tar", "shard-000000.idx", "manifest.json", "latest", "meta.json",
                     "encoder.safetensors", "encoder.json", "sheet.png"):
        assert expected in names, expected
    assert any(p.suffix == ".pt" for p in (out / "run" / "checkpoints").rglob("*"))
