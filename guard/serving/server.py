"""Start, wait for, and stop a TorchServe serving guard model archives.

Each server lives in its own run directory: the ``config.properties`` it was started with (the packaged
:data:`~guard.serving.TS_CONFIG_FILE` or the user's, with the ports, metrics file and per-model batching
filled in), its logs, its temporary files (TorchServe keeps its pid file and worker sockets there, so
servers never collide), its token-authorization keys (``key_file.json``) and ``server.json``, from which
``TorchServe.attach`` finds a running server again (``guard serve --stop``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .._validation import require_extra
from .archive import ARCHIVE_VERSION, verify_archive
from .predictor import WeightsMismatchError
from .resources import METRICS_FILE, TS_CONFIG_FILE

log = logging.getLogger(__name__)

STATE_FILE = "server.json"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
#: the handler logs this when it refuses an archive; start-up stops waiting when it appears
REFUSAL_MARK = "guard: refusing to load"
_REFUSAL = re.compile(re.escape(REFUSAL_MARK) + r" model (\S+): (.*)$")
_ADDRESSES = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}
# TorchServe 0.12 always starts its gRPC APIs too (host and port in separate keys)
_GRPC = {"grpc_inference": ("grpc_inference_address", "grpc_inference_port", 7070),
         "grpc_management": ("grpc_management_address", "grpc_management_port", 7071)}


#: the ports a start may override, in the order ``guard serve --ports`` takes them
PORT_NAMES = ("inference_port", "management_port", "metrics_port", "grpc_inference_port", "grpc_management_port")


class ServerError(RuntimeError):
    """TorchServe did not start, did not become ready, or did not stop."""


def _check_port(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536):
        raise ValueError(f"{name} must be a TCP port in 1..65535, got {value!r}")


@dataclass(frozen=True)
class ServerSettings:
    """What a start overrides in ``config.properties``; ``None`` keeps the file's value.

    Ports replace the loopback addresses' ports (TorchServe 0.12 always opens its two gRPC ports too).
    ``batch_size`` / ``max_batch_delay_ms`` / ``workers`` apply to every served model.
    ``token_auth=False`` disables TorchServe's token authorization (tests and local demos only).
    ``threads``: intra-op threads of each worker (``OMP_NUM_THREADS``); default: with ``workers``, the cores
    divided among a model's workers (no oversubscription under load), else PyTorch's (one per core). On a machine with
    several GPUs TorchServe gives each worker its own (``gpu_id``, round robin), which the handler runs on.
    """

    inference_port: int | None = None
    management_port: int | None = None
    metrics_port: int | None = None
    grpc_inference_port: int | None = None
    grpc_management_port: int | None = None
    token_auth: bool = True
    batch_size: int | None = None
    max_batch_delay_ms: int | None = None
    workers: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in PORT_NAMES:
            _check_port(name, getattr(self, name))
        if not isinstance(self.token_auth, bool):
            raise TypeError(f"token_auth must be a bool, got {self.token_auth!r}")
        for name, low in (("batch_size", 1), ("max_batch_delay_ms", 0), ("workers", 1), ("threads", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def read_properties(path: Path) -> dict[str, str]:
    """``key=value`` lines of a Java properties file (comments and blank lines skipped)."""
    props = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


class TorchServe:
    """One TorchServe process serving ``models`` (endpoint name -> ``.mar`` file in ``model_store``).

    Example::

        with TorchServe("runs/test", "model_store", {"resnet20": "resnet20.mar"},
                        ServerSettings(token_auth=False)) as server:
            requests.post(server.inference_url("resnet20"), data=png_bytes)
    """

    def __init__(self, run_dir: str | Path, model_store: str | Path, models: Mapping[str, str],
                 settings: ServerSettings | None = None, config: str | Path | None = None) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.model_store = Path(model_store).resolve()
        if not models:
            raise ValueError("expected at least one model to serve (name -> .mar file)")
        self.models = dict(models)
        self.settings = ServerSettings() if settings is None else settings
        self.config = TS_CONFIG_FILE if config is None else Path(config).resolve()
        self.pid: int | None = None
        self.addresses: dict[str, str] = {}
        #: model -> the handler's reason, for the models a start with ``allow_refused`` left out
        self.refused: dict[str, str] = {}

    # -- locations -------------------------------------------------------------------------------------
    @property
    def tmp_dir(self) -> Path:
        return self.run_dir / "tmp"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    def inference_url(self, model: str) -> str:
        return f"{self.addresses['inference']}/predictions/{model}"

    @property
    def metrics_url(self) -> str:
        return f"{self.addresses['metrics']}/metrics"

    def management_url(self, path: str = "") -> str:
        return f"{self.addresses['management']}/{path.lstrip('/')}"

    def _key(self, api: str) -> str | None:
        if not self.settings.token_auth:
            return None
        key_file = self.run_dir / "key_file.json"
        if not key_file.is_file():
            raise ServerError(f"token authorization is on but {key_file} does not exist (yet)")
        return json.loads(key_file.read_text())[api]["key"]

    def auth_headers(self, api: str = "inference") -> dict[str, str]:
        """``Authorization`` header for the ``inference`` or ``management`` API (empty without tokens)."""
        key = self._key(api)
        return {} if key is None else {"Authorization": f"Bearer {key}"}

    # -- configuration ---------------------------------------------------------------------------------
    def write_config(self) -> Path:
        """Write the run's ``config.properties``: the base file with this start's overrides."""
        if not self.config.is_file():
            raise FileNotFoundError(f"TorchServe config not found: {self.config}")
        props = read_properties(self.config)
        s = self.settings
        for api, key in _ADDRESSES.items():
            address = props.get(key)
            if address is None:
                raise ValueError(f"{self.config} must set {key} (a loopback address such as http://127.0.0.1:8080)")
            parts = urlsplit(address)
            if parts.hostname not in LOOPBACK:
                raise ValueError(f"{self.config}: {key}={address} is not a loopback address; guard serves on "
                                 f"127.0.0.1 only (put a reverse proxy in front to expose it)")
            port = getattr(s, f"{api}_port") or parts.port
            if port is None:
                raise ValueError(f"{self.config}: {key}={address} names no port")
            self.addresses[api] = f"{parts.scheme}://127.0.0.1:{port}"
            props[key] = self.addresses[api]
        for api, (address_key, port_key, default) in _GRPC.items():
            host = props.get(address_key, "127.0.0.1")
            if host not in LOOPBACK:
                raise ValueError(f"{self.config}: {address_key}={host} is not a loopback address; guard serves on "
                                 f"127.0.0.1 only")
            port = getattr(s, f"{api}_port")
            props[address_key] = "127.0.0.1"
            props[port_key] = str(port if port is not None else props.get(port_key, default))
        # a config that names no metrics file gets guard's; a relative one is next to the config
        metrics_config = Path(props["metrics_config"]) if "metrics_config" in props else METRICS_FILE
        if not metrics_config.is_absolute():
            metrics_config = self.config.parent / metrics_config
        if not metrics_config.is_file():
            raise FileNotFoundError(f"metrics config not found: {metrics_config} (metrics_config in {self.config})")
        props["metrics_config"] = str(metrics_config)
        props["metrics_mode"] = "prometheus"
        per_model = json.loads(props.get("models", "{}"))
        for name, mar in self.models.items():
            entry = per_model.setdefault(name, {}).setdefault(ARCHIVE_VERSION, {})
            entry.update(defaultVersion=True, marName=mar)
            overrides = {"batchSize": s.batch_size, "maxBatchDelay": s.max_batch_delay_ms,
                         "minWorkers": s.workers, "maxWorkers": s.workers}
            entry.update({key: value for key, value in overrides.items() if value is not None})
        props["models"] = json.dumps(per_model)
        props["disable_token_authorization"] = "false" if s.token_auth else "true"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "config.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()), encoding="utf-8")
        return path

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("TS_CONFIG_FILE", None)  # would override --ts-config
        env.update(TMPDIR=str(self.tmp_dir), TEMP=str(self.tmp_dir), LOG_LOCATION=str(self.log_dir),
                   METRICS_LOCATION=str(self.log_dir))
        # Idle OpenMP threads sleep instead of spinning: a spinning thread that loses its core to another
        # process stalls every parallel region of the backward pass (measured: 40 ms -> 4.5 s per batch
        # of 8 on two busy cores).
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        threads = self.worker_threads
        if threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        return env

    @property
    def worker_threads(self) -> int | None:
        """Intra-op threads of each worker: ``settings.threads``, else, when ``settings.workers`` is given, this
        machine's cores divided among a model's workers (at least 1), else PyTorch's default (None)."""
        s = self.settings
        if s.threads is not None or s.workers is None:
            return s.threads
        return max(1, len(os.sched_getaffinity(0)) // s.workers)

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0, *, allow_refused: bool = False) -> "TorchServe":
        """Start TorchServe and wait until every model has a READY worker (raises :class:`ServerError`).

        Every archive is first checked against its checksum file (``NAME.mar.sha256`` from ``guard archive``;
        an archive without one is served with a warning): a changed archive is not served. A model whose
        archive the handler refuses at load (a file changed after archiving, weights that are not a state dict,
        a manifest naming a file outside the archive) raises, or, with ``allow_refused``, is left out: its
        reason goes to :attr:`refused`, its workers are stopped (:meth:`stop_workers`) and its endpoint answers
        503.
        """
        require_extra("ts", "serve", "serving with TorchServe")
        if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
            raise ServerError("TorchServe needs a Java runtime (17 or newer): install one (e.g. openjdk-17-jre) "
                              "or set JAVA_HOME")
        for name, mar in self.models.items():
            if not (self.model_store / mar).is_file():
                raise FileNotFoundError(f"model {name}: archive {self.model_store / mar} not found")
            try:
                if not verify_archive(self.model_store / mar):
                    log.warning("model %s: %s has no checksum file; serving it unverified", name, mar)
            except WeightsMismatchError as exc:
                raise ServerError(f"model {name}: {exc}") from exc
        if (self.run_dir / STATE_FILE).is_file() and TorchServe.attach(self.run_dir).is_running():
            raise ServerError(f"a server from {self.run_dir} is already running; stop it first (guard serve --stop)")
        config = self.write_config()
        for stale in ("key_file.json", STATE_FILE):
            (self.run_dir / stale).unlink(missing_ok=True)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.tmp_dir.mkdir(parents=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "ts.model_server", "--start", "--ncs", "--model-store",
                   str(self.model_store), "--ts-config", str(config),
                   "--models", *[f"{name}={mar}" for name, mar in self.models.items()]]
        with open(self.run_dir / "torchserve.out", "wb") as out:
            done = subprocess.run(command, cwd=self.run_dir, env=self._env(), stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        pid_file = self.tmp_dir / ".model_server.pid"
        if done.returncode != 0 or not pid_file.is_file():
            raise ServerError(f"torchserve did not start (exit {done.returncode}):\n{self._tail()}")
        self.pid = int(pid_file.read_text().strip())
        state = {"pid": self.pid, "addresses": self.addresses, "models": self.models,
                 "model_store": str(self.model_store), "config": str(self.config),
                 "settings": asdict(self.settings)}
        (self.run_dir / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        try:
            self.refused = self.wait_ready(timeout, allow_refused=allow_refused)
        except BaseException:
            self.stop()
            raise
        return self

    @classmethod
    def attach(cls, run_dir: str | Path) -> "TorchServe":
        """The server a previous :meth:`start` left running in ``run_dir``."""
        run_dir = Path(run_dir).resolve()
        state_file = run_dir / STATE_FILE
        if not state_file.is_file():
            raise ServerError(f"no server state in {run_dir} (nothing was started there)")
        state = json.loads(state_file.read_text())
        server = cls(run_dir, state["model_store"], state["models"], ServerSettings(**state["settings"]),
                     state["config"])
        server.pid, server.addresses = state["pid"], state["addresses"]
        return server

    def is_running(self) -> bool:
        return self.pid is not None and _is_alive(self.pid)

    def _request(self, url: str, api: str, timeout: float = 5.0, method: str = "GET") -> tuple[int, bytes]:
        request = urllib.request.Request(url, headers=self.auth_headers(api), method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def model_status(self, model: str) -> list[dict]:
        """The management API's description of ``model`` (its workers, batch size, ...)."""
        code, body = self._request(self.management_url(f"models/{model}"), "management")
        if code != 200:
            raise ServerError(f"GET models/{model} answered {code}: {body[:300]!r}")
        return json.loads(body)

    def stop_workers(self, model: str) -> None:
        """Scale ``model`` to no workers: TorchServe stops restarting a worker that cannot load it, and answers
        its endpoint at once with a 503 instead of queueing requests for a worker that never comes."""
        url = self.management_url(f"models/{model}?min_worker=0&max_worker=0&synchronous=true")
        code, body = self._request(url, "management", timeout=60.0, method="PUT")
        if code != 200:
            raise ServerError(f"PUT models/{model} (no workers) answered {code}: {body[:300]!r}")

    def worker_pids(self, model: str) -> list[int]:
        return [int(w["pid"]) for desc in self.model_status(model) for w in desc["workers"] if w.get("pid")]

    def wait_ready(self, timeout: float = 180.0, *, allow_refused: bool = False) -> dict[str, str]:
        """Block until every model has a READY worker; fail fast if the server exits or refuses a model — or,
        with ``allow_refused``, wait for the others and return ``{model: reason}`` of the refused ones."""
        deadline = time.monotonic() + timeout
        pending = set(self.models)
        refused: dict[str, str] = {}
        while pending:
            if not self.is_running():
                raise ServerError(f"TorchServe exited during start-up:\n{self._tail()}")
            for model, reason in self._refusals().items():
                if model in pending:
                    if not allow_refused:
                        raise ServerError(f"a model archive was refused: {REFUSAL_MARK} model {model}: {reason}")
                    refused[model] = reason
                    pending.discard(model)
                    self.stop_workers(model)
            for model in sorted(pending):
                try:
                    workers = [w for d in self.model_status(model) for w in d["workers"]]
                except (OSError, ServerError, ValueError):
                    continue  # not listening yet
                if any(w.get("status") == "READY" for w in workers):
                    pending.discard(model)
            if pending and time.monotonic() > deadline:
                raise ServerError(f"models {sorted(pending)} not READY after {timeout:.0f} s:\n{self._tail()}")
            if pending:
                time.sleep(0.25)
        log.info("TorchServe ready: %s", ", ".join(self.inference_url(m) for m in self.models if m not in refused))
        for model, reason in refused.items():
            log.error("TorchServe is not serving %s: %s", model, reason)
        return refused

    def _refusals(self) -> dict[str, str]:
        """``{model: reason}`` for every model whose archive the handler refused (from the model log)."""
        model_log = self.log_dir / "model_log.log"
        if not model_log.is_file():
            return {}
        found = {}
        for line in model_log.read_text(errors="replace").splitlines():
            match = _REFUSAL.search(line)
            if match:
                found.setdefault(match.group(1), match.group(2))
        return found

    def _tail(self, lines: int = 30) -> str:
        parts = []
        for path in (self.run_dir / "torchserve.out", self.log_dir / "model_log.log"):
            if path.is_file():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} ---\n" + "\n".join(text))
        return "\n".join(parts) or "(no logs)"

    def stop(self, timeout: float = 60.0) -> None:
        """Stop TorchServe (``torchserve --stop``) and wait until it and its workers have exited."""
        if not self.is_running():
            (self.run_dir / STATE_FILE).unlink(missing_ok=True)
            return
        workers = []
        for model in self.models:
            try:
                workers += self.worker_pids(model)
            except (OSError, ServerError, ValueError):
                pass
        subprocess.run([sys.executable, "-m", "ts.model_server", "--stop", "--foreground"], cwd=self.run_dir,
                       env=self._env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout + 30)
        deadline = time.monotonic() + timeout
        while any(_is_alive(p) for p in [self.pid, *workers]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _is_alive(self.pid):
            log.warning("TorchServe (pid %d) did not stop in %.0f s; killing its process group", self.pid, timeout)
            os.killpg(self.pid, signal.SIGKILL)
        (self.run_dir / STATE_FILE).unlink(missing_ok=True)
        (self.run_dir / "key_file.json").unlink(missing_ok=True)

    def __enter__(self) -> "TorchServe":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that are free right now (for tests, benchmarks and ``--ports``)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _is_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie awaiting its parent counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True
