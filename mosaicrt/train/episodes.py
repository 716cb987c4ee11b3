"""Synthetic recall episodes in natural text: the demo model's training data and its recall test.

An episode is one byte-level sequence that starts with BOS. Facts `@KEY:VALUE\\n` (KEY and VALUE
six random lowercase letters) sit on lines of their own among lines of filler text (which holds no
`@` and no `?`); a query `?KEY:` asks for a fact seen earlier and is answered by `VALUE\\n`. Every
fact a query asks sits further back than the short-term window, so only the long-term memory can
answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WORD = 6  # letters in a KEY or a VALUE
LETTERS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", np.uint8)


def random_word(rng: np.random.Generator) -> bytes:
    return LETTERS[rng.integers(0, 26, WORD)].tobytes()


def fact_line(key: bytes, value: bytes) -> bytes:
    return b"@" + key + b":" + value + b"\n"


def query_prompt(key: bytes) -> bytes:
    return b"?" + key + b":"


def filler_lines(rng: np.random.Generator, text: bytes, nbytes: int) -> list[bytes]:
    """Whole lines of `text` from a random line start, at least nbytes in all (wrapping around)."""
    start = text.find(b"\n", int(rng.integers(0, len(text)))) + 1
    lines: list[bytes] = []
    total = 0
    while total < nbytes:
        end = text.find(b"\n", start)
        if end < 0:  # wrap to the beginning of the text
            start, end = 0, text.find(b"\n")
        line = text[start : end + 1]
        start = end + 1
        lines.append(line)
        total += len(line)
    return lines


@dataclass(frozen=True)
class TrainingEpisode:
    ids: np.ndarray  # (T + 1,) int64: BOS, then bytes
    answer: np.ndarray  # (T + 1,) bool: the byte is part of an answer VALUE\n


def training_episode(
    rng: np.random.Generator,
    text: bytes,
    length: int,
    bos: int,
    min_distance: int,
    fact_rate: float = 0.25,
    query_rate: float = 0.3,
) -> TrainingEpisode:
    """length + 1 tokens: filler lines with facts among the first three quarters and queries of
    facts at least min_distance bytes back among the rest of the lines."""
    ids, answer = [bos], [False]
    facts: list[tuple[bytes, bytes, int]] = []  # key, value, offset of the fact's end
    for line in filler_lines(rng, text, 2 * length):
        if len(ids) > length:
            break
        ids += line
        answer += [False] * len(line)
        if len(ids) < 0.75 * length and rng.random() < fact_rate:
            key, value = random_word(rng), random_word(rng)
            ids += fact_line(key, value)
            answer += [False] * (2 * WORD + 3)
            facts.append((key, value, len(ids)))
        far = [f for f in facts if len(ids) - f[2] >= min_distance]
        if far and rng.random() < query_rate:
            key, value, _ = far[int(rng.integers(0, len(far)))]
            ids += query_prompt(key) + value + b"\n"
            answer += [False] * (WORD + 2) + [True] * (WORD + 1)
    return TrainingEpisode(
        np.asarray(ids[: length + 1], np.int64), np.asarray(answer[: length + 1], bool)
    )


@dataclass(frozen=True)
class RecallEpisode:
    prompt: list[int]  # BOS, filler with facts, then the query ?KEY:
    answer: list[int]  # VALUE\n
    distance: int  # bytes from the asked fact's end to the query


def recall_episode(
    rng: np.random.Generator,
    text: bytes,
    context: int,
    bos: int,
    min_distance: int,
    facts: int = 4,
) -> RecallEpisode:
    """An episode of at most `context` tokens (prompt and answer): `facts` facts at random line
    boundaries at least min_distance bytes before the query at the end; the query asks one."""
    fact_bytes = facts * (2 * WORD + 3)
    room = context - 1 - fact_bytes - (WORD + 2) - (WORD + 1)  # BOS, facts, query, answer
    lines = filler_lines(rng, text, room)
    while sum(map(len, lines)) > room:  # whole lines only
        lines.pop()
    offsets = np.cumsum([0] + [len(x) for x in lines])  # bytes before each line boundary
    eligible = np.flatnonzero(offsets[-1] - offsets >= min_distance)
    spots = np.sort(rng.choice(eligible, size=facts, replace=True))
    words = [(random_word(rng), random_word(rng)) for _ in range(facts)]
    asked = int(rng.integers(0, facts))
    body = bytearray()
    ends = []
    for i, line in enumerate(lines + [b""]):
        for j in np.flatnonzero(spots == i):
            body += fact_line(*words[j])
            ends.append(len(body))
        body += line
    key, value = words[asked]
    return RecallEpisode(
        prompt=[bos] + list(body) + list(query_prompt(key)),
        answer=list(value + b"\n"),
        distance=len(body) - ends[asked],
    )
