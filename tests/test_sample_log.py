"""$ECHOCARE_SAMPLE_LOG (echocare_dist/train/sample_log.py): the keys each rank trained on."""
from __future__ import annotations

import os
import socket

import pytest

from echocare_dist.train.sample_log import ENV_VAR, SampleKeyLog, read_sample_logs, wrap_from_env


class FakeLoader:
    """Two epochs of two batches; the epoch turns when the third batch is taken, as PretrainLoader's does."""

    def __init__(self):
        self.epoch, self.taken, self.closed = 0, 0, False

    def __next__(self):
        if self.taken and self.taken % 2 == 0:
            self.epoch += 1
        self.taken += 1
        return {"keys": [f"k{self.taken}a", f"k{self.taken}b"]}

    def state_dict(self):
        return {"epoch": self.epoch, "taken": self.taken}

    def close(self):
        self.closed = True


def test_every_batch_is_logged_with_its_epoch_and_the_loader_is_passed_through(tmp_path):
    inner = FakeLoader()
    loader = wrap_from_env(inner, rank=3, environ={ENV_VAR: str(tmp_path / "log")})
    assert isinstance(loader, SampleKeyLog)
    batches = [next(loader) for _ in range(3)]
    assert batches[2]["keys"] == ["k3a", "k3b"]
    assert loader.state_dict() == {"epoch": 1, "taken": 3}, "attributes reach the wrapped loader"
    loader.close()
    assert inner.closed
    logs = read_sample_logs(tmp_path / "log")
    assert list(logs) == [f"rank-3.{socket.gethostname()}.{os.getpid()}.tsv"]
    assert logs[next(iter(logs))] == [(0, "k1a"), (0, "k1b"), (0, "k2a"), (0, "k2b"), (1, "k3a"), (1, "k3b")]


def test_off_without_the_variable_and_clear_errors(tmp_path):
    inner = FakeLoader()
    assert wrap_from_env(inner, rank=0, environ={}) is inner
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match=f"\\${ENV_VAR}={tmp_path / 'file'}: cannot write the sample log"):
        SampleKeyLog(inner, tmp_path / "file", rank=0)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "rank-0.h.1.tsv").write_text("0\tk1\nnot a line\n")
    with pytest.raises(ValueError, match="rank-0.h.1.tsv:2: expected"):
        read_sample_logs(tmp_path / "bad")
