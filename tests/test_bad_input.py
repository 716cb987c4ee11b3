"""Every bad input the command line can get: one line that starts with `error:`, exit code 2, and
no file changed (inputs, outputs and everything beside them), run in this process through
cli.main. The table is built below from a set of broken inputs made once per module."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mosaicrt.errors import MosaicError
from mosaicrt.runtime.files import parse_prompt, read_prompts, read_token_array

pytest.importorskip("onnxruntime", reason="the table covers ONNX artifacts ([onnx] extra)")
FIXTURE_SCOPE = HealthCheck.function_scoped_fixture  # tmp_path is only written, never read back


def trt_base(model, r) -> list:
    return ["triton-export", model, "-o", r / "repo"]


def write(path: Path, data) -> Path:
    if isinstance(data, np.ndarray):
        np.save(path, data)
    else:
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


@pytest.fixture(scope="module")
def inputs(tiny_ckpt, tmp_path_factory):
    """A directory of good and broken models, token arrays, prompt files and outputs."""
    from mosaicrt.export.artifact import export_artifact
    from mosaicrt.model import preset, random_model, save_checkpoint

    root = tmp_path_factory.mktemp("bad")
    ck = shutil.copytree(tiny_ckpt, root / "ck")
    art = export_artifact(ck, root / "art", max_context=64)

    def model_copy(name, source=ck):
        return shutil.copytree(source, root / name)

    def edit_config(model_dir, **changes):
        data = json.loads((model_dir / "config.json").read_text())
        data.update(changes)
        (model_dir / "config.json").write_text(json.dumps(data))
        return model_dir

    edit_config(model_copy("cfg_unknown"), extra=1)
    edit_config(model_copy("cfg_heads0"), num_heads=0)
    edit_config(model_copy("cfg_dtype"), torch_dtype="float64")
    edit_config(model_copy("cfg_vocab_str"), vocab_size="258")
    edit_config(model_copy("cfg_bos"), bos_token_id=999)
    edit_config(model_copy("cfg_mismatch"), num_heads=8, head_dim=8)
    (model_copy("cfg_badjson") / "config.json").write_text("{not json")
    (model_copy("cfg_list") / "config.json").write_text("[1, 2]")
    (model_copy("cfg_missing") / "config.json").unlink()
    (model_copy("st_missing") / "model.safetensors").unlink()
    (model_copy("st_corrupt") / "model.safetensors").write_bytes(b"\0" * 64)
    (model_copy("st_text") / "model.safetensors").write_text("hello")
    for name, value in (("nan", float("nan")), ("inf", float("inf"))):
        model = random_model(preset("tiny"))
        model.layers[1].ffn.up_proj.weight.data[3, 4] = value
        save_checkpoint(model, root / f"w_{name}")
    export_artifact(ck, root / "art_nan_src", max_context=64)
    nan_art = shutil.copytree(art, root / "art_nan")
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(nan_art / "model.onnx"))
    weight = next(t for t in graph.graph.initializer if t.name == "lm_head.weight_t")
    array = numpy_helper.to_array(weight).copy()
    array[0, 0] = np.nan
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    onnx.save(graph, str(nan_art / "model.onnx"))
    (model_copy("art_trunc", art) / "model.onnx").write_bytes(
        (art / "model.onnx").read_bytes()[:5000]
    )
    (model_copy("art_noonnx", art) / "model.onnx").unlink()
    (model_copy("art_nomanifest", art) / "manifest.json").unlink()
    (model_copy("art_badmanifest", art) / "manifest.json").write_text("{")
    for name, key, value in (
        ("art_version", "mosaicrt_version", "0.0.1"),
        ("art_format", "format", "other"),
        ("art_opset", "onnx_opset", 7),
    ):
        d = model_copy(name, art)
        manifest = json.loads((d / "manifest.json").read_text())
        manifest[key] = value
        (d / "manifest.json").write_text(json.dumps(manifest))
    edit_config(model_copy("art_cfg_heads", art), num_heads=2, head_dim=32)
    edit_config(model_copy("art_cfg_vocab", art), vocab_size=300)
    edit_config(model_copy("art_cfg_layers", art), num_layers=3)
    mini = root / "mini_cfg"  # a model without a byte vocabulary (for eval)
    byteless = preset("tiny").replace(vocab_size=200, bos_token_id=1, eos_token_id=2)
    save_checkpoint(random_model(byteless), mini)

    arrays = {
        "ok.npy": np.array([[1, 2, 3, 4]]),
        "float.npy": np.array([[1.0, 2.0]]),
        "bool.npy": np.array([[True, False]]),
        "vec.npy": np.array([1, 2, 3]),
        "cube.npy": np.zeros((1, 2, 3), dtype=np.int64),
        "b0.npy": np.zeros((0, 5), dtype=np.int64),
        "t0.npy": np.zeros((2, 0), dtype=np.int64),
        "big.npy": np.array([[1, 300]]),
        "neg.npy": np.array([[-1, 3]]),
        "u64.npy": np.array([[1, 2**63 + 5]], dtype=np.uint64),
        "long.npy": np.zeros((1, 100), dtype=np.int64),
        "obj.npy": np.array([[1, "x"]], dtype=object),
    }
    for name, array in arrays.items():
        if array.dtype == object:
            np.save(root / name, array, allow_pickle=True)
        else:
            write(root / name, array)
    np.savez(root / "arch.npz", ids=np.array([[1, 2]]))
    write(root / "text.npy", "not numpy at all")
    write(root / "empty.npy", b"")
    texts = {
        "p_ok.jsonl": '{"input_ids": [1, 2, 3]}\n',
        "p_empty.jsonl": "",
        "p_blank_only.jsonl": "\n",
        "p_notjson.jsonl": "hello\n",
        "p_list.jsonl": "[1, 2]\n",
        "p_nokey.jsonl": '{"ids": [1]}\n',
        "p_str.jsonl": '{"input_ids": "1 2"}\n',
        "p_float.jsonl": '{"input_ids": [1.0]}\n',
        "p_bool.jsonl": '{"input_ids": [true]}\n',
        "p_nested.jsonl": '{"input_ids": [[1]]}\n',
        "p_emptyids.jsonl": '{"input_ids": []}\n',
        "p_range.jsonl": '{"input_ids": [999]}\n',
        "p_negative.jsonl": '{"input_ids": [-4]}\n',
        "p_huge.jsonl": '{"input_ids": [1000000000000000000000]}\n',
        "p_long.jsonl": json.dumps({"input_ids": [1] * 70}) + "\n",
        "p_null.jsonl": "null\n",
        "text.txt": "plain text\n",
    }
    for name, text in texts.items():
        write(root / name, text)
    write(root / "p_latin1.jsonl", b'{"input_ids": [1]}\n\xff\xfe\n')
    (root / "a_dir").mkdir()
    (root / "dir.npy").mkdir()
    (root / "a_dir" / "keep.txt").write_text("keep")
    (root / "existing").mkdir()
    (root / "existing" / "keep.txt").write_text("keep")
    write(root / "a_file", "a file")
    ro = root / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    return root


def snapshot(root: Path) -> dict:
    """Every file under root: its bytes' hash (directories by their entries)."""
    found = {}
    for dirpath, dirs, files in os.walk(root):
        found[dirpath] = sorted(dirs + files)
        for name in files:
            path = Path(dirpath) / name
            found[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def cases(r: Path) -> list[tuple[list, str]]:
    """(arguments, what the one line must say). r is the inputs directory."""
    ck, art = r / "ck", r / "art"
    ok, out = r / "ok.npy", r / "out.npy"
    score = ["score", ck, "--input", ok, "--output", out]
    gen = ["generate", ck, "--input", r / "p_ok.jsonl", "--output", r / "out.jsonl"]
    table = []

    def add(args, pattern):
        table.append(([str(a) for a in args], pattern))

    # Numbers: finite, in range, no silent default, per command and option.
    bad_positive = ["0", "-1", "-3", "abc", "1.5", ""]
    for option in ("--max-context", "--prefill-chunk"):
        for value in bad_positive:
            add(score + [option, value], f"argument {option}")
    for option in ("--max-new-tokens", "--max-batch", "--max-context", "--prefill-chunk"):
        for value in ("0", "-1", "x"):
            add(gen + [option, value], f"argument {option}")
    for value in ("nan", "inf", "-inf", "-1", "-0.5", "abc"):
        add(gen + ["--temperature", value], "argument --temperature")
    for value in ("0", "-0.1", "1.5", "nan", "inf"):
        add(gen + ["--top-p", value], "argument --top-p")
    for value in ("-1", "x"):
        add(gen + ["--top-k", value], "argument --top-k")
    for value in ("0", "-1GiB", "12XB", "GiB", "1e9", ""):  # --state-memory: a size
        for command in (gen, score, ["inspect", ck], ["bench", "latency", ck], trt_base(ck, r)):
            add(command + ["--state-memory", value], "argument --state-memory")
    for model in (ck, art):  # a budget too small for the rows and one LTM block
        add(["generate", model, "--prompt", "hi", "--state-memory", "1KiB"],
            "cannot hold one sequence")  # fmt: skip
    add(score + ["--state-memory", "1KiB"], "cannot hold one sequence")
    add(trt_base(art, r) + ["--state-memory", "1KiB"], "cannot hold one sequence")
    for value in ("-1", str(2**64), str(2**70), "1e3"):
        add(gen + ["--seed", value], "argument --seed")
        add(["init", r / "new_ck", "--preset", "tiny", "--seed", value], "argument --seed")
    for option in ("--max-context", "--max-batch"):
        for value in ("0", "-1", "many"):
            add(["inspect", ck, option, value], f"argument {option}")
    for value in ("0", "-1", "x"):
        add(["export", ck, "-o", r / "new_art", "--max-context", value], "argument --max-context")
    add(["export", ck, "-o", r / "new_art", "--max-context", "1"], "--max-context must be >= 2")
    for option in ("--max-batch", "--max-context", "--max-chunk"):
        for value in ("0", "-2", "x"):
            add(["build", art, "-o", r / "eng", option, value], f"argument {option}")
    add(["build", art, "-o", r / "eng", "--max-chunk", "1"], "--max-chunk must be >= 2")
    add(["build", art, "-o", r / "eng", "--target", "sm90"], "unknown --target 'sm90'")
    trt = trt_base(art, r)
    for option in ("--max-batch", "--max-context", "--instances", "--prefill-chunk"):
        for value in ("0", "-1"):
            add(trt + [option, value], f"argument {option}")
    for value in ("0", "-5", "nan", "inf"):
        add(trt + ["--idle-timeout", value], "argument --idle-timeout")
    add(trt + ["--max-context", "100"], "--max-context 100 exceeds the 64 tokens")
    add(trt + ["--backend", "torch"], "is for the onnxruntime backend")
    for option in ("--http-port", "--grpc-port", "--metrics-port"):
        for value in ("0", "70000", "x"):
            add(["serve", r / "repo", option, value], f"argument {option}")
    bench = ["bench", "latency", ck, "--input-len", "4", "--output-len", "2"]
    for option in ("--batch", "--input-len", "--output-len", "--iters", "--context"):
        for value in ("0", "-1"):
            add(bench + [option, value], f"argument {option}")
    for value in ("0", "-3"):
        add(["bench", "throughput", ck, "--num-requests", value], "argument --num-requests")
    add(bench + ["--warmup", "-1"], "argument --warmup")
    compare = ["bench", "compare", ck, "--backends", "torch"]
    for value in ("abc", "-5", "0", "1,,x", ""):
        add(compare + ["--contexts", value], "argument --contexts")
    add(compare + ["--contexts", "10000000"], "at most 1048576 tokens")
    add(["bench", "compare", "--preset", "small", "--contexts", "1000000"], "this machine has")
    add(["bench", "compare", ck, "--backends", "torch,vllm", "--contexts", "16"], "vllm")
    add(["bench", "compare", ck, "--backends", ",", "--contexts", "16"], "--backends")
    add(compare + ["--steps", "0"], "argument --steps")
    add(["bench", "serve", "--preset", "huge"], "unknown preset 'huge'")
    for option in ("--clients", "--requests", "--prompt-len", "--new-tokens", "--rounds"):
        add(["bench", "serve", option, "0"], f"argument {option}")
    for option in ("--atol", "--rtol"):
        for value in ("nan", "-1", "inf", "x"):
            add(["check", art, option, value], f"argument {option}")
    ev = ["eval", "recall", ck, "--contexts", "300"]
    add(ev + ["--episodes", "0"], "argument --episodes")
    add(ev + ["--max-batch", "0"], "argument --max-batch")
    add(["eval", "recall", ck, "--contexts", "abc"], "argument --contexts")
    add(["eval", "recall", ck, "--contexts", "100,500", "--max-context", "200"],
        "exceeds --max-context 200")  # fmt: skip
    add(["eval", "recall", art, "--contexts", "1000"], "exceeds --max-context 64")
    add(["eval", "recall", ck, "--contexts", "40"], "too short for this model")
    add(["eval", "recall", r / "mini_cfg", "--contexts", "300"], "byte-level model")
    add(["eval", "ppl", r / "mini_cfg"], "byte-level model")
    add(["eval", "ppl", ck, "--context", "0"], "argument --context")
    add(["eval", "ppl", ck, "--input", r / "nope.txt"], "does not exist")
    add(["eval", "ppl", ck, "--input", r / "p_latin1.jsonl"], "is not UTF-8")
    add(["eval", "ppl", ck, "--input", r / "p_empty.jsonl"], "the text is empty")
    add(["eval", "recall", art, "--contexts", "60", "--ablate", "ltm"], "--backend torch")
    train = ["train", r / "run", "--preset", "tiny"]
    for option in ("--steps", "--batch", "--context"):
        for value in ("0", "-1"):
            add(train + [option, value], f"argument {option}")
    for value in ("0", "nan", "-1"):
        add(train + ["--lr", value], "argument --lr")
    add(train + ["--data", r / "nowhere"], "--data")
    add(["train", r / "existing", "--preset", "tiny", "--steps", "1"], "--force")
    add(["train", r / "a_file", "--preset", "tiny"], "is a file")

    # Token files.
    for name, pattern in (
        ("missing.npy", "does not exist"),
        ("a_dir", "does not exist"),
        ("float.npy", "token ids must be integers"),
        ("bool.npy", "token ids must be integers"),
        ("vec.npy", "expected [B, T]"),
        ("cube.npy", "expected [B, T]"),
        ("b0.npy", "has shape [0, 5]"),
        ("t0.npy", "has shape [2, 0]"),
        ("big.npy", "token id 300 is outside [0, 258)"),
        ("neg.npy", "token id -1 is outside [0, 258)"),
        ("u64.npy", f"token id {2**63 + 5}"),
        ("long.npy", "exceed --max-context 20"),
        ("obj.npy", "is not a .npy array"),
        ("arch.npz", "is an .npz archive"),
        ("text.npy", "is not a .npy array"),
        ("empty.npy", "is not a .npy array"),
    ):
        extra = ["--max-context", "20"] if name == "long.npy" else []
        add(["score", ck, "--input", r / name, "--output", out, *extra], pattern)
        if name != "long.npy":
            add(["score", art, "--input", r / name, "--output", out], pattern)

    # Prompt files: errors of the whole file, and of every line (the run goes on, exit 2).
    add(["generate", ck, "--input", r / "missing.jsonl"], "does not exist")
    add(["generate", ck, "--input", r / "p_empty.jsonl"], "has no prompts")
    for name, pattern in (
        ("p_blank_only.jsonl", "line 1 is blank"),
        ("p_notjson.jsonl", "line 1 is not"),
        ("p_list.jsonl", "line 1 is not"),
        ("p_nokey.jsonl", "line 1 is not"),
        ("p_str.jsonl", "line 1 is not"),
        ("p_float.jsonl", "line 1 is not"),
        ("p_bool.jsonl", "line 1 is not"),
        ("p_nested.jsonl", "line 1 is not"),
        ("p_null.jsonl", "line 1 is not"),
        ("p_emptyids.jsonl", "the prompt is empty"),
        ("p_range.jsonl", "token id 999 outside"),
        ("p_negative.jsonl", "token id -4 outside"),
        ("p_huge.jsonl", "outside [0, 258)"),
        ("p_long.jsonl", "raise --max-context"),
    ):
        for model in (ck, art):
            add(["generate", model, "--input", r / name, "--max-context", "64"], pattern)
        if name != "p_long.jsonl":  # the benchmark sizes its context to the dataset
            add(["bench", "latency", ck, "--dataset", r / name], pattern.replace("the prompt", ""))
    add(["generate", ck, "--input", r / "p_ok.jsonl", "--prompt", "x"], "exactly one of")
    add(["generate", ck], "exactly one of")
    add(["generate", ck, "--prompt", ""], "--prompt is empty")
    add(["generate", ck, "--prompt", "x" * 80, "--max-context", "40"], "raise --max-context")
    add(["generate", ck, "--prompt", "hi", "--output", r / "out.jsonl"], "--output is for")

    # Models: missing, corrupt, mismatched, non-finite, the wrong kind for the backend.
    for name, pattern in (
        ("nowhere", "does not exist"),
        ("a_file", "does not exist"),
        ("a_dir", "config.json is missing"),
        ("cfg_missing", "config.json is missing"),
        ("cfg_badjson", "is not valid JSON"),
        ("cfg_list", "must be a JSON object"),
        ("cfg_unknown", "unknown keys: extra"),
        ("cfg_heads0", "num_heads must be a positive integer"),
        ("cfg_dtype", "torch_dtype must be one of"),
        ("cfg_vocab_str", "vocab_size must be a positive integer"),
        ("cfg_bos", "bos_token_id must be null or an id in [0, 258)"),
        ("cfg_mismatch", "shape mismatch: layers.0.stm.key_gate.weight"),
        ("st_missing", "model.safetensors is missing"),
        ("st_corrupt", "is corrupt or not a safetensors file"),
        ("st_text", "is corrupt or not a safetensors file"),
        ("w_nan", "layers.1.ffn.up_proj.weight holds NaN"),
        ("w_inf", "layers.1.ffn.up_proj.weight holds inf"),
    ):
        add(["score", r / name, "--input", ok, "--output", out], pattern)
        add(["generate", r / name, "--prompt", "hi"], pattern)
        if name.startswith(("w_", "cfg_mismatch", "st_")):
            add(["export", r / name, "-o", r / "new_art"], pattern)
            add(["triton-export", r / name, "-o", r / "repo"], pattern)
            add(["inspect", r / name], pattern)
            add(["bench", "latency", r / name], pattern)
    for name, pattern in (
        ("art_nan", "lm_head.weight_t holds NaN"),
        ("art_trunc", "cannot be read"),
        ("art_noonnx", "not an ONNX artifact"),
        ("art_nomanifest", "has model.onnx but no manifest.json"),
        ("art_badmanifest", "is not valid JSON"),
        ("art_version", "was exported by mosaicrt 0.0.1"),
        ("art_format", "is not a mosaicrt ONNX artifact"),
        ("art_opset", "opset 7"),
        ("art_cfg_heads", "does not match its graph"),
        ("art_cfg_vocab", "does not match its graph"),
        ("art_cfg_layers", "graph inputs do not match"),
    ):
        add(["score", r / name, "--input", ok, "--output", out], pattern)
        add(["generate", r / name, "--prompt", "hi"], pattern)
        add(["triton-export", r / name, "-o", r / "repo"], pattern)
    add(["inspect", r / "art_nan"], "lm_head.weight_t holds NaN")
    add(["check", r / "art_nan"], "lm_head.weight_t holds NaN")
    add(["check", art, "--checkpoint", r / "w_nan"], "holds NaN")
    add(["check", art, "--checkpoint", r / "cfg_mismatch"], "shape mismatch")
    add(["check", art, "--checkpoint", r / "nowhere"], "pass --checkpoint")
    add(["check", ck], "not an ONNX artifact")
    add(score[:2] + ["--backend", "vllm"] + score[2:], "unknown backend 'vllm'")
    add(score[:2] + ["--backend", "onnxruntime"] + score[2:], "is a checkpoint, not an ONNX")
    add(["score", art, "--backend", "torch", "--input", ok, "--output", out], "is an ONNX artifact")
    add(["score", art, "--backend", "tensorrt", "--input", ok, "--output", out],
        "build an engine from it")  # fmt: skip
    add(score + ["--kernels", "cuda"], "unknown --kernels 'cuda'")
    add(["score", art, "--kernels", "triton", "--input", ok, "--output", out],
        "applies to the torch backend only")  # fmt: skip
    add(["generate", art, "--prompt", "hi", "--compile"], "--compile applies to the torch")
    add(["generate", art, "--prompt", "hi", "--dtype", "bf16"], "--dtype applies to the torch")
    add(["generate", ck, "--prompt", "hi", "--dtype", "fp8"], "unknown dtype 'fp8'")
    add(["generate", ck, "--prompt", "hi", "--device", "cuda"], "--device cuda")
    add(["init", r / "x", "--preset", "huge"], "unknown preset 'huge'")
    add(["init", r / "x", "--preset", "tiny", "--dtype", "int8"], "unknown dtype 'int8'")
    add(["export", ck, "-o", r / "x", "--dtype", "int4"], "unknown dtype 'int4'")
    add(["build", ck, "-o", r / "eng"], "not an ONNX artifact")
    add(["triton-export", r / "a_dir", "-o", r / "repo"], "is neither an ONNX artifact")
    add(["serve", r / "a_dir"], "is not a mosaicrt model repository")

    # Outputs: checked before any work, never an input, never a half-written file.
    add(["score", ck, "--input", ok, "--output", ok], "would overwrite the input")
    add(["score", ck, "--input", ok, "--output", r / "dir.npy"], "is a directory")
    add(["score", ck, "--input", ok, "--output", r / "nodir" / "o.npy"], "does not exist")
    if os.geteuid() != 0:  # root writes anywhere: there is no permission to lack
        add(["score", ck, "--input", ok, "--output", r / "readonly" / "o.npy"], "no permission")
        add(gen[:-1] + [r / "readonly" / "o.jsonl"], "no permission")
        add(["export", ck, "-o", r / "readonly" / "art"], "no permission")
    add(["score", ck, "--input", ok, "--output", ck / "logits.npy"], "would overwrite the input")
    add(["generate", ck, "--input", r / "p_ok.jsonl", "--output", r / "p_ok.jsonl"],
        "would overwrite the input")  # fmt: skip
    add(gen[:-1] + [r / "a_dir"], "is a directory")
    add(gen[:-1] + [r / "nodir" / "o.jsonl"], "does not exist")
    add(["export", ck, "-o", ck], "would overwrite the input")
    add(["export", ck, "-o", ck / "sub"], "would overwrite the input")
    add(["export", ck, "-o", r / "existing"], "pass --force")
    add(["export", ck, "-o", art], "pass --force")
    add(["export", ck, "-o", r / "a_file"], "is a file")
    add(["export", ck, "-o", r / "nodir" / "art"], "does not exist")
    add(["build", art, "-o", art], "would overwrite the input")
    add(["build", art, "-o", r / "existing"], "pass --force")
    add(["build", art, "-o", r / "a_file"], "is a file")
    add(["triton-export", art, "-o", art], "would overwrite the input")
    add(["triton-export", art, "-o", art / "repo"], "would overwrite the input")
    add(["triton-export", art, "-o", r / "existing"], "pass --force")
    add(["triton-export", art, "-o", r / "a_file"], "is a file")
    add(["init", r / "existing", "--preset", "tiny"], "pass --force")
    add(["init", r / "a_file", "--preset", "tiny"], "is a file")
    add(["init", ck, "--preset", "tiny"], "--force")
    add(bench + ["--json", r / "a_dir"], "is a directory")
    add(bench + ["--json", r / "nodir" / "r.json"], "does not exist")
    add(compare + ["--contexts", "16", "--json", r / "a_dir"], "is a directory")
    add(ev + ["--json", r / "a_dir"], "is a directory")
    return table


def test_every_bad_input_is_one_line_exit_2_and_changes_no_file(cli, inputs):
    table = cases(inputs)
    assert len(table) >= 220
    before = snapshot(inputs)
    failures = []
    for args, pattern in table:
        result = cli(*args)
        lines = result.stderr.strip().splitlines()
        good = (
            result.returncode == 2
            and lines
            and all(line.startswith("error:") for line in lines)
            and any(pattern in line for line in lines)
            and "Traceback" not in result.stderr
        )
        # A file of prompts with a bad line runs the others: one error line per bad line.
        single = len(lines) == 1 or (args[0] == "generate" and "--input" in args)
        if args[0] == "generate" and "--prompt" in args:  # text prints from its first token on
            good = good and result.stdout == ""
        if not (good and single):
            failures.append(f"{' '.join(args[:6])} ...: rc {result.returncode}: {lines[-3:]}")
        after = snapshot(inputs)
        if after != before:
            changed = sorted(k for k in set(after) | set(before) if after.get(k) != before.get(k))
            failures.append(f"{' '.join(args[:6])} ...: changed {changed[:3]}")
            before = after
    assert not failures, "\n".join(failures[:20]) + f"\n({len(failures)} in all)"


def test_a_bad_line_keeps_its_place_and_the_good_ones_their_tokens(cli, inputs, tmp_path):
    """Blank, non-UTF-8 and broken lines each get an {"error": ...} line in their place; the
    good lines get the tokens they get alone, greedy and sampled (seed + line number)."""
    lines = [b'{"input_ids": [5, 6, 7]}', b"", b"\xff\xfe", b"nope", b'{"input_ids": [9]}']
    mixed = write(tmp_path / "mixed.jsonl", b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")
    for extra in ([], ["--temperature", "0.9", "--seed", "7"]):
        result = cli("generate", inputs / "ck", "--input", mixed, "--max-new-tokens", 5, *extra)
        assert result.returncode == 2
        out = [json.loads(line) for line in result.stdout.splitlines()]
        assert [list(o) for o in out] == [["output_ids"], ["error"], ["error"], ["error"],
                                          ["output_ids"]]  # fmt: skip
        assert "line 2 is blank" in out[1]["error"] and "not UTF-8" in out[2]["error"]
        for number in (1, 5):  # the same line alone, at the same line number
            alone = [b"{}"] * (number - 1) + [lines[number - 1]]
            single = write(tmp_path / f"alone{number}.jsonl", b"\n".join(alone) + b"\n")
            got = cli("generate", inputs / "ck", "--input", single, "--max-new-tokens", 5, *extra)
            assert json.loads(got.stdout.splitlines()[-1]) == out[number - 1]


@settings(max_examples=150, deadline=None, suppress_health_check=[FIXTURE_SCOPE])
@given(data=st.binary(max_size=300))
def test_readers_take_any_bytes(tmp_path, data):
    path = write(tmp_path / "f.bin", data)
    for reader in (read_token_array, read_prompts):
        try:
            reader(str(path))
        except MosaicError:
            pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(value=json_values | st.fixed_dictionaries({"input_ids": json_values}))
def test_prompt_lines_take_any_json(value):
    line = json.dumps(value).encode()
    ids = parse_prompt(line, "line 1")
    assert isinstance(ids, MosaicError) or (
        isinstance(ids, list) and all(type(i) is int for i in ids)
    )


arrays = st.sampled_from(["int8", "int64", "uint64", "float32", "bool", "float16"]).flatmap(
    lambda dtype: st.lists(st.integers(0, 3), min_size=0, max_size=3).map(
        lambda shape: np.random.default_rng(len(shape)).integers(-5, 5, shape).astype(dtype)
    )
)


@settings(max_examples=100, deadline=None, suppress_health_check=[FIXTURE_SCOPE])
@given(array=arrays)
def test_token_arrays_of_any_dtype_and_shape(tmp_path, array):
    np.save(tmp_path / "a.npy", array)
    try:
        ids = read_token_array(str(tmp_path / "a.npy"))
    except MosaicError:
        return
    assert ids.dtype == np.int64 and ids.ndim == 2 and min(ids.shape) >= 1
