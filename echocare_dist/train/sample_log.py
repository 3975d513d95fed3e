"""Which samples each rank consumed: a debug log for checking data coverage across ranks and nodes.

With $ECHOCARE_SAMPLE_LOG=DIR every rank appends one line per sample it trained on,
`<epoch>\t<key>`, to `DIR/rank-<rank>.<host>.<pid>.tsv` (a file per process, so a requeued or
resumed attempt never interleaves with the previous one). The multi-node tests use it to prove
that an epoch covers every sample exactly once across hosts; on a real cluster it answers "did
node 3 read the same shards as node 1?". Off by default: it costs one small write per batch.

The log records batches as the loader hands them to the step, before the forward pass: a batch
in flight when a rank dies is listed although its update was never applied.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path

ENV_VAR = "ECHOCARE_SAMPLE_LOG"


class SampleKeyLog:
    """Wraps a loader (PretrainLoaderProtocol): iteration logs each batch's keys, the rest passes through."""

    def __init__(self, loader, directory: Path, rank: int):
        self._loader = loader
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            self.path = directory / f"rank-{rank}.{socket.gethostname()}.{os.getpid()}.tsv"
            # Line-buffered append: every batch is on disk before the next step, even if the rank dies.
            self._file = open(self.path, "a", buffering=1, encoding="utf-8")
        except OSError as exc:
            raise OSError(f"${ENV_VAR}={directory}: cannot write the sample log ({exc.strerror or exc})") from exc

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = next(self._loader)
        epoch = self._loader.epoch
        self._file.write("".join(f"{epoch}\t{key}\n" for key in batch["keys"]))
        return batch

    def __getattr__(self, name):
        # Only reached for names this wrapper lacks: state_dict, epoch, steps_per_epoch, close, ...
        return getattr(self._loader, name)

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            self._loader.close()


def wrap_from_env(loader, rank: int, environ=None):
    """The loader itself, or wrapped in a SampleKeyLog when $ECHOCARE_SAMPLE_LOG names a directory."""
    environ = os.environ if environ is None else environ
    directory = environ.get(ENV_VAR, "")
    return SampleKeyLog(loader, Path(directory), rank) if directory else loader


def read_sample_logs(directory: Path) -> dict[str, list[tuple[int, str]]]:
    """{file name: [(epoch, key), ...]} of every rank's log in `directory` (for tests and audits)."""
    out = {}
    for path in sorted(Path(directory).glob("rank-*.tsv")):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            epoch, sep, key = line.partition("\t")
            if not sep or not epoch.isdigit() or not key:
                raise ValueError(f"{path}:{number}: expected '<epoch>\\t<key>', got {line!r}")
            rows.append((int(epoch), key))
        out[path.name] = rows
    return out
