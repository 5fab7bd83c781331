"""A1111's prompt token counter, the "n/75" at the corner of its prompt boxes, without a loaded model.

The count is the one the prompt encoder chunks by (:func:`~underpaint.prompts.chunks.chunk_prompt`:
75 per full chunk, then the last chunk's tokens), of the prompt as the model will see it: extra-network
tags taken out, each ``AND`` part (the positive prompt only) and each step's text of a
``[from:to:when]`` schedule counted on its own, the largest shown, as A1111 shows it. The limit beside
it is 75 for every chunk begun. Textual-inversion embeddings count one token per vector. The tokenizer
is OpenAI CLIP's, shipped with the package (SD 1.x/2.x and SDXL all tokenize with it).

>>> TokenCounter().count("a photo of a cat")
(5, 75)
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..errors import UnderpaintError
from .chunks import CHUNK_LENGTH, EmbeddingIndex, EmbeddingWord, chunk_prompt, run_segments
from .parser import extract_extra_networks, parse_attention, prompt_schedule, split_and


class TokenCounter:
    """Counts prompt tokens; ``embeddings`` maps embedding names to their vector counts."""

    def __init__(self, embeddings: Mapping[str, int] | None = None, *, tokenizer=None):
        from ..models.tokenizer import clip_tokenizer

        if tokenizer is None:
            tokenizer = clip_tokenizer()
            tokenizer.model_max_length = 1 << 30  # long prompts are chunked here, never cut: no length warning
        self.tokenizer = tokenizer
        words = [EmbeddingWord(tuple(self._ids([name])[0]), name, vectors)
                 for name, vectors in (embeddings or {}).items()]
        self.index = EmbeddingIndex.build(words)
        comma = self.tokenizer.convert_tokens_to_ids(",</w>")
        self.comma = None if comma == self.tokenizer.unk_token_id else comma

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def count(self, prompt: str, steps: int = 20, *, negative: bool = False) -> tuple[int, int]:
        """(tokens, limit) for a prompt (``negative``: a negative prompt, whose ``AND`` is plain text)."""
        text, _ = extract_extra_networks(prompt)
        try:
            parts = [text] if negative else [part for part, _ in split_and(text)]
            texts = [scheduled for part in parts for _, scheduled in prompt_schedule(part, steps)]
        except UnderpaintError:  # a schedule that does not parse is counted as written, as A1111 does
            texts = [text]
        tokens = max(self._count(t) for t in texts or [""])
        return tokens, math.ceil(max(tokens, 1) / CHUNK_LENGTH) * CHUNK_LENGTH

    def _count(self, text: str) -> int:
        runs = parse_attention(text)
        segments = run_segments(runs, self._ids([run for run, _ in runs]))
        bos, eos = int(self.tokenizer.bos_token_id), int(self.tokenizer.eos_token_id)
        return chunk_prompt(segments, bos=bos, eos=eos, comma=self.comma, embeddings=self.index)[1]
