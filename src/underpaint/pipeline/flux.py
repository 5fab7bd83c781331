"""FLUX.1 in the one generate() path: its conditioning, its transformer call and its denoiser.

FLUX is conditioned on T5-XXL's token embeddings (up to 512 tokens, 256 for schnell, as the
reference code uses) and on CLIP-L's pooled embedding. FLUX.1-dev is guidance-distilled: the
guidance strength goes in as an input (Forge's "Distilled CFG Scale", default 3.5) and one
model call per step suffices; real classifier-free guidance against the negative prompt runs
only when the CFG scale is above 1, as in Forge. The transformer works on 2×2 patches of
the 16-channel latent, addressed by (0, row, column) position ids.

A1111 prompt syntax is read as for the other models. T5 has no 75-token chunks: the whole
prompt is one sequence and ``BREAK`` is dropped. Attention weights like ``(word:1.2)`` scale
their tokens' T5 embeddings, then the whole is rescaled to its unweighted mean (A1111's
"Original" emphasis, which Forge applies to T5 too); CLIP-L's pooled vector reads the plain
words. Prompt editing ``[a:b:when]`` and ``<lora:...>`` tags work as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
import torch

from ..models.device import to_device
from ..models.ip_adapter import flux_adapters_applied
from ..models.optimize import attention_for, begin_call, owned
from ..params import GenerationParams
from ..prompts.parser import extract_extra_networks, parse_attention, prompt_schedule
from ..sampling.denoisers import cfg_denoiser
from ..sampling.flow import velocity_denoiser
from .conditioning import CondSchedule
from .guidance import UncondSkip

#: Forge's default "Distilled CFG Scale" for FLUX.1-dev.
DEFAULT_GUIDANCE = 3.5
#: Token budgets of the reference code: 512 for dev (and Fill), 256 for schnell.
T5_TOKENS = {"schnell": 256}
T5_TOKENS_DEFAULT = 512
CLIP_TOKENS = 77


@dataclass(frozen=True)
class FluxConditioning:
    """One prompt's FLUX conditioning, batch-first: T5 token embeddings and CLIP-L's pooled vector."""

    t5: torch.Tensor
    pooled: torch.Tensor

    @classmethod
    def cat(cls, items) -> "FluxConditioning":
        return cls(torch.cat([c.t5 for c in items]), torch.cat([c.pooled for c in items]))

    def repeat(self, n: int) -> "FluxConditioning":
        return self if n == 1 else FluxConditioning(self.t5.repeat(n, 1, 1), self.pooled.repeat(n, 1))


def family_defaults(model) -> dict:
    """The controls a FLUX user expects when they set none (Forge's FLUX preset): Euler on the
    simple schedule, CFG 1 (distilled guidance only), 20 steps for dev and 4 for schnell."""
    if not is_flux(model):
        return {}
    steps = 4 if getattr(model.spec, "variant", "") == "schnell" else 20
    return {"cfg_scale": 1.0, "sampler": "Euler", "scheduler": "Simple", "steps": steps}


def is_flux(model) -> bool:
    return getattr(model.spec.family, "value", model.spec.family) == "flux"


def t5_tokens(model) -> int:
    return T5_TOKENS.get(getattr(model.spec, "variant", ""), T5_TOKENS_DEFAULT)


def guidance_value(model, params: GenerationParams) -> float | None:
    """The distilled guidance a guidance-embedding model gets (None for schnell, which has none)."""
    if not getattr(model.unet.config, "guidance_embeds", False):
        return None
    value = getattr(params, "distilled_cfg_scale", None)
    return DEFAULT_GUIDANCE if value is None else float(value)


def with_infotext(model, params: GenerationParams) -> GenerationParams:
    """Forge's FLUX keys: "Distilled CFG Scale" for models with a guidance input, and the
    schedule the flow path really ran ("Simple" for "Automatic")."""
    entries = []
    value = guidance_value(model, params)
    if value is not None:
        entries.append(("Distilled CFG Scale", value))
    if params.scheduler in ("Automatic", "automatic"):
        entries.append(("Schedule type", "Simple"))
    return params.replace(extra_infotext=tuple(entries) + params.extra_infotext) if entries else params


def plain_text(prompt: str) -> str:
    """The words of an (already scheduled) A1111 prompt: emphasis brackets and BREAK removed."""
    return "".join(text for text, weight in parse_attention(prompt) if weight >= 0)


def t5_tokens_and_weights(tokenizer, prompt: str, length: int) -> tuple[list[int], list[float]]:
    """T5 ids of an (already scheduled) prompt, each run of text tokenized with its attention
    weight, then EOS and padding to ``length`` (weight 1), as the tokenizer itself would pad."""
    ids: list[int] = []
    weights: list[float] = []
    for text, weight in parse_attention(prompt):
        if weight < 0:  # BREAK
            continue
        piece = tokenizer(text, add_special_tokens=False).input_ids
        ids += piece
        weights += [weight] * len(piece)
    ids, weights = ids[: length - 1] + [tokenizer.eos_token_id], weights[: length - 1] + [1.0]
    pad = length - len(ids)
    return ids + [tokenizer.pad_token_id] * pad, weights + [1.0] * pad


def encode_prompt(model, prompt: str) -> FluxConditioning:
    """One scheduled prompt: plain-text CLIP-L pooled vector, T5 embeddings with A1111 emphasis."""
    runs = parse_attention(prompt)
    if all(weight in (1.0, -1.0) for _, weight in runs):
        return encode_texts(model, [plain_text(prompt)])
    plain = encode_texts(model, [plain_text(prompt)], with_t5=False)
    t5 = model.text_encoders[1]
    ids, weights = t5_tokens_and_weights(model.tokenizers[1], prompt, t5_tokens(model))
    with torch.inference_mode():
        z = t5(torch.tensor([ids], device=model.device), output_hidden_states=False)[0].float()
        original_mean = z.mean()
        z = z * torch.tensor(weights, device=z.device, dtype=z.dtype)[None, :, None]
        z = z * (original_mean / z.mean())
    return FluxConditioning(z, plain.pooled)


def encode_texts(model, texts: list[str], *, with_t5: bool = True) -> FluxConditioning:
    """CLIP-L pooled and T5 embeddings of each text, on the model's device (``with_t5=False``: pooled only)."""
    clip, t5 = model.text_encoders
    clip_tok, t5_tok = model.tokenizers
    device = model.device
    with torch.inference_mode():
        ids = to_device(clip_tok(texts, padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                                 return_tensors="pt").input_ids, device)
        pooled = clip(ids, output_hidden_states=False).pooler_output
        if not with_t5:
            return FluxConditioning(torch.empty(0), pooled.float())
        ids = to_device(t5_tok(texts, padding="max_length", max_length=t5_tokens(model), truncation=True,
                               return_tensors="pt").input_ids, device)
        embeds = t5(ids, output_hidden_states=False)[0]
    return FluxConditioning(embeds.float(), pooled.float())


def encode_prompts(model, params: GenerationParams, steps: int, *, batch: int,
                   hires_steps: int | None = None) -> CondSchedule:
    """Per-step conditioning for the prompt and the negative prompt (prompt editing included;
    ``hires_steps``: for a hires. fix second pass after a first pass of ``steps``)."""
    positive, _ = extract_extra_networks(params.prompt)
    cache: dict[str, FluxConditioning] = {}

    def schedule(prompt: str) -> list[tuple[int, FluxConditioning]]:
        out = []
        for end, text in prompt_schedule(prompt, steps, hires_steps=hires_steps):
            if text not in cache:
                cache[text] = encode_prompt(model, text)
            out.append((end, cache[text].repeat(batch)))
        return out

    uncond = schedule(params.negative_prompt) if params.cfg_scale != 1 else schedule("")
    return CondSchedule(schedule(positive), uncond)


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/2)(W/2), 4C]: 2×2 patches, row-major, channels outermost in a patch."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack` for a latent of ``height`` × ``width``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device) -> torch.Tensor:
    """Position ids (0, row, column) of the 2×2 patches of a ``height`` × ``width`` latent."""
    rows = torch.arange(height // 2, dtype=torch.float32)[:, None].expand(height // 2, width // 2)
    cols = torch.arange(width // 2, dtype=torch.float32)[None, :].expand(height // 2, width // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1)
    return to_device(ids.reshape(-1, 3), device)


def transformer_fn(model, guidance: float | None, *, extra_channels: torch.Tensor | None = None, control=None
                   ) -> Callable[[torch.Tensor, torch.Tensor, FluxConditioning], torch.Tensor]:
    """``fn(x, σ, cond) -> v``: the FLUX transformer on an unpacked latent, answering in float32.

    ``extra_channels`` (FLUX Fill's masked-picture latent and mask, already packed, one row per
    image) are appended to each row's patch features; ``control`` (a
    :class:`~underpaint.pipeline.flux_control.FluxControl`) adds its ControlNets' residuals.
    """
    transformer = model.unet
    dtype = model.dtype
    placed: dict[tuple, torch.Tensor] = {}

    def ids_for(key, make):
        if key not in placed:
            placed[key] = make()
        return placed[key]

    def call(x: torch.Tensor, sigma: torch.Tensor, cond: FluxConditioning) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = pack(x)
        latent_tokens = tokens
        if extra_channels is not None:
            rows = b // extra_channels.shape[0]
            tokens = torch.cat([tokens, extra_channels.repeat(rows, 1, 1).to(tokens)], dim=-1)
        img_ids = ids_for(("img", h, w, x.device), lambda: image_ids(h, w, x.device).to(dtype))
        txt_ids = ids_for(("txt", cond.t5.shape[1], x.device),
                          lambda: torch.zeros(cond.t5.shape[1], 3, device=x.device, dtype=dtype))
        g = None
        if guidance is not None:
            g = ids_for(("g", b, x.device), lambda: torch.full((b,), guidance, device=x.device, dtype=torch.float32))
        blocks = singles = None
        pictures = []
        if control is not None:
            blocks, singles = control.residuals(latent_tokens, sigma, cond, img_ids, txt_ids, guidance, dtype)
            pictures = control.image_prompts(b, cond, x.device)
        begin_call(model)
        with attention_for(model), flux_adapters_applied(transformer, pictures):
            out = transformer(
                hidden_states=tokens.to(dtype),
                encoder_hidden_states=cond.t5.to(x.device, dtype),
                pooled_projections=cond.pooled.to(x.device, dtype),
                timestep=sigma.to(dtype),
                img_ids=img_ids,
                txt_ids=txt_ids,
                guidance=g,
                controlnet_block_samples=blocks,
                controlnet_single_block_samples=singles,
                return_dict=False,
            )[0]
        return unpack(owned(out, model), h, w)

    return call


def make_denoiser(model, conds: CondSchedule, params: GenerationParams, *,
                  extra_channels: torch.Tensor | None = None, control=None,
                  skip: UncondSkip | None = None) -> Callable:
    """``denoiser(x, σ) -> x0`` for FLUX: distilled guidance always, true CFG when the scale is not 1
    (``skip``: the evaluations that run the prompt alone, pipeline/guidance.py)."""
    base = velocity_denoiser(transformer_fn(model, guidance_value(model, params), extra_channels=extra_channels,
                                            control=control))
    scale = params.cfg_scale

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        cond, uncond = conds.current()
        if control is not None:  # IP-Adapter units tell the prompt's rows by these objects
            control.set_conds(cond, uncond)
        evaluation = conds.step
        conds.step += 1
        if scale == 1 or (skip is not None and skip.skips(evaluation, sigma)):
            return base(x, sigma, cond)
        return cfg_denoiser(base, cond, uncond, scale)(x, sigma)

    return denoise
