"""`mosaicrt serve REPO`: tritonserver on 127.0.0.1 for a model repository, until Ctrl-C.

A model process (stub) that dies makes the server restart (the model is not ready meanwhile), up
to --restarts times; past that, serve stops and exits 1 with the reason. Ctrl-C or SIGTERM ends
the requests in flight with an error response and stops the server.
"""

from __future__ import annotations

import argparse
import sys

from mosaicrt.argtypes import nonneg_int, port


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("repo")
    p.add_argument("--http-port", type=port, default=8000)
    p.add_argument("--grpc-port", type=port, default=8001)
    p.add_argument("--metrics-port", type=port, default=8002)
    p.add_argument("--log-verbose", type=nonneg_int, default=0, help="tritonserver's log level")
    p.add_argument(
        "--restarts", type=nonneg_int, default=3, help="restarts after a model process dies"
    )


def main(args: argparse.Namespace) -> int:
    import signal
    import threading

    from mosaicrt.runtime.serving.server import TritonServer

    server = TritonServer(args.repo, args.http_port, args.grpc_port, args.metrics_port,
                          log_verbose=args.log_verbose)  # fmt: skip
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    print(
        f"tritonserver ready: HTTP {server.http_url}, gRPC {server.grpc_url}, metrics "
        f"127.0.0.1:{server.metrics_port} (log {server.log_path}); Ctrl-C stops it",
        flush=True,
    )
    restarts = 0
    while not stop.wait(1.0):
        if server.healthy():
            continue
        if server.process.poll() is not None:
            code = server.stop()
            print(f"error: tritonserver exited by itself (code {code}, log {server.log_path})",
                  file=sys.stderr)  # fmt: skip
            return 1
        if restarts == args.restarts:
            server.stop(drain_s=0)
            print(f"error: a model process died again after {restarts} restarts: stopping "
                  f"(log {server.log_path})", file=sys.stderr)  # fmt: skip
            return 1
        restarts += 1
        print(f"a model process died: restarting tritonserver ({restarts}/{args.restarts})",
              file=sys.stderr, flush=True)  # fmt: skip
        server.restart()
        print("tritonserver ready again", flush=True)
    code = server.stop()
    print(f"tritonserver stopped (exit code {code})")
    return 0 if code == 0 else 1
