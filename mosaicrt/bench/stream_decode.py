"""Per-token decode time of the reference's streaming decoder vs context length, batch 1.

The STM-only model keeps constant state, so its step time should not grow with context; with the
LTM, each step reads the valid part of a store that grows by one pair per token.

    python -m mosaicrt.bench.stream_decode --json bench/results/stream_decode_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from mosaicrt.bench.machine import machine_info
from mosaicrt.model import preset, random_model


@torch.inference_mode()
def decode_times(model, context: int, steps: int, warmup: int, chunk: int) -> list[float]:
    """Prefill `context` random tokens, then time `steps` single-token steps (seconds each)."""
    gen = torch.Generator().manual_seed(0)
    state = model.new_state(1, context + warmup + steps + 1)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=gen)
    for start in range(0, context, chunk):
        model.step(ids[:, start:start + chunk], state, last_only=True)
    token = torch.randint(0, model.config.vocab_size, (1, 1), generator=gen)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        logits = model.step(token, state, last_only=True)
        token = logits.argmax(-1, keepdim=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mini")
    parser.add_argument("--contexts", default="256,1024,4096,16384")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = []
    for use_ltm in (False, True):
        config = preset(args.preset).replace(use_ltm=use_ltm)
        model = random_model(config, seed=0)
        for context in tqdm(contexts, desc=f"use_ltm={use_ltm}"):
            times = decode_times(model, context, args.steps, args.warmup, args.prefill_chunk)
            rows.append({"use_ltm": use_ltm, "context": context,
                         "tpot_ms_p50": 1e3 * statistics.median(times),
                         "tpot_ms_mean": 1e3 * statistics.fmean(times),
                         "tpot_ms_min": 1e3 * min(times)})
            tqdm.write(f"use_ltm={use_ltm!s:5} context={context:6d} "
                  f"p50 {rows[-1]['tpot_ms_p50']:7.2f} ms  mean {rows[-1]['tpot_ms_mean']:7.2f} ms")
    result = {"benchmark": "stream_decode", "backend": "torch eager (reference)", "batch": 1,
              "preset": args.preset, "config": preset(args.preset).to_dict(),
              "steps": args.steps, "warmup": args.warmup, "machine": machine_info(), "rows": rows}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
