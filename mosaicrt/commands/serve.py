"""`mosaicrt serve REPO`: tritonserver on 127.0.0.1 for a model repository, until Ctrl-C."""

from __future__ import annotations

import argparse

from mosaicrt.argtypes import port


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo")
    p.add_argument("--http-port", type=port, default=8000)
    p.add_argument("--grpc-port", type=port, default=8001)
    p.add_argument("--metrics-port", type=port, default=8002)


def main(args: argparse.Namespace) -> int:
    import signal
    import threading

    from mosaicrt.runtime.serving.server import TritonServer

    server = TritonServer(args.repo, args.http_port, args.grpc_port, args.metrics_port)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    print(
        f"tritonserver ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics "
        f"127.0.0.1:{server.metrics_port} (log {server.log_path}); Ctrl-C stops it",
        flush=True,
    )
    while not stop.is_set() and server.process.poll() is None:
        stop.wait(1.0)
    code = server.stop()
    print(f"tritonserver stopped (exit code {code})")
    return 0 if code == 0 else 1
