"""Prompt text → CLIP conditioning with AUTOMATIC1111 1.10's numbers.

What A1111 does, and so what :class:`PromptEncoder` does:

- the prompt is split into weighted runs (:func:`~underpaint.prompts.parser.parse_attention`),
  each run is tokenized on its own, and the ids are laid out in 77-token chunks
  (:mod:`~underpaint.prompts.chunks`: 75 tokens, comma backtracking, ``BREAK``, embeddings);
- all texts encoded together get the same number of chunks (short ones get empty-prompt
  chunks); each chunk goes through the text encoder separately and the results are joined
  along the token axis;
- where an encoder pads with a token other than EOS (OpenCLIP: ``!``, id 0), everything after
  a chunk's first EOS becomes that pad id;
- hidden layer: SD1 takes ``hidden_states[-clip_skip]`` then the final layer norm
  (``clip_skip=1`` is the normal output). SD2 takes OpenCLIP-H's penultimate layer then the
  final norm: with the last block left out of the model, as diffusers and
  ``underpaint.models`` build it, that is the model's normal output; A1111 ignores clip skip
  for SD2. SDXL joins CLIP-L's and bigG's ``hidden_states[-2]`` (no final norm) along the
  feature axis, and its pooled vector is bigG's projected output for the *first* chunk;
  A1111 ignores clip skip for SDXL unless its "SDXL clip skip" option is set, which moves
  CLIP-L's layer to ``hidden_states[-clip_skip]``. The SDXL refiner has bigG alone, read as
  in SDXL (``hidden_states[-2]``, pooled from the first chunk, clip skip ignored);
- weights multiply each token's hidden state. Emphasis "Original" then rescales the chunk
  so the mean over the whole batch equals the unweighted mean, "No norm" does not rescale,
  "Ignore" parses brackets but applies no weights, "None" reads brackets literally (and
  ``BREAK`` as a word);
- SDXL and its refiner: a negative prompt whose texts are all empty encodes as zeros
  (cross-attention and pooled), as A1111 does (diffusers' ``force_zeros_for_empty_prompt``,
  which its refiner pipeline leaves off).

diffusers' ``clip_skip`` counts from 0 where A1111's counts from 1: A1111 ``clip_skip=n``
(n >= 2) equals diffusers ``clip_skip=n-1``; A1111 1 is diffusers ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidParameter, UnknownName
from .chunks import EmbeddingIndex, EmbeddingWord, PromptChunk, chunk_prompt, run_segments
from .embeddings import Embedding, load_embedding
from .parser import parse_attention

__all__ = ["Conditioning", "PromptEncoder", "Embedding", "load_embedding", "pad_to_match",
           "EMPHASIS_MODES", "FAMILIES"]

#: A1111's emphasis modes ("Original" is its default).
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")
FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
_ENCODER_COUNT = {"sd1": 1, "sd2": 1, "sdxl": 2, "sdxl_refiner": 1}
#: Families conditioned on hidden_states[-2] without the final norm, with bigG's pooled output.
_SGM = ("sdxl", "sdxl_refiner")


@dataclass(frozen=True, eq=False)  # tensors have no single truth value to compare
class Conditioning:
    """Text conditioning: ``cross_attn`` [B, T, D] (T a multiple of 77), SDXL's ``pooled`` [B, P] and
    ``time_ids`` [B, N], the size numbers the UNet embeds with the pooled text (SDXL: original size,
    crop, target size; its refiner: original size, crop, aesthetic score; set by the pipeline)."""

    cross_attn: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return int(self.cross_attn.shape[1])

    def __len__(self) -> int:
        return int(self.cross_attn.shape[0])

    def row(self, index: int) -> Conditioning:
        """Row ``index`` as a batch of one."""
        rows = slice(index, index + 1)
        return Conditioning(self.cross_attn[rows], _rows(self.pooled, rows), _rows(self.time_ids, rows))

    @classmethod
    def cat(cls, items: Sequence[Conditioning]) -> Conditioning:
        """Stack along the batch axis; every item must have the same token length."""
        items = list(items)
        lengths = {c.tokens for c in items}
        if len(lengths) != 1:
            raise ValueError(f"cannot batch conditionings of different token lengths {sorted(lengths)}; "
                             "pad them (cat_padded, pad_to_match) or evaluate them separately")
        pooled = None if items[0].pooled is None else torch.cat([c.pooled for c in items])
        time_ids = None if items[0].time_ids is None else torch.cat([c.time_ids for c in items])
        return cls(torch.cat([c.cross_attn for c in items]), pooled, time_ids)

    @classmethod
    def cat_padded(cls, items: Sequence[Conditioning]) -> Conditioning:
        """Stack rows of different lengths by repeating each one's last token vector.

        A1111 does this for the sub-prompts of ``AND`` and for batches of different prompts.
        """
        items = list(items)
        longest = max(c.tokens for c in items)
        return cls.cat([c._repeat_last(longest - c.tokens) for c in items])

    def _repeat_last(self, extra: int) -> Conditioning:
        if extra <= 0:
            return self
        tail = self.cross_attn[:, -1:].expand(-1, extra, -1)
        return Conditioning(torch.cat([self.cross_attn, tail], dim=1), self.pooled, self.time_ids)


def _rows(tensor: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if tensor is None else tensor[rows]


def pad_to_match(cond: Conditioning, uncond: Conditioning, empty: Conditioning) -> tuple[Conditioning, Conditioning]:
    """A1111's "Pad prompt/negative prompt" option: extend the shorter with empty-prompt chunks.

    Off by default in A1111, which instead runs the model separately for cond and uncond when
    their lengths differ; the padded result is faster but not numerically the same.
    """
    chunks = (cond.tokens - uncond.tokens) // empty.tokens
    if chunks > 0:
        uncond = _append(uncond, empty, chunks)
    elif chunks < 0:
        cond = _append(cond, empty, -chunks)
    return cond, uncond


def _append(cond: Conditioning, empty: Conditioning, chunks: int) -> Conditioning:
    filler = empty.cross_attn[:1].to(cond.cross_attn).repeat(len(cond), chunks, 1)
    return Conditioning(torch.cat([cond.cross_attn, filler], dim=1), cond.pooled, cond.time_ids)


@dataclass(frozen=True)
class _Tower:
    """One text encoder with A1111's settings for it."""

    index: int
    model: Any
    tokenizer: Any
    hidden_layer: int
    final_norm: bool
    pad_id: int
    pooled: bool
    bos: int
    eos: int
    comma: int | None
    vocabulary: EmbeddingIndex

    @property
    def width(self) -> int:
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]


class PromptEncoder:
    """Encodes A1111 prompts with the text encoders of an SD1, SD2, SDXL or SDXL refiner model.

    ``text_encoders``/``tokenizers``: ``(CLIPTextModel,)`` for SD1/SD2, ``(CLIPTextModel,
    CLIPTextModelWithProjection)`` for SDXL, ``(CLIPTextModelWithProjection,)`` for the refiner. ``embeddings`` maps names to textual-inversion
    embeddings; those whose shapes do not fit these encoders are skipped, as A1111 does
    (:attr:`embeddings` lists the ones in use).
    """

    def __init__(self, text_encoders: tuple, tokenizers: tuple, *, family: str, clip_skip: int = 1,
                 emphasis: str = "Original", embeddings: Mapping[str, Embedding] | None = None,
                 sdxl_clip_l_skip: bool = False):
        if family not in FAMILIES:
            raise UnknownName("family", family, FAMILIES)
        if emphasis not in EMPHASIS_MODES:
            raise UnknownName("emphasis", emphasis, EMPHASIS_MODES)
        if len(text_encoders) != _ENCODER_COUNT[family] or len(tokenizers) != len(text_encoders):
            raise InvalidParameter("text_encoders", len(text_encoders),
                                   f"{_ENCODER_COUNT[family]} text encoder(s) and as many tokenizers for {family}")
        _check_clip_skip(clip_skip, text_encoders[0])
        self.family = family
        self.emphasis = emphasis
        layers = _hidden_layers(family, clip_skip, sdxl_clip_l_skip)
        dims = tuple(int(m.config.hidden_size) for m in text_encoders)
        self.embeddings: dict[str, Embedding] = {
            name: emb for name, emb in (embeddings or {}).items() if emb.fits(dims)}
        self._towers = tuple(
            _make_tower(family, i, model, tok, layer, self.embeddings)
            for i, (model, tok, layer) in enumerate(zip(text_encoders, tokenizers, layers)))

    # -- public ------------------------------------------------------------------------------

    def encode(self, texts: Sequence[str], *, negative: bool = False) -> Conditioning:
        """One row per text, all with the same number of chunks (A1111's ``get_learned_conditioning``).

        Texts encoded together share the emphasis normalisation, as in A1111, which encodes the
        texts of one prompt's schedule together (see :meth:`encode_schedule`).
        """
        texts = _check_texts(texts)
        with torch.no_grad():
            outputs = [self._encode_tower(tower, texts) for tower in self._towers]
        cross = torch.cat([z for z, _ in outputs], dim=-1)
        pooled = outputs[-1][1]
        if negative and self.family in _SGM and all(t == "" for t in texts):
            cross, pooled = torch.zeros_like(cross), torch.zeros_like(pooled)
        return Conditioning(cross, pooled)

    def encode_schedule(self, schedule: Sequence[tuple[int, str]], *,
                        negative: bool = False) -> list[tuple[int, Conditioning]]:
        """Encode a :func:`~underpaint.prompts.parser.prompt_schedule` as A1111 does: in one batch."""
        cond = self.encode([text for _, text in schedule], negative=negative)
        return [(end, cond.row(i)) for i, (end, _) in enumerate(schedule)]

    def encode_pair(self, prompts: Sequence[str], negatives: Sequence[str], *,
                    pad: bool = False) -> tuple[Conditioning, Conditioning]:
        """Positive and negative rows for classifier-free guidance.

        A1111 encodes them separately, so their token lengths can differ; by default they are
        returned as they are (A1111 then evaluates cond and uncond in separate model calls).
        ``pad=True`` is A1111's "Pad prompt/negative prompt" option (:func:`pad_to_match`).
        """
        cond = self.encode(prompts)
        uncond = self.encode(negatives, negative=True)
        if pad and cond.tokens != uncond.tokens:
            cond, uncond = pad_to_match(cond, uncond, self.empty())
        return cond, uncond

    def empty(self) -> Conditioning:
        """The empty prompt's conditioning (never zeroed), which A1111 pads with."""
        return self.encode([""])

    def chunks(self, text: str) -> list[PromptChunk]:
        """The 77-token chunks a text becomes (with the first text encoder's tokenizer)."""
        return self._chunks(self._towers[0], text)[0]

    def count_tokens(self, text: str) -> int:
        """A1111's prompt token count, the "n" in its "n/75" counter."""
        return self._chunks(self._towers[0], text)[1]

    # -- internals ---------------------------------------------------------------------------

    def _chunks(self, tower: _Tower, text: str) -> tuple[list[PromptChunk], int]:
        runs = [(text, 1.0)] if self.emphasis == "None" else parse_attention(text)
        ids = tower.tokenize([run for run, _ in runs])
        return chunk_prompt(run_segments(runs, ids), bos=tower.bos, eos=tower.eos, comma=tower.comma,
                            embeddings=tower.vocabulary)

    def _encode_tower(self, tower: _Tower, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        cache: dict[str, list[PromptChunk]] = {}
        for text in texts:
            if text not in cache:
                cache[text] = self._chunks(tower, text)[0]
        per_text = [cache[text] for text in texts]
        empty = PromptChunk.empty(tower.bos, tower.eos)
        zs, pooled = [], None
        for i in range(max(len(c) for c in per_text)):
            batch = [chunks[i] if i < len(chunks) else empty for chunks in per_text]
            z, first_pooled = self._run_chunk(tower, batch)
            zs.append(z)
            pooled = first_pooled if i == 0 else pooled
        return torch.cat(zs, dim=1), pooled

    def _run_chunk(self, tower: _Tower, batch: list[PromptChunk]) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = _device_of(tower.model)
        ids = _from_host([_pad_after_eos(c.tokens, tower.eos, tower.pad_id) for c in batch], torch.int64, device)
        slots = [[(s.offset, self.embeddings[s.name].vectors[tower.index])
                  for s in c.embeddings] for c in batch]
        embedding_layer = _text_model(tower.model).embeddings.token_embedding
        hook = embedding_layer.register_forward_hook(_substitute(slots)) if any(slots) else None
        try:
            out = tower.model(input_ids=ids, output_hidden_states=True)
        finally:
            if hook is not None:
                hook.remove()
        z = out.hidden_states[tower.hidden_layer]
        if tower.final_norm:
            z = _text_model(tower.model).final_layer_norm(z)
        pooled = out.text_embeds if tower.pooled else None
        if self.emphasis in ("Ignore", "None") or all(m == 1.0 for c in batch for m in c.multipliers):
            return z, pooled  # decided on the host: testing a GPU tensor would wait for the GPU
        weights = _from_host([c.multipliers for c in batch], torch.float32, device)
        return _emphasize(z, weights, self.emphasis), pooled


def _from_host(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of Python ``values`` on ``device``. To a GPU it is copied from page-locked memory
    without blocking, so the host queues the copy and goes on: a blocking copy (PyTorch's default)
    returns only once the GPU has finished everything queued before it (here, the text encoder's
    previous chunk), leaving the GPU idle while the host catches up."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _emphasize(z: torch.Tensor, weights: torch.Tensor, mode: str) -> torch.Tensor:
    """Scale each token's hidden state by its weight; "Original" then restores the batch mean.

    The caller skips it for the "Ignore" and "None" modes and when every weight is 1 (the result
    would be ``z`` itself: A1111's rescale is then ``mean / mean``), which also keeps a zero-mean
    ``z`` free of 0/0.
    """
    original = z.float()
    weighted = original * weights.unsqueeze(-1)
    if mode == "Original":
        weighted = weighted * (original.mean() / weighted.mean())
    return weighted.to(z.dtype)


def _substitute(slots: list[list[tuple[int, torch.Tensor]]]) -> Callable:
    """A forward hook on the token embedding that writes embedding vectors after BOS + offset."""

    def hook(module, args, output):
        rows = []
        for row, row_slots in zip(output, slots):
            for offset, vectors in row_slots:
                start = offset + 1
                count = min(row.shape[0] - start, vectors.shape[0])
                row = torch.cat([row[:start], vectors[:count].to(row), row[start + count:]])
            rows.append(row)
        return torch.stack(rows)

    return hook


def _pad_after_eos(tokens: tuple[int, ...], eos: int, pad: int) -> list[int]:
    if pad == eos:
        return list(tokens)
    first = tokens.index(eos)
    return [*tokens[:first + 1], *([pad] * (len(tokens) - first - 1))]


def _hidden_layers(family: str, clip_skip: int, sdxl_clip_l_skip: bool) -> tuple[int, ...]:
    if family == "sd1":
        return (-clip_skip,)
    if family == "sd2":
        return (-1,)
    if family == "sdxl_refiner":
        return (-2,)
    return (-clip_skip if sdxl_clip_l_skip else -2, -2)


def _make_tower(family: str, index: int, model, tokenizer, layer: int,
                embeddings: Mapping[str, Embedding]) -> _Tower:
    bigg = family == "sdxl_refiner" or (family == "sdxl" and index == 1)
    openclip = family == "sd2" or bigg
    eos = int(tokenizer.eos_token_id)
    words = []
    for name, emb in embeddings.items():
        ids = tokenizer([name], add_special_tokens=False)["input_ids"][0]
        words.append(EmbeddingWord(tuple(ids), name, emb.count))
    return _Tower(
        index=index, model=model, tokenizer=tokenizer, hidden_layer=layer,
        final_norm=family not in _SGM, pad_id=0 if openclip else eos, pooled=bigg,
        bos=int(tokenizer.bos_token_id), eos=eos, comma=_comma_id(tokenizer),
        vocabulary=EmbeddingIndex.build(words),
    )


def _comma_id(tokenizer) -> int | None:
    """The id of ``,</w>``, or None where the vocabulary has no such token.

    A token lookup, not ``get_vocab()``: turning the 49,408-entry vocabulary into a dict
    costs tens of milliseconds per prompt encoder.
    """
    found = tokenizer.convert_tokens_to_ids(",</w>")
    if found is None or (found == tokenizer.unk_token_id and tokenizer.unk_token != ",</w>"):
        return None
    return int(found)


def _text_model(model):
    """The module holding ``embeddings`` and ``final_layer_norm`` (transformers 4 and 5 differ)."""
    return getattr(model, "text_model", model)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _check_clip_skip(clip_skip: object, model) -> None:
    layers = int(model.config.num_hidden_layers)
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= layers:
        raise InvalidParameter("clip_skip", clip_skip, f"a whole number from 1 to {layers}")


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise InvalidParameter("texts", texts, "a list of prompts, not a single string")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InvalidParameter("texts", texts, "one or more prompt strings")
    return texts
