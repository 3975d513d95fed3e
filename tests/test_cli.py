"""The `echocare` entry point: light --help/--version, quiet closed pipes, required --config, progress bars."""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest

from echocare_dist import __version__
from echocare_dist.cli import COMMANDS, build_parser, main
from echocare_dist.config import preset_names
from echocare_dist.progress import ENV, disable_progress, progress_bar, progress_enabled

HEAVY = ("torch", "timm", "deepspeed")


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple = ()) -> list[tuple]:
    """Every (sub)command of the parser, nested ones included: ('shards', 'build'), ..."""
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append(prefix + (name,))
                paths += _command_paths(sub, prefix + (name,))
    return paths


def test_command_paths_cover_nested_commands():
    paths = _command_paths(build_parser())
    for expected in [("pretrain",), ("shards", "build"), ("config", "show"), ("finetune",), ("export",)]:
        assert expected in paths


@pytest.mark.slow
def test_help_and_version_import_no_torch_timm_or_deepspeed(python_exe, tmp_path):
    """Each `--help` and `--version`, in one fresh interpreter; then nothing heavy may be loaded."""
    code = textwrap.dedent(f"""
        import contextlib, io, json, sys
        from echocare_dist.cli import main

        def run(argv):
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
                try:
                    code = main(argv)
                except SystemExit as exc:
                    code = exc.code
            return [argv, code, out.getvalue()]

        results = [run(["--help"]), run(["--version"])]
        # `echocare --help` and `--version` need no command module, nor NumPy
        after_top_level = sorted(m for m in sys.modules if m.split(".")[0] == "numpy"
                                 or m.startswith(("echocare_dist.curation", "echocare_dist.synth")))
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from echocare_dist.cli import build_parser
        from test_cli import _command_paths
        results += [run(list(p) + ["--help"]) for p in _command_paths(build_parser())]
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
        print(json.dumps(dict(results=results, heavy=heavy, after_top_level=after_top_level)))
    """)
    proc = subprocess.run([python_exe, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["heavy"] == [], f"--help/--version imported {report['heavy'][:10]}"
    assert report["after_top_level"] == [], report["after_top_level"][:10]
    assert len(report["results"]) > 10
    for argv, code, out in report["results"]:
        assert code == 0, argv
        if argv == ["--version"]:
            assert out.strip() == f"echocare-dist {__version__}"
        else:
            assert out.startswith("usage: echocare"), (argv, out[:200])


def test_top_level_help_lists_what_the_command_modules_register():
    """`echocare --help` names the commands from cli.COMMANDS without importing them: the same text
    as with every module imported, and every command a module registers is listed."""
    full = build_parser()
    assert build_parser(only="").format_help() == full.format_help()
    registered = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert list(registered) == list(COMMANDS)
    for command in ("export", "finetune", "evaluate"):
        assert build_parser(only=command).format_help() == build_parser().format_help()


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"echocare-dist {__version__}"


@pytest.mark.slow
def test_closed_pipe_ends_quietly(python_exe, tmp_path):
    """The reader is gone before anything is written: no traceback, the status of a SIGPIPE death.
    (Buffered stdout, as for any user: with PYTHONUNBUFFERED argparse itself swallows the error of
    --help and exits 0.)"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    for module, argv in (("echocare_dist.cli", ["--help"]), ("echocare_dist", ["config", "show", "--config", "tiny_cpu"])):
        proc = subprocess.Popen([python_exe, "-m", module, *argv], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert (proc.wait(timeout=60), err) == (141, ""), argv
    # And as a user types it; `head` may read everything before leaving, so only quietness is checked.
    shell = subprocess.run(["bash", "-c", f"{python_exe} -m echocare_dist.cli config show --config tiny_cpu | head -1"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert shell.stdout.startswith("name: tiny_cpu") and shell.stderr == "", shell.stderr


@pytest.mark.parametrize("argv", [["pretrain"], ["pretrain", "--nproc", "2"],
                                  ["shards", "build", "--mapping", "m.yaml", "--out", "out"]])
def test_config_is_required_for_pretraining_and_shard_building(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    command = "shards build" if argv[0] == "shards" else "pretrain"
    assert f"echocare {command}: error: --config is required" in err
    for name in preset_names():
        assert name in err
    assert not (tmp_path / "out").exists()


def test_commands_that_do_not_need_a_config_keep_their_default():
    parser = build_parser()
    assert parser.parse_args(["finetune"]).config == "tiny_cpu"
    assert parser.parse_args(["config", "show"]).config == "tiny_cpu"
    assert parser.parse_args(["pretrain"]).config is None


def test_config_presets_lists_the_packaged_presets(capsys):
    assert main(["config", "presets"]) == 0
    assert capsys.readouterr().out.split() == preset_names()
    assert {"tiny_cpu", "echocare_swin_l", "echocare_swin_b"} <= set(preset_names())


@pytest.mark.parametrize("argv", [["shards", "build", "--config", "tiny_cpu", "-m", "m.yaml", "-o", "o"],
                                  ["export", "run", "--out", "o"], ["finetune"], ["evaluate"], ["demo"]])
def test_every_long_command_takes_no_progress(argv):
    assert build_parser().parse_args(argv + ["--no-progress"]).no_progress is True


def test_no_progress_reaches_the_whole_process(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(ENV, "")  # restored afterwards, also after disable_progress()
    rc = main(["shards", "build", "--config", "tiny_cpu", "--no-progress", "--mapping", str(tmp_path / "absent.yaml"),
               "--out", str(tmp_path / "out")])
    assert rc == 2 and "absent.yaml" in capsys.readouterr().err
    assert os.environ.get(ENV) == "0"  # child processes (the demo's stages) inherit it


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.setenv(ENV, "")  # restored afterwards, also after disable_progress()
    assert progress_enabled(True, _Stream(tty=True)) and not progress_enabled(True, _Stream(tty=False))
    assert not progress_enabled(False, _Stream(tty=True))
    log = _Stream(tty=False)
    for _ in progress_bar(range(50), file=log, mininterval=0):
        pass
    assert log.getvalue() == ""  # nothing, not even one \r fragment, lands in a log file
    term = _Stream(tty=True)
    for _ in progress_bar(range(50), file=term, mininterval=0):
        pass
    assert "\r" in term.getvalue() and "50/50" in term.getvalue()
    monkeypatch.setenv(ENV, "1")
    assert progress_enabled(True, _Stream(tty=False))
    disable_progress()
    assert not progress_enabled(True, _Stream(tty=True))


def test_bad_progress_setting_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv(ENV, "yes")
    with pytest.raises(ValueError, match=r"\$ECHOCARE_PROGRESS='yes'"):
        progress_enabled()
    assert main(["config", "show"]) == 2
    assert "ECHOCARE_PROGRESS='yes'" in capsys.readouterr().err


@pytest.mark.parametrize("value, key", [
    ("optim.betas=[0.9", "optim.betas"), ("model.depths=[1,x,2,1]", "model.depths[1]"),
    ("tracking.enabled=on", "tracking.enabled"), ("train.steps=1.5", "train.steps"),
    ("model.nope=1", "model.nope"), ("train=3", "train"),
])
def test_every_bad_set_value_exits_2_naming_the_key(value, key, capsys):
    assert main(["config", "show", "--set", value]) == 2
    err = capsys.readouterr().err
    assert f"{key}" in err and "Traceback" not in err


def test_config_show_prints_set_values_as_typed(capsys):
    assert main(["config", "show", "--set", "tracking.run_name=2024-01-15", "--set", "tracking.experiment=on"]) == 0
    import yaml
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["tracking"]["run_name"] == "2024-01-15" and shown["tracking"]["experiment"] == "on"
    assert json.dumps(shown["tracking"]["run_name"]) == '"2024-01-15"'
