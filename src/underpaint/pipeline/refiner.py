"""A1111's "Refiner": another checkpoint finishes the sampling the request's checkpoint began.

As A1111 1.10 decides it, before each model evaluation the evaluation's noise level is matched to
the nearest of the base model's 1000 training noise levels, ``t``; once ``(999 − t) / 1000`` (the
share of the noise schedule already passed) reaches "Switch at", that evaluation and every one after
it runs the refiner. The sampler goes on as it was (its history, its noise); the refiner gets the
prompts encoded by its own text encoders, with prompt editing counted on from where the base
model was. The infotext gains "Refiner" (``name [hash]``) and "Refiner switch at". With hires. fix
the refiner takes part in the pass A1111's "Hires fix: which pass to enable refiner for" names
(``RefinerOptions.hires_pass``: the second by default, the first, or both), its switch judged on that
pass's noise levels; each pass starts on the model (or the Hires checkpoint), as in A1111, which
loads the model again after a first pass the refiner finished. A setting other than the default is
recorded as "Hires refiner".

Where underpaint does less than A1111 (refused by name, before any work): a FLUX model on either
side, an SDXL checkpoint with an SD 1.x/2.x one (their latents differ), inpainting (9-channel)
checkpoints, ControlNet units, DeepCache and a Hires checkpoint with a refiner. Where it differs: the
picture is decoded by the request's VAE (A1111 decodes with the refiner's, the same VAE for the
SDXL base and refiner); a prompt's LoRAs and the speed/quality switches that hook the UNet (token
merging, FreeU) stay with the base model (its hypernetworks run in the refiner too, as in A1111), and the refiner runs without the base's ``--optimize``
switches. Stability's SDXL refiner (its own architecture: OpenCLIP bigG alone, a UNet conditioned on
an aesthetic score) refines an SDXL base, as it was made to, or any SDXL checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import InvalidParameter
from ..params import GenerationParams


def check(model, refiner, params: GenerationParams) -> None:
    """Refuse a refiner request underpaint cannot run, naming the field."""
    family, other = model.spec.family.value, refiner.spec.family.value
    if "flux" in (family, other):
        raise InvalidParameter("refiner_checkpoint", params.refiner.checkpoint,
                               "an SD 1.x/2.x or SDXL checkpoint with an SD or SDXL model (FLUX has no refiner here)")
    if not model.spec.family.shares_latents(refiner.spec.family):
        raise InvalidParameter("refiner_checkpoint", params.refiner.checkpoint,
                               f"a checkpoint of the same latent space as the model ({family}; this one is {other})")
    if model.spec.is_inpaint or refiner.spec.is_inpaint:
        raise InvalidParameter("refiner_checkpoint", params.refiner.checkpoint,
                               "checkpoints that are not inpainting (9-channel) models")
    if params.hires is not None and params.hires.checkpoint is not None:
        raise InvalidParameter("hires_checkpoint", params.hires.checkpoint,
                               "the same checkpoint with a refiner (a refiner and a hires checkpoint together are "
                               "not available)")
    for field, on, what in (("control_units", bool(params.control_units), "ControlNet units"),
                            ("deepcache", params.deepcache is not None and params.deepcache.interval > 1, "DeepCache")):
        if on:
            raise InvalidParameter(field, "with a refiner", f"no {what} with a refiner (not available yet)")


def completed_ratio(sigma: float, table: torch.Tensor) -> float:
    """A1111's share of the schedule passed at ``sigma``: ``(999 − t) / 1000``, ``t`` the index of the
    nearest of the model's training noise levels (``table``, ascending, on the host)."""
    t = int(torch.argmin((table - sigma).abs()))
    return (999 - t) / 1000


class SwitchingDenoiser:
    """``base`` until an evaluation's noise level passes the switch, then ``make_refiner()`` (built
    once, at the switch) for that evaluation and all later ones. ``switched`` says whether it did."""

    def __init__(self, base: Callable, make_refiner: Callable[[], Callable], table: torch.Tensor, switch_at: float):
        self.base, self.make_refiner = base, make_refiner
        self.table, self.switch_at = table.detach().to("cpu", torch.float64), switch_at
        self.refiner: Callable | None = None

    @property
    def switched(self) -> bool:
        return self.refiner is not None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # One host read per evaluation until the switch (A1111 reads the sigma too).
        if self.refiner is None and completed_ratio(float(sigma.max()), self.table) >= self.switch_at:
            self.refiner = self.make_refiner()
        return (self.refiner or self.base)(x, sigma, *args, **kwargs)


def will_switch(sigmas: torch.Tensor, table: torch.Tensor, switch_at: float) -> bool:
    """Whether a run over ``sigmas`` (its steps' noise levels, the last one 0) reaches the switch: A1111
    records the refiner only when it does."""
    table = table.detach().to("cpu", torch.float64)
    return any(completed_ratio(float(s), table) >= switch_at for s in sigmas[:-1])


def infotext_entries(refiner, switch_at: float) -> tuple[tuple[str, object], ...]:
    """A1111's keys: ``Refiner: name [hash]`` (the loaded refiner's name and short hash) and ``Refiner switch at``."""
    return (("Refiner", refiner.short_title), ("Refiner switch at", float(switch_at)))


def infotext_for_plan(refiner, options, table: torch.Tensor, sigmas: torch.Tensor,
                      hires_sigmas: torch.Tensor | None) -> tuple[tuple[str, object], ...]:
    """The infotext entries of a run whose passes sample ``sigmas`` (and ``hires_sigmas``: hires. fix's
    second pass), ``table`` the model's training noise levels: A1111's refiner keys when a pass the
    refiner takes part in reaches the switch, and with hires. fix "Hires refiner" where it is not the
    default second pass."""
    passes = [sigmas] if hires_sigmas is None else \
        [s for s, second in ((sigmas, False), (hires_sigmas, True)) if options.in_pass(second)]
    if not any(will_switch(s, table, options.switch_at) for s in passes):
        return ()
    entries = infotext_entries(refiner, options.switch_at)
    if hires_sigmas is not None and options.hires_pass != "second pass":  # A1111 writes it first
        entries = (("Hires refiner", options.hires_pass), *entries)
    return entries
