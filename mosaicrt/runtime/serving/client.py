"""A small streaming client for the served `mosaicrt` model (tritonclient gRPC): the tests and the
serving benchmark use it; any Triton client speaks the same inputs (see triton_model)."""

from __future__ import annotations

import queue
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Result:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    error: str | None = None
    responses: int = 0  # responses that carried tokens


def inputs_for(prompt=None, text=None, max_new_tokens=None, stream=True, **optional) -> list:
    """The request's input tensors: input_ids or text_input, max_new_tokens (None: left out),
    stream, and any optional input by name (temperature=0.7, session_id="a", ...)."""
    import tritonclient.grpc as grpcclient

    def tensor(name, array, dtype):
        t = grpcclient.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    types = {"temperature": (np.float32, "FP32"), "top_p": (np.float32, "FP32"),
             "top_k": (np.int32, "INT32"), "seed": (np.uint64, "UINT64"),
             "session_start": (bool, "BOOL"), "session_end": (bool, "BOOL"),
             "stop_ids": (np.int64, "INT64")}  # fmt: skip
    out = []
    if prompt is not None:
        out.append(tensor("input_ids", np.array(prompt, dtype=np.int64), "INT64"))
    if text is not None:
        out.append(tensor("text_input", np.array([text.encode()], dtype=np.object_), "BYTES"))
    if max_new_tokens is not None:
        out.append(tensor("max_new_tokens", np.array([max_new_tokens], dtype=np.int32), "INT32"))
    out.append(tensor("stream", np.array([stream]), "BOOL"))
    for name, value in optional.items():
        if name in ("session_id", "stop"):
            values = [value] if isinstance(value, str) else list(value)
            out.append(tensor(name, np.array([v.encode() for v in values], np.object_), "BYTES"))
        else:
            dtype, kind = types[name]
            out.append(tensor(name, np.array(np.atleast_1d(value), dtype=dtype), kind))
    return out


class StreamClient:
    """One gRPC connection and stream to the server, for requests sent one after another (as a
    client that keeps its connection does: no connection set up per request).

    outputs: the outputs to ask for (None: all of them, output_ids and text_output); a
    client that reads only ids asks for ("output_ids",), and the server then works out no text.
    """

    def __init__(self, url: str, outputs: tuple[str, ...] | None = None) -> None:
        import tritonclient.grpc as grpcclient

        self.responses: queue.Queue = queue.Queue()
        self.outputs = [grpcclient.InferRequestedOutput(n) for n in outputs] if outputs else None
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))
        self.cancelled = False

    def generate(
        self,
        prompt: list[int] | None = None,
        max_new_tokens: int | None = 16,
        text: str | None = None,
        stream: bool = True,
        cancel_after: int | None = None,
        timeout_s: float = 600.0,
        **optional,
    ) -> Result:
        """One request: the tokens and text as they arrived, or the error. cancel_after=N: stop
        reading after N tokens; closing the client then cancels the request, as when a client
        goes away (so the client takes no further request)."""
        if self.cancelled:
            raise RuntimeError("this client cancelled a request: close it and open another")
        result = Result()
        self.client.async_stream_infer("mosaicrt", inputs_for(prompt, text, max_new_tokens, stream,
                                                              **optional),
                                       outputs=self.outputs,
                                       enable_empty_final_response=True)  # fmt: skip
        while True:
            answer, error = self.responses.get(timeout=timeout_s)
            if error is not None:
                result.error = str(error)
                return result
            ids = answer.as_numpy("output_ids")
            if ids is not None and ids.size:
                result.tokens += ids.tolist()
                result.responses += 1
            pieces = answer.as_numpy("text_output")
            if pieces is not None:
                result.text += "".join(p.decode() for p in pieces.reshape(-1))
            if cancel_after is not None and len(result.tokens) >= cancel_after:
                self.cancelled = True
                return result
            if answer.get_response().parameters["triton_final_response"].bool_param:
                return result

    def close(self) -> None:
        # a stream left open keeps the server from shutting down
        self.client.stop_stream(cancel_requests=self.cancelled)
        self.client.close()

    def __enter__(self) -> StreamClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def stream_generate(url: str, *args, outputs: tuple[str, ...] | None = None, **kwargs) -> Result:
    """One request over its own connection and stream (StreamClient.generate's arguments)."""
    with StreamClient(url, outputs) as client:
        return client.generate(*args, **kwargs)
