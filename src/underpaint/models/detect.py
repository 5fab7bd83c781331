"""Which model a checkpoint holds, decided from tensor names and shapes alone.

Original single-file checkpoints (CompVis LDM for SD1/SD2, Stability's SGM for SDXL) keep
each component under a fixed prefix, and each family's text encoder has a tell-tale layout:
SD1 stores OpenAI CLIP-L in transformers' names, SD2 stores OpenCLIP ViT-H in OpenCLIP's own
names, SDXL stores both CLIP-L and OpenCLIP bigG under ``conditioner.embedders.{0,1}`` and adds
the size/crop embedding ``label_emb``. The SDXL refiner keeps only bigG, as
``conditioner.embedders.0``, and its ``label_emb`` also takes an aesthetic score.
:data:`FAMILIES` is that table; :func:`detect` walks it.

FLUX.1 is told apart by its transformer alone (``double_blocks.*``, in Black Forest Labs' names,
bare or under ``model.diffusion_model.``; or diffusers' ``transformer_blocks.*`` with
``x_embedder``): its text encoders and VAE usually come as separate files. The variant follows
from two tensors: a guidance embedding (``guidance_in``) means dev, none means schnell, and an
image input of 384 features (latent, masked-image latent and the 8x8-packed mask) means Fill.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path

from ..errors import InvalidParameter, ModelError
from .header import CheckpointHeader

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


class Family(str, Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    #: Stability's SDXL refiner 1.0 architecture: bigG alone, an aesthetic score among its size ids.
    SDXL_REFINER = "sdxl_refiner"
    FLUX = "flux"

    @property
    def latent_space(self) -> Family:
        """The family whose VAE latents this one's UNet works on (the refiner shares SDXL's)."""
        return Family.SDXL if self == Family.SDXL_REFINER else self

    def shares_latents(self, other: Family) -> bool:
        """Whether one Stable Diffusion family's latents are the other's: SD 1.x and 2.x share theirs, SDXL
        and its refiner theirs (FLUX's are its own: its callers refuse it first)."""
        return (self.latent_space == Family.SDXL) == (other.latent_space == Family.SDXL)


@dataclass(frozen=True)
class TextEncoderLayout:
    """Where one text encoder lives in a single-file checkpoint and how it is built."""

    #: Key prefix in the checkpoint.
    prefix: str
    #: "hf": transformers' CLIP names (``text_model.*``); "openclip": OpenCLIP names (``transformer.resblocks.*``).
    naming: str
    #: The key whose shape gives (vocab, hidden).
    token_embedding: str
    #: Activation of the MLP: OpenAI CLIP uses quick_gelu, OpenCLIP exact gelu.
    hidden_act: str
    #: Build ``CLIPTextModelWithProjection`` (SDXL's bigG, whose pooled output conditions the UNet).
    with_projection: bool
    #: SD2 is conditioned on the penultimate layer (then ln_final): the last block is not built, as in diffusers.
    drop_last_layer: bool
    #: Padding token of this encoder's tokenizer.
    pad_token: str


@dataclass(frozen=True)
class FamilyLayout:
    family: Family
    text_encoders: tuple[TextEncoderLayout, ...]
    #: Keys that must all be present for this family to match.
    markers: tuple[str, ...]
    scaling_factor: float
    #: Native training resolution of the eps model (SD2 v models are 768).
    default_size: int
    #: SD2 checkpoints come as eps (512 base) or v (768): only SD2 gets the probing forward pass
    #: (not its 9-channel inpainting model, which is eps like A1111 assumes).
    probe_prediction: bool
    #: What the text hidden size is in real files, for messages only (tiny test files differ).
    real_context_dim: int
    #: How many size/crop/score numbers ``label_emb`` embeds after the pooled text (0: no ``label_emb``):
    #: SDXL 6 (original size, crop, target size), the refiner 5 (original size, crop, aesthetic score).
    time_ids: int = 0


def _bigg(prefix: str) -> TextEncoderLayout:
    """OpenCLIP ViT-bigG/14's text tower in OpenCLIP's names, with its projection (SDXL, the refiner)."""
    return TextEncoderLayout(prefix=prefix, naming="openclip", token_embedding="token_embedding.weight",
                             hidden_act="gelu", with_projection=True, drop_last_layer=False, pad_token="!")


def _clip_l(prefix: str) -> TextEncoderLayout:
    """OpenAI CLIP ViT-L/14's text model, stored in transformers' names (SD1, SDXL's first encoder)."""
    return TextEncoderLayout(prefix=prefix, naming="hf", token_embedding="text_model.embeddings.token_embedding.weight",
                             hidden_act="quick_gelu", with_projection=False, drop_last_layer=False,
                             pad_token="<|endoftext|>")


FAMILIES: tuple[FamilyLayout, ...] = (
    FamilyLayout(
        family=Family.SDXL,
        text_encoders=(_clip_l("conditioner.embedders.0.transformer."), _bigg("conditioner.embedders.1.model.")),
        markers=("conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
                 "conditioner.embedders.1.model.token_embedding.weight", UNET_PREFIX + "label_emb.0.0.weight"),
        scaling_factor=0.13025, default_size=1024, probe_prediction=False, real_context_dim=2048, time_ids=6,
    ),
    FamilyLayout(
        family=Family.SDXL_REFINER,
        text_encoders=(_bigg("conditioner.embedders.0.model."),),
        markers=("conditioner.embedders.0.model.token_embedding.weight", UNET_PREFIX + "label_emb.0.0.weight"),
        scaling_factor=0.13025, default_size=1024, probe_prediction=False, real_context_dim=1280, time_ids=5,
    ),
    FamilyLayout(
        family=Family.SD2,
        text_encoders=(
            TextEncoderLayout(prefix="cond_stage_model.model.", naming="openclip",
                              token_embedding="token_embedding.weight", hidden_act="gelu", with_projection=False,
                              drop_last_layer=True, pad_token="!"),
        ),
        markers=("cond_stage_model.model.token_embedding.weight",),
        scaling_factor=0.18215, default_size=512, probe_prediction=True, real_context_dim=1024,
    ),
    FamilyLayout(
        family=Family.SD1,
        text_encoders=(_clip_l("cond_stage_model.transformer."),),
        markers=("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",),
        scaling_factor=0.18215, default_size=512, probe_prediction=False, real_context_dim=768,
    ),
)


def layout_of(family: Family) -> FamilyLayout:
    """The single-file layout of an SD family (FLUX has its own loader and no entry here)."""
    layout = next((f for f in FAMILIES if f.family == family), None)
    if layout is None:
        raise ModelError(f"{family.value} models have no Stable Diffusion single-file layout")
    return layout


def is_edit_checkpoint(path) -> bool:
    """Whether a checkpoint (a safetensors file or a diffusers folder) is an InstructPix2Pix edit model:
    its UNet takes 8 input channels. Read from the header or the UNet's config only; False when unsure."""
    import json
    from pathlib import Path

    from .header import read_header, sniff_format

    p = Path(path)
    try:
        if p.is_dir():
            config = p / "unet" / "config.json"
            return config.is_file() and json.loads(config.read_text()).get("in_channels") == 8
        if not p.is_file() or sniff_format(p) != "safetensors":
            return False
        conv_in = read_header(p).tensors.get(UNET_PREFIX + "input_blocks.0.0.weight")
        return conv_in is not None and len(conv_in.shape) == 4 and conv_in.shape[1] == 8
    except (ModelError, OSError, ValueError):
        return False


@dataclass(frozen=True)
class ModelSpec:
    """What the sampler and the pipeline need to know about a checkpoint."""

    family: Family
    #: "eps" (predicts the noise), "v" (velocity, Salimans & Ho 2022) or "flow" (FLUX: rectified-flow velocity).
    prediction: str
    #: 4, 8 for InstructPix2Pix edit models ([latent, the picture's latent]), or 9 for inpainting models
    #: ([latent, mask, masked-image latent]); for FLUX the transformer's packed input features: 64 (16
    #: latent channels x 2x2 patches), 384 for Fill.
    in_channels: int
    latent_channels: int = 4
    scaling_factor: float = 0.18215
    #: Why ``prediction`` has its value: "override", "v_pred key", "metadata", "probe", "config" or "default".
    prediction_source: str = "default"
    #: The latent the model sees is ``(z - shift_factor) * scaling_factor`` (0 for SD, 0.1159 for FLUX's VAE).
    shift_factor: float = 0.0
    #: FLUX: "dev" (guidance-distilled), "schnell" (timestep-distilled, no guidance input) or "fill"; SD: "".
    variant: str = ""

    @property
    def is_inpaint(self) -> bool:
        return self.in_channels == 9 or self.variant == "fill"

    @property
    def is_edit(self) -> bool:
        """An InstructPix2Pix edit model: it sees the picture to edit beside the latent and follows an instruction."""
        return self.in_channels == 8 and self.family != Family.FLUX

    @property
    def default_size(self) -> int:
        """The resolution the model was trained at: 512 SD1, 768 SD2-v (512 SD2 base), 1024 SDXL and FLUX."""
        if self.family == Family.FLUX:
            return FLUX_DEFAULT_SIZE
        if self.family == Family.SD2 and self.prediction == "v":
            return 768
        return layout_of(self.family).default_size


# --- FLUX.1 ----------------------------------------------------------------------------------------

#: The FLUX.1 autoencoder's latent statistics (Black Forest Labs' ``ae.safetensors``): z → (z - shift) * scale.
FLUX_SCALING_FACTOR = 0.3611
FLUX_SHIFT_FACTOR = 0.1159
FLUX_LATENT_CHANNELS = 16
FLUX_DEFAULT_SIZE = 1024
#: A tensor only FLUX transformers have, in each naming (the BFL name's prefix varies by file).
FLUX_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"
FLUX_DIFFUSERS_MARKER = "transformer_blocks.0.attn.norm_added_k.weight"
#: Image-input features: 16 latent channels in 2x2 patches; Fill adds the masked-image latent and the packed mask.
FLUX_IN_FEATURES = {64: "normal", 384: "fill"}


@dataclass(frozen=True)
class FluxLayout:
    """Where a FLUX transformer sits in a file and which names it uses."""

    #: Key prefix of the transformer ("" or "model.diffusion_model." in the files seen so far).
    prefix: str
    #: "bfl" (Black Forest Labs' original names) or "diffusers" (``FluxTransformer2DModel`` names).
    naming: str

    def key(self, bfl: str, diffusers: str) -> str:
        return self.prefix + (bfl if self.naming == "bfl" else diffusers)

    @property
    def img_in(self) -> str:
        return self.key("img_in.weight", "x_embedder.weight")

    @property
    def guidance_in(self) -> str:
        return self.key("guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight")


def flux_layout(names: dict | set) -> FluxLayout | None:
    """The FLUX transformer's prefix and naming in a file, or None when it holds none."""
    for key in names:
        if key.endswith(FLUX_MARKER):
            prefix = key[: -len(FLUX_MARKER)]
            if prefix == "" or prefix.endswith("."):
                return FluxLayout(prefix, "bfl")
    if FLUX_DIFFUSERS_MARKER in names and "x_embedder.weight" in names:
        return FluxLayout("", "diffusers")
    return None


def flux_spec(in_features: int, has_guidance: bool, *, prediction: str | None = None,
              source: str = "default") -> ModelSpec:
    """The FLUX ModelSpec for a transformer with ``in_features`` image inputs and/or a guidance embedding."""
    kind = FLUX_IN_FEATURES.get(in_features)
    if kind is None:
        what = " (a FLUX Canny/Depth control model)" if in_features == 128 else ""
        raise ModelError(f"unsupported: the FLUX transformer takes {in_features} image features{what}; "
                         "expected 64 (dev, schnell) or 384 (Fill)")
    if prediction is not None and str(prediction).strip().lower() not in ("flow", "flow_match", "rectified_flow"):
        raise InvalidParameter("prediction", prediction, "'flow' (or nothing) for a FLUX model")
    variant = "fill" if kind == "fill" else ("dev" if has_guidance else "schnell")
    return ModelSpec(family=Family.FLUX, prediction="flow", in_channels=in_features,
                     latent_channels=FLUX_LATENT_CHANNELS, scaling_factor=FLUX_SCALING_FACTOR,
                     prediction_source="override" if prediction is not None else source,
                     shift_factor=FLUX_SHIFT_FACTOR, variant=variant)


def detect_flux(header: CheckpointHeader, *, prediction: str | None = None) -> ModelSpec:
    """The FLUX ModelSpec of a file holding a FLUX transformer (raises when it holds none)."""
    layout = flux_layout(header.tensors)
    if layout is None:
        raise ModelError(f"not a FLUX model: {describe_tensors(header.tensors)}; expected a FLUX transformer "
                         f"({FLUX_MARKER}, ...)")
    _refuse_bnb(header.tensors)
    if layout.img_in not in header.tensors:
        raise ModelError(f"the FLUX transformer has no image input {layout.img_in}; the file is incomplete")
    return flux_spec(header.tensors[layout.img_in].shape[1], layout.guidance_in in header.tensors,
                     prediction=prediction)


def _refuse_bnb(names: dict) -> None:
    if any(k.endswith((".absmax", ".quant_map")) or ".quant_state." in k for k in names):
        raise ModelError("a bitsandbytes (NF4/FP4) quantized FLUX file read without its quantization states: "
                         "its weights' shapes are in them (read it with flux_loader.read_any_header or load_flux)")


# Recognisable files that are not a supported checkpoint: (what it looks like, any of these keys).
_UNSUPPORTED: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("an SD3 model", ("joint_blocks.0.context_block.adaLN_modulation.1.bias",
                      UNET_PREFIX + "joint_blocks.0.context_block.adaLN_modulation.1.bias")),
    ("an SD2 depth-to-image model", ("depth_model.model.pretrained.act_postprocess3.0.project.0.weight",)),
    ("a Stable Cascade model", ("clip_txt_mapper.weight", "down_blocks.1.0.channelwise.0.weight")),
)

# Files that are something other than a full checkpoint: (what it looks like, predicate on names).
_NOT_CHECKPOINTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a LoRA/LyCORIS file", ("lora_unet_", "lora_te", ".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.",
                             ".hada_w1_a", ".lokr_w1")),
    ("a ControlNet", ("control_model.", "input_hint_block.", "controlnet_cond_embedding.")),
    ("a textual-inversion embedding", ("string_to_param.", "emb_params", "clip_l", "clip_g")),
)


def detect(header: CheckpointHeader, *, prediction: str | None = None) -> ModelSpec:
    """Family, prediction type and channels of a single-file checkpoint, from its header."""
    names = header.tensors
    if flux_layout(names) is not None:
        return detect_flux(header, prediction=prediction)
    _refuse_unsupported(names)
    layout = next((f for f in FAMILIES if all(m in names for m in f.markers)), None)
    if layout is None:
        raise ModelError(f"not a Stable Diffusion checkpoint: {describe_tensors(names)}; expected an SD1, SD2 or SDXL "
                         "single-file checkpoint (model.diffusion_model.* with its text encoder)")
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    if conv_in not in names:
        raise ModelError(f"the {layout.family.value} checkpoint has no UNet ({conv_in} is missing); "
                         "it looks like a text encoder or VAE extracted on its own")
    in_channels = names[conv_in].shape[1]
    if in_channels not in (4, 8, 9):
        raise ModelError(f"unsupported: the UNet takes {in_channels} input channels; "
                         "expected 4 (normal), 8 (InstructPix2Pix) or 9 (inpainting)")
    _check_context_dim(header, layout)
    conv_out = names.get(UNET_PREFIX + "out.2.weight")
    spec = ModelSpec(family=layout.family, prediction="eps", in_channels=in_channels,
                     latent_channels=conv_out.shape[0] if conv_out else 4, scaling_factor=layout.scaling_factor)
    pred, source = prediction_hint(header, prediction)
    return replace(spec, prediction=pred, prediction_source=source) if pred else spec


def prediction_hint(header: CheckpointHeader, prediction: str | None = None) -> tuple[str | None, str]:
    """eps or v from what the file says: an explicit override, a ``v_pred`` key, then modelspec metadata.

    Returns ``(None, "default")`` when nothing tells; SD2 then needs :func:`probe_prediction`.
    """
    if prediction is not None:
        return normalise_prediction(prediction, "prediction"), "override"
    if "v_pred" in header.tensors:
        return "v", "v_pred key"
    meta = header.metadata.get("modelspec.prediction_type")
    if meta:
        return normalise_prediction(meta, "modelspec.prediction_type metadata"), "metadata"
    return None, "default"


def normalise_prediction(value: str, field: str) -> str:
    v = str(value).strip().lower().replace("-", "_")
    if v in ("eps", "epsilon"):
        return "eps"
    if v in ("v", "v_prediction", "vpred", "v_pred"):
        return "v"
    raise InvalidParameter(field, value, "'eps' (epsilon) or 'v' (v_prediction)")


def probe_prediction(unet_forward, context_dim: int) -> str:
    """Tell SD2 v models from eps ones with one forward pass, as A1111 does for SD2 files.

    At the last timestep (t = 999) the latent is almost pure noise. An eps model then returns
    roughly its input (the noise it sees); a v model returns roughly ``-x0``, far from it.
    Feeding a constant 0.5 latent (1x4x8x8) and a constant 0.5 context of two tokens, A1111
    calls the model v-prediction when the mean of (output - input) is below -1.

    ``unet_forward(sample, timestep, context) -> Tensor`` runs the UNet in float32.
    """
    import torch

    with torch.no_grad():
        x = torch.full((1, 4, 8, 8), 0.5)
        context = torch.full((1, 2, context_dim), 0.5)
        out = unet_forward(x, torch.tensor([999]), context)
        return "v" if (out.float() - x).mean().item() < -1 else "eps"


def _refuse_unsupported(names: dict) -> None:
    for what, keys in _UNSUPPORTED:
        if any(k in names for k in keys):
            raise ModelError(f"unsupported: looks like {what}; underpaint loads SD1, SD2, SDXL and FLUX.1 checkpoints")


def describe_tensors(names: dict) -> str:
    """A short guess of what a file that is not a full checkpoint is, for error messages."""
    if not names:
        return "it holds no tensors"
    for what, fragments in _NOT_CHECKPOINTS:
        if any(any(f in n for f in fragments) for n in names):
            return f"it looks like {what}"
    if any(n.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.", "decoder.up_blocks.",
                         VAE_PREFIX + "encoder.")) for n in names) and not any(n.startswith(UNET_PREFIX) for n in names):
        return "it looks like a VAE on its own (use it with --vae / vae=)"
    if any(n.startswith(("down_blocks.", "conv_in.")) for n in names):
        return "it looks like a UNet in diffusers' names without its text encoder and VAE"
    if any(n.startswith(UNET_PREFIX) for n in names):
        return "it has a UNet but no text encoder this loader recognises"
    sample = ", ".join(sorted(names)[:3])
    return f"its {len(names)} tensors ({sample}, ...) match no known layout"


def _check_context_dim(header: CheckpointHeader, layout: FamilyLayout) -> None:
    """The UNet's cross-attention width must equal the text encoders' hidden sizes added up."""
    k_keys = [k for k in header.tensors if k.startswith(UNET_PREFIX) and k.endswith("attn2.to_k.weight")]
    if not k_keys:
        raise ModelError(f"the {layout.family.value} checkpoint's UNet has no cross-attention (attn2) layers")
    context_dim = header.tensors[k_keys[0]].shape[1]
    hidden = sum(header.tensors[t.prefix + t.token_embedding].shape[1] for t in layout.text_encoders)
    if context_dim != hidden:
        raise ModelError(f"the {layout.family.value} checkpoint's UNet expects text features of width {context_dim} "
                         f"but its text encoder gives {hidden} (real {layout.family.value} files use "
                         f"{layout.real_context_dim}); the file mixes parts of different models")


def detect_diffusers_folder(folder: str | Path, *, prediction: str | None = None) -> ModelSpec:
    """Family and prediction of a diffusers pipeline folder, from its JSON configs."""
    folder = Path(folder)
    if (folder / "transformer").is_dir() and not (folder / "unet").is_dir():
        return _detect_flux_folder(folder, prediction)
    unet_cfg = _read_json(folder / "unet" / "config.json")
    vae_cfg = _read_json(folder / "vae" / "config.json")
    if unet_cfg.get("addition_embed_type") == "text_time" or (folder / "text_encoder_2").is_dir():
        # The refiner's folder has bigG alone, as text_encoder_2 (its model_index says requires_aesthetics_score).
        family = Family.SDXL if (folder / "text_encoder").is_dir() else Family.SDXL_REFINER
    else:
        te_cfg = _read_json(folder / "text_encoder" / "config.json")
        family = Family.SD2 if te_cfg.get("hidden_act") == "gelu" else Family.SD1
    layout = layout_of(family)
    if prediction is not None:
        pred, source = normalise_prediction(prediction, "prediction"), "override"
    else:
        sched = folder / "scheduler" / "scheduler_config.json"
        kind = _read_json(sched).get("prediction_type", "epsilon") if sched.exists() else "epsilon"
        pred, source = normalise_prediction(kind, "scheduler prediction_type"), "config"
    return ModelSpec(family=family, prediction=pred, in_channels=int(unet_cfg.get("in_channels", 4)),
                     latent_channels=int(vae_cfg.get("latent_channels", 4)),
                     scaling_factor=float(vae_cfg.get("scaling_factor", layout.scaling_factor)),
                     prediction_source=source)


def _detect_flux_folder(folder: Path, prediction: str | None) -> ModelSpec:
    """A diffusers FLUX folder: the variant from the transformer's config, the latent statistics from the VAE's."""
    cfg = _read_json(folder / "transformer" / "config.json")
    if cfg.get("_class_name") != "FluxTransformer2DModel":
        raise ModelError(f"unsupported: {folder} holds a {cfg.get('_class_name', 'unknown')} transformer; "
                         "expected FluxTransformer2DModel (FLUX.1)")
    spec = flux_spec(int(cfg.get("in_channels", 64)), bool(cfg.get("guidance_embeds", False)), prediction=prediction,
                     source="config")
    vae_cfg = _read_json(folder / "vae" / "config.json")
    return replace(spec, latent_channels=int(vae_cfg.get("latent_channels", spec.latent_channels)),
                   scaling_factor=float(vae_cfg.get("scaling_factor", spec.scaling_factor)),
                   shift_factor=float(vae_cfg.get("shift_factor") or 0.0))


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path.parent.parent}: not a diffusers model folder ({path.relative_to(path.parent.parent)} "
                         "is missing)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable config ({exc})") from None
