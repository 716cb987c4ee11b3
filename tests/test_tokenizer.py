"""Streamed text: the pieces of TextStream, joined, are the text of all the ids, for every kind of
tokenizer the runtime loads, and no piece splits a UTF-8 character."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaicrt.runtime.tokenizer import ByteTokenizer, HFTokenizer, TextStream

CORPUS = [
    "def memory(x):\n    return x + 1\n",
    "mosaïques de mémoire, 记忆马赛克 €5",
    "  spaced  out  ",
]


def pieces_of(tokenizer, ids: list[int]) -> list[str]:
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == stream.text
    return pieces


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    """A byte-level BPE tokenizer.json (GPT-2's kind), trained on the corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS * 4, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tokenizer.save(str(path))
    return HFTokenizer(path)


@pytest.fixture(scope="module")
def words(tmp_path_factory) -> HFTokenizer:
    """A WordLevel tokenizer.json with no decoder: decode joins the words with spaces."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "memory", "mosaics", "at", "scale", "."])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("words") / "tokenizer.json"
    tokenizer.save(str(path))
    return HFTokenizer(path)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=60))
def test_byte_pieces_join_to_the_text_and_never_split_a_character(ids):
    tokenizer = ByteTokenizer()  # any bytes: invalid and cut multi-byte sequences too
    pieces = pieces_of(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    for piece in pieces[:-1]:  # a piece ends at a whole character (flush sends the rest)
        assert not piece.endswith("\ufffd")


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_tokenizer_json_pieces_join_to_the_text(bpe, words, data):
    for tokenizer, vocab in ((bpe, 400), (words, 6)):
        ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=40))
        assert "".join(pieces_of(tokenizer, ids)) == tokenizer.decode(ids)


def test_encoded_text_streams_back_whole_characters(bpe):
    for text in CORPUS:
        ids = bpe.encode(text)
        pieces = pieces_of(bpe, ids)
        assert "".join(pieces) == text
        assert all("\ufffd" not in piece for piece in pieces)


def test_a_long_generation_decodes_a_short_window_per_token():
    """Each push decodes the last piece's ids and the new ones, not all ids so far."""

    class Counting(ByteTokenizer):
        decoded = 0

        def decode(self, ids):
            Counting.decoded += len(ids)
            return super().decode(ids)

    ids = list(("mémoire " * 500).encode())  # 4,500 ids, 2-byte characters among them
    tokenizer = Counting()
    assert "".join(pieces_of(tokenizer, ids)) == "mémoire " * 500
    assert Counting.decoded < 8 * len(ids)  # all ids every time: about 10 million
