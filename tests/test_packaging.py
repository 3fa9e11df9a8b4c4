"""guard as a user installs it: declared dependencies, package data, optional extras, and a built wheel that
archives and serves a model from a fresh environment."""

from __future__ import annotations

import ast
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from guard import models
from guard._validation import MissingExtraError
from guard.cli import main
from guard.cli.repair import plot_tradeoff
from guard.serving import (HANDLER_FILE, METRICS_FILE, TS_CONFIG_FILE, GuardedClassifier, ServerSettings, TorchServe,
                           build_archive, free_ports)

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "sklearn": "scikit-learn", "ts": "torchserve",
                "model_archiver": "torch-model-archiver", "cv2": "opencv-python", "skimage": "scikit-image"}
HANDLERS = sorted(HANDLER_FILE.parent.glob("*.py"))


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _names(requirements: list[str]) -> set[str]:
    return {_normalize(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in requirements}


CORE = _names(PYPROJECT["project"]["dependencies"])
EXTRAS = {extra: _names(reqs) for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items()}


def _third_party(path: Path) -> dict[str, bool]:
    """Top-level third-party modules ``path`` imports -> whether one import of it runs at module load."""
    found: dict[str, bool] = {}
    tree = ast.parse(path.read_text())
    at_load = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top != "guard" and top not in sys.stdlib_module_names:
                found[top] = found.get(top, False) or id(node) in at_load
    return found


def _distribution(module: str) -> str:
    return _normalize(DISTRIBUTION.get(module, module))


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: p.name)
def test_benchmark_imports_are_declared(path):
    declared = CORE.union(*EXTRAS.values())
    siblings = {p.stem for p in path.parent.glob("*.py")}  # benchmarks share modules (victims.py)
    missing = sorted(m for m in _third_party(path) if m not in siblings and _distribution(m) not in declared)
    assert not missing, f"{path.name} imports {missing}, declared in no extra of pyproject.toml"


@pytest.mark.parametrize("path", sorted((ROOT / "guard").rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_library_imports_optional_dependencies_lazily(path):
    """A plain ``pip install guard`` imports every module: only core dependencies may load with it; the
    extras' modules are imported inside the function that needs them (handlers: loaded by TorchServe)."""
    declared = CORE.union(*EXTRAS.values())
    for module, at_load in _third_party(path).items():
        assert _distribution(module) in declared, f"{module} is declared in no extra of pyproject.toml"
        if at_load and path not in HANDLERS:
            assert _distribution(module) in CORE, f"{module} (an extra) is imported at module load"


def test_every_data_file_of_the_package_is_declared_as_package_data():
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]
    for path in (ROOT / "guard").rglob("*"):
        if path.is_file() and path.suffix not in (".py", ".pyc"):
            package = ".".join(path.parent.relative_to(ROOT).parts)
            assert any(path.match(g) for g in globs.get(package, ())), f"{path} is not in package-data"
    for path in (HANDLER_FILE, TS_CONFIG_FILE, METRICS_FILE):
        assert path.is_file() and path.parent == ROOT / "guard" / "serving" / "assets"


# ---------------------------------------------------------------------------------- missing extras

def test_archive_without_the_serve_extra_says_what_to_install(tmp_path, monkeypatch, capsys):
    weights = models.save_weights(models.create("tiny_resnet"), tmp_path / "tiny.pt")
    monkeypatch.setitem(sys.modules, "model_archiver", None)  # what an install without guard[serve] sees
    with pytest.raises(MissingExtraError, match=r"pip install 'guard\[serve\]'"):
        build_archive("tiny_resnet", weights, tmp_path / "tiny.mar")
    assert main(["archive", "--model", "tiny_resnet", "--weights", str(weights), "--out", str(tmp_path / "t.mar")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("guard archive: error: building a model archive needs the 'model_archiver' module")
    assert err.count("\n") == 1 and not list(tmp_path.glob("*.mar"))


def test_serve_without_the_serve_extra_says_what_to_install(tmp_path, monkeypatch):
    (tmp_path / "m.mar").touch()
    monkeypatch.setitem(sys.modules, "ts", None)
    server = TorchServe(tmp_path / "run", tmp_path, {"m": "m.mar"}, ServerSettings(token_auth=False))
    with pytest.raises(MissingExtraError, match=r"serving with TorchServe needs the 'ts' module.*guard\[serve\]"):
        server.start()
    assert not (tmp_path / "run").exists()


def test_repair_plot_without_matplotlib_is_skipped_with_a_warning(tmp_path, monkeypatch, caplog):
    history = [{"step": 0, "cda": 0.9, "asr": 0.8}, {"step": 10, "cda": 0.89, "asr": 0.1}]
    assert plot_tradeoff(history, history[1], 0.9, 0.02, "t", tmp_path / "with.png") == tmp_path / "with.png"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level(logging.WARNING, logger="guard.cli.repair"):
        assert plot_tradeoff(history, history[1], 0.9, 0.02, "t", tmp_path / "without.png") is None
    assert "pip install 'guard[bench]'" in caplog.text and not (tmp_path / "without.png").exists()


def test_repair_with_an_explicit_plot_fails_before_repairing_without_matplotlib(tmp_path, monkeypatch, capsys):
    weights = models.save_weights(models.create("tiny_resnet"), tmp_path / "tiny.pt")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code = main(["repair", "--model", "tiny_resnet", "--weights", str(weights), "--data-dir",
                 str(tmp_path / "no-data"), "--out", str(tmp_path / "r.pt"), "--plot", str(tmp_path / "r.png")])
    err = capsys.readouterr().err
    assert code == 2 and "--plot needs the 'matplotlib' module" in err and "guard[bench]" in err
    assert "CIFAR-10" not in err, "the missing extra must be found before any data is read"


def test_repair_without_matplotlib_keeps_the_finished_repair(data_root, tmp_path, monkeypatch, capsys, caplog):
    weights = models.save_weights(models.create("tiny_resnet"), tmp_path / "suspect.pt")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "repaired.pt"
    caplog.set_level(logging.WARNING, logger="guard.cli.repair")
    assert main(["repair", "--model", "tiny_resnet", "--weights", str(weights), "--dataset", "cifar10",
                 "--data-dir", str(data_root), "--limit", "500", "--trusted-fraction", "0.1", "--eval-split",
                 "test-lossless", "--eval-limit", "100", "--device", "cpu", "--opt", "steps=4", "--opt", "eval_every=2",
                 "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["plot"] is None and "pip install 'guard[bench]'" in caplog.text
    assert json.loads((tmp_path / "repaired.pt.json").read_text())["plot"] is None
    models.create("tiny_resnet", weights=out)
    assert not list(tmp_path.glob("*.png"))


# ------------------------------------------------------------------------------ install like a user

def _venv(path: Path) -> Path:
    """A fresh virtual environment that also sees this interpreter's third-party packages (torch,
    TorchServe, ...) through a ``.pth`` line, after its own: reinstalling torch would take minutes. Lines
    of a ``.pth`` file only extend ``sys.path``, so an editable guard installed here stays invisible."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = path / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    outer = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages") and Path(p).is_dir()]
    (Path(purelib) / "outer-site-packages.pth").write_text("\n".join(outer) + "\n")
    return python


def _env(venv_python: Path) -> dict[str, str]:
    """The environment of a user's shell with the venv activated: no PYTHONPATH into the source tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = f"{venv_python.parent}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(command: list, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{command} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _source_copy(into: Path) -> Path:
    """What an sdist holds, so that building leaves no build/ or egg-info in the source tree."""
    into.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, into / name)
    shutil.copytree(ROOT / "guard", into / "guard", ignore=shutil.ignore_patterns("__pycache__"))
    return into


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools (the test extra)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_copy(tmp / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp / "dist"), str(src)], check=True, cwd=tmp, capture_output=True)
    (found,) = (tmp / "dist").glob("guard-*.whl")
    return found


@pytest.mark.slow
@pytest.mark.serve
def test_installed_wheel_archives_and_serves_with_its_packaged_handler(wheel, tmp_path):
    pytest.importorskip("ts")
    requests = pytest.importorskip("requests")
    if shutil.which("java") is None:
        pytest.skip("TorchServe needs a Java runtime")
    from test_serving_server import _alive, assert_same_answer, expected_answers, png

    with zipfile.ZipFile(wheel) as zf:
        assert {"guard/serving/assets/guard_handler.py", "guard/serving/assets/config.properties",
                "guard/serving/assets/metrics.yaml"} <= set(zf.namelist())
    python = _venv(tmp_path / "venv")
    env, work = _env(python), tmp_path / "work"
    work.mkdir()
    _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], work, env)
    where = json.loads(_run([python, "-c", "import json, guard, guard.serving as s; print(json.dumps("
                                           "[guard.__file__, str(s.HANDLER_FILE), str(s.TS_CONFIG_FILE)]))"],
                            work, env))
    for path in where:
        assert Path(path).is_relative_to(tmp_path / "venv"), f"{path} is not the installed wheel's"
    assert Path(where[1]).read_bytes() == HANDLER_FILE.read_bytes()

    weights = models.save_weights(models.create("tiny_resnet"), work / "tiny.pt")
    guard = tmp_path / "venv" / "bin" / "guard"
    _run([guard, "archive", "--model", "tiny_resnet", "--weights", weights, "--out", work / "store" / "tiny.mar"],
         work, env)
    with zipfile.ZipFile(work / "store" / "tiny.mar") as zf:
        assert zf.read("guard_handler.py") == HANDLER_FILE.read_bytes()
        zf.extractall(work / "unpacked")
    out = _run([guard, "serve", "--models", "tiny=tiny.mar", "--model-store", work / "store", "--run-dir",
                work / "run", "--ports", ",".join(map(str, free_ports(5))), "--threads", "1", "--timeout", "240"],
               work, env)
    server = TorchServe.attach(work / "run")
    try:
        assert f"serving tiny: {server.inference_url('tiny')}" in out and server.settings.token_auth
        workers = server.worker_pids("tiny")
        for pid in workers:  # the worker runs the installed environment's interpreter
            assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == str(python).encode()
        _, h, w = models.get_spec("tiny_resnet").input_size
        image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
        response = requests.post(server.inference_url("tiny"), data=png(image), timeout=60,
                                 headers={**server.auth_headers(), "Content-Type": "image/png"})
        assert response.status_code == 200, response.text
        local = GuardedClassifier.from_archive_dir(work / "unpacked")
        assert_same_answer(response.json(), expected_answers(local, image[None])[0])
        assert 400 <= requests.post(server.inference_url("tiny"), data=png(image), timeout=60).status_code < 500
    finally:
        _run([guard, "serve", "--stop", "--run-dir", work / "run"], work, env)
    assert not any(_alive(pid) for pid in [server.pid, *workers])


@pytest.mark.slow
def test_editable_install_finds_the_same_package_data(tmp_path):
    """``make``'s ``pip install -e``: the package data resolves into the source tree it was installed from."""
    pytest.importorskip("setuptools", reason="an offline editable install needs setuptools (the test extra)")
    src = _source_copy(tmp_path / "src")
    python = _venv(tmp_path / "venv")
    env = _env(python)
    _run([python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-e", src],
         tmp_path, env)
    where = json.loads(_run([python, "-c", "import json, guard, guard.serving as s; print(json.dumps("
                                           "[guard.__file__, str(s.HANDLER_FILE), str(s.METRICS_FILE)]))"],
                            tmp_path, env))
    assert [Path(p) for p in where] == [src / "guard" / "__init__.py", src / "guard" / "serving" / "assets" /
                                        "guard_handler.py", src / "guard" / "serving" / "assets" / "metrics.yaml"]
