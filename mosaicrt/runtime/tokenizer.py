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
