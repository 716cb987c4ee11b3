"""The native ONNX Runtime library of the mosaic ops: where it lives, and how it is built.

Every op folder has an `ort_kernel.h` (its CPU kernel); `ort_library.cc` registers them all in the
"mosaic" domain. A session that registers the library runs these kernels, a few nodes per layer;
one that does not inlines the ops' ONNX function bodies (~100 small nodes per layer), so the
library is an accelerator, never a requirement.

Building needs a C++ compiler and ONNX Runtime's C++ API headers, which no PyPI wheel ships.
`mosaicrt ort-ops build` takes them from --headers DIR, or fetches Debian's `libonnxruntime-dev`
package (headers only, API HEADERS_API) from the Debian archive with apt into the cache; they are
never part of this package. The library is compiled for this machine's CPU (-march=native) into
$MOSAICRT_CACHE (default ~/.cache/mosaicrt)/ort-ops/KEY/, KEY a hash of the sources, the flags, the
CPU's features and the headers, so a changed source or another machine gets its own build. The
kernels' vectors follow the CPU: 16 fp32 lanes with AVX-512, 8 with AVX2 (and F16C), else 4 in
GCC's generic vector code (SSE, NEON). A build for a narrower target than this CPU
(march="x86-64-v3": AVX2; "x86-64-v2": generic) runs those other paths here, for tests and
side-by-side benchmarks.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from mosaicrt.errors import InputError

OPS_DIR = Path(__file__).parent
SOURCES = ("ort_library.cc", "ort_common.h", "ort_simd.h", "associative_memory/ort_kernel.h",
           "gated_key_scan/ort_kernel.h", "ort_layer_memories.h", "ort_swiglu.h",
           "ort_row_scan.h", "ort_row_matmul.h")  # fmt: skip
FLAGS = ("-std=c++17", "-O3", "-ffast-math", "-fopenmp-simd", "-fPIC", "-fvisibility=hidden")
# Linked in a second step without -ffast-math: with it the linker adds crtfastmath, whose
# constructor would turn on flush-to-zero for the whole process that loads the library.
LINK = ("-shared",)
LIBS = ("-lmvec", "-lm")  # glibc's vector math (the softmax's exp) and libm
LIBRARY_NAME = "libmosaic_ort.so"
# The session config entry ("1") under which the library's AssociativeMemory kernel also writes
# each step's new pairs into its fp32/fp16 stores, in place (ort_library.cc): for a runtime that
# binds the stores by address and then writes no pairs itself.
APPEND_PAIRS = "mosaic.append_pairs"
HEADER = "onnxruntime_cxx_api.h"
HEADERS_PACKAGE = "libonnxruntime-dev"  # Debian 13's: ONNX Runtime 1.21 headers
HEADERS_API = 21  # the library then loads into ONNX Runtime >= 1.21
DEBIAN_SUITE = "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main"  # noqa: E501


def cache_dir() -> Path:
    return Path(os.environ.get("MOSAICRT_CACHE") or Path.home() / ".cache" / "mosaicrt") / "ort-ops"


def cpu_features() -> str:
    """What -march=native depends on: the architecture and the CPU's feature flags."""
    flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line.split(":", 1)[1].strip()
                break
    return f"{platform.machine()} {flags}"


# The retrieval kernel's vector paths (ort_simd.h), widest first: the -march target that selects
# each on an x86-64 CPU that has the flags it needs (AVX-512's: this CPU's own build).
VECTOR_PATHS = {
    "avx512": ("native", {"avx512f"}),
    "avx2": ("x86-64-v3", {"avx2", "f16c", "fma"}),
    "generic": ("x86-64-v2", {"sse4_2"}),  # GCC's generic vectors, scalar widening loads
}
VECTOR_LANES = {"avx512": 16, "avx2": 8, "generic": 4}  # fp32 lanes of each path's vectors


def cpu_vectors() -> str:
    """The vector path this machine's own build takes (VECTOR_PATHS; generic off x86-64)."""
    arch, *flags = cpu_features().split()
    for path, (_, needs) in VECTOR_PATHS.items():
        if arch == "x86_64" and needs <= set(flags):
            return path
    return "generic"


def build_key(headers: Path | None, march: str = "native") -> str:
    """A hash of everything the compiled library depends on."""
    h = hashlib.sha256()
    for name in SOURCES:
        h.update((OPS_DIR / name).read_bytes())
    h.update(" ".join(FLAGS + (f"-march={march}",) + LINK + LIBS).encode())
    h.update(cpu_features().encode())
    if headers is not None:
        h.update((headers / HEADER).read_bytes())
    return h.hexdigest()[:16]


def find_library(march: str = "native") -> Path | None:
    """The library built from these sources for this machine (or for `march`), if there is one."""
    root = cache_dir()
    if not root.is_dir():
        return None
    key = build_key(None, march)
    for candidate in sorted(root.glob(f"{key}-*/{LIBRARY_NAME}")):
        return candidate
    return None


def supported_by_runtime() -> bool:
    """The installed ONNX Runtime can load a library built against the API-HEADERS_API headers."""
    import onnxruntime

    major, minor = (int(x) for x in onnxruntime.__version__.split(".")[:2])
    return (major, minor) >= (1, HEADERS_API)


def build_library(headers: str | Path | None = None, log=print, march: str = "native") -> Path:
    """Compile the library for this machine, or for the -march target `march` (fetching the
    headers if none are given), and return its path; an existing build of the same sources is
    reused."""
    found = find_library(march)
    if found is not None:
        return found
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise InputError("building the native ONNX Runtime ops needs a C++ compiler: install g++")
    include = Path(headers) if headers else fetch_headers(log)
    if not (include / HEADER).is_file():
        raise InputError(
            f"{include} has no {HEADER}: give the folder of ONNX Runtime's C++ headers"
        )
    out = cache_dir() / f"{build_key(None, march)}-{build_key(include, march)}"
    out.mkdir(parents=True, exist_ok=True)
    target = out / LIBRARY_NAME
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        obj, lib = Path(tmp) / "ops.o", Path(tmp) / LIBRARY_NAME
        log(f"compiling {LIBRARY_NAME} for {'this CPU' if march == 'native' else march} ...")
        for command in (
            [
                compiler,
                *FLAGS,
                f"-march={march}",
                f"-I{include}",
                "-c",
                str(OPS_DIR / SOURCES[0]),
                "-o",
                str(obj),
            ],  # fmt: skip
            [compiler, *LINK, str(obj), "-o", str(lib), *LIBS],
        ):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                first = (done.stderr.strip().splitlines() or ["no output"])[0]
                raise InputError(f"compiling the native ONNX Runtime ops failed: {first}")
        os.replace(lib, target)
    return target


def fetch_headers(log=print) -> Path:
    """ONNX Runtime's C++ headers from Debian's libonnxruntime-dev package, into the cache (apt
    downloads the package only: nothing is installed on the system)."""
    dest = cache_dir() / f"headers-api{HEADERS_API}"
    include = dest / "usr" / "include" / "onnxruntime"
    if (include / HEADER).is_file():
        return include
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise InputError(
            "no ONNX Runtime C++ headers: this system has no apt to fetch Debian's "
            f"{HEADERS_PACKAGE}; give --headers DIR (a folder with {HEADER})"
        )
    log(f"fetching ONNX Runtime's C++ headers (Debian package {HEADERS_PACKAGE}) ...")
    with tempfile.TemporaryDirectory() as work:
        apt = apt_options(Path(work))
        for command in (
            ["apt-get", "-q", *apt, "update"],
            ["apt-get", "-q", *apt, "download", HEADERS_PACKAGE],
        ):  # noqa: E501
            done = subprocess.run(command, cwd=work, capture_output=True, text=True)
            if done.returncode != 0:
                reason = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise InputError(
                    f"fetching {HEADERS_PACKAGE} failed ({reason}): give --headers DIR instead"
                )
        deb = next(Path(work).glob(f"{HEADERS_PACKAGE}_*.deb"))
        unpacked = Path(work) / "unpacked"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(str(unpacked), dest)
    return include


def apt_options(work: Path) -> list[str]:
    """apt options that read one private source list and keep every file under `work`."""
    (work / "lists" / "partial").mkdir(parents=True)
    (work / "archives" / "partial").mkdir(parents=True)
    (work / "sources.list").write_text(DEBIAN_SUITE + "\n")
    settings = {
        "Dir::Etc::SourceList": work / "sources.list",
        "Dir::Etc::SourceParts": "/dev/null",
        "Dir::State::Lists": work / "lists",
        "Dir::Cache::Archives": work / "archives",
        "Dir::State::status": "/dev/null",
        "Debug::NoLocking": "1",
        "APT::Sandbox::User": "root" if os.geteuid() == 0 else os.environ.get("USER", "root"),
    }
    return [arg for key, value in settings.items() for arg in ("-o", f"{key}={value}")]
