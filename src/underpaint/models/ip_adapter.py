"""IP-Adapter: a picture as a prompt (Ye et al. 2023), as A1111's ControlNet extension and diffusers run it.

The files are Tencent AI Lab's and the community's (``ip-adapter_sd15.safetensors``,
``ip-adapter-plus_sd15``, ``ip-adapter_sdxl_vit-h``, ``ip-adapter-plus-face_sd15``,
``ip-adapter-full-face_sd15``, ...), kept with the ControlNet models (A1111's ``models/ControlNet``;
ComfyUI's ``models/ipadapter`` is read too), flat ``.safetensors`` or ``.bin`` pickles holding
``{"image_proj": ..., "ip_adapter": ...}`` (read with ``torch.load(weights_only=True)`` only).

What they hold:

- ``image_proj``: how CLIP's reading of the picture becomes extra "tokens" beside the prompt's:
  a linear layer to ``tokens`` x the text width and a LayerNorm (the base models, on CLIP's
  projected image embedding); Tencent's perceiver "Resampler" (the Plus models: learned queries
  attending, in layers of attention and feed-forward, to CLIP's penultimate hidden states, then a
  linear layer and a LayerNorm); or an MLP (the full-face model: linear, GELU, linear, LayerNorm, on
  the penultimate hidden states, one token per patch);
- ``ip_adapter``: for every cross-attention layer of the UNet (numbered 1, 3, 5, ... in the order
  diffusers lists the UNet's attention layers: down blocks, up blocks, then the middle block), a key
  and a value projection (``to_k_ip``, ``to_v_ip``) for those tokens.

In each such layer the UNet then attends to the picture's tokens beside the prompt's, with the same
queries, and adds that attention's result times the unit's weight before the layer's output
projection (the "decoupled cross-attention"). The picture is read by a CLIP vision model (ViT-H/14
for the SD 1.5 models and the ``vit-h`` SDXL ones, ViT-bigG/14 for ``ip-adapter_sdxl``), after
CLIP's preprocessing (shortest side to the model's size with bicubic resampling, centre crop,
CLIP's mean and deviation). The negative prompt's rows get the tokens of no picture: the
projection of a zero embedding (base models), or of the hidden states CLIP gives for an all-zero
input (Plus and full-face), as diffusers makes them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

#: The Resampler's width per head (a constant of Tencent's code and diffusers', not in the files).
RESAMPLER_HEAD_DIM = 64
_LAYER_KEY = re.compile(r"ip_adapter\.(\d+)\.to_([kv])_ip\.weight")
#: XLabs' FLUX IP-Adapter: the image projection, and a key and value projection (with biases) per double block.
_XLABS_PROJ = "ip_adapter_proj_model."
_XLABS_LAYER = re.compile(r"double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)")


def is_ip_adapter(names) -> bool:
    """Whether tensor names are an IP-Adapter's (``image_proj.*`` and ``ip_adapter.*``, or XLabs' FLUX layout)."""
    names = list(names)
    return (any(n.startswith("image_proj.") for n in names) and any(n.startswith("ip_adapter.") for n in names)) \
        or is_flux_ip_adapter(names)


def is_flux_ip_adapter(names) -> bool:
    """Whether tensor names are XLabs' FLUX IP-Adapter's (``ip_adapter_proj_model.*`` and, per double block,
    ``double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj``)."""
    names = list(names)
    return any(n.startswith(_XLABS_PROJ) for n in names) and any(_XLABS_LAYER.fullmatch(n) for n in names)


def flatten_nested(obj: Mapping) -> dict[str, torch.Tensor] | None:
    """The tensors of a ``.bin`` IP-Adapter (``{"image_proj": {...}, "ip_adapter": {...}}``) under flat
    names; None when ``obj`` is not so nested."""
    if not isinstance(obj.get("image_proj"), Mapping) or not isinstance(obj.get("ip_adapter"), Mapping):
        return None
    flat = {}
    for part in ("image_proj", "ip_adapter"):
        for key, value in obj[part].items():
            if isinstance(value, torch.Tensor):
                flat[f"{part}.{key}"] = value
    return flat


# --------------------------------------------------------------------------- the image projections


class ImageProjection(nn.Module):
    """The base models' ``image_proj``: the image embedding to ``tokens`` tokens of the text width."""

    def __init__(self, embed_dim: int, cross_dim: int, tokens: int):
        super().__init__()
        self.tokens, self.cross_dim = tokens, cross_dim
        self.proj = nn.Linear(embed_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) → (B, tokens, cross_dim)."""
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, self.cross_dim))


class MLPProjection(nn.Module):
    """The full-face model's ``image_proj``: each hidden state through linear, GELU, linear, LayerNorm."""

    def __init__(self, hidden_dim: int, cross_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, cross_dim),
                                  nn.LayerNorm(cross_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class _PerceiverAttention(nn.Module):
    """The queries (latents) attend to the picture's states and themselves."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.heads = inner // RESAMPLER_HEAD_DIM
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, states: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        states, latents = self.norm1(states), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((states, latents), dim=1)).chunk(2, dim=-1)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, t.shape[1], self.heads, -1).transpose(1, 2)

        # Tencent's code scales queries and keys each by head_dim^-1/4 and takes the softmax in float32
        scale = RESAMPLER_HEAD_DIM ** -0.25
        weights = ((split(q) * scale) @ (split(k) * scale).transpose(-2, -1)).float().softmax(dim=-1)
        out = (weights.to(v.dtype) @ split(v)).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


class _FeedForward(nn.Sequential):
    """LayerNorm, linear to ``mult`` x, GELU, linear back (no biases on the linear layers)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, hidden, bias=False), nn.GELU(),
                         nn.Linear(hidden, dim, bias=False))


class Resampler(nn.Module):
    """The Plus models' ``image_proj``: ``latents`` queries through attention and feed-forward layers over
    the projected hidden states, then to the text width and normalised."""

    def __init__(self, *, embed_dim: int, dim: int, inner: int, queries: int, depth: int, ff_hidden: int,
                 out_dim: int):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, queries, dim))
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, out_dim)
        self.norm_out = nn.LayerNorm(out_dim)
        self.layers = nn.ModuleList(nn.ModuleList([_PerceiverAttention(dim, inner), _FeedForward(dim, ff_hidden)])
                                    for _ in range(depth))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        latents = self.latents.expand(hidden.shape[0], -1, -1)
        states = self.proj_in(hidden)
        for attention, feed_forward in self.layers:
            latents = attention(states, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


# --------------------------------------------------------------------------- the adapter


@dataclass(frozen=True)
class AdapterShape:
    """What an IP-Adapter file is: its projection ("base", "plus" or "full"; "flux": XLabs' FLUX adapter, a
    base projection whose layers are the transformer's double blocks), the CLIP width it reads (the image
    embedding's for "base" and "flux", the hidden states' otherwise), the text width of the model it fits,
    its token count and its layers' widths (in the file's order)."""

    kind: str
    clip_dim: int
    cross_dim: int
    tokens: int
    layers: tuple[tuple[int, int], ...]  # (key/value input width, output width) per layer

    @property
    def uses_hidden_states(self) -> bool:
        return self.kind in ("plus", "full")


class IPAdapter(nn.Module):
    """The file's networks: ``image_proj`` and, per cross-attention layer, ``to_k_ip`` and ``to_v_ip``."""

    def __init__(self, shape: AdapterShape, image_proj: nn.Module):
        super().__init__()
        self.shape = shape
        self.image_proj = image_proj
        bias = shape.kind == "flux"
        self.to_k_ip = nn.ModuleList(nn.Linear(width, out, bias=bias) for width, out in shape.layers)
        self.to_v_ip = nn.ModuleList(nn.Linear(width, out, bias=bias) for width, out in shape.layers)

    def tokens(self, clip_states: torch.Tensor) -> torch.Tensor:
        return self.image_proj(clip_states.to(self.to_k_ip[0].weight.dtype))


def _tensor(sd: Mapping[str, torch.Tensor], name: str, ndim: int, source: str) -> torch.Tensor:
    t = sd.get(name)
    if not isinstance(t, torch.Tensor) or t.ndim != ndim:
        raise ModelError(f"{source}: IP-Adapter without a {ndim}-D {name!r}: incomplete or damaged file")
    return t


def _projection_tokens(proj: torch.Tensor, cross: int, source: str) -> int:
    if proj.shape[0] % cross:
        raise ModelError(f"{source}: IP-Adapter projection to {proj.shape[0]} values, not a whole number of "
                         f"{cross}-wide tokens")
    return proj.shape[0] // cross


def _flux_shape(sd: Mapping[str, torch.Tensor], source: str) -> AdapterShape:
    blocks = sorted({int(m.group(1)) for name in sd if (m := _XLABS_LAYER.fullmatch(name))})
    if blocks != list(range(len(blocks))):
        raise ModelError(f"{source}: FLUX IP-Adapter double blocks numbered {blocks[:6]}...; expected 0, 1, 2, ...")
    widths = []
    for n in blocks:
        k, v = (_tensor(sd, f"double_blocks.{n}.processor.ip_adapter_double_stream_{kv}_proj.weight", 2, source)
                for kv in "kv")
        if k.shape != v.shape:
            raise ModelError(f"{source}: FLUX IP-Adapter block {n}'s key and value projections differ in shape")
        widths.append((k.shape[1], k.shape[0]))
    proj = _tensor(sd, _XLABS_PROJ + "proj.weight", 2, source)
    cross = _tensor(sd, _XLABS_PROJ + "norm.weight", 1, source).shape[0]
    return AdapterShape("flux", proj.shape[1], cross, _projection_tokens(proj, cross, source), tuple(widths))


def adapter_shape(sd: Mapping[str, torch.Tensor], source: str) -> AdapterShape:
    """The shape of an IP-Adapter from its tensors (flat names); :class:`ModelError` naming ``source``."""
    if is_flux_ip_adapter(sd):
        return _flux_shape(sd, source)

    def tensor(name: str, ndim: int) -> torch.Tensor:
        return _tensor(sd, name, ndim, source)

    layers: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in sd.items():
        if m := _LAYER_KEY.fullmatch(name):
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = t
    numbers = sorted(layers)
    if not numbers or numbers != list(range(1, 2 * len(numbers), 2)):
        raise ModelError(f"{source}: IP-Adapter layers numbered {numbers[:6]}...; expected 1, 3, 5, ...")
    widths = []
    for n in numbers:
        k, v = tensor(f"ip_adapter.{n}.to_k_ip.weight", 2), tensor(f"ip_adapter.{n}.to_v_ip.weight", 2)
        if k.shape != v.shape:
            raise ModelError(f"{source}: IP-Adapter layer {n}'s key and value projections differ in shape")
        widths.append((k.shape[1], k.shape[0]))
    if any(name.startswith("image_proj.face") or "perceiver_resampler" in name or "id_embedding" in name
           for name in sd):
        raise ModelError(f"{source}: an IP-Adapter FaceID / InstantID model (it reads a face recognition "
                         "embedding) is not supported; the CLIP-image IP-Adapters are")
    if "image_proj.latents" in sd:
        latents = tensor("image_proj.latents", 3)
        proj_in = tensor("image_proj.proj_in.weight", 2)
        proj_out = tensor("image_proj.proj_out.weight", 2)
        return AdapterShape("plus", proj_in.shape[1], proj_out.shape[0], latents.shape[1], tuple(widths))
    if "image_proj.proj.0.weight" in sd:
        first, last = tensor("image_proj.proj.0.weight", 2), tensor("image_proj.proj.2.weight", 2)
        return AdapterShape("full", first.shape[1], last.shape[0], 0, tuple(widths))
    proj = tensor("image_proj.proj.weight", 2)
    cross = tensor("image_proj.norm.weight", 1).shape[0]
    return AdapterShape("base", proj.shape[1], cross, _projection_tokens(proj, cross, source), tuple(widths))


def build_ip_adapter(sd: Mapping[str, torch.Tensor], source: str, device, dtype) -> IPAdapter:
    """The adapter in ``sd`` (flat names), weights loaded strictly, frozen, on ``device`` in ``dtype``."""
    shape = adapter_shape(sd, source)
    if shape.kind == "plus":
        depth = 1 + max(int(m.group(1)) for n in sd if (m := re.match(r"image_proj\.layers\.(\d+)\.", n)))
        inner = sd["image_proj.layers.0.0.to_q.weight"].shape[0]
        if inner % RESAMPLER_HEAD_DIM:
            raise ModelError(f"{source}: IP-Adapter Resampler attention {inner} wide; expected heads of "
                             f"{RESAMPLER_HEAD_DIM}")
        dim = sd["image_proj.latents"].shape[2]
        image_proj: nn.Module = Resampler(embed_dim=shape.clip_dim, dim=dim, inner=inner, queries=shape.tokens,
                                          depth=depth, ff_hidden=sd["image_proj.layers.0.1.1.weight"].shape[0],
                                          out_dim=shape.cross_dim)
    elif shape.kind == "full":
        image_proj = MLPProjection(shape.clip_dim, shape.cross_dim)
    else:
        image_proj = ImageProjection(shape.clip_dim, shape.cross_dim, shape.tokens)
    module = IPAdapter(shape, image_proj)
    if shape.kind == "flux":  # file name → ours
        names = {_XLABS_PROJ + k: f"image_proj.{k}" for k in module.image_proj.state_dict()}
        for i in range(len(shape.layers)):
            for kv in "kv":
                for part in ("weight", "bias"):
                    names[f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj.{part}"] = \
                        f"to_{kv}_ip.{i}.{part}"
    else:
        names = {f"image_proj.{k}": f"image_proj.{k}" for k in module.image_proj.state_dict()}
        for i, n in enumerate(range(1, 2 * len(shape.layers), 2)):
            names[f"ip_adapter.{n}.to_k_ip.weight"] = f"to_k_ip.{i}.weight"
            names[f"ip_adapter.{n}.to_v_ip.weight"] = f"to_v_ip.{i}.weight"
    missing = sorted(set(names) - set(sd))
    extra = sorted(set(sd) - set(names))
    own = module.state_dict()
    wrong = [n for n in names if n in sd and tuple(sd[n].shape) != tuple(own[names[n]].shape)]
    if missing or extra or wrong:
        problems = ([f"missing {', '.join(missing[:4])}"] if missing else []) + \
                   ([f"unexpected {', '.join(extra[:4])}"] if extra else []) + \
                   ([f"{wrong[0]} is {tuple(sd[wrong[0]].shape)}, expected {tuple(own[names[wrong[0]]].shape)}"]
                    if wrong else [])
        raise ModelError(f"{source}: tensors do not fit the IP-Adapter ({shape.kind}) they describe: "
                         + "; ".join(problems))
    module.load_state_dict({names[n]: t for n, t in sd.items()}, strict=True)
    return module.eval().requires_grad_(False).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- the UNet's cross-attention


def cross_attention_layers(unet: nn.Module) -> list[nn.Module]:
    """The UNet's cross-attention layers (``attn2``) in the order IP-Adapter files number them: the
    order diffusers lists the attention processors (down blocks, up blocks, then the middle block)."""
    names = [name.removesuffix(".processor") for name in unet.attn_processors if name.endswith("attn2.processor")]
    return [unet.get_submodule(name) for name in names]


def check_fits(adapter: IPAdapter, unet: nn.Module, name: str) -> None:
    """The adapter's layers must be the UNet's cross-attention layers, width for width (a FLUX adapter's:
    the transformer's double blocks, from its text width to its attention width)."""
    flux_model = hasattr(unet, "transformer_blocks") and hasattr(unet, "single_transformer_blocks")
    if (adapter.shape.kind == "flux") != flux_model:
        made, model = ("FLUX", "an SD/SDXL UNet") if adapter.shape.kind == "flux" else ("SD/SDXL", "FLUX")
        raise ModelError(f"IP-Adapter {name} is made for {made}; this checkpoint is {model}: use an IP-Adapter "
                         "made for the checkpoint's family")
    if flux_model:
        widths = [(unet.config.joint_attention_dim, block.attn.inner_dim) for block in unet.transformer_blocks]
        what = "double blocks"
    else:
        widths = [(layer.to_k.in_features, layer.to_k.out_features) for layer in cross_attention_layers(unet)]
        what = "cross-attention layers"
    if list(adapter.shape.layers) != widths:
        raise ModelError(f"IP-Adapter {name} has {len(adapter.shape.layers)} {what} "
                         f"{_widths(adapter.shape.layers)}, this checkpoint's model {len(widths)} {_widths(widths)}: "
                         "use an IP-Adapter made for the checkpoint's family")


def _widths(layers) -> str:
    kinds = sorted(set(layers))
    return "(" + ", ".join(f"{a}→{b}" for a, b in kinds) + ")"


class _DecoupledAttention:
    """An ``attn2`` processor: the layer's own processor for the prompt, plus, for each IP-Adapter
    active in this call, ``scale`` x attention of the same queries to the picture's tokens, through
    the layer's output projection (its bias counted once)."""

    def __init__(self, original, extras: list[tuple[torch.Tensor, nn.Linear, nn.Linear, float]]):
        self.original, self.extras = original, extras

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if not self.extras:
            return out
        b, n, _ = hidden_states.shape
        heads = attn.heads
        query = attn.to_q(hidden_states)
        added = None
        for tokens, to_k, to_v, scale in self.extras:
            key, value = to_k(tokens), to_v(tokens)
            split = [t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (query, key, value)]
            ip = F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, -1)
            added = ip * scale if added is None else added + ip * scale
        added = F.linear(added.to(attn.to_out[0].weight.dtype), attn.to_out[0].weight)
        return out + added / attn.rescale_output_factor


@contextmanager
def adapters_applied(unet: nn.Module, active: list[tuple[IPAdapter, torch.Tensor, float]]) -> Iterator[None]:
    """Inside the block, ``unet``'s cross-attention layers also attend to each adapter's tokens (rows
    matching the call's batch) times its scale; nothing changes when ``active`` is empty."""
    with _processors_wrapped(unet, cross_attention_layers, _DecoupledAttention, active):
        yield


@contextmanager
def _processors_wrapped(model: nn.Module, layers_of, wrapper, active: list[tuple[IPAdapter, torch.Tensor, float]]
                        ) -> Iterator[None]:
    """Each of ``layers_of(model)`` with its processor wrapped in ``wrapper`` (given, per active adapter, the
    tokens and the adapter's projections for that layer, and its scale), the model's own uncompiled forward
    running inside the block; the processors put back after. Nothing changes when ``active`` is empty."""
    if not active:
        yield
        return
    from .optimize import eager

    layers = layers_of(model)
    saved = [(layer, layer.processor) for layer in layers]
    try:
        for i, layer in enumerate(layers):
            extras = [(tokens.to(adapter.to_k_ip[i].weight.dtype), adapter.to_k_ip[i], adapter.to_v_ip[i], scale)
                      for adapter, tokens, scale in active]
            layer.processor = wrapper(layer.processor, extras)
        with eager(model):
            yield
    finally:
        for layer, processor in saved:
            layer.processor = processor


class _FluxImageAttention:
    """A FLUX double block's attention processor: the block's own, plus, for each active adapter, ``scale`` x
    attention of the picture stream's queries (normalised, before the rotary embedding) to the picture's
    tokens, as XLabs' adapter and diffusers' ``FluxIPAdapterAttnProcessor`` do; the block adds that third
    output to its picture stream after its feed-forward, ungated."""

    def __init__(self, original, extras: list[tuple[torch.Tensor, nn.Linear, nn.Linear, float]]):
        self.original, self.extras = original, extras

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        out = self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        b = hidden_states.shape[0]
        query = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (-1, attn.head_dim))).transpose(1, 2)
        added = None
        for tokens, to_k, to_v, scale in self.extras:
            key, value = (proj(tokens).view(b, -1, query.shape[1], attn.head_dim).transpose(1, 2)
                          for proj in (to_k, to_v))
            ip = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).reshape(b, -1, query.shape[1]
                                                                                          * attn.head_dim)
            added = ip * scale if added is None else added + ip * scale
        return (*out, added.to(out[0].dtype))


@contextmanager
def flux_adapters_applied(transformer: nn.Module, active: list[tuple[IPAdapter, torch.Tensor, float]]
                          ) -> Iterator[None]:
    """Inside the block, the FLUX transformer's double blocks also attend to each adapter's tokens (rows
    matching the call's batch) times its scale; nothing changes when ``active`` is empty."""
    with _processors_wrapped(transformer, lambda t: [block.attn for block in t.transformer_blocks],
                             _FluxImageAttention, active):
        yield


# --------------------------------------------------------------------------- CLIP's reading of the picture


#: OpenAI CLIP's picture normalisation (the IP-Adapters' encoders were trained with it).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_pixels(image, size: int) -> torch.Tensor:
    """(1, 3, size, size): CLIP's preprocessing as transformers' ``CLIPImageProcessor`` does it: the
    shortest side resized to ``size`` (bicubic, the other side rounded as it rounds it), a centre crop,
    values / 255 normalised with CLIP's mean and deviation. A picture more than 8 times longer than wide
    (or the other way round) is first cut to its middle 8:1, so that a strip cannot make a huge resize
    (only the middle square is kept anyway)."""
    import numpy as np
    from PIL import Image

    picture = image.convert("RGB")
    w, h = picture.size
    if max(w, h) > 8 * min(w, h):
        keep = 8 * min(w, h)
        picture = picture.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h) if w > h
                               else (0, (h - keep) // 2, w, (h - keep) // 2 + keep))
        w, h = picture.size
    short, long = (w, h) if w <= h else (h, w)
    other = int(size * long / short)
    new = (size, other) if w <= h else (other, size)
    picture = picture.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    picture = picture.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def picture_states(encoder, adapter: IPAdapter, image) -> tuple[torch.Tensor, torch.Tensor]:
    """(the picture's CLIP states, no picture's) as the adapter reads them: the projected image
    embedding and zeros (base), or the penultimate hidden states of the picture and of an all-zero
    input (Plus, full-face); FLUX: the projected image embeddings of the picture and of a black one."""
    param = next(encoder.parameters())
    pixels = clip_pixels(image, encoder.config.image_size).to(device=param.device, dtype=param.dtype)
    with torch.inference_mode():
        if adapter.shape.kind == "flux":  # diffusers' FLUX pipeline reads a black picture for the negative rows
            black = clip_pixels(_black(), encoder.config.image_size).to(pixels)
            embeds = encoder(torch.cat([pixels, black])).image_embeds
            return embeds[:1], embeds[1:]
        if not adapter.shape.uses_hidden_states:
            embeds = encoder(pixels).image_embeds
            return embeds, torch.zeros_like(embeds)
        both = encoder(torch.cat([pixels, torch.zeros_like(pixels)]), output_hidden_states=True).hidden_states[-2]
        return both[:1], both[1:]


def _black():
    from PIL import Image

    return Image.new("RGB", (64, 64))


def clip_vision_config(state: Mapping[str, torch.Tensor], source: str):
    """A transformers ``CLIPVisionConfig`` from a CLIP vision model's tensors (the ``vision_model.*``
    layout of transformers, which the IP-Adapter encoders and ComfyUI's clip_vision files use)."""
    from transformers import CLIPVisionConfig

    def tensor(name: str) -> torch.Tensor:
        t = state.get(name)
        if not isinstance(t, torch.Tensor):
            raise ModelError(f"{source}: CLIP vision model without {name!r}: not a transformers CLIP vision file")
        return t

    hidden = tensor("vision_model.embeddings.class_embedding").shape[0]
    patch = tensor("vision_model.embeddings.patch_embedding.weight").shape[-1]
    positions = tensor("vision_model.embeddings.position_embedding.weight").shape[0]
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise ModelError(f"{source}: CLIP vision model with {positions} positions; expected a square of patches + 1")
    layers = 1 + max(int(m.group(1)) for n in state if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", n)))
    intermediate = tensor("vision_model.encoder.layers.0.mlp.fc1.weight").shape[0]
    projection = tensor("visual_projection.weight").shape[0]
    # The released encoders use 64-wide heads but ViT-H/14 and ViT-bigG/14 (80 and 104 wide: 16 heads).
    heads = {1280: 16, 1664: 16}.get(hidden, max(hidden // 64, 1))
    # OpenCLIP's ViT-H and bigG use GELU; OpenAI's ViT-L and B quick GELU
    act = "gelu" if hidden in (1280, 1664) else "quick_gelu"
    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=intermediate, projection_dim=projection,
                            num_hidden_layers=layers, num_attention_heads=heads, image_size=side * patch,
                            patch_size=patch, hidden_act=act, layer_norm_eps=1e-5)


_ENCODER_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
#: What each file of a clip_vision folder is, by (path, mtime, size): its config, or None when it is not a
#: CLIP vision model (a pickle's tensors must be read to tell, so each file is read once).
_CONFIGS: dict[tuple, object] = {}


def encoder_config(path: Path):
    """The ``CLIPVisionConfig`` of a CLIP vision file or folder, None when it is not one (remembered per
    file version)."""
    is_folder = path.is_dir() and (path / "config.json").is_file()
    if not is_folder and not (path.is_file() and path.suffix.lower() in _ENCODER_SUFFIXES):
        return None
    stat = (path / "config.json" if is_folder else path).stat()
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    if key not in _CONFIGS:
        if len(_CONFIGS) > 64:
            _CONFIGS.clear()
        try:
            if is_folder:
                _CONFIGS[key] = _folder_config(path)
            else:
                from .header import read_header

                shapes = {k: torch.empty(v.shape, device="meta") for k, v in read_header(path).tensors.items()}
                _CONFIGS[key] = clip_vision_config(shapes, str(path))
        except Exception:  # not a CLIP vision model (or not readable): the caller looks at the next file
            _CONFIGS[key] = None
    return _CONFIGS[key]


def _folder_config(path: Path):
    """The vision config of a transformers folder: a CLIP vision model's, or a whole CLIP model's vision half
    (whose projection width is the whole model's)."""
    import json

    from transformers import CLIPConfig, CLIPVisionConfig

    kind = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    if kind == "clip":
        whole = CLIPConfig.from_pretrained(str(path), local_files_only=True)
        vision = whole.vision_config
        vision.projection_dim = whole.projection_dim
        return vision
    if kind != "clip_vision_model":
        raise ModelError(f"{path}: a {kind} model, not a CLIP vision model")
    return CLIPVisionConfig.from_pretrained(str(path), local_files_only=True)


#: The text half of a whole CLIP model's weights (openai/clip-vit-large-patch14's model.safetensors), left out.
_TEXT_HALF = ("text_model.", "text_projection.", "logit_scale")


def load_clip_vision(path: Path, device="cpu", dtype=torch.float32):
    """A ``CLIPVisionModelWithProjection`` from a transformers folder (config.json and weights) or one
    weights file (``.safetensors``; ``.bin``/``.pth``/``.pt`` read with ``weights_only``), its config
    worked out from the tensors. A whole CLIP model (vision and text) gives its vision half."""
    from transformers import CLIPVisionModelWithProjection

    from .header import load_state_dict

    if path.is_dir():
        config = _folder_config(path)
        weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
        if weights is None:
            raise ModelError(f"{path}: CLIP vision folder without model.safetensors or pytorch_model.bin")
        state = load_state_dict(weights)
    else:
        state = load_state_dict(path)
        config = clip_vision_config(state, str(path))
    state = {k: v for k, v in state.items() if not k.endswith("position_ids") and not k.startswith(_TEXT_HALF)}
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        what = f"missing {', '.join(missing[:3])}" if missing else f"unexpected {', '.join(unexpected[:3])}"
        raise ModelError(f"{path}: tensors do not fit a CLIP vision model ({what})")
    positions = (config.image_size // config.patch_size) ** 2 + 1  # the one buffer not in the files
    model.vision_model.embeddings.register_buffer("position_ids", torch.arange(positions).unsqueeze(0),
                                                  persistent=False)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ModelError(f"{path}: the CLIP vision model was left incomplete by its file")
    return model.eval().requires_grad_(False).to(device=device, dtype=dtype)
