"""The `mosaicrt` model of a Triton Inference Server repository (Python backend, decoupled).

`mosaicrt triton-export` copies this file to REPO/mosaicrt/1/model.py; it runs inside Triton's
Python-backend stub, in the environment mosaicrt is installed in. Each request streams one response
per generated token and then an empty final one. Requests of every client are decoded together by
one ServingLoop; a sequence (Triton's sequence batcher: correlation id, START, END) keeps its memory
state between requests, so a later turn costs only its new tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mosaicrt.errors import InputError, MosaicError
from mosaicrt.runtime.backends import open_backend
from mosaicrt.runtime.generator import RunLimits
from mosaicrt.runtime.sampling import SamplingParams
from mosaicrt.runtime.serving.loop import ServingLoop
from mosaicrt.runtime.serving.repository import SETTINGS


def scalar(request, name: str, default=None):
    """The first element of an optional [1] input, or default when the request has none."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise InputError(f"{name} must hold exactly one value, got {values.size}")
    return values[0].item()


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        here = Path(args["model_repository"]) / args["model_version"]
        settings = json.loads((here / SETTINGS).read_text())
        backend = open_backend(settings["backend"], here / "model", device=settings["device"])
        limits = RunLimits(
            max_batch=settings["max_batch"],
            max_context=settings["max_context"],
            prefill_chunk=settings["prefill_chunk"],
        )
        self.loop = ServingLoop(backend, limits, idle_timeout_s=settings["idle_timeout_s"])

    def execute(self, requests: list) -> None:
        for request in requests:
            self.accept(request)
        return None  # decoupled: responses go out through each request's sender

    def accept(self, request) -> None:
        sender = request.get_response_sender()

        def on_token(token: int) -> None:
            output = pb_utils.Tensor("output_ids", np.array([token], dtype=np.int64))
            sender.send(pb_utils.InferenceResponse(output_tensors=[output]))

        def on_done() -> None:
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

        def on_error(exc: Exception) -> None:
            error = pb_utils.TritonError(str(exc))
            sender.send(
                pb_utils.InferenceResponse(error=error),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )

        try:
            if not scalar(request, "READY", 1):  # a slot the sequence batcher filled: no work
                return on_done()
            ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1)
            max_new_tokens = int(scalar(request, "max_new_tokens"))
            temperature = scalar(request, "temperature")
            sampling = None  # greedy, the default
            if temperature is not None and temperature > 0:
                sampling = SamplingParams(
                    greedy=False,
                    temperature=float(temperature),
                    top_k=int(scalar(request, "top_k", 0)),
                    top_p=float(scalar(request, "top_p", 1.0)),
                    seed=int(scalar(request, "seed", 0)),
                )
            start, end = bool(scalar(request, "START", 1)), bool(scalar(request, "END", 1))
            session = None if start and end else request.correlation_id()
        except MosaicError as exc:
            return on_error(exc)
        self.loop.submit(
            [int(i) for i in ids],
            max_new_tokens,
            sampling,
            on_token,
            on_done,
            on_error,
            session=session,
            start_session=start,
            end_session=end,
        )

    def finalize(self) -> None:
        self.loop.stop()
