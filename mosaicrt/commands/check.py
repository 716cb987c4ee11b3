"""`mosaicrt check ARTIFACT_DIR`: the artifact's backends against the torch reference.

An fp artifact must match the reference output for output within --atol/--rtol. A quantized one
cannot, so it is measured instead: logit error, top-1 agreement and KL divergence against the fp32
checkpoint over held-out text, and it passes when the top-1 agreement reaches --min-top1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mosaicrt.argtypes import nonneg_float, positive_int, probability
from mosaicrt.errors import InputError


def add_cli_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("artifact")
    p.add_argument(
        "--checkpoint", help="the source checkpoint (default: the one recorded at export)"
    )
    p.add_argument("--engine", help="also run this TensorRT engine (built from the artifact)")
    p.add_argument("--atol", type=nonneg_float, default=1e-4)
    p.add_argument("--rtol", type=nonneg_float, default=1e-3)
    quant = p.add_argument_group("quantized artifacts")
    quant.add_argument(
        "--min-top1",
        type=probability,
        default=0.9,
        help="least share of positions whose most likely next token equals the fp32 reference's",
    )
    quant.add_argument(
        "--text", help="text file to compare on (default: the built-in held-out text)"
    )
    quant.add_argument(
        "--text-bytes", type=positive_int, default=8192, help="bytes of the text to use"
    )
    quant.add_argument("--context", type=positive_int, default=1024, help="tokens per window")


def main(args: argparse.Namespace) -> int:
    from mosaicrt.export.artifact import quantization_label, read_manifest

    manifest, _ = read_manifest(args.artifact)
    checkpoint = args.checkpoint or manifest.get("source_checkpoint")
    if not checkpoint or not Path(checkpoint).is_dir():
        raise InputError(
            f"the torch reference needs the checkpoint {args.artifact} was exported "
            f"from ({checkpoint or 'not recorded'} is not there): pass --checkpoint"
        )
    if quantization_label(manifest):
        return check_quantized(args, manifest, checkpoint)
    from mosaicrt.runtime.check import run_check

    passed = run_check(args.artifact, checkpoint, args.atol, args.rtol, args.engine)
    against = "onnxruntime and tensorrt" if args.engine else "onnxruntime"
    print(
        f"check {'PASSED' if passed else 'FAILED'}: {against} vs torch reference "
        f"(atol {args.atol}, rtol {args.rtol})"
    )
    return 0 if passed else 1


def check_quantized(args: argparse.Namespace, manifest: dict, checkpoint: str) -> int:
    """The quantized artifact against the fp32 checkpoint on text: 0 when top-1 agreement holds."""
    from mosaicrt.eval.compare import compare_logits
    from mosaicrt.export.artifact import quantization_label
    from mosaicrt.runtime.ort_backend import OrtBackend
    from mosaicrt.runtime.tokenizer import load_tokenizer
    from mosaicrt.runtime.torch_backend import TorchBackend

    if args.engine:
        raise InputError("a quantized artifact has no TensorRT engine to check: drop --engine")
    if args.text:
        if not Path(args.text).is_file():
            raise InputError(f"--text {args.text} is not a file: give a text file")
        text = Path(args.text).read_bytes()
    else:
        from mosaicrt.train.corpus import load_corpus

        text = load_corpus("heldout")
    text = text[: args.text_bytes].decode("utf-8", errors="ignore")
    candidate = OrtBackend(args.artifact, device="cpu")
    reference = TorchBackend(checkpoint, device="cpu", dtype="float32")
    tokenizer = load_tokenizer(checkpoint, reference.config.vocab_size)
    context = min(args.context, candidate.max_context)
    report = compare_logits(reference, candidate, tokenizer, text, context)
    report["quantization"] = manifest["quantization"]
    report["stores"] = manifest["state_dtype"]["stores"]
    print(json.dumps(report, indent=2))
    passed = report["top1_agreement"] >= args.min_top1
    print(
        f"check {'PASSED' if passed else 'FAILED'}: {quantization_label(manifest)} "
        f"onnxruntime vs fp32 torch reference over {report['positions']} positions: top-1 "
        f"agreement {report['top1_agreement']:.4f} (floor {args.min_top1}), KL "
        f"{report['kl_mean']:.2e} nats, max logit error {report['logit_abs_error_max']:.3g}"
    )
    return 0 if passed else 1
