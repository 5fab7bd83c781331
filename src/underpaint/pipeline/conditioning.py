"""Prompts to per-step conditioning: A1111 prompt editing picks the conditioning by step."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..params import GenerationParams
from ..prompts.encoder import Conditioning, PromptEncoder
from ..prompts.parser import extract_extra_networks, prompt_schedule, split_and
from .networks import available_embeddings


@dataclass
class CondSchedule:
    """Conditioning for the positive and negative prompt as (end_step, Conditioning) lists.

    ``step`` is the only mutable field: the denoiser advances it once per evaluation, as
    A1111's CFG denoiser does, so ``[from:to:when]`` switches where it does there (the
    schedule spans twice the steps for second-order samplers, which evaluate twice).
    """

    cond: list[tuple[int, Conditioning]]
    uncond: list[tuple[int, Conditioning]]
    #: SDXL micro-conditioning (original size, crop, target size), one row per image.
    time_ids: torch.Tensor | None = None
    step: int = field(default=0)
    #: Composable diffusion (``a AND b :0.5``): (weight, schedule) of every part, ``cond`` being
    #: the first one's schedule; empty for a plain prompt (one part of weight 1).
    parts: tuple[tuple[float, list[tuple[int, Conditioning]]], ...] = ()

    def current(self) -> tuple[Conditioning, Conditioning]:
        return _at(self.cond, self.step), _at(self.uncond, self.step)

    def current_parts(self) -> list[tuple[Conditioning, float]]:
        """Each ``AND`` part's conditioning at this step with its weight."""
        if not self.parts:
            return [(_at(self.cond, self.step), 1.0)]
        return [(_at(schedule, self.step), weight) for weight, schedule in self.parts]


def _at(schedule: list[tuple[int, Conditioning]], step: int) -> Conditioning:
    for end, cond in schedule:
        if step <= end:
            return cond
    return schedule[-1][1]


def prompt_encoder(model, clip_skip: int) -> PromptEncoder:
    """The model's prompt encoder, with the textual-inversion embeddings of its models folder."""
    return PromptEncoder(model.text_encoders, model.tokenizers, family=model.spec.family.value, clip_skip=clip_skip,
                         embeddings=available_embeddings(model))


def encode_prompts(model, params: GenerationParams, steps: int, *, batch: int, width: int, height: int,
                   hires_steps: int | None = None) -> CondSchedule:
    """Encode each distinct segment of the prompt schedules once and repeat it for the batch.

    ``hires_steps``: the schedule is for a hires. fix second pass of that many evaluations,
    after a first pass of ``steps`` (A1111 counts prompt editing on from the first pass).
    """
    encoder = prompt_encoder(model, params.clip_skip)
    # Extra-network tags (<lora:...>) come out of the prompt only; A1111 leaves the negative as written.
    positive, _ = extract_extra_networks(params.prompt)

    def schedule(prompt: str, negative: bool) -> list[tuple[int, Conditioning]]:
        # One batch per schedule, as A1111: equal chunk counts and emphasis normalised together.
        with torch.inference_mode():
            encoded = encoder.encode_schedule(prompt_schedule(prompt, steps, hires_steps=hires_steps),
                                             negative=negative)
        return [(end, _repeat(cond, batch)) for end, cond in encoded]

    time_ids = None
    if model.spec.family.value == "sdxl":
        # A1111 conditions SDXL on the generation size as both original and target size, no crop.
        row = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
        time_ids = row.repeat(batch, 1)
    # Composable diffusion: each AND part has its own schedule, as A1111 encodes them.
    parts = tuple((weight, schedule(text, False)) for text, weight in split_and(positive))
    plain = len(parts) == 1 and parts[0][0] == 1.0
    return CondSchedule(parts[0][1], schedule(params.negative_prompt, True), time_ids=time_ids,
                        parts=() if plain else parts)


def _repeat(cond: Conditioning, batch: int) -> Conditioning:
    return Conditioning.cat([cond] * batch) if batch > 1 else cond
