"""A1111's 75-token chunking: comma backtracking, BREAK, embeddings, token counts.

Token ids come from the real CLIP vocabulary (shipped BPE file): "cat" = 2368, "dog" = 1929,
"," = 267, BOS = 49406, EOS = 49407.
"""

from __future__ import annotations

import pytest

from underpaint.errors import InvalidParameter
from underpaint.prompts.chunks import (
    CHUNK_LENGTH,
    EmbeddingIndex,
    EmbeddingSlot,
    EmbeddingWord,
    PromptChunk,
    chunk_prompt,
)

BOS, EOS, COMMA, CAT, DOG = 49406, 49407, 267, 2368, 1929


def chunks_of(ids, weight=1.0, **kw):
    return chunk_prompt([(ids, weight)], bos=BOS, eos=EOS, comma=COMMA, **kw)


@pytest.fixture(scope="module")
def tokenizer():
    from underpaint.models.tokenizer import clip_tokenizer

    return clip_tokenizer()


def test_vocabulary_ids(tokenizer):
    ids = tokenizer(["cat, dog"], add_special_tokens=False)["input_ids"][0]
    assert ids == [CAT, COMMA, DOG]


def test_100_token_prompt_splits_after_the_comma(tokenizer):
    text = "cat " * 59 + "cat, " + "dog " * 39
    ids = tokenizer([text], add_special_tokens=False)["input_ids"][0]
    assert len(ids) == 100 and ids[60] == COMMA
    chunks, count = chunks_of(ids)
    assert len(chunks) == 2
    first, second = chunks
    # 75 - 60 = 15 <= 20 tokens after the comma: the 14 dogs already in chunk 1 move to chunk 2
    assert first.tokens == (BOS, *[CAT] * 60, COMMA, *[EOS] * 14, EOS)
    assert second.tokens == (BOS, *[DOG] * 39, *[EOS] * 36, EOS)
    assert len(first.tokens) == len(second.tokens) == CHUNK_LENGTH + 2
    assert count == 75 + 39


@pytest.mark.parametrize("comma_at, moved", [(55, True), (54, False)])
def test_backtrack_limit_is_20_tokens(comma_at, moved):
    ids = [CAT] * comma_at + [COMMA] + [DOG] * (80 - comma_at)
    first, second = chunks_of(ids)[0]
    if moved:  # 75 - 55 = 20: still within the limit
        assert first.tokens[1:comma_at + 2] == (*[CAT] * comma_at, COMMA)
        assert set(first.tokens[comma_at + 2:]) == {EOS}
        assert second.tokens[1:1 + 25] == (DOG,) * 25
    else:  # 21 tokens back: cut at exactly 75
        assert first.tokens[1:76] == (*[CAT] * 54, COMMA, *[DOG] * 20)
        assert second.tokens[1:7] == (DOG,) * 6 and second.tokens[7] == EOS


def test_backtrack_disabled():
    ids = [CAT] * 60 + [COMMA] + [DOG] * 39
    first, _ = chunks_of(ids, backtrack=0)[0]
    assert first.tokens[1:76] == (*[CAT] * 60, COMMA, *[DOG] * 14)


def test_comma_as_76th_token_starts_the_next_chunk_without_backtracking():
    ids = [CAT] * 75 + [COMMA] + [DOG] * 3
    first, second = chunks_of(ids)[0]
    assert first.tokens[1:76] == (CAT,) * 75
    assert second.tokens[1:5] == (COMMA, DOG, DOG, DOG)


def test_weights_follow_their_tokens_and_padding_is_one():
    chunks, _ = chunk_prompt([([CAT, CAT], 1.0), ([DOG], 1.5)], bos=BOS, eos=EOS, comma=COMMA)
    assert chunks[0].multipliers[:5] == (1.0, 1.0, 1.0, 1.5, 1.0)
    assert set(chunks[0].multipliers[4:]) == {1.0}


def test_break_closes_chunks_even_empty_ones():
    chunks, count = chunk_prompt([([CAT], 1.0), (None, -1.0), ([DOG], 1.0)], bos=BOS, eos=EOS, comma=COMMA)
    assert [c.tokens[:3] for c in chunks] == [(BOS, CAT, EOS), (BOS, DOG, EOS)]
    assert count == 75 + 1
    chunks, _ = chunk_prompt([([], 1.0), (None, -1.0), ([DOG], 1.0)], bos=BOS, eos=EOS, comma=COMMA)
    assert chunks[0] == PromptChunk.empty(BOS, EOS) and chunks[1].tokens[1] == DOG


def test_empty_prompt_is_one_empty_chunk():
    chunks, count = chunks_of([])
    assert chunks == [PromptChunk.empty(BOS, EOS)] and count == 0


def test_exactly_75_tokens_is_one_chunk_and_76_is_two():
    assert len(chunks_of([CAT] * 75)[0]) == 1
    assert len(chunks_of([CAT] * 76)[0]) == 2


def test_embeddings_take_one_slot_per_vector_and_longest_name_wins():
    index = EmbeddingIndex.build([EmbeddingWord((CAT,), "cat", 2), EmbeddingWord((CAT, DOG), "catdog", 3)])
    chunks, _ = chunk_prompt([([DOG, CAT, DOG, CAT], 1.2)], bos=BOS, eos=EOS, comma=COMMA, embeddings=index)
    chunk = chunks[0]
    assert chunk.tokens[:8] == (BOS, DOG, 0, 0, 0, 0, 0, EOS)
    assert chunk.embeddings == (EmbeddingSlot(1, "catdog", 3), EmbeddingSlot(4, "cat", 2))
    assert chunk.multipliers[1:7] == (1.2,) * 6


def test_embedding_never_straddles_chunks():
    index = EmbeddingIndex.build([EmbeddingWord((DOG,), "dog", 4)])
    chunks, _ = chunks_of([CAT] * 73 + [DOG], embeddings=index)
    assert chunks[0].tokens[74:] == (EOS, EOS, EOS) and chunks[0].embeddings == ()
    assert chunks[1].embeddings == (EmbeddingSlot(0, "dog", 4),)


def test_oversized_embedding_is_a_typed_error():
    index = EmbeddingIndex.build([EmbeddingWord((DOG,), "huge", 76)])
    with pytest.raises(InvalidParameter, match="huge"):
        chunks_of([DOG], embeddings=index)


def test_comma_id_is_a_token_lookup_matching_the_vocabulary(tokenizer):
    from underpaint.prompts.encoder import _comma_id

    assert _comma_id(tokenizer) == tokenizer.get_vocab()[",</w>"] == COMMA


def test_comma_id_is_none_without_a_comma_token():
    from underpaint.prompts.encoder import _comma_id

    class NoComma:
        unk_token, unk_token_id = "<|endoftext|>", 49407

        def convert_tokens_to_ids(self, token):
            return self.unk_token_id

    assert _comma_id(NoComma()) is None


def test_token_counter_counts_as_a1111_shows_it(sd1_file):
    """A1111's "n/75": tags out, the largest AND part and scheduled text, BREAK's padding, embeddings by vectors,
    and the count the prompt encoder itself reports for the same text."""
    from underpaint.prompts.counter import TokenCounter

    counter = TokenCounter({"easyneg": 3})
    assert counter.count("") == (0, 75)
    assert counter.count("a photo of a cat <lora:film:0.8>") == counter.count("a photo of a cat") == (5, 75)
    assert counter.count("a cat AND a very big red dog") == (5, 75)  # the larger part
    assert counter.count("a cat AND a very big red dog", negative=True) == (8, 75)
    assert counter.count("[cat:a very big red dog:0.5]") == (5, 75)
    assert counter.count("(cat:1.3) easyneg") == (4, 75)
    assert counter.count("x BREAK y") == (76, 150)
    assert counter.count("a, " * 50) == (100, 150)
    assert counter.count("[cat:dog:0.5") == counter.count("cat:dog:0.5")  # not a schedule: counted as written
    # the prompt encoder of a loaded model, which chunks what it encodes, counts the same
    from underpaint.models.loader import load_model
    from underpaint.pipeline.conditioning import prompt_encoder

    encoder = prompt_encoder(load_model(sd1_file), 1)
    for text in ("a, " * 50, "x BREAK y", "(a red:1.2) barn, [dusk] sky " * 9):
        assert TokenCounter().count(text)[0] == encoder.count_tokens(text), text
