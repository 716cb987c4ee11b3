"""A minimal streaming client for the served `mosaicrt` model (tritonclient gRPC)."""

from __future__ import annotations

import queue

import numpy as np


def stream_generate(
    url: str,
    prompt: list[int],
    max_new_tokens: int | None,
    sequence_id: int,
    start: bool = True,
    end: bool = True,
    timeout_s: float = 600.0,
) -> tuple[list[int], str | None]:
    """One request over a gRPC stream: (tokens as they arrived, the error message or None).
    max_new_tokens None leaves that input out (the server refuses the request)."""
    import tritonclient.grpc as grpcclient

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    inputs = [grpcclient.InferInput("input_ids", [len(prompt)], "INT64")]
    inputs[0].set_data_from_numpy(np.array(prompt, dtype=np.int64))
    if max_new_tokens is not None:
        inputs.append(grpcclient.InferInput("max_new_tokens", [1], "INT32"))
        inputs[1].set_data_from_numpy(np.array([max_new_tokens], dtype=np.int32))
    tokens: list[int] = []
    try:
        client.async_stream_infer("mosaicrt", inputs, sequence_id=sequence_id,
                                  sequence_start=start, sequence_end=end,
                                  enable_empty_final_response=True)  # fmt: skip
        while True:
            result, error = responses.get(timeout=timeout_s)
            if error is not None:
                return tokens, str(error)
            out = result.as_numpy("output_ids")
            if out is not None:
                tokens += out.tolist()
            if result.get_response().parameters["triton_final_response"].bool_param:
                return tokens, None
    finally:
        client.stop_stream()  # an open stream would keep the server from stopping
        client.close()
