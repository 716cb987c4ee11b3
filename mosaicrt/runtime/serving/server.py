"""A real `tritonserver` on 127.0.0.1 for a model repository: `mosaicrt serve` and the tests.

The binary comes from the `nvidia-pytriton` wheel (which also ships the Python backend and its
stubs) or from PATH. The Python backend's stub must run this interpreter: the server gets this
environment's bin first on PATH and its libpython's directory on LD_LIBRARY_PATH, and a backend
directory whose python/ holds links to the backend library, its utils and the stub for this
Python version.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from mosaicrt.errors import BackendError
from mosaicrt.runtime.serving.repository import DRAIN_FILE_ENV


def pytriton_root() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    return Path(pytriton.__file__).parent / "tritonserver"


def server_binary() -> Path:
    root = pytriton_root()
    if root is not None and (root / "bin" / "tritonserver").is_file():
        return root / "bin" / "tritonserver"
    found = shutil.which("tritonserver")
    if found:
        return Path(found)
    raise BackendError(
        "no tritonserver found: pip install 'mosaicrt[serve]' (the nvidia-pytriton wheel ships "
        "the server), or put NVIDIA's tritonserver on PATH"
    )


def backend_directory(where: Path) -> Path:
    """where/python/ with the Python backend and the stub for this interpreter's version."""
    root = pytriton_root()
    if root is None:
        return Path("/opt/tritonserver/backends")  # a tritonserver from PATH brings its own
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    python = where / "python"
    python.mkdir(parents=True, exist_ok=True)
    stub = "triton_python_backend_stub"
    for name, source in (
        ("libtriton_python.so", root / "backends/python/libtriton_python.so"),
        ("triton_python_backend_utils.py", root / "backends/python/triton_python_backend_utils.py"),
        (stub, root / "python_backend_stubs" / version / stub),
    ):
        if not source.exists():
            raise BackendError(f"the Triton Python backend has no {name} for Python {version}")
        if not (python / name).exists():
            (python / name).symlink_to(source)
    return where


def server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libdir = sysconfig.get_config_var("LIBDIR")
        env["LD_LIBRARY_PATH"] = libdir + (os.pathsep + env["LD_LIBRARY_PATH"]
                                           if env.get("LD_LIBRARY_PATH") else "")  # fmt: skip
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """`with TritonServer(repo) as server:` a ready server; stopped cleanly on exit.

    Everything the server writes besides the repository (its log, the Python backend's
    temporary directories, the drain flag) lives in one work directory that a clean stop
    removes. `healthy()` tells whether every model process (stub) it started is still alive:
    Triton keeps reporting a model ready after its stub died, so `mosaicrt serve` asks this."""

    def __init__(
        self,
        repo: str | Path,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        log: str | Path | None = None,
        exit_timeout_s: int = 5,
        log_verbose: int = 0,
    ) -> None:
        self.repo = Path(repo)
        if not (self.repo / "mosaicrt" / "config.pbtxt").is_file():
            raise BackendError(
                f"{repo} is not a mosaicrt model repository: create one with "
                f"`mosaicrt triton-export MODEL_DIR -o {repo}`"
            )
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.metrics_port = metrics_port or free_port()
        self.exit_timeout_s, self.log_verbose = exit_timeout_s, log_verbose
        self.given_log = Path(log) if log else None
        self.process: subprocess.Popen | None = None
        self.stubs: dict[int, str] = {}  # stub pid -> its shared-memory region

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, timeout_s: float = 120.0) -> TritonServer:
        self.workdir = Path(tempfile.mkdtemp(prefix="mosaicrt-triton-"))
        (self.workdir / "tmp").mkdir()
        self.log_path = self.given_log or self.workdir / "server.log"
        command = [
            str(server_binary()),
            f"--model-repository={self.repo}",
            f"--backend-directory={backend_directory(self.workdir / 'backends')}",
            "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.metrics_port}",
            f"--exit-timeout-secs={self.exit_timeout_s}", f"--log-verbose={self.log_verbose}",
        ]  # fmt: skip
        env = server_env() | {"TMPDIR": str(self.workdir / "tmp"),
                              DRAIN_FILE_ENV: str(self.drain_file)}  # fmt: skip
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                error = self.last_error()
                self.stop()
                raise BackendError(
                    f"tritonserver exited with code {self.process_code} while starting: {error} "
                    f"(log: {self.log_path})"
                )
            if self.ready():
                self.stubs = stub_processes(self.process.pid)
                return self
            time.sleep(0.25)
        self.stop()
        raise BackendError(f"tritonserver was not ready after {timeout_s:.0f} s")

    @property
    def drain_file(self) -> Path:
        return self.workdir / "drain"

    def ready(self) -> bool:
        url = f"http://{self.http_url}/v2/health/ready"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def healthy(self) -> bool:
        """The server runs, and as many model processes (stubs) as the repository's instance
        groups ask for are alive, every one seen so far among them."""
        if self.process is None or self.process.poll() is not None:
            return False
        dead = [pid for pid in self.stubs if not alive(pid)]
        self.stubs.update(stub_processes(self.process.pid))
        return not dead and sum(map(alive, self.stubs)) >= self.expected_stubs()

    def expected_stubs(self) -> int:
        """Model instances in the repository: one stub process each."""
        counts = re.findall(r"count:\s*(\d+)", "".join(
            f.read_text() for f in self.repo.glob("*/config.pbtxt")))  # fmt: skip
        return sum(map(int, counts))

    def last_error(self) -> str:
        """The model's load failure if there is one (it names the cause), else the last error."""
        lines = self.log_path.read_text().splitlines()
        for line in lines:
            if "failed to load '" in line:
                return line.strip()
        errors = [line for line in lines if "rror" in line]
        return errors[-1].strip() if errors else "no error in its log"

    def stop(self, drain_s: float = 1.0) -> int | None:
        """End the requests in flight with an error (the drain flag the models watch), then
        SIGTERM and wait; then SIGKILL the server (its stubs clean up after it); then the whole
        process group, whatever of it is left. Shared memory a dead stub left is removed, and the
        work directory with it. Returns the server's exit code."""
        if self.process is None:
            return None
        code = self.process.poll()
        if code is None:
            self.drain_file.touch()
            time.sleep(drain_s)  # error responses go out; clients close their streams
            self.process.send_signal(signal.SIGTERM)
            try:
                code = self.process.wait(self.exit_timeout_s + 5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                code = self.process.wait(10)
                time.sleep(3)  # the stubs notice and remove their shared memory
        try:  # a stub that outlived its server (seen after a clean exit too) holds its memory
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.log.close()
        for region in self.stubs.values():  # a stub killed outright leaves its region behind
            Path("/dev/shm", region).unlink(missing_ok=True)
        if code == 0 or self.given_log:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:  # keep the log of an unclean stop, and nothing else
            kept = Path(tempfile.gettempdir()) / f"mosaicrt-triton-{self.process.pid}.log"
            shutil.copy(self.log_path, kept)
            self.log_path = kept
            shutil.rmtree(self.workdir, ignore_errors=True)
        self.process_code, self.process = code, None
        return code

    def restart(self) -> TritonServer:
        self.stop(drain_s=0)
        return self.start()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def alive(pid: int) -> bool:
    """The process exists and is not a zombie waiting to be reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def stub_processes(server_pid: int) -> dict[int, str]:
    """The Python-backend stubs of a server started in its own session: pid -> the name of the
    shared-memory region it uses (its second argument)."""
    stubs = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            if os.getpgid(int(proc.name)) != server_pid or b"python_backend_stub" not in args[0]:
                continue
        except (OSError, ProcessLookupError):
            continue
        stubs[int(proc.name)] = args[2].decode().lstrip("/") if len(args) > 2 else ""
    return stubs
