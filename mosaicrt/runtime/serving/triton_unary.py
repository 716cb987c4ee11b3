"""The `mosaicrt_unary` model of the repository (Python backend, not decoupled): unary `infer`
over HTTP or gRPC, for clients that cannot stream.

Triton's `infer` endpoints refuse decoupled models, so this companion takes the same inputs and
forwards each request to `mosaicrt` (Business Logic Scripting) with `stream` false, which answers
with exactly one response: the companion returns it. It holds no model and no state; the one
`mosaicrt` model decodes every request, sessions included. Requests reach it one at a time per
instance, and it waits for each answer: raise its instance count for concurrent unary clients.
"""

from __future__ import annotations

import json

import numpy as np
import triton_python_backend_utils as pb_utils

OUTPUTS = ["output_ids", "text_output"]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.inputs = [i["name"] for i in json.loads(args["model_config"])["input"]]

    def execute(self, requests: list) -> list:
        return [self.forward(request) for request in requests]

    def forward(self, request):
        tensors = [pb_utils.get_input_tensor_by_name(request, name) for name in self.inputs]
        tensors = [t for t in tensors if t is not None and t.name() != "stream"]
        tensors.append(pb_utils.Tensor("stream", np.array([False])))
        outputs = [name for name in OUTPUTS if name in request.requested_output_names()]
        call = pb_utils.InferenceRequest(
            model_name="mosaicrt", inputs=tensors, requested_output_names=outputs
        )
        answer = None
        for response in call.exec(decoupled=True):
            if response.has_error():
                return pb_utils.InferenceResponse(error=response.error())
            if response.output_tensors():
                answer = response
        if answer is None:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError("mosaicrt sent nothing"))
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.get_output_tensor_by_name(answer, name) for name in outputs]
        )
