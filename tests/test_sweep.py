"""guard.sweep on a real local Ray: a grid's tasks equal the serial run, an interrupted sweep resumes without
rerunning finished jobs, a failing or dying job is reported with its config and does not sink the grid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from guard.sweep import Grid, Resources, job_key, load_grid, run_sweep

ray = pytest.importorskip("ray")

JOBS = str(Path(__file__).with_name("sweep_jobs.py"))


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (2 CPUs, the project's machine); run_sweep reuses a running Ray."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _grid(tmp_path: Path, function: str, **fields) -> Grid:
    return Grid(name="t", function=f"{JOBS}:{function}", out=tmp_path / "out.json", **fields)


def test_grid_expands_points_times_lists_with_stable_keys(tmp_path):
    grid = Grid(name="g", function="m:f", params={"model": "m"}, grid={"seed": [0, 1], "lr": [0.1, 0.2]},
                points=[{"weights": "a.pt"}, {"weights": "b.pt"}])
    jobs = grid.jobs()
    assert len(jobs) == 8 and len({j.key for j in jobs}) == 8
    assert jobs[0].params == {"model": "m", "weights": "a.pt", "seed": 0, "lr": 0.1}
    assert jobs[0].key == job_key("m:f", {"lr": 0.1, "seed": 0, "weights": "a.pt", "model": "m"})  # order-free
    assert job_key("m:f", {"x": 1}) != job_key("m:g", {"x": 1})
    assert Grid(name="g", function="m:f", grid={"seed": [0, 1]}, points=[]).jobs() == []  # no points: no jobs
    assert len(Grid(name="g", function="m:f", grid={"seed": [0, 1]}).jobs()) == 2


@pytest.mark.parametrize("spec, message", [
    ({"function": "nocolon"}, "function: expected"),
    ({"function": "m:f", "grid": {"seed": []}}, "grid.seed: expected a non-empty list"),
    ({"function": "m:f", "grid": {"seed": [0]}, "jobs": [{"seed": 1}]}, "also grid lists"),
    ({"function": "m:f", "resources": {"cpus": 0}}, "resources.cpus: expected a number > 0"),
    ({"function": "m:f", "resources": {"gpu": 1}}, "resources: unknown keys ['gpu']"),
    ({"function": "m:f", "typo": 1}, "unknown keys ['typo']"),
    ({"function": "m:f", "jobs": {"a": 1}}, "jobs: expected a list"),
    ({"function": "m:f", "params": [1, 2]}, "params: expected a mapping"),
    ({"params": {}}, "expected a 'function' key"),
])
def test_bad_grids_are_rejected_naming_what_was_expected(spec, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Grid.from_dict(spec)


def test_ray_tasks_equal_the_serial_run(local_ray, tmp_path):
    fields = {"grid": {"seed": [0, 1, 2], "lr": [0.01, 0.1]}, "resources": Resources(cpus=1)}
    on_ray = run_sweep(_grid(tmp_path / "ray", "train_tiny", **fields))
    serial = run_sweep(_grid(tmp_path / "serial", "train_tiny", **fields), backend="serial")
    assert on_ray.ran == serial.ran == 6 and not on_ray.failed and not serial.failed
    assert on_ray.results.keys() == serial.results.keys()
    assert len({r["pid"] for r in on_ray.results.values()} - {os.getpid()}) >= 1  # ran in Ray workers
    assert {r["pid"] for r in serial.results.values()} == {os.getpid()}
    for key, record in on_ray.results.items():
        assert record["result"]["threads"] == 1  # the declared CPUs are the job's torch threads
        assert record["result"]["loss"] == pytest.approx(serial.results[key]["result"]["loss"], rel=1e-5)
        assert record["result"]["checksum"] == pytest.approx(serial.results[key]["result"]["checksum"], rel=1e-5)
    stored = json.loads((tmp_path / "ray" / "out.json").read_text())
    assert stored["finished"] == stored["total"] == 6 and stored["jobs"].keys() == on_ray.results.keys()


def test_a_grown_grid_runs_only_its_new_jobs(local_ray, tmp_path):
    log = tmp_path / "log"
    first = run_sweep(_grid(tmp_path, "counted", params={"log": str(log)}, grid={"i": [0, 1]}))
    second = run_sweep(_grid(tmp_path, "counted", params={"log": str(log)}, grid={"i": [0, 1, 2, 3]}))
    assert (first.ran, first.skipped) == (2, 0) and (second.ran, second.skipped) == (2, 2)
    assert sorted(log.read_text().split()) == ["0", "1", "2", "3"]  # each job ran once
    assert {r["result"]["square"] for r in second.results.values()} == {0, 1, 4, 9}
    third = run_sweep(_grid(tmp_path, "counted", params={"log": str(log)}, grid={"i": [3]}))
    stored = json.loads((tmp_path / "out.json").read_text())
    assert (third.ran, third.skipped) == (0, 1) and (stored["total"], stored["finished"]) == (1, 1)
    assert len(stored["jobs"]) == 4  # the other jobs' records are kept for a later grid that has them


def test_a_failing_job_is_reported_with_its_config_and_the_rest_finish(local_ray, tmp_path):
    report = run_sweep(_grid(tmp_path, "fails_on", params={"bad": 2}, grid={"i": [0, 1, 2, 3]}))
    assert report.ran == 4 and len(report.failed) == 1
    failure = report.failed[0]
    assert failure.job.params == {"bad": 2, "i": 2}
    assert failure.record["error"] == "ValueError: job 2 is the bad one" and "fails_on" in failure.record["traceback"]
    assert sorted(r["result"]["i"] for r in report.results.values() if r["status"] == "ok") == [0, 1, 3]
    again = run_sweep(_grid(tmp_path, "fails_on", params={"bad": 2}, grid={"i": [0, 1, 2, 3]}))
    assert (again.ran, again.skipped) == (1, 3)  # only the failed job runs again


def test_a_job_whose_worker_dies_is_reported_and_the_rest_finish(local_ray, tmp_path):
    report = run_sweep(_grid(tmp_path, "dies_on", params={"bad": 1}, grid={"i": [0, 1, 2]}))
    assert [f.job.params["i"] for f in report.failed] == [1]
    assert "Worker" in report.failed[0].record["error"] or "died" in report.failed[0].record["error"]
    assert sorted(r["result"]["i"] for r in report.results.values() if r["status"] == "ok") == [0, 2]


def test_an_interrupted_sweep_resumes_without_rerunning_finished_jobs(tmp_path):
    """``guard sweep`` on its own local Ray, stopped with SIGINT after the first results, then run again."""
    log = tmp_path / "log"
    spec = {"function": f"{JOBS}:counted", "params": {"log": str(log), "sleep": 1.5}, "grid": {"i": list(range(8))},
            "resources": {"cpus": 1}}
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(yaml.safe_dump(spec))
    out = tmp_path / "grid.json"
    argv = [sys.executable, "-m", "guard.cli", "sweep", str(grid_file), "--num-cpus", "2", "--no-progress"]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.is_file() and json.loads(out.read_text())["finished"] >= 2:
            break
        time.sleep(0.2)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=60)
    finished = {k for k, r in json.loads(out.read_text())["jobs"].items() if r["status"] == "ok"}
    assert 2 <= len(finished) < 8, "the sweep was meant to be stopped part way"
    second = subprocess.run(argv + ["--json"], capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr
    summary = json.loads(second.stdout[second.stdout.index("{"):])
    assert summary["skipped"] == len(finished) and summary["ran"] == 8 - len(finished)
    runs = log.read_text().split()
    for key in finished:  # a job finished before the interruption never ran again
        i = json.loads(out.read_text())["jobs"][key]["params"]["i"]
        assert runs.count(str(i)) == 1
    assert sorted(set(runs)) == sorted(str(i) for i in range(8))


def test_the_builtin_job_runs_guard_commands_per_grid_point(tmp_path, data_root, resnet20_weights):
    """``guard.sweep:commands``: a ``guard`` command per grid point, its result the JSON the command printed."""
    command = ["eval", "--model", "resnet20", "--weights", str(resnet20_weights), "--data-dir", str(data_root),
               "--split", "test-lossless", "--limit", "{limit}", "--json"]
    grid = Grid(name="eval", function="guard.sweep:commands", params={"commands": [command]},
                grid={"limit": [32, 64]}, out=tmp_path / "eval.json")
    report = run_sweep(grid, backend="serial")
    assert report.ran == 2 and not report.failed
    results = sorted(report.results.values(), key=lambda r: r["params"]["limit"])
    assert [r["result"]["n"] for r in results] == [32, 64]
    assert all(0.8 <= r["result"]["accuracy"] <= 1.0 for r in results)
    broken = Grid(name="bad", function="guard.sweep:commands", params={"commands": [command[:-3] + ["--limit", "0"]]},
                  grid={"limit": [1]}, out=tmp_path / "bad.json")
    failure = run_sweep(broken, backend="serial").failed[0]
    assert "exited with code 2" in failure.record["error"] and "--limit must be >= 1" in failure.record["error"]


def test_environment_variables_expand_where_the_job_runs_and_an_unset_one_fails_the_job(tmp_path, monkeypatch):
    (tmp_path / "jobs.py").write_text("def f(path, n):\n    return {'path': path}\n")
    grid = Grid(name="env", function=f"{tmp_path / 'jobs.py'}:f", params={"path": "${GUARD_T_ROOT}/x"},
                grid={"n": [1]}, out=tmp_path / "env.json")
    monkeypatch.delenv("GUARD_T_ROOT", raising=False)
    failed = run_sweep(grid, backend="serial").failed
    assert "environment variable GUARD_T_ROOT is not set" in failed[0].record["error"]
    monkeypatch.setenv("GUARD_T_ROOT", "/data")
    report = run_sweep(grid, backend="serial")
    assert [r["result"]["path"] for r in report.results.values()] == ["/data/x"]  # the same job, now finished


def test_load_grid_resolves_paths_against_the_file(tmp_path):
    (tmp_path / "jobs.py").write_text("def f(x):\n    return {'x': x}\n")
    (tmp_path / "g.yaml").write_text("function: jobs.py:f\ngrid: {x: [1, 2]}\n")
    grid = load_grid(tmp_path / "g.yaml")
    assert grid.name == "g" and grid.out == tmp_path / "g.json"
    assert grid.function == f"{tmp_path / 'jobs.py'}:f"
    report = run_sweep(grid, backend="serial")
    assert sorted(r["result"]["x"] for r in report.results.values()) == [1, 2]


def test_sweep_progress_is_scraped_over_http_with_the_declared_metrics(tmp_path):
    requests = pytest.importorskip("requests")
    from guard.serving import free_ports
    from guard.serving.metrics import PrometheusExporter
    from guard.sweep import SWEEP_METRICS

    exporter = PrometheusExporter(SWEEP_METRICS)
    port = free_ports(1)[0]
    server = exporter.serve(port)
    try:
        run_sweep(_grid(tmp_path, "fails_on", params={"bad": 1}, grid={"i": [0, 1, 2, 3]}), backend="serial",
                  metrics=exporter)
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        server.shutdown()
    host = exporter.hostname
    assert f'guard_sweep_jobs_total{{Hostname="{host}",status="ok",sweep="t"}} 3.0' in text
    assert f'guard_sweep_jobs_total{{Hostname="{host}",status="failed",sweep="t"}} 1.0' in text
    assert f'guard_sweep_jobs_remaining{{Hostname="{host}",sweep="t"}} 0.0' in text
    assert f'guard_sweep_job_seconds_count{{Hostname="{host}",sweep="t"}} 4.0' in text


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "benchmarks" / "grids").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_the_shipped_grid_files_load_and_list_their_jobs(path, capsys):
    from guard.cli import main

    grid = load_grid(path)
    assert grid.jobs() and grid.out.parent.name == "results"
    assert main(["sweep", str(path), "--dry-run", "--out", "/nonexistent/x.json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(grid.jobs())


@pytest.mark.gpu
def test_a_job_declaring_a_gpu_runs_on_its_own(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gpus = torch.cuda.device_count()
    ray.shutdown()  # the module's CPU-only Ray, if it is up
    ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
    try:
        report = run_sweep(_grid(tmp_path, "on_gpu", grid={"i": list(range(gpus))},
                                 resources=Resources(cpus=1, gpus=1)))
    finally:
        ray.shutdown()
    assert not report.failed
    results = [r["result"] for r in report.results.values()]
    assert all(r["count"] == 1 and r["device"] == "cuda:0" for r in results)  # Ray shows each job its own GPU
    assert len({r["visible"] for r in results}) == gpus
