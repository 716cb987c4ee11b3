"""`mosaicrt ort-ops build|status`: the native ONNX Runtime kernels of the mosaic ops for this
machine (mosaicrt.ops.ort_library). Once built, the onnxruntime backend runs them by default
(`--ort-ops auto`) in place of the ops' ONNX function bodies."""

from __future__ import annotations

import argparse
import sys


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "action", choices=("build", "status"), help="build the library, or say where it is"
    )
    p.add_argument(
        "--headers",
        metavar="DIR",
        help="ONNX Runtime's C++ API headers (a folder with onnxruntime_cxx_api.h, API >= 21); "
        "default: fetch Debian's libonnxruntime-dev package into the cache",
    )


def main(args: argparse.Namespace) -> int:
    from mosaicrt.ops import ort_library

    if args.action == "build":
        path = ort_library.build_library(args.headers, log=lambda m: print(m, file=sys.stderr))
        print(path)
        return 0
    path = ort_library.find_library()
    if path is None:
        print("not built for this machine: `mosaicrt ort-ops build` (the onnxruntime backend "
              "runs the ops' function bodies meanwhile)")  # fmt: skip
        return 1
    usable = ort_library.supported_by_runtime()
    print(path)
    vectors = ort_library.cpu_vectors()
    print(f"vectors: {vectors} ({ort_library.VECTOR_LANES[vectors]} fp32 lanes)")
    if usable:
        print("used by the onnxruntime backend on the CPU (--ort-ops auto), each layer's "
              "memories one node where the artifact has fp32 stores")  # fmt: skip
    else:
        print(f"not loadable: onnxruntime < 1.{ort_library.HEADERS_API} is installed")
    return 0 if usable else 1
