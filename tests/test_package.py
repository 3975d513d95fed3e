"""Packaging: dependencies declared where they are used, constraints that match what is installed,
and a wheel (not only an editable install) that carries the presets and the ontology."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import echocare_dist
from echocare_dist.config import preset_names
from echocare_dist.paths import DEFAULT_ONTOLOGY

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("echocare_dist", "kernels")  # what the wheel installs (kernels/ as echocare_dist.kernels)


def _setup_kwargs() -> dict:
    """install_requires, extras_require and version, read from setup.py without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    wanted = ("install_requires", "extras_require", "version")
    return {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in wanted}


def _install_sh() -> tuple[list[str], list[str]]:
    """(extras of the package install, the packages it names itself) in scripts/install.sh."""
    text = (REPO / "scripts" / "install.sh").read_text()
    extras = re.search(r'-e "\$\{ROOT\}\[([a-z0-9_,-]+)\]"', text)
    assert extras, "scripts/install.sh: no `-e \"${ROOT}[extras]\"` install line found"
    named = re.findall(r'"([A-Za-z][A-Za-z0-9_.-]*)(?:[<>=!~]=?[^"]*)?"', text)
    packages = [n for n in named if n in ("pip", "setuptools", "wheel", "torch", "torchvision")]
    return extras[1].split(","), packages


def _third_party_imports() -> dict[str, set[str]]:
    """{top-level import name: files} of every absolute import in the package, stdlib excluded."""
    found: dict[str, set[str]] = {}
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in ("echocare_dist", "kernels", "__future__"):
                        found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def _declared() -> set[str]:
    kw = _setup_kwargs()
    reqs = kw["install_requires"] + [r for extra in kw["extras_require"].values() for r in extra]
    return {canonicalize_name(Requirement(r).name) for r in reqs}


def test_setup_version_is_the_package_version():
    assert _setup_kwargs()["version"] == echocare_dist.__version__


def test_every_third_party_import_is_declared():
    declared = _declared()
    providers = metadata.packages_distributions()
    undeclared = {}
    for name, files in _third_party_imports().items():
        dists = {canonicalize_name(d) for d in providers.get(name, [])}
        assert dists, f"import {name!r} ({sorted(files)[0]}) is provided by no installed distribution"
        if not dists & declared:
            undeclared[name] = (sorted(dists), sorted(files)[:3])
    assert not undeclared, f"imported but not in setup.py (install_requires or an extra): {undeclared}"


def _closure(roots: list[str]) -> set[str]:
    """Canonical names of `roots` and everything they require, as installed in this environment."""
    seen: set[tuple[str, tuple]] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), tuple(sorted(req.extras)))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # e.g. a platform-only dependency; the pin check below would name it
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker and not any(sub.marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                continue
            todo.append(sub)
    return {name for name, _ in seen}


def test_every_constraint_pin_is_installed_by_setup_or_install_sh():
    kw = _setup_kwargs()
    extras, named = _install_sh()
    unknown = sorted(set(extras) - set(kw["extras_require"]))
    assert not unknown, f"scripts/install.sh installs extras setup.py does not define: {unknown}"
    roots = kw["install_requires"] + [r for e in extras for r in kw["extras_require"][e]] + named
    installed = _closure(roots)
    pins = [line.split("==")[0].strip() for line in (REPO / "constraints.txt").read_text().splitlines()
            if "==" in line and not line.lstrip().startswith("#")]
    stray = [p for p in pins if canonicalize_name(p) not in installed]
    assert not stray, f"constraints.txt pins packages nothing installs (setup.py, scripts/install.sh): {stray}"
    pinned = {canonicalize_name(p) for p in pins}
    unpinned = sorted(n for n in {canonicalize_name(Requirement(r).name) for r in roots} if n not in pinned
                      and n not in ("pip", "setuptools", "wheel"))
    assert not unpinned, f"installed by scripts/install.sh but without an exact version in constraints.txt: {unpinned}"


def test_presets_and_ontology_are_package_data():
    """The wheel's package_data globs cover every preset and ontology file that exists."""
    data = ast.literal_eval(re.search(r"package_data=(\{[^}]*\})", (REPO / "setup.py").read_text())[1])
    globs = data["echocare_dist"]
    shipped = {str(p.relative_to(REPO / "echocare_dist"))
               for pattern in globs for p in (REPO / "echocare_dist").glob(pattern)}
    on_disk = {str(p.relative_to(REPO / "echocare_dist")) for p in (REPO / "echocare_dist" / "configs").rglob("*")
               if p.is_file()}
    assert on_disk and on_disk <= shipped, sorted(on_disk - shipped)
    # the repository's configs/ (docs, slurm, Docker) is the package's folder, not a copy
    assert (REPO / "configs").resolve() == (REPO / "echocare_dist" / "configs").resolve()


def _copy_sources(dst: Path) -> None:
    for name in ("setup.py", "MANIFEST.in", "README.md", "constraints.txt"):
        shutil.copy2(REPO / name, dst / name)
    for folder in SOURCE_DIRS:
        shutil.copytree(REPO / folder, dst / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


@pytest.mark.slow
def test_wheel_install_finds_presets_and_ontology(tmp_path, python_exe):
    """Build the wheel from a copy of the sources, install it into a scratch venv that borrows this
    environment's dependencies (a .pth line, not our editable install), load everything from outside."""
    src, dist, venv, elsewhere = (tmp_path / n for n in ("src", "dist", "venv", "elsewhere"))
    for d in (src, dist, elsewhere):
        d.mkdir()
    _copy_sources(src)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    build = subprocess.run([python_exe, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "--wheel-dir", str(dist), str(src)], capture_output=True, text=True, env=env, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    wheel = next(dist.glob("echocare_dist-*.whl"))

    subprocess.run([python_exe, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    scratch_python = venv / "bin" / "python"
    site = subprocess.run([str(scratch_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # Only a path: .pth files inside it (our editable install's finder) are not run from there.
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "echocare_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    # --ignore-installed: pip must never touch the environment it borrows from.
    install = subprocess.run([str(scratch_python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q",
                              str(wheel)], capture_output=True, text=True, env=env, cwd=elsewhere, timeout=600)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    probe = textwrap.dedent("""
        import json, sys
        import echocare_dist
        from echocare_dist.config import load_config, preset_names
        from echocare_dist.ontology import load_ontology
        out = dict(package=echocare_dist.__file__, presets=preset_names(), ontologies={})
        for name in preset_names():
            cfg = load_config(name)
            onto = load_ontology(cfg.resolve_path(cfg.ontology.path))
            out["ontologies"][name] = [cfg.ontology.path, onto.hash]
        print(json.dumps(out))
    """)
    run = subprocess.run([str(scratch_python), "-c", probe], capture_output=True, text=True, env=env,
                         cwd=elsewhere, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout.splitlines()[-1])
    assert found["package"].startswith(site), found["package"]  # the wheel's copy, not the checkout
    assert found["presets"] == preset_names() and len(found["presets"]) >= 4
    from echocare_dist.ontology import load_ontology
    want = load_ontology(DEFAULT_ONTOLOGY).hash
    for name, (path, digest) in found["ontologies"].items():
        assert path.startswith(site) and digest == want, (name, path)

    cli = subprocess.run([str(venv / "bin" / "echocare"), "config", "presets"], capture_output=True, text=True,
                         env=env, cwd=elsewhere, timeout=120)
    assert cli.returncode == 0 and cli.stdout.split() == preset_names(), cli.stderr
