"""The `mosaicrt` command line: in this process through cli.main (as the user's arguments reach
it), and once as a real subprocess through the installed entry point."""

import json
import os
import shutil

import numpy as np
import oracle
import pytest
from helpers import mosaicrt

ATOL = 1e-4  # CLI logits (fp32) vs the float64 oracle


def ok(result):
    assert result.returncode == 0, result.stderr
    return result


def expect_error(cli, args, pattern):
    """One line on stderr, starting with `error:`, naming the problem; exit code 2."""
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("error: ") and pattern in lines[0], lines[0]
    return result


def test_score_and_generate_match_the_oracle(cli, oracle_ckpt, tmp_path):
    config, _ = oracle.load_checkpoint(oracle_ckpt)
    rng = np.random.default_rng(5)
    T = 2 * config["stm_window"] + config["ltm_delay"] + 4  # T > h, T > m
    ids = rng.integers(0, config["vocab_size"], (2, T))
    np.save(tmp_path / "ids.npy", ids)
    ok(cli("score", oracle_ckpt, "--backend", "torch", "--input", tmp_path / "ids.npy",
           "--output", tmp_path / "logits.npy", "--prefill-chunk", 5))  # fmt: skip
    logits = np.load(tmp_path / "logits.npy")
    assert logits.dtype == np.float32 and logits.shape == (2, T, config["vocab_size"])
    for row in range(2):
        assert np.abs(logits[row] - oracle.logits(oracle_ckpt, ids[row].tolist())).max() <= ATOL

    prompts = [rng.integers(0, config["vocab_size"], n).tolist() for n in (3, 11, 17)]
    (tmp_path / "prompts.jsonl").write_text(
        "".join(json.dumps({"input_ids": p}) + "\n" for p in prompts)
    )
    ok(cli("generate", oracle_ckpt, "--backend", "torch", "--input", tmp_path / "prompts.jsonl",
           "--max-new-tokens", 8, "--greedy", "--output", tmp_path / "out.jsonl"))  # fmt: skip
    outputs = [
        json.loads(line)["output_ids"] for line in (tmp_path / "out.jsonl").read_text().splitlines()
    ]
    for prompt, got in zip(prompts, outputs):
        assert got == oracle.greedy(oracle_ckpt, prompt, 8)


def test_the_entry_point_runs_as_a_program(tiny_ckpt):
    """A real process: text generation; a bad input gets one line and exit code 2, with the
    traceback before it under --debug."""
    proc = mosaicrt("generate", tiny_ckpt, "--prompt", "Hello", "--max-new-tokens", 5)
    assert proc.returncode == 0 and proc.stdout.startswith("Hello"), proc.stderr
    proc = mosaicrt("--debug", "generate", tiny_ckpt, "--prompt", "")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.endswith("error: --prompt is empty: give some text\n")


def test_init_inspect_and_text_generation(cli, tmp_path):
    ok(cli("init", tmp_path / "m", "--preset", "tiny", "--seed", 1, "--dtype", "bf16"))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    umask = os.umask(0o022)
    os.umask(umask)  # outputs are written beside and renamed, with the modes open() would give
    assert (tmp_path / "m").stat().st_mode & 0o777 == 0o777 & ~umask
    for f in (tmp_path / "m").iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    report = json.loads(
        ok(cli("inspect", tmp_path / "m", "--max-context", 1000, "--max-batch", 2, "--json")).stdout
    )
    plan = report["memory_plan"]
    assert report["parameters"] == 158_352
    assert plan["ltm_bytes_per_token"] == 2 * 64 * 2 * 2  # (k, v) x width x bf16 x layers
    assert plan["state_bytes"] == 2 * plan["bytes_per_sequence"]
    assert "memory plan" in ok(cli("inspect", tmp_path / "m")).stdout
    text = ok(cli("generate", tmp_path / "m", "--prompt", "Hello", "--max-new-tokens", 5)).stdout
    assert text.startswith("Hello")
    expect_error(
        cli, ["generate", tmp_path / "m", "--input", "p.jsonl", "--prompt", "x"],
        "exactly one of --input",
    )  # fmt: skip


def test_sampling_flags_are_reproducible(cli, tiny_ckpt, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"input_ids": [1, 2, 3]}\n{"input_ids": [4]}\n')
    args = ["generate", tiny_ckpt, "--input", tmp_path / "p.jsonl", "--max-new-tokens", 10,
            "--temperature", 0.8, "--top-k", 20, "--top-p", 0.9, "--seed", 3]  # fmt: skip
    first, second = ok(cli(*args)).stdout, ok(cli(*args)).stdout
    assert first == second and len(first.splitlines()) == 2


def test_every_bad_input_gets_one_line_and_exit_2(cli, tiny_ckpt, tmp_path):
    tiny = tiny_ckpt
    np.save(tmp_path / "ok.npy", np.array([[1, 2, 3]]))
    np.save(tmp_path / "big.npy", np.array([[1, 2, 300]]))
    np.save(tmp_path / "float.npy", np.array([[1.0, 2.0]]))
    np.save(tmp_path / "long.npy", np.zeros((1, 50), dtype=np.int64))
    (tmp_path / "empty.jsonl").write_text('{"input_ids": []}\n')
    out = tmp_path / "o.npy"
    cases = [
        (["score", tiny, "--input", tmp_path / "big.npy", "--output", out],
         "token id 300 is outside [0, 258)"),
        (["score", tiny, "--input", tmp_path / "float.npy", "--output", out],
         "token ids must be integers"),
        (["score", tiny, "--input", tmp_path / "long.npy", "--output", out, "--max-context", 20],
         "exceed --max-context 20"),
        (["generate", tiny, "--input", tmp_path / "empty.jsonl"], "the prompt is empty"),
        (["generate", tiny, "--prompt", ""], "--prompt is empty"),
        (["generate", tiny, "--prompt", "a long prompt", "--max-context", 8],
         "raise --max-context"),
        (["score", tmp_path / "nowhere", "--input", tmp_path / "ok.npy", "--output", out],
         "does not exist"),
        (["init", tmp_path / "x", "--preset", "huge"], "unknown preset 'huge'"),
        (["score", tiny, "--backend", "vllm", "--input", tmp_path / "ok.npy", "--output", out],
         "unknown backend 'vllm'"),
        (["init", tiny, "--preset", "tiny"], "--force"),
    ]  # fmt: skip
    for args, pattern in cases:
        expect_error(cli, args, pattern)


@pytest.mark.slow
def test_compile_flag_decodes_the_same_tokens(cli, tiny_ckpt, tmp_path):
    """--compile runs decode steps through torch.compile: the same greedy tokens; other
    backends refuse the flag."""
    outputs = []
    for extra in ([], ["--compile"]):
        result = ok(cli("generate", tiny_ckpt, "--backend", "torch", "--prompt", "hello",
                        "--max-new-tokens", 6, "--greedy", *extra))  # fmt: skip
        outputs.append(result.stdout)
    assert outputs[0] == outputs[1] and outputs[0].strip()
    ok(cli("export", tiny_ckpt, "-o", tmp_path / "onnx", "--max-context", 64))
    expect_error(
        cli, ["generate", tmp_path / "onnx", "--prompt", "hi", "--compile"],
        "--compile applies to the torch backend only",
    )  # fmt: skip


def test_corrupt_and_mismatched_checkpoints(cli, tiny_ckpt, tmp_path):
    np.save(tmp_path / "ok.npy", np.array([[1, 2, 3]]))
    args = ["--input", tmp_path / "ok.npy", "--output", tmp_path / "o.npy"]
    bad = tmp_path / "corrupt"
    shutil.copytree(tiny_ckpt, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    expect_error(cli, ["score", bad, *args], "corrupt")
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tiny_ckpt, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["num_heads"] = 8
    config["head_dim"] = 8
    (mismatched / "config.json").write_text(json.dumps(config))
    expect_error(cli, ["score", mismatched, *args], "shape mismatch: layers.0.stm.key_gate.weight")
    config["extra"] = 1
    (mismatched / "config.json").write_text(json.dumps(config))
    expect_error(cli, ["score", mismatched, *args], "unknown keys: extra")
    (mismatched / "model.safetensors").unlink()
    del config["extra"]
    (mismatched / "config.json").write_text(json.dumps(config))
    expect_error(cli, ["score", mismatched, *args], "model.safetensors is missing")


def test_bad_lines_fail_alone(cli, tiny_ckpt, tmp_path):
    (tmp_path / "p.jsonl").write_text(
        '{"input_ids": [1, 2]}\n{"input_ids": [1, 999]}\nnot json\n{"input_ids": [3]}\n'
    )
    result = cli("generate", tiny_ckpt, "--input", tmp_path / "p.jsonl", "--max-new-tokens", 4)
    assert result.returncode == 2
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [list(x) for x in lines] == [["output_ids"], ["error"], ["error"], ["output_ids"]]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2
    assert errors[0].startswith("error: request 2: the prompt has token id 999")
    assert errors[1].startswith("error: request 3: ") and "p.jsonl line 3 is not" in errors[1]
    (tmp_path / "good.jsonl").write_text('{"input_ids": [1, 2]}\n{"input_ids": [3]}\n')
    alone = ok(cli("generate", tiny_ckpt, "--input", tmp_path / "good.jsonl",
                   "--max-new-tokens", 4))  # fmt: skip
    assert [json.loads(line) for line in alone.stdout.splitlines()] == [lines[0], lines[3]]


def test_prompt_text_goes_through_tokenizer_json(cli, tiny_ckpt, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["memory", "mosaics", "[UNK]"] + [f"w{i}" for i in range(3, 258)]  # the tiny vocab
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    ckpt = tmp_path / "m"
    shutil.copytree(tiny_ckpt, ckpt)
    tokenizer.save(str(ckpt / "tokenizer.json"))
    text = ok(cli("generate", ckpt, "--prompt", "memory mosaics", "--max-new-tokens", 4)).stdout
    assert text.startswith("memory mosaics")
    generated = text[len("memory mosaics") :].split()
    assert generated and set(generated) <= set(words)  # new ids decode through the WordLevel vocab
    ok(cli("export", ckpt, "-o", tmp_path / "onnx", "--max-context", 64))
    assert (tmp_path / "onnx" / "tokenizer.json").read_text() == (
        ckpt / "tokenizer.json"
    ).read_text()
    onnx_text = ok(
        cli("generate", tmp_path / "onnx", "--prompt", "memory mosaics", "--max-new-tokens", 4)
    ).stdout
    assert onnx_text == text


@pytest.mark.parametrize("command", [["inspect"], ["ort-ops", "status"]])
def test_a_closed_stdout_ends_the_command_quietly(tiny_ckpt, command):
    """`mosaicrt ... | head -0`: the reader is gone before the first line is written. The command
    stops with a nonzero code and says nothing on stderr (rich's tables exit 1 as rich does;
    plain prints 141, 128 + SIGPIPE, as Unix tools do)."""
    import subprocess
    import sys

    args = [*command, str(tiny_ckpt)] if command == ["inspect"] else command
    proc = subprocess.Popen([sys.executable, "-m", "mosaicrt.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # before the interpreter has even imported mosaicrt
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (1, 141) and stderr == ""
