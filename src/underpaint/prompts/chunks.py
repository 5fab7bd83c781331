"""Token ids → 77-token chunks, as A1111 1.10 feeds CLIP prompts longer than 75 tokens.

Pure Python (no torch): the encoder tokenizes each weighted run from
:func:`~underpaint.prompts.parser.parse_attention` and hands the ids here.

A1111's rules, reproduced:

- each chunk holds 75 prompt tokens between BOS and EOS; a short last chunk is padded with EOS
  (the encoder swaps the padding for the encoder's own pad id where that differs);
- when a chunk is full and the last comma is at most ``backtrack`` (20) tokens back, the tokens
  after that comma move to the next chunk, so phrases are not cut in half;
- ``BREAK`` closes the current chunk (even an empty one);
- a textual-inversion embedding, recognised by its name's token sequence, takes one slot per
  vector (placeholder id 0) and never straddles two chunks.

>>> chunks, count = chunk_prompt([([320, 2368], 1.0), ([1929], 1.5)], bos=49406, eos=49407, comma=267)
>>> count, len(chunks), chunks[0].tokens[:5], chunks[0].multipliers[:5]
(3, 1, (49406, 320, 2368, 1929, 49407), (1.0, 1.0, 1.0, 1.5, 1.0))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..errors import InvalidParameter

#: Prompt tokens per chunk; with BOS and EOS a chunk is CLIP's 77 positions.
CHUNK_LENGTH = 75
#: A1111's ``comma_padding_backtrack`` default.
COMMA_BACKTRACK = 20
#: Token id A1111 puts where an embedding's vectors go (overwritten before the transformer).
EMBEDDING_PLACEHOLDER = 0


@dataclass(frozen=True)
class EmbeddingSlot:
    """Where an embedding's vectors replace token embeddings: ``offset`` counts from after BOS."""

    offset: int
    name: str
    vectors: int


@dataclass(frozen=True)
class PromptChunk:
    """One 77-token window: ids, per-token weights and embedding slots."""

    tokens: tuple[int, ...]
    multipliers: tuple[float, ...]
    embeddings: tuple[EmbeddingSlot, ...] = ()

    @classmethod
    def empty(cls, bos: int, eos: int) -> PromptChunk:
        """The chunk of an empty prompt, used to give every row of a batch the same chunk count."""
        return cls((bos,) + (eos,) * (CHUNK_LENGTH + 1), (1.0,) * (CHUNK_LENGTH + 2))


@dataclass(frozen=True)
class EmbeddingWord:
    """An embedding as it appears in token ids: its name's tokens and its vector count."""

    ids: tuple[int, ...]
    name: str
    vectors: int


@dataclass(frozen=True)
class EmbeddingIndex:
    """Embedding names by first token, longest first, as A1111's embedding database matches them."""

    by_first_token: Mapping[int, tuple[EmbeddingWord, ...]] = field(default_factory=dict)

    @classmethod
    def build(cls, words: Iterable[EmbeddingWord]) -> EmbeddingIndex:
        table: dict[int, list[EmbeddingWord]] = {}
        for word in words:
            if word.ids:
                table.setdefault(word.ids[0], []).append(word)
        return cls({k: tuple(sorted(v, key=lambda w: len(w.ids), reverse=True)) for k, v in table.items()})

    def match(self, tokens: Sequence[int], position: int) -> EmbeddingWord | None:
        for word in self.by_first_token.get(tokens[position], ()):
            if tuple(tokens[position:position + len(word.ids)]) == word.ids:
                return word
        return None


class _Builder:
    """Accumulates chunks; ``close`` pads and wraps the current one (A1111's ``next_chunk``)."""

    def __init__(self, bos: int, eos: int):
        self.bos, self.eos = bos, eos
        self.chunks: list[PromptChunk] = []
        self.tokens: list[int] = []
        self.weights: list[float] = []
        self.slots: list[EmbeddingSlot] = []
        self.last_comma = -1
        self.count = 0

    def close(self, last: bool = False) -> None:
        self.count += len(self.tokens) if last else CHUNK_LENGTH
        pad = max(0, CHUNK_LENGTH - len(self.tokens))
        tokens = (self.bos, *self.tokens, *([self.eos] * pad), self.eos)
        weights = (1.0, *self.weights, *([1.0] * pad), 1.0)
        self.chunks.append(PromptChunk(tokens, weights, tuple(self.slots)))
        self.tokens, self.weights, self.slots = [], [], []
        self.last_comma = -1

    def move_after_comma(self) -> None:
        """Close the chunk at its last comma and carry the tokens after it into the next one.

        Embedding slots stay with the closed chunk, exactly as A1111 leaves them.
        """
        cut = self.last_comma + 1
        tokens, weights = self.tokens[cut:], self.weights[cut:]
        del self.tokens[cut:], self.weights[cut:]
        self.close()
        self.tokens, self.weights = tokens, weights


def run_segments(runs: Sequence[tuple[str, float]], ids: Sequence[Sequence[int]]
                 ) -> list[tuple[Sequence[int] | None, float]]:
    """:func:`~underpaint.prompts.parser.parse_attention`'s runs with their token ids, as
    :func:`chunk_prompt` takes them (a ``BREAK`` run becomes ``None``)."""
    from .parser import BREAK_WEIGHT

    return [(None if (run == "BREAK" and weight == BREAK_WEIGHT) else tokens, weight)
            for tokens, (run, weight) in zip(ids, runs)]


def chunk_prompt(segments: Sequence[tuple[Sequence[int] | None, float]], *, bos: int, eos: int,
                 comma: int | None, embeddings: EmbeddingIndex | None = None,
                 backtrack: int = COMMA_BACKTRACK) -> tuple[list[PromptChunk], int]:
    """Lay out weighted token runs in 77-token chunks; ``None`` ids mean ``BREAK``.

    Returns the chunks (at least one) and A1111's token count (75 per full chunk plus the
    tokens of the last), the number its UI shows as "n/75".
    """
    build = _Builder(bos, eos)
    for ids, weight in segments:
        if ids is None:
            build.close()
            continue
        position = 0
        while position < len(ids):
            position += _place(build, ids, position, weight, comma, embeddings, backtrack)
    if build.tokens or not build.chunks:
        build.close(last=True)
    return build.chunks, build.count


def _place(build: _Builder, ids: Sequence[int], position: int, weight: float, comma: int | None,
           embeddings: EmbeddingIndex | None, backtrack: int) -> int:
    """Append the token (or embedding) at ``position``; returns how many ids it consumed."""
    if ids[position] == comma:
        build.last_comma = len(build.tokens)
    elif (backtrack and len(build.tokens) == CHUNK_LENGTH and build.last_comma != -1
          and len(build.tokens) - build.last_comma <= backtrack):
        build.move_after_comma()
    if len(build.tokens) == CHUNK_LENGTH:
        build.close()
    word = embeddings.match(ids, position) if embeddings is not None else None
    if word is None:
        build.tokens.append(ids[position])
        build.weights.append(weight)
        return 1
    if word.vectors > CHUNK_LENGTH:
        raise InvalidParameter("prompt", word.name, f"an embedding of at most {CHUNK_LENGTH} vectors")
    if len(build.tokens) + word.vectors > CHUNK_LENGTH:
        build.close()
    build.slots.append(EmbeddingSlot(len(build.tokens), word.name, word.vectors))
    build.tokens.extend([EMBEDDING_PLACEHOLDER] * word.vectors)
    build.weights.extend([weight] * word.vectors)
    return len(word.ids)
