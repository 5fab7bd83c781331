"""Prompts to per-step conditioning: A1111 prompt editing picks the conditioning by step."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..models.detect import Family
from ..models.device import to_device
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
        ids = size_ids(model.spec.family, params, width=width, height=height, negative=negative)
        if ids is not None:  # placed once with the text features, so no step copies it to the device
            encoded = [(end, replace(cond, time_ids=to_device(ids, cond.cross_attn.device, torch.float32)))
                       for end, cond in encoded]
        return [(end, _repeat(cond, batch)) for end, cond in encoded]

    # Composable diffusion: each AND part has its own schedule, as A1111 encodes them.
    parts = tuple((weight, schedule(text, False)) for text, weight in split_and(positive))
    plain = len(parts) == 1 and parts[0][0] == 1.0
    return CondSchedule(parts[0][1], schedule(params.negative_prompt, True), parts=() if plain else parts)


def size_ids(family: Family, params: GenerationParams, *, width: int, height: int,
             negative: bool) -> torch.Tensor | None:
    """The numbers SDXL's UNet embeds beside the pooled text, one row, on the host; None for other models.

    As A1111 conditions them: SDXL on the generation size as both original and target size and its
    "crop top/left" settings (0, 0 by default; height first, as the model was trained); its refiner
    on the size, the crop and the aesthetic score, the high one for the prompt and the low one for
    the negative prompt.
    """
    crop = [params.sdxl_crop_top, params.sdxl_crop_left]
    if family == Family.SDXL:
        row = [height, width, *crop, height, width]
    elif family == Family.SDXL_REFINER:
        row = [height, width, *crop, params.negative_aesthetic_score if negative else params.aesthetic_score]
    else:
        return None
    return torch.tensor([row], dtype=torch.float32)


def _repeat(cond: Conditioning, batch: int) -> Conditioning:
    return Conditioning.cat([cond] * batch) if batch > 1 else cond
