import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run under the Triton interpreter (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))  # tests/oracle.py

import oracle  # noqa: E402

# Oracle checkpoints: (name, writer kwargs). Windows and delays are short so T > h and T > m.
ORACLE_CONFIGS = {
    "ltm": dict(layers=2, heads=2, head_dim=16, window=6, delay=3, use_ltm=True, seed=1),
    "stm_only": dict(layers=3, heads=2, head_dim=8, window=5, delay=3, use_ltm=False, seed=2),
    "wide": dict(d=48, layers=2, heads=4, head_dim=12, window=9, delay=5, use_ltm=True, seed=3),
}


@pytest.fixture(scope="session", params=list(ORACLE_CONFIGS))
def oracle_ckpt(request, tmp_path_factory) -> Path:
    """A random checkpoint written by the independent writer in tests/oracle.py."""
    out = tmp_path_factory.mktemp(f"oracle_{request.param}")
    return oracle.write_random_checkpoint(out, **ORACLE_CONFIGS[request.param])


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """The `tiny` preset with random weights (seed 0), as `mosaicrt init DIR --preset tiny`
    writes it. Session-wide: tests copy it before they change it."""
    from mosaicrt.model import preset, random_model, save_checkpoint

    out = tmp_path_factory.mktemp("tiny") / "ckpt"
    save_checkpoint(random_model(preset("tiny")), out)
    return out


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys):
    """Run `mosaicrt ARGS...` in this process (cli.main) and capture what it prints."""
    from mosaicrt.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()  # drop what came before
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


@pytest.fixture(scope="session", params=["functions", "native"])
def ort_ops(request) -> str:
    """Both ways ONNX Runtime runs the mosaic ops: their function bodies, and the native library
    (built for this machine on first use, as `mosaicrt ort-ops build` does)."""
    if request.param == "native":
        request.getfixturevalue("native_ort_library")
    return request.param


@pytest.fixture(scope="session", params=["functions", "native", "fused"])
def ort_ops_fp32(request) -> str:
    """The same, and for a graph with fp32 stores the third way: the native library with each
    layer's memory nodes one LayerMemories node (runtime/ort_fusion.py)."""
    if request.param != "functions":
        request.getfixturevalue("native_ort_library")
    return request.param


@pytest.fixture(scope="session")
def native_ort_library() -> Path:
    from mosaicrt.errors import InputError
    from mosaicrt.ops import ort_library

    try:
        return ort_library.build_library(log=lambda message: None)
    except InputError as exc:
        pytest.skip(f"the native ONNX Runtime ops cannot be built here: {exc}")
