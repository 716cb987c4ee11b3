"""`mosaicrt score MODEL --input tokens.npy --output logits.npy`: logits of token arrays."""

from __future__ import annotations

import argparse
import sys

from mosaicrt.argtypes import positive_int
from mosaicrt.outputs import atomic_file, check_output_file
from mosaicrt.runtime.backends import add_run_args, open_run_backend, state_limits


def add_cli_args(p: argparse.ArgumentParser) -> None:
    add_run_args(p)
    p.add_argument("--input", required=True, help="int64 [B, T] .npy")
    p.add_argument("--output", required=True, help="float32 [B, T, V] .npy to write")
    p.add_argument("--max-context", type=positive_int, help="default: T")


def main(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from mosaicrt.runtime.files import read_token_array
    from mosaicrt.runtime.generator import RunLimits, score

    output = args.output if args.output.endswith(".npy") else args.output + ".npy"  # as np.save
    check_output_file(output, inputs=[args.input, args.model])
    ids = read_token_array(args.input)
    limits = RunLimits(
        max_context=args.max_context or max(ids.shape[1], 1),
        prefill_chunk=args.prefill_chunk,
        **state_limits(args),
    )
    backend = open_run_backend(args)
    logits = score(backend, torch.from_numpy(ids), limits)
    with atomic_file(output) as tmp, open(tmp, "wb") as fh:
        np.save(fh, logits.numpy().astype(np.float32))
    print(f"wrote {output}: float32 {list(logits.shape)}", file=sys.stderr)
    return 0
