"""Text <-> ids: the model's tokenizer.json through `tokenizers` when present, else UTF-8 bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from mosaicrt.errors import InputError


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """One id per UTF-8 byte (ids 0..255); ids above 255 (BOS, EOS, ...) decode to nothing."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception on bad files
            raise InputError(f"{path} is not a valid tokenizer.json ({exc})") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def load_tokenizer(model_dir: str | Path, vocab_size: int) -> Tokenizer:
    path = Path(model_dir) / "tokenizer.json"
    if path.is_file():
        return HFTokenizer(path)
    if vocab_size < 256:
        raise InputError(
            f"{model_dir} has no tokenizer.json and its vocabulary ({vocab_size}) is "
            "too small for byte-level text: pass token ids with --input instead"
        )
    return ByteTokenizer()


class TextStream:
    """Text of a growing list of generated ids, piece by piece, never splitting a UTF-8
    character: a piece is held back while it ends in an incomplete one.

    Each push decodes a short window, not every id so far (which would cost O(n) per token):
    the ids of the last piece sent (the context: how a tokenizer joins a token to the ones
    before it, a leading space for one) and those after it. The new piece is the window's text
    past the context's."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""
        self.context = 0  # ids[context:done]: the last piece sent's ids
        self.done = 0  # ids[:done] are sent
        self.before = ""  # the text of ids[context:done]

    def push(self, token: int) -> str:
        """The new text that `token` completes (possibly empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids[self.context :])
        if text.endswith("\ufffd") or len(text) <= len(self.before):  # an incomplete character,
            return ""  # or ids of no text yet: wait for the next ones
        return self._send(text[len(self.before) :])

    def flush(self) -> str:
        """What is left once no more ids come (a dangling byte decodes as U+FFFD)."""
        return self._send(self.tokenizer.decode(self.ids[self.context :])[len(self.before) :])

    def _send(self, piece: str) -> str:
        self.context, self.done = self.done, len(self.ids)
        self.before = self.tokenizer.decode(self.ids[self.context : self.done])
        self.sent += piece
        return piece

    @property
    def text(self) -> str:
        return self.sent
