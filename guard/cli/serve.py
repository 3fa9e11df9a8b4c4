"""``guard serve``: start TorchServe with guarded model archives on loopback and wait until they are READY.

Examples::

    guard serve                                   # demo: CIFAR-10 ResNet-20 behind ReScaler
    guard serve --models resnet20=resnet20.mar --model-store model_store --batch-size 16
    guard serve --stop                            # stop it and wait for it to exit

With no ``--models``, builds ``model_store/resnet20.mar`` if missing (the pretrained ResNet-20 from the
data directory, else a short CIFAR-10 training run) and serves it. The server keeps running after this
command returns; its logs, keys and state live in ``--run-dir``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import CLIError


def _model_arg(text: str) -> tuple[str, str]:
    name, sep, mar = text.partition("=")
    if not sep:
        name, mar = Path(text).stem, text
    if not name or not mar.endswith(".mar"):
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.mar or FILE.mar, got {text!r}")
    return name, mar


def _ports(text: str) -> tuple[int, ...]:
    try:
        ports = tuple(int(p) for p in text.split(","))
    except ValueError:
        ports = ()
    if len(ports) != 5:
        raise argparse.ArgumentTypeError(f"expected five comma-separated ports I,M,X,GI,GM, got {text!r}")
    return ports


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve guarded models with TorchServe (or --stop it)",
                              description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stop", action="store_true", help="stop the server started from --run-dir and wait for it")
    p.add_argument("--model-store", default="model_store", help="folder of .mar archives (default: model_store)")
    p.add_argument("--models", nargs="+", type=_model_arg, metavar="NAME=FILE.mar",
                   help="archives to serve (default: the demo ResNet-20, built if missing)")
    p.add_argument("--run-dir", default="runs/serve", help="logs, keys and state of the server (default: runs/serve)")
    p.add_argument("--ts-config", default=None,
                   help="TorchServe config (default: guard's config.properties, guard.serving.TS_CONFIG_FILE)")
    p.add_argument("--ports", type=_ports, default=None, metavar="I,M,X,GI,GM",
                   help="override the config's ports: inference, management, metrics, gRPC inference, gRPC "
                        "management (e.g. 8080,8081,8082,7070,7071)")
    p.add_argument("--batch-size", type=int, default=None, help="requests per server batch, for every model")
    p.add_argument("--max-batch-delay", type=int, default=None, metavar="MS",
                   help="milliseconds to wait for a batch to fill, for every model")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes per model; each gets its own GPU when there are several, and the "
                        "cores are divided among a model's workers unless --threads is given")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads per worker (default: cores / workers with --workers, else one "
                        "per core)")
    p.add_argument("--no-token-auth", action="store_true",
                   help="disable token authorization (local demos and tests only)")
    p.add_argument("--data-dir", default=None, help="data root for the demo model (default: $GUARD_DATA_DIR)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for READY (default 300)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar if the demo model is trained")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..serving import PORT_NAMES, ServerError, ServerSettings, TorchServe

    if args.stop:
        try:
            server = TorchServe.attach(args.run_dir)
        except ServerError:
            print(f"no server was started from {args.run_dir}")
            return 0
        running = server.is_running()
        server.stop()
        print(f"stopped TorchServe (pid {server.pid})" if running else "the server had already exited")
        return 0

    try:
        ports = dict(zip(PORT_NAMES, args.ports)) if args.ports else {}
        settings = ServerSettings(**ports, token_auth=not args.no_token_auth, batch_size=args.batch_size,
                                  max_batch_delay_ms=args.max_batch_delay, workers=args.workers,
                                  threads=args.threads)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    if args.models:
        models = dict(args.models)
    else:
        from ..serving.demo import DEMO_MODEL, build_demo_archive

        archive = build_demo_archive(args.model_store, args.data_dir, progress=not args.no_progress)
        print(f"demo archive: {archive}")
        models = {DEMO_MODEL: archive.name}
    server = TorchServe(args.run_dir, args.model_store, models, settings, args.ts_config)
    try:
        server.start(timeout=args.timeout)
    except ServerError as exc:
        raise CLIError(f"{exc}\n(logs in {server.log_dir})") from exc
    auth = server.auth_headers("inference")
    header = f' -H "Authorization: {auth["Authorization"]}"' if auth else ""
    for name in models:
        print(f"serving {name}: {server.inference_url(name)}")
    print(f"metrics: {server.metrics_url}")
    if auth:
        print(f"token authorization on: keys in {server.run_dir / 'key_file.json'}")
    name = next(iter(models))
    print(f'try:  curl{header} -H "Content-Type: image/png" --data-binary @image.png {server.inference_url(name)}')
    print(f"stop: guard serve --stop{'' if args.run_dir == 'runs/serve' else f' --run-dir {args.run_dir}'}")
    return 0
