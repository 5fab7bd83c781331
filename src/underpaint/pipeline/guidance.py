"""Model evaluations that skip the negative prompt: A1111's two speed/quality trade-offs in its CFG
denoiser, both off by default.

* **Negative Guidance minimum sigma** (``s_min_uncond``, infotext ``NGMS``): once the noise level of
  an evaluation is below the threshold the picture is nearly settled, and every other evaluation
  (counting from the run's first, odd ones skip) runs the prompt alone; with ``s_min_uncond_all``
  ("NGMS all steps") every one below it does.
* **Ignore negative prompt during early sampling** (``skip_early_cond``, infotext
  ``Skip Early CFG``): the evaluations whose index divided by the run's length is at most the
  fraction run the prompt alone, so the negative prompt does not steer the composition.

An evaluation that skips runs only the prompt's rows through the model (half the guidance batch)
and takes their answer as the denoised latent: with composable prompts (``a AND b``), the first
part's answer stands in for the negative prompt's and the parts are combined at guidance scale 1,
as A1111 1.10 does. Deciding on the noise level reads the evaluation's sigma from the device once
(only while ``s_min_uncond`` is on); the early rule needs no read.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..sampling.names import sampler_info

if TYPE_CHECKING:
    from ..params import GenerationParams


@dataclass(frozen=True)
class UncondSkip:
    """Which evaluations of one sampling run skip the negative prompt.

    ``total`` is A1111's step count for the run: the steps it launches the sampler with (txt2img:
    the steps; img2img and a hires. fix pass: t_enc + 1, the steps that run), doubled for samplers
    that evaluate the model twice a step.
    """

    min_sigma: float = 0.0
    all_steps: bool = False
    early: float = 0.0
    total: int = 1

    @classmethod
    def of(cls, p: "GenerationParams", *, steps: int) -> "UncondSkip | None":
        """The request's rules for a run of ``steps`` sampler steps (None: nothing skips)."""
        if not p.s_min_uncond and not p.skip_early_cond:
            return None
        factor = 2 if "second_order" in sampler_info(p.sampler).flags else 1
        return cls(p.s_min_uncond, p.s_min_uncond_all, p.skip_early_cond, max(1, steps * factor))

    def skips(self, evaluation: int, sigma: torch.Tensor) -> bool:
        """Whether evaluation number ``evaluation`` (0-based, in this run) at ``sigma`` runs the prompt alone."""
        if self.early and evaluation / self.total <= self.early:
            return True
        if self.min_sigma > 0 and (evaluation % 2 or self.all_steps):
            return float(sigma.reshape(-1)[0]) < self.min_sigma
        return False


def infotext_entries(p: "GenerationParams") -> dict[str, object]:
    """A1111's keys for the rules that are on (A1111 writes NGMS once an evaluation has skipped;
    underpaint writes it whenever it is set, which reads back to the same request)."""
    return {
        "Skip Early CFG": p.skip_early_cond or None,
        "NGMS": p.s_min_uncond or None,
        "NGMS all steps": True if p.s_min_uncond and p.s_min_uncond_all else None,
    }


def prompt_alone(denoiser: Callable, cond, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A skipping evaluation of a plain prompt: the prompt's answer is the denoised latent."""
    return denoiser(x, sigma, cond)


def parts_alone(denoiser: Callable, parts, weights: Sequence[float], x: torch.Tensor,
                sigma: torch.Tensor) -> torch.Tensor:
    """A skipping evaluation of composable parts (stacked part-major, as ``stack_parts`` does):
    the first part's answer stands in for the negative prompt's, the parts combined at scale 1."""
    n, b = len(weights), x.shape[0]
    on_parts = denoiser(x.repeat(n, *[1] * (x.ndim - 1)), sigma.repeat(n), parts)
    stand_in = on_parts[:b]
    result = stand_in
    for i, weight in enumerate(weights):
        result = result + (on_parts[i * b : (i + 1) * b] - stand_in) * weight
    return result
