"""The trained demo model that ships in the package: it loads, writes readable text, and recalls a
fact from beyond its short-term window through ONNX Runtime."""

import json

import pytest

from mosaicrt.model import load_model, preset
from mosaicrt.model.checkpoint import DEMO_DIR

RECALL_FLOOR = 0.9  # 40 held-out episodes at 1k tokens; the full measurement is in the README


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from mosaicrt.cli import main

    out = tmp_path_factory.mktemp("demo") / "ckpt"
    assert main(["init", str(out), "--preset", "demo"]) == 0
    return out


def test_the_packaged_demo_model_loads(demo):
    size = sum(f.stat().st_size for f in DEMO_DIR.iterdir())
    assert size < 8 * 2**20  # fp16 safetensors and its config
    config = json.loads((demo / "config.json").read_text())
    assert config | {"torch_dtype": "float32"} == preset("demo").to_dict()
    assert config["torch_dtype"] == "float16"
    model = load_model(demo)
    assert model.config.vocab_size == 258 and model.config.use_ltm


def test_demo_writes_printable_text(cli, demo):
    """The README's first command (sampled, seeded) and greedy decoding."""
    sampled = ["--temperature", 0.8, "--top-p", 0.95, "--seed", 3]
    for flags in (sampled, []):
        result = cli("generate", demo, "--prompt", "def ", "--max-new-tokens", 200, *flags)
        assert result.returncode == 0, result.stderr
        text = result.stdout[len("def ") :]
        printable = sum(c.isprintable() or c in "\n\t" for c in text)
        assert len(text) >= 100 and printable >= 0.95 * len(text), text


def test_demo_recalls_through_onnxruntime(demo, tmp_path):
    pytest.importorskip("onnxruntime", reason="needs the [onnx] extra")
    from mosaicrt.eval.recall import run_recall
    from mosaicrt.export.artifact import export_artifact
    from mosaicrt.runtime.ort_backend import OrtBackend

    backend = OrtBackend(export_artifact(demo, tmp_path / "onnx", max_context=1024))
    result = run_recall(backend, 1024, 40, seed=7)
    assert result.accuracy >= RECALL_FLOOR, result.answers
