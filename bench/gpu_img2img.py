"""img2img speed, underpaint against diffusers, on the real SD 1.5, SDXL and FLUX.1 architectures.

One process builds each architecture once with random weights (timing does not depend on
weight values, so no checkpoint and no network are needed), hands the *same* module objects
to underpaint's engine and to diffusers' img2img pipelines, runs both on identical settings
and prints a table last. Run it from a source checkout::

    PYTHONPATH=src python bench/gpu_img2img.py                       # the three GPU cases
    PYTHONPATH=src python bench/gpu_img2img.py --compile-diffusers   # plus diffusers + torch.compile
    PYTHONPATH=src python bench/gpu_img2img.py --tiny                # tiny models on the CPU, ~1 minute
    PYTHONPATH=src python bench/gpu_img2img.py --cases flux-dev,flux-schnell   # FLUX.1, opt-in

Settings follow the performance issue: img2img, 30 steps at strength 0.65 (19 denoising steps
in diffusers), CFG 7, DPM++ 2M Karras, fp16 on CUDA. underpaint counts img2img steps as
AUTOMATIC1111 does (int(strength·steps) + 1), so it is given the strength that runs the same
number of steps on the same Karras grid; the UNet call count per run is recorded to prove it.

The FLUX cases (opt-in, ``--cases flux-dev,flux-schnell``) follow the FLUX model cards instead:
dev 28 steps at strength 0.65 with distilled guidance 3.5, schnell 4 steps at strength 0.75
without guidance, Euler on the simple schedule, bf16 on CUDA, against diffusers'
FluxImg2ImgPipeline on the same transformer, T5, CLIP-L and VAE objects. Their pictures are also
checked against diffusers' (same seed and noise; diffusers made to take the VAE posterior's
mean, as underpaint does).

``--optimize`` (and ``--attention``) turns on the engine's speed switches
(underpaint.models.optimize: channels_last, fused_qkv, compile, cuda_graphs; the attention
kernel) for an extra underpaint row, and checks that its pictures equal the plain run's
within fp16 tolerance. Given more than once, each ``--optimize`` adds a row of its own (measured
alone, undone afterwards, checked on its own); ``--attention`` applies to every one of them.
``fp8`` is lossy (a speed/quality trade-off): a row with it reports its pictures' mean |Δ| and
PSNR against the plain row's as a measure, not as a pass/fail check.
``--token-merging R``, ``--deepcache N``, ``--ngms SIGMA`` and ``--taesd`` each add an underpaint row with that
trade-off (token merging at ratio R; DeepCache with a full UNet step every N steps, SD cases only; A1111's
Negative Guidance minimum sigma: every other evaluation below SIGMA without the negative prompt; A1111's VAE type
TAESD for encode and decode, a tiny autoencoder of random weights written to a models folder of the run's own),
timed in turn with the plain rows; their pictures differ by design, so their difference to the plain run's is reported,
not judged (random weights say nothing of quality).

``--profile DIR`` runs each row once more after its timed runs under torch.profiler and writes
``DIR/<case>--<row>.txt`` (the top ops/kernels and a summary: device busy and idle time, kernels,
ops, host-device syncs, device time by kind of work); the summary also goes into the log and into
the JSON under each result's ``profile``.

``--vae-precision P`` (fp32, fp16, bf16) adds an underpaint row whose VAE encode and decode run at
that precision (the engine's ``vae_precision``; the other rows run SDXL's VAE in float32, as diffusers
does, although underpaint's own default runs it in bfloat16 on Ampere or later GPUs). It
takes turns with the plain rows like the trade-off rows, and its pictures' difference is reported
the same way (fp16/bf16 change the picture slightly; random weights say nothing of quality).
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

PROMPT = "a lighthouse on a cliff at sunset, oil painting, detailed brushwork"
NEGATIVE = "blurry, low quality, watermark"
SEED = 1234

# --- architectures ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    """The module configs of one model architecture (diffusers/transformers keyword arguments)."""

    name: str
    family: str  # "sd1", "sdxl" or "flux"
    #: UNet2DConditionModel's config; FLUX: FluxTransformer2DModel's.
    unet: dict
    vae: dict
    #: One CLIPTextConfig dict per text encoder; SDXL's second one has a projection.
    text: tuple[dict, ...]
    #: Published parameter counts (UNet, VAE, text encoders), checked before a full-size run.
    params: tuple[int, int, tuple[int, ...]] | None = None
    #: FLUX: the T5 encoder's T5Config (it follows the CLIP-L encoder), and "dev" or "schnell".
    t5: dict | None = None
    variant: str = ""


def _vae(channels: tuple[int, ...], layers: int, scaling: float, sample: int, upcast: bool, groups: int = 32) -> dict:
    n = len(channels)
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=list(channels), layers_per_block=layers,
                latent_channels=4, norm_num_groups=min(groups, channels[0]), sample_size=sample,
                scaling_factor=scaling, force_upcast=upcast)


def _flux_vae(channels: tuple[int, ...], layers: int, sample: int, groups: int = 32) -> dict:
    """FLUX.1's autoencoder: 16 latent channels, no quant convs, latents shifted then scaled."""
    return {**_vae(channels, layers, 0.3611, sample, False, groups), "latent_channels": 16, "use_quant_conv": False,
            "use_post_quant_conv": False, "shift_factor": 0.1159}


def _flux_transformer(layers: int, single: int, head_dim: int, heads: int, joint: int, pooled: int, rope: tuple,
                      guidance: bool) -> dict:
    return dict(patch_size=1, in_channels=64, num_layers=layers, num_single_layers=single,
                attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint,
                pooled_projection_dim=pooled, guidance_embeds=guidance, axes_dims_rope=rope)


def _t5(d_model: int, d_kv: int, heads: int, d_ff: int, layers: int, vocab: int, buckets: int = 32,
        distance: int = 128) -> dict:
    return dict(vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_heads=heads,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=buckets,
                relative_attention_max_distance=distance)


def _clip(hidden: int, layers: int, act: str, *, intermediate: int | None = None, projection: int | None = None,
          pad_token_id: int = 49407) -> dict:
    return dict(vocab_size=49408, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), max_position_embeddings=77,
                hidden_act=act, layer_norm_eps=1e-5, projection_dim=projection or hidden, bos_token_id=49406,
                eos_token_id=49407, pad_token_id=pad_token_id)


def _sd1_unet(channels, layers, context, groups=32) -> dict:
    n = len(channels)
    return dict(sample_size=64, in_channels=4, out_channels=4,
                down_block_types=["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1),
                block_out_channels=list(channels), layers_per_block=layers, cross_attention_dim=context,
                attention_head_dim=8, norm_num_groups=groups)


def _sdxl_unet(channels, depth, heads, context, time_dim, pooled, groups=32) -> dict:
    n = len(channels)
    return dict(sample_size=128, in_channels=4, out_channels=4,
                down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1),
                up_block_types=["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"],
                block_out_channels=list(channels), layers_per_block=2, transformer_layers_per_block=list(depth),
                attention_head_dim=list(heads), cross_attention_dim=context, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=pooled + 6 * time_dim, norm_num_groups=groups)


# The "!" padding token of OpenCLIP's tokenizer has id 0.
ARCHS = {
    "sd15": Arch("sd15", "sd1", _sd1_unet((320, 640, 1280, 1280), 2, 768),
                 _vae((128, 256, 512, 512), 2, 0.18215, 512, False), (_clip(768, 12, "quick_gelu"),),
                 params=(859_520_964, 83_653_863, (123_060_480,))),
    "sdxl": Arch("sdxl", "sdxl", _sdxl_unet((320, 640, 1280), (1, 2, 10), (5, 10, 20), 2048, 256, 1280),
                 _vae((128, 256, 512, 512), 2, 0.13025, 1024, True),
                 (_clip(768, 12, "quick_gelu"), _clip(1280, 32, "gelu", projection=1280, pad_token_id=0)),
                 params=(2_567_463_684, 83_653_863, (123_060_480, 694_659_840))),
}
# FLUX.1 as published: 19 double + 38 single blocks of 24 heads x 128, T5-XXL (encoder only) and CLIP-L.
_FLUX_T5 = _t5(4096, 64, 64, 10240, 24, 32128)
for _variant, _guidance in (("dev", True), ("schnell", False)):
    ARCHS[f"flux-{_variant}"] = Arch(
        f"flux-{_variant}", "flux", _flux_transformer(19, 38, 128, 24, 4096, 768, (16, 56, 56), _guidance),
        _flux_vae((128, 256, 512, 512), 2, 1024), (_clip(768, 12, "quick_gelu"),), t5=_FLUX_T5, variant=_variant,
        params=(11_901_408_320 if _guidance else 11_891_178_560, 83_819_683, (123_060_480, 4_762_310_656)))
TINY_ARCHS = {
    "sd15": Arch("sd15-tiny", "sd1", _sd1_unet((32, 64), 2, 32, groups=16), _vae((32, 32, 32, 32), 1, 0.18215, 64, False),
                 (_clip(32, 2, "quick_gelu"),)),
    "sdxl": Arch("sdxl-tiny", "sdxl", _sdxl_unet((32, 64), (1, 2), (1, 1), 32 + 64, 8, 64, groups=16),
                 _vae((32, 32, 32, 32), 1, 0.13025, 64, True),
                 (_clip(32, 2, "quick_gelu"), _clip(64, 2, "gelu", projection=64, pad_token_id=0))),
}
for _variant, _guidance in (("dev", True), ("schnell", False)):
    TINY_ARCHS[f"flux-{_variant}"] = Arch(
        f"flux-{_variant}-tiny", "flux", _flux_transformer(1, 1, 16, 2, 32, 32, (4, 6, 6), _guidance),
        _flux_vae((8, 16, 16, 16), 1, 64, groups=8), (_clip(32, 2, "quick_gelu"),),
        t5=_t5(32, 8, 4, 64, 2, 60, buckets=8, distance=16), variant=_variant)


@dataclass(frozen=True)
class Case:
    name: str
    arch: str
    size: int
    batch: int
    #: The case's own steps, strength, CFG and distilled guidance, where they differ from the
    #: command line's defaults (FLUX); --steps, --strength and --cfg given explicitly win.
    steps: int | None = None
    strength: float | None = None
    cfg: float | None = None
    guidance: float | None = None


CASES = (Case("sd15", "sd15", 512, 1), Case("sd15-b16", "sd15", 512, 16), Case("sdxl", "sdxl", 1024, 1))
#: Opt-in (--cases): with T5-XXL they need ~35 GB of weights in bf16 and would push the default run past 10 minutes.
FLUX_CASES = (Case("flux-dev", "flux-dev", 1024, 1, steps=28, strength=0.65, cfg=1.0, guidance=3.5),
              Case("flux-schnell", "flux-schnell", 1024, 1, steps=4, strength=0.75, cfg=1.0))
TINY_SIZES = {"sd15": 64, "sd15-b16": 64, "sdxl": 128, "flux-dev": 64, "flux-schnell": 64}


# --- settings ---------------------------------------------------------------------------------

#: The SD cases' settings (the performance issue's); the FLUX cases carry their own.
SD_STEPS, SD_STRENGTH, SD_CFG = 30, 0.65, 7.0


@dataclass(frozen=True)
class Settings:
    device: torch.device
    dtype: torch.dtype
    steps: int
    strength: float
    cfg: float
    runs: int
    warmup: int
    #: One set of speed switch names per optimized row (``--optimize``, once per row).
    optimize: tuple[tuple[str, ...], ...]
    compile_diffusers: bool
    compile_mode: str
    #: FLUX.1-dev's distilled guidance (None: schnell, or SD).
    guidance: float | None = None
    #: FLUX cases: "dev" or "schnell"; "" for SD.
    flux: str = ""
    #: underpaint's memory mode for an extra row (``--vram``); "high" adds none.
    vram: str = "high"
    #: The VAE precision for an extra underpaint row (``--vae-precision``); "" adds none.
    vae_precision: str = ""
    #: The attention kernel for the optimized row (``--attention``; "auto": PyTorch's choice).
    attention: str = "auto"
    #: Token merging ratio for an extra underpaint row (``--token-merging``); 0 adds none.
    token_merging: float = 0.0
    #: DeepCache interval for an extra underpaint row (``--deepcache``); 0 adds none.
    deepcache: int = 0
    #: Negative Guidance minimum sigma for an extra underpaint row (``--ngms``); 0 adds none.
    ngms: float = 0.0
    #: TAESD for the VAE encode and decode in an extra underpaint row (``--taesd``).
    taesd: bool = False
    #: Folder for one profiled call per row (``--profile``); None: no profiling.
    profile: Path | None = None

    def tradeoffs(self) -> list[tuple[str, dict]]:
        """The extra underpaint rows that change the picture by design: (label, request fields)."""
        from underpaint.params import DeepCacheOptions

        rows = []
        if self.token_merging and not self.flux:  # token merging and DeepCache are for SD UNets
            rows.append((f"tome={self.token_merging:g}", dict(token_merging_ratio=self.token_merging)))
        if self.deepcache > 1 and not self.flux:
            rows.append((f"deepcache={self.deepcache}", dict(deepcache=DeepCacheOptions(interval=self.deepcache))))
        if self.ngms:
            rows.append((f"ngms={self.ngms:g}", dict(s_min_uncond=self.ngms)))
        if self.taesd:
            rows.append(("taesd", dict(vae_encode_method="TAESD", vae_decode_method="TAESD")))
        return rows

    @property
    def speeds(self) -> list:
        """The engine's speed switches, one SpeedOptions per optimized row: each ``--optimize`` set
        with ``--attention``; ``--attention`` alone when no set is given; none when nothing is on."""
        from underpaint.models.optimize import SpeedOptions

        mode = None if self.compile_mode == "default" else self.compile_mode
        speeds = [SpeedOptions.parse(names, attention=self.attention, compile_mode=mode)
                  for names in self.optimize or ((),)]
        return [s for s in speeds if s.describe() != "none"]

    @property
    def recipe(self) -> str:
        """Sampler and guidance in words, for the printed settings."""
        if not self.flux:
            return f"CFG {self.cfg}, DPM++ 2M Karras"
        guidance = "no distilled guidance" if self.guidance is None else f"distilled guidance {self.guidance}"
        return f"CFG {self.cfg}, {guidance}, Euler/Simple"

    @property
    def steps_run(self) -> int:
        """Denoising steps diffusers runs: int(steps · strength); its FLUX img2img pipeline starts at
        int(steps - steps · strength) instead, which runs one more when steps · strength is fractional."""
        if self.flux:
            return self.steps - int(max(self.steps - self.steps * self.strength, 0))
        return min(int(self.steps * self.strength), self.steps)

    @property
    def underpaint_strength(self) -> float:
        """The strength at which A1111's count, int(strength · steps) + 1, equals ``steps_run``."""
        return (self.steps_run - 0.5) / self.steps


# --- random weights ---------------------------------------------------------------------------


def _fill(name: str, p: torch.Tensor, gen: torch.Generator) -> None:
    """Variance-preserving uniform weights, unit norms, zero biases, CLIP-like 0.02 embeddings."""
    if name.endswith(("token_embedding.weight", "position_embedding.weight")):
        p.normal_(0.0, 0.02, generator=gen)
    elif p.ndim == 1:
        p.zero_() if name.endswith("bias") else p.fill_(1.0)
    else:
        bound = math.sqrt(3.0 / p[0].numel())
        p.uniform_(-bound, bound, generator=gen)


def materialise(module: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    """A meta-device module given random weights in place on ``device``, in ``dtype``."""
    # nn.Module.to, not diffusers' override, which warns about modules it would keep in float32.
    module = torch.nn.Module.to(module.to_empty(device=device), dtype)
    gen = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            _fill(name, p, gen)
        for mod_name, mod in module.named_modules():
            for name, buf in mod.named_buffers(recurse=False):
                if name != "position_ids":
                    raise RuntimeError(f"no rule to initialise buffer {mod_name}.{name}")
                buf.copy_(torch.arange(buf.shape[-1], device=device).expand(buf.shape))
    return module.eval().requires_grad_(False)


@dataclass
class Components:
    """One architecture's modules, shared by both libraries so that they run the same weights."""

    arch: Arch
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: tuple
    tokenizers: tuple


def _meta_modules(arch: Arch, vae_upcast: bool):
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    with torch.device("meta"):
        unet = (FluxTransformer2DModel if arch.family == "flux" else UNet2DConditionModel)(**arch.unet)
        vae = AutoencoderKL(**{**arch.vae, "force_upcast": arch.vae["force_upcast"] and vae_upcast})
        texts = tuple((CLIPTextModelWithProjection if i else CLIPTextModel)(CLIPTextConfig(**cfg))
                      for i, cfg in enumerate(arch.text))
        if arch.t5 is not None:
            texts += (T5EncoderModel(T5Config(**arch.t5)),)
    return unet, vae, texts


def check_param_counts(arch: Arch) -> None:
    """The configs above are the published architectures: same parameter counts (no memory used)."""
    if arch.params is None:
        return
    unet, vae, texts = _meta_modules(arch, True)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    found = (count(unet), count(vae), tuple(count(t) for t in texts))
    if found != arch.params:
        raise SystemExit(f"{arch.name}: parameter counts {found} differ from the published {arch.params}")


def build_components(arch: Arch, settings: Settings, *, vae_upcast: bool) -> Components:
    from underpaint.models.tokenizer import clip_tokenizer

    unet, vae, texts = _meta_modules(arch, vae_upcast)
    dev, dt = settings.device, settings.dtype
    unet = materialise(unet, dev, dt, SEED)
    vae = materialise(vae, dev, dt, SEED + 1)
    texts = tuple(materialise(t, dev, dt, SEED + 2 + i) for i, t in enumerate(texts))
    if arch.family == "flux":
        return Components(arch, unet, vae, texts, (clip_tokenizer(), t5_tokenizer()))
    pads = ("<|endoftext|>", "!")[: len(texts)]
    return Components(arch, unet, vae, texts, tuple(clip_tokenizer(p) for p in pads))


#: What the stand-in T5 tokenizer is trained on. Its ids (< 60) are valid rows of any T5 vocabulary,
#: and the prompt is padded to the same 512 (256) tokens either way, so the work is T5-XXL's.
T5_CORPUS = (PROMPT, "a photo of a cat sitting on a red chair in the sun", "the same street at night, rain, neon lights",
             "an oil painting of mountains and a lake at dawn", "portrait of an old man with a beard, studio light")


def t5_tokenizer():
    """A T5 tokenizer from a small sentencepiece model trained here (no download needed)."""
    import tempfile

    import sentencepiece as spm
    from transformers import T5TokenizerFast

    with tempfile.TemporaryDirectory() as folder:
        corpus = Path(folder) / "corpus.txt"
        corpus.write_text("\n".join(T5_CORPUS * 30), encoding="utf-8")
        spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(Path(folder) / "spiece"), vocab_size=60,
                                       model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
        return T5TokenizerFast(vocab_file=str(Path(folder) / "spiece.model"), extra_ids=0)


def stub_unet(unet: torch.nn.Module) -> None:
    """Make the UNet (FLUX: transformer) answer half its input at once, so what remains is each
    library's own work around it (per-step overhead, text encoders, VAE). Not a speed figure."""
    if type(unet).__name__ == "FluxTransformer2DModel":

        def flux_forward(hidden_states, *args, return_dict=True, **kwargs):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            out = hidden_states * 0.5
            return Transformer2DModelOutput(sample=out) if return_dict else (out,)

        unet.forward = flux_forward
        return

    def forward(sample, timestep, encoder_hidden_states=None, *args, return_dict=True, **kwargs):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        out = sample * 0.5
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    unet.forward = forward


# --- the two libraries ------------------------------------------------------------------------


def init_image(size: int):
    """A deterministic picture with structure: colour ramps and a disc."""
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    r = xx * 255 // max(size - 1, 1)
    g = yy * 255 // max(size - 1, 1)
    b = (((xx - size / 2) ** 2 + (yy - size / 2) ** 2) < (size / 4) ** 2) * 220
    return Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8), "RGB")


def underpaint_model(comps: Components, settings: Settings):
    """A ``LoadedModel`` around the shared modules, as the loader would build from a checkpoint."""
    from underpaint.models.detect import Family, ModelSpec
    from underpaint.models.loader import LoadedModel, scaled_linear_alphas_cumprod

    family = Family(comps.arch.family)
    vae = comps.arch.vae
    if family == Family.FLUX:
        spec = ModelSpec(family=family, prediction="flow", in_channels=comps.arch.unet["in_channels"],
                         latent_channels=vae["latent_channels"], scaling_factor=vae["scaling_factor"],
                         shift_factor=vae["shift_factor"], variant=comps.arch.variant)
        alphas = torch.empty(0, dtype=torch.float64)  # a flow model has no DDPM schedule
    else:
        spec = ModelSpec(family=family, prediction="eps", in_channels=4, latent_channels=4,
                         scaling_factor=vae["scaling_factor"])
        alphas = scaled_linear_alphas_cumprod()
    model = LoadedModel(spec=spec, unet=comps.unet, vae=comps.vae, text_encoders=comps.text_encoders,
                        tokenizers=comps.tokenizers, alphas_cumprod=alphas,
                        name=f"random-{comps.arch.name}", path=Path(f"random-{comps.arch.name}.safetensors"),
                        device=settings.device, dtype=settings.dtype)
    vars(model)["short_hash"] = None  # there is no file to hash (a cached_property)
    if family == Family.SDXL and settings.dtype == torch.float16 and comps.vae.config.force_upcast:
        # Where diffusers' SDXL pipeline upcasts its fp16 VAE, so does every underpaint row: the same work.
        # underpaint's own default (auto) would take bfloat16 on Ampere or later; --vae-precision measures that.
        from underpaint.models.offload import set_vae_precision

        set_vae_precision(model, "fp32")
    return model


def underpaint_runner(model, case: Case, settings: Settings, **fields) -> Callable[[], list]:
    """underpaint's img2img for the case; ``fields`` are extra GenerationParams fields (a trade-off row)."""
    from underpaint.params import GenerationParams
    from underpaint.pipeline.engine import Engine

    engine = Engine(model)
    flux = dict(negative_prompt="", sampler="Euler", scheduler="Simple", distilled_cfg_scale=settings.guidance)
    sd = dict(negative_prompt=NEGATIVE, sampler="DPM++ 2M", scheduler="Karras")
    params = GenerationParams(
        prompt=PROMPT, init_images=(init_image(case.size),), steps=settings.steps,
        strength=settings.underpaint_strength, cfg_scale=settings.cfg, seed=SEED, batch_size=case.batch,
        rng="cpu" if settings.device.type == "cpu" else "gpu", **(flux if settings.flux else sd), **fields,
    )
    return lambda: list(engine.generate(params).images)


def taesd_models_dir(comps: Components, settings: Settings):
    """A models folder of the run's own holding a TAESD (diffusers' AutoencoderTiny, random weights at a
    trained network's scale) for the case's family, where the ``--taesd`` row's model finds it."""
    import tempfile

    from diffusers import AutoencoderTiny

    from underpaint.models.detect import Family
    from underpaint.models.registry import ModelsDir
    from underpaint.pipeline.preview import TAESD_NAMES

    root = Path(tempfile.mkdtemp(prefix="underpaint-bench-models-"))
    torch.manual_seed(SEED)
    tiny = AutoencoderTiny(latent_channels=comps.arch.vae["latent_channels"])
    with torch.no_grad():
        for p in tiny.parameters():
            p.mul_(0.6)
    tiny.save_pretrained(root / "VAE-approx" / TAESD_NAMES[Family(comps.arch.family)])
    return ModelsDir(root)


def with_vae_precision(model, precision: str, call: Callable[[], list]) -> Callable[[], list]:
    """``call`` with the model's VAE precision (``--vae-precision``) set for its duration, the plain one after."""
    from underpaint.models.offload import set_vae_precision, vae_precision_of

    def run() -> list:
        before = vae_precision_of(model)
        set_vae_precision(model, precision)
        try:
            return call()
        finally:
            set_vae_precision(model, before)

    return run


def diffusers_pipeline(comps: Components):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    if comps.arch.family == "flux":
        return _flux_pipeline(comps)
    scheduler = DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                            algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True,
                                            steps_offset=1)
    if comps.arch.family == "sdxl":
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=comps.vae, text_encoder=comps.text_encoders[0], text_encoder_2=comps.text_encoders[1],
            tokenizer=comps.tokenizers[0], tokenizer_2=comps.tokenizers[1], unet=comps.unet, scheduler=scheduler,
            add_watermarker=False)
    else:
        pipe = StableDiffusionImg2ImgPipeline(
            vae=comps.vae, text_encoder=comps.text_encoders[0], tokenizer=comps.tokenizers[0], unet=comps.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux_pipeline(comps: Components):
    """FluxImg2ImgPipeline with FLUX.1's flow-match Euler scheduler: resolution-shifted for dev,
    unshifted for schnell (their published scheduler configs)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxImg2ImgPipeline

    if comps.arch.variant == "schnell":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    clip, t5 = comps.text_encoders
    pipe = FluxImg2ImgPipeline(scheduler=scheduler, vae=comps.vae, text_encoder=clip, tokenizer=comps.tokenizers[0],
                               text_encoder_2=t5, tokenizer_2=comps.tokenizers[1], transformer=comps.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def posterior_mean() -> Iterator[None]:
    """diffusers' FLUX img2img samples the VAE posterior; underpaint (like A1111) takes its mean.
    Make diffusers take the mean too, so the pictures can be compared (the cost is the same)."""
    from diffusers.pipelines.flux import pipeline_flux_img2img as module

    original = module.retrieve_latents
    module.retrieve_latents = lambda enc, generator=None, sample_mode="sample": original(enc, generator, "argmax")
    try:
        yield
    finally:
        module.retrieve_latents = original


def denoiser(pipe) -> torch.nn.Module:
    """The module a diffusers pipeline calls each step: its UNet, or FLUX's transformer."""
    return pipe.transformer if hasattr(pipe, "transformer") else pipe.unet


def diffusers_runner(pipe, case: Case, settings: Settings) -> Callable[[], list]:
    image = init_image(case.size)
    gen_device = "cpu" if settings.device.type == "cpu" else settings.device

    if settings.flux:
        from underpaint.pipeline.flux import T5_TOKENS, T5_TOKENS_DEFAULT

        tokens = T5_TOKENS.get(settings.flux, T5_TOKENS_DEFAULT)  # as underpaint pads the prompt

        def run_flux() -> list:
            generator = torch.Generator(gen_device).manual_seed(SEED)
            return list(pipe(prompt=PROMPT, image=image, strength=settings.strength, height=case.size,
                             width=case.size, num_inference_steps=settings.steps,
                             guidance_scale=settings.guidance or 0.0, num_images_per_prompt=case.batch,
                             generator=generator, max_sequence_length=tokens, output_type="pil").images)

        return run_flux

    def run() -> list:
        generator = torch.Generator(gen_device).manual_seed(SEED)
        return list(pipe(prompt=PROMPT, negative_prompt=NEGATIVE, image=image, strength=settings.strength,
                         num_inference_steps=settings.steps, guidance_scale=settings.cfg,
                         num_images_per_prompt=case.batch, generator=generator, output_type="pil").images)

    return run


# --- optimizations (the engine's speed switches, toggled by --optimize / --attention) -------------

#: The names ``--optimize`` takes: the engine's own (``aot`` is timed by bench/first_image.py).
OPTIMIZATIONS = ("channels_last", "fused_qkv", "fp8", "compile", "cuda_graphs")


@contextmanager
def optimized(model, speed) -> Iterator[None]:
    """The switches ``speed`` (a SpeedOptions) on for the block, the model as built after it (the
    diffusers rows and the other optimized rows share it)."""
    from underpaint.models.optimize import apply, undo

    # Each row compiles for its own shapes, as a fresh process would: without this, the second
    # case's new batch size would make Dynamo recompile the first one's graphs with dynamic shapes.
    torch._dynamo.reset()
    apply(model, speed)
    try:
        yield
    finally:
        undo(model)


@contextmanager
def vram_mode(model, settings: Settings) -> Iterator[None]:
    """underpaint's memory mode (``--vram``) for one row; everything is back on the device after,
    as the diffusers rows share the modules."""
    from underpaint.models.offload import place

    place(model, settings.vram, device=settings.device)
    if settings.device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        yield
    finally:
        place(model, "high", device=settings.device)


@contextmanager
def compiled_unet(pipe, settings: Settings) -> Iterator[None]:
    """diffusers' own recipe: channels-last UNet (FLUX: the transformer) under torch.compile (restored afterwards)."""
    attr = "transformer" if hasattr(pipe, "transformer") else "unet"
    plain = getattr(pipe, attr)
    plain.to(memory_format=torch.channels_last)
    setattr(pipe, attr, torch.compile(plain, mode=settings.compile_mode, fullgraph=True))
    try:
        yield
    finally:
        setattr(pipe, attr, plain)
        plain.to(memory_format=torch.contiguous_format)


# --- measuring --------------------------------------------------------------------------------


def device_warmup(settings: Settings) -> None:
    """Create the BLAS/cuDNN/attention handles before any timing, so no runner pays for them."""
    dev, dt = settings.device, settings.dtype
    x = torch.randn(2, 64, 32, 32, device=dev, dtype=dt)
    torch.nn.functional.conv2d(x, torch.randn(64, 64, 3, 3, device=dev, dtype=dt), padding=1)
    q = x.flatten(2).transpose(1, 2).reshape(2, 1024, 1, 64).transpose(1, 2)
    torch.nn.functional.scaled_dot_product_attention(q, q, q)
    x.flatten(1) @ torch.randn(64 * 32 * 32, 8, device=dev, dtype=dt)
    sync(dev)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class UNetClock:
    """Wall time inside the UNet's forward, from hooks on the module the pipeline calls.

    CUDA events keep the loop free of host syncs; on the CPU the clock is read directly.
    """

    def __init__(self, module: torch.nn.Module, device: torch.device):
        self.device, self.calls, self._pairs, self._cpu_s = device, 0, [], 0.0
        self._handles = [module.register_forward_pre_hook(self._start), module.register_forward_hook(self._stop)]

    def _start(self, *_):
        if self.device.type == "cuda":
            self._pairs.append([torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)])
            self._pairs[-1][0].record()
        else:
            self._t0 = time.perf_counter()

    def _stop(self, *_):
        self.calls += 1
        if self.device.type == "cuda":
            self._pairs[-1][1].record()
        else:
            self._cpu_s += time.perf_counter() - self._t0

    def close(self) -> float:
        """Remove the hooks; total seconds spent in the UNet."""
        for h in self._handles:
            h.remove()
        sync(self.device)
        return sum(a.elapsed_time(b) for a, b in self._pairs) / 1000 if self._pairs else self._cpu_s


@dataclass
class Measurement:
    case: str
    runner: str
    batch: int
    first_call_s: float
    latencies_s: list[float]
    unet_ms_per_step: float
    unet_calls_per_run: float
    peak_vram_gib: float | None
    vs_diffusers: float | None = None
    vs_diffusers_compiled: float | None = None
    #: ``--profile``: the summary of one more call under torch.profiler (see ``profile_summary``).
    profile: dict | None = None

    @property
    def latency_s(self) -> float:
        return statistics.median(self.latencies_s)

    @property
    def images_per_s(self) -> float:
        return self.batch / self.latency_s


@dataclass(frozen=True)
class Runner:
    """One row of the table: a call that makes the case's pictures, and the UNet object it calls."""

    name: str
    call: Callable[[], list]
    unet: Callable[[], torch.nn.Module]


def _timed(runner: Runner, device: torch.device) -> tuple[float, float, int, float | None, list]:
    """One call: seconds, seconds inside the UNet, UNet calls, peak GiB (CUDA), pictures."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = UNetClock(runner.unet(), device)
    sync(device)
    t0 = time.perf_counter()
    out = runner.call()
    sync(device)
    seconds = time.perf_counter() - t0
    unet_s = clock.close()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, unet_s, clock.calls, peak, out


def measure(runners: list[Runner], case: Case, settings: Settings) -> list[tuple[Measurement, list]]:
    """First call of each, ``warmup`` more, then ``runs`` rounds of one timed call each.

    Several runners take turns within each round, so a machine that gets busier or quieter
    during the measurement (a shared CPU, clocks) affects them alike.
    """
    dev = settings.device
    firsts = [_timed(r, dev) for r in runners]
    for _ in range(settings.warmup):
        for r in runners:
            r.call()
    timed = [[] for _ in runners]
    for _ in range(settings.runs):
        for r, record in zip(runners, timed):
            record.append(_timed(r, dev))
    results = []
    for r, first, record in zip(runners, firsts, timed):
        latencies = [t[0] for t in record]
        peaks = [t[3] for t in record if t[3] is not None]
        m = Measurement(case.name, r.name, case.batch, first[0], latencies,
                        sum(t[1] for t in record) * 1000 / (settings.runs * settings.steps_run),
                        sum(t[2] for t in record) / settings.runs, max(peaks) if peaks else None)
        _log(f"  {r.name:<22} median {m.latency_s:.3f} s  first {m.first_call_s:.2f} s  "
             f"unet {m.unet_ms_per_step:.1f} ms/step  ({m.unet_calls_per_run:g} calls/run)")
        results.append((m, first[4]))
    if settings.profile is not None:  # after every timed call of these rows, so the timings stay as they were
        for r, (m, _) in zip(runners, results):
            m.profile = profile_row(r, case, settings, m.latency_s)
    return results


# --- profiling (--profile) --------------------------------------------------------------------

#: What each kernel (CUDA) or op (CPU) is counted as, from its lower-cased name: the first rule
#: that matches wins, anything else is "elementwise/other". Names only, so the split is
#: approximate: cuDNN may run a 1x1 convolution as a GEMM kernel (counted as matmul), and a group
#: norm's affine step runs in an elementwise kernel; inductor's fused kernels are named after the
#: ops they fuse (``triton_red_fused_native_group_norm_0``: normalization; its templates
#: ``triton_tem_*``: matmul).
CATEGORIES = (
    # DMA copies and memsets, copy kernels (casts, .contiguous()), cuDNN's layout transposes; CPU: aten::copy_.
    ("memory copy", re.compile(r"^memcpy|^memset|direct_copy|copy_kernel|nchwtonhwc|nhwctonchw|^aten::copy_$")),
    ("attention", re.compile(r"attention|flash|fmha|sdpa|softmax")),
    ("normalization", re.compile(r"norm(?!al)|rowwisemoments|computefusedparams")),
    # cuDNN/CUTLASS forward convolutions are "...fprop..." (their implicit GEMMs too).
    ("convolution", re.compile(r"conv(?!ert)|fprop|winograd")),
    # cuBLAS(Lt) kernels on Hopper are "nvjet_*"; fp8 runs aten::_scaled_mm.
    ("matmul/gemm", re.compile(r"gemm|gemv|matmul|cublas|cutlass|nvjet|splitkreduce|triton_tem|"
                               r"^aten::(mm|addmm|bmm|baddbmm|_scaled_mm)$")),
)
OTHER = "elementwise/other"
#: CUDA runtime calls that make the host wait for the device (cudaMemcpy: the synchronous copy).
SYNC_CALLS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy")
#: The record_function range around the profiled call: its wall time, and which thread made it.
CALL_MARKER = "bench::call"


def category(name: str) -> str:
    lowered = name.lower()
    return next((label for label, rule in CATEGORIES if rule.search(lowered)), OTHER)


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def _annotation(event) -> bool:
    """A record_function range (ours, torch.compile's), or its copy on the device's timeline."""
    return bool(getattr(event, "is_user_annotation", False)) or "annotation" in str(getattr(event, "activity_type", ""))


def _aten_parent(event) -> str:
    """The nearest enclosing aten op's name (where a runtime call such as a sync came from)."""
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("aten::"):
        parent = parent.cpu_parent
    return parent.name if parent is not None else "(no aten op)"


def profile_summary(events, *, cuda: bool, wall_s: float) -> dict:
    """Numbers from one profiled call's events (torch.profiler FunctionEvents), all times in seconds.

    busy: CUDA, the union of the kernel and copy intervals on the device (``busy_sum_s`` adds their
    durations instead, which exceeds the union where kernels overlap); CPU, the time inside top-level
    aten ops on the calling thread. ``idle_fraction`` is the rest of the call's wall time (on the
    CPU: Python, PIL and everything else outside ops); ``lead_s``/``tail_s`` the idle time before the
    first and after the last busy interval, ``gaps_s`` the idle time between them by gap length.
    ``ops``: top-level aten ops (called from Python, not from inside another op). ``categories_s``:
    device time (CPU: op self time) by ``category``.
    """
    from torch.autograd import DeviceType

    marker = next((e for e in events if e.name == CALL_MARKER and e.device_type == DeviceType.CPU), None)
    cpu = [e for e in events if e.device_type == DeviceType.CPU]
    # A record_function range's copy on the device timeline (gpu_user_annotation) spans the kernels
    # launched inside it: it is no kernel. (Not every CPU-side name: inductor names the CPU-side range
    # that launches a Triton kernel after the kernel.)
    ranges = {e.name for e in cpu if _annotation(e)} | {CALL_MARKER}
    device = [e for e in events if e.device_type != DeviceType.CPU and not _annotation(e) and e.name not in ranges]
    aten = [e for e in cpu if e.name.startswith("aten::")]
    top = [e for e in aten if _aten_parent(e) == "(no aten op)"]
    if marker is not None:
        start, end = marker.time_range.start, marker.time_range.end
        wall_s = (end - start) / 1e6
        top = [e for e in top if e.thread == marker.thread]
    if cuda:
        busy_events = device
        by_kind = Counter()
        for e in device:
            by_kind[category(e.name)] += e.time_range.elapsed_us()
    else:
        busy_events = top
        by_kind = Counter()
        for e in aten:
            by_kind[category(e.name)] += e.self_cpu_time_total
    spans = _merge([(e.time_range.start, e.time_range.end) for e in busy_events])
    if marker is None:  # the call's own range is unknown: taken to start at the first busy interval
        start = spans[0][0] if spans else 0.0
        end = start + wall_s * 1e6
    spans = [(max(a, start), min(b, end)) for a, b in spans if b > start and a < end]
    busy_us = sum(b - a for a, b in spans)
    gaps = [(prev - start, a - prev) for prev, (a, _) in zip([b for _, b in spans], spans[1:])]  # (at, length)
    copies = Counter()
    for e in device:
        if e.name.lower().startswith("memset"):
            copies["memset"] += 1
        elif e.name.lower().startswith("memcpy"):
            copies[(e.name.split() + ["?"])[1]] += 1  # "Memcpy DtoH (Device -> Pageable)"
    runtime = Counter(e.name for e in cpu if e.name.startswith(("cuda", "cu")))
    syncs = {name: runtime[name] for name in SYNC_CALLS if runtime[name]}
    sync_ops = Counter(_aten_parent(e) for e in cpu if e.name in SYNC_CALLS)
    categories = {label: round(by_kind[label] / 1e6, 6) for label, _ in CATEGORIES + ((OTHER, None),)}
    return dict(
        device="cuda" if cuda else "cpu",
        wall_s=round(wall_s, 6),
        busy_s=round(busy_us / 1e6, 6),
        busy_sum_s=round(sum(e.time_range.elapsed_us() for e in busy_events) / 1e6, 6),
        idle_fraction=round(max(0.0, 1 - busy_us / 1e6 / wall_s), 4) if wall_s > 0 else None,
        lead_s=round(((spans[0][0] if spans else end) - start) / 1e6, 6),
        tail_s=round((end - (spans[-1][1] if spans else end)) / 1e6, 6),
        gaps_s={"under_10us": round(sum(g for _, g in gaps if g < 10) / 1e6, 6),
                "10us_to_1ms": round(sum(g for _, g in gaps if 10 <= g < 1000) / 1e6, 6),
                "over_1ms": round(sum(g for _, g in gaps if g >= 1000) / 1e6, 6)},
        gaps_over_1ms=sum(1 for _, g in gaps if g >= 1000),
        #: [offset from the call's start, length] in ms, the longest first.
        largest_gaps_ms=[[round(at / 1e3, 3), round(g / 1e3, 3)] for at, g in sorted(gaps, key=lambda x: -x[1])[:5]],
        kernels=sum(1 for e in device if not e.name.lower().startswith(("memcpy", "memset"))) if cuda else None,
        launches=sum(n for name, n in runtime.items() if name.startswith(("cudaLaunch", "cuLaunch"))) if cuda else None,
        graph_launches=runtime["cudaGraphLaunch"] if cuda else None,
        ops=len(top),
        host_device_syncs=sum(syncs.values()) if cuda else None,
        syncs=syncs,
        sync_ops=dict(sync_ops.most_common(8)),
        copies=dict(copies),
        categories_s=categories,
    )


@contextmanager
def sync_sites(device: torch.device) -> Iterator[Counter]:
    """CUDA: where in the Python code the block makes the host wait for the device, from
    ``torch.cuda.set_sync_debug_mode("warn")``'s warnings (file:line of the calling frame: count)."""
    sites: Counter = Counter()
    if device.type != "cuda":
        yield sites
        return
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield sites
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    for w in caught:
        if "synchroniz" in str(w.message):
            sites[f"{'/'.join(Path(w.filename).parts[-3:])}:{w.lineno}"] += 1


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-")


def profile_row(runner: Runner, case: Case, settings: Settings, median_s: float) -> dict | None:
    """One more call of the row under torch.profiler; its text file, its summary (None if profiling failed:
    the row's timings stand either way)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    dev = settings.device
    cuda = dev.type == "cuda"
    path = settings.profile / f"{case.name}--{_slug(runner.name)}.txt"
    t_start = time.perf_counter()
    try:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        sync(dev)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            with record_function(CALL_MARKER):
                with sync_sites(dev) as sites:
                    runner.call()
                sync(dev)
            wall_s = time.perf_counter() - t0
        summary = profile_summary(prof.events(), cuda=cuda, wall_s=wall_s)
        averages = prof.key_averages()
        by_device = averages.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40,
                                   max_name_column_width=90)
        by_cpu = averages.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=90) if cuda else ""
    except Exception as exc:  # a profiler problem must not cost the run its other results
        _log(f"  profile {runner.name}: failed: {type(exc).__name__}: {exc}")
        return dict(error=f"{type(exc).__name__}: {exc}")
    summary.update(timed_median_s=round(median_s, 6), sync_sites=dict(sites.most_common(10)),
                   profiling_s=round(time.perf_counter() - t_start, 1), file=path.name)
    path.write_text(_profile_text(case, runner.name, summary, sites, by_device, by_cpu))
    _log(f"  profile {runner.name}: {_profile_line(summary)} -> {path}")
    return summary


def _profile_line(p: dict) -> str:
    """The summary in one log line."""
    ms = lambda s: f"{s * 1000:.1f}"  # noqa: E731
    kinds = ", ".join(f"{label.split('/')[0]} {ms(v)}" for label, v in p["categories_s"].items())
    count = f"{p['kernels']} kernels, {p['ops']} ops, {p['host_device_syncs']} syncs" if p["device"] == "cuda" \
        else f"{p['ops']} ops"
    if p["device"] == "cuda" and not p["kernels"]:
        count += " (no kernels recorded: is CUPTI available?)"
    return (f"wall {ms(p['wall_s'])} ms, busy {ms(p['busy_s'])} ms (idle {p['idle_fraction']:.0%}: lead "
            f"{ms(p['lead_s'])}, tail {ms(p['tail_s'])}, {p['gaps_over_1ms']} gaps > 1 ms), {count}; "
            f"ms by kind: {kinds}")


def _profile_text(case: Case, row: str, p: dict, sites: Counter, by_device: str, by_cpu: str) -> str:
    ms = lambda s: f"{s * 1000:.2f} ms"  # noqa: E731
    cuda = p["device"] == "cuda"
    busy = ("device busy (union of kernel/copy intervals)" if cuda else "inside top-level aten ops")
    lines = [
        f"{case.name} ({case.size}x{case.size}, batch {case.batch}) / {row}: one call under torch.profiler, "
        f"after the row's timed runs",
        "",
        f"wall time of the call      {ms(p['wall_s'])} (profiler overhead included; the row's timed median: "
        f"{ms(p['timed_median_s'])})",
        f"{busy:<27}{ms(p['busy_s'])}; durations summed: {ms(p['busy_sum_s'])}"
        + (" (above the union where kernels overlap)" if cuda else ""),
        f"idle                       {p['idle_fraction']:.1%} of the wall time: {ms(p['lead_s'])} before the first "
        f"busy interval, {ms(p['tail_s'])} after the last; gaps between: < 10 us {ms(p['gaps_s']['under_10us'])}, "
        f"10 us-1 ms {ms(p['gaps_s']['10us_to_1ms'])}, > 1 ms {ms(p['gaps_s']['over_1ms'])} "
        f"({p['gaps_over_1ms']} of them)",
        "largest gaps (at ms from the call's start: length ms): "
        + (", ".join(f"{at}: {g}" for at, g in p["largest_gaps_ms"]) or "none"),
    ]
    if cuda:
        lines += [
            f"kernels                    {p['kernels']} (launch calls {p['launches']}, CUDA graph launches "
            f"{p['graph_launches']})",
            f"host-device syncs          {p['host_device_syncs']}: "
            + (", ".join(f"{k} {v}" for k, v in p["syncs"].items()) or "none")
            + " (one cudaDeviceSynchronize is the benchmark's own, closing the call)",
            "  issued inside            " + (", ".join(f"{k} {v}" for k, v in p["sync_ops"].items()) or "-"),
            "  device copies            " + (", ".join(f"{k} {v}" for k, v in p["copies"].items()) or "none"),
            "  Python lines that synced (torch.cuda.set_sync_debug_mode):",
            *(f"    {n:>5}  {site}" for site, n in sites.most_common(15)),
        ]
    lines += [f"ops                        {p['ops']} top-level aten ops (called from Python, not inside another op)",
              "time by kind ({}, from names; bench/gpu_img2img.py CATEGORIES):".format(
                  "device time of kernels and copies" if cuda else "self CPU time of aten ops")]
    total = sum(p["categories_s"].values()) or 1.0
    lines += [f"  {label:<20}{ms(v):>14}  {v / total:6.1%}" for label, v in p["categories_s"].items()]
    lines += ["", f"profiling took {p['profiling_s']} s (not part of any timing)", "",
              "top 40 by self {} time:".format("device" if cuda else "CPU"), by_device]
    if by_cpu:
        lines += ["", "top 20 by self CPU time (host work: launches, Python-driven ops):", by_cpu]
    return "\n".join(lines) + "\n"


@dataclass
class Check:
    """Optimized pictures against the plain run's, or (FLUX) underpaint's against diffusers', same seed (uint8 levels)."""

    case: str
    optimizations: str
    max_abs: int
    mean_abs: float
    psnr_db: float
    passed: bool
    #: A lossy switch's row: the difference is a measure of its quality cost, and ``passed`` holds regardless.
    lossy: bool = False


#: fp16 tolerance over a whole img2img run: rounding differences of the kernels may shift a few
#: pixels by several levels, but on average a picture must stay within one level and 40 dB.
MEAN_ABS_LIMIT, PSNR_LIMIT = 1.0, 40.0


def compare(case: Case, names: str, plain: list, fast: list, *, lossy: bool = False) -> Check:
    a = np.stack([np.asarray(i, dtype=np.int16) for i in plain])
    b = np.stack([np.asarray(i, dtype=np.int16) for i in fast])
    diff = np.abs(a - b)
    mse = float((diff.astype(np.float64) ** 2).mean())
    psnr = math.inf if mse == 0 else 10 * math.log10(255**2 / mse)
    ok = lossy or bool(diff.mean() <= MEAN_ABS_LIMIT and psnr >= PSNR_LIMIT)
    return Check(case.name, names, int(diff.max()), float(diff.mean()), psnr, ok, lossy)


#: fp32 witness check of underpaint's FLUX pictures against diffusers' on the same weights, seed and
#: noise: diffusers rounds to uint8 where underpaint (like A1111) truncates, so one level, and one
#: more for summation order. In bf16/fp16 the two paths' rounding differs more; the fp16 limits apply.
WITNESS_MAX_ABS_FP32 = 2


def witness(case: Case, settings: Settings, ours: list, theirs: list) -> Check:
    check = compare(case, "vs diffusers", ours, theirs)
    if settings.dtype == torch.float32:
        check.passed = check.max_abs <= WITNESS_MAX_ABS_FP32
    return check


# --- one case ---------------------------------------------------------------------------------


def run_case(case: Case, comps: Components, settings: Settings) -> tuple[list[Measurement], list[Check]]:
    """underpaint and diffusers eager taking turns, then each underpaint optimized row, then diffusers compiled.

    The optimized and compiled rows change the shared modules, so each runs alone and undoes it after.
    """
    _log(f"{case.name}: {case.size}x{case.size}, batch {case.batch}, {settings.steps_run} steps")
    model = underpaint_model(comps, settings)
    pipe = diffusers_pipeline(comps)
    runners = [Runner("underpaint", underpaint_runner(model, case, settings), lambda: model.unet),
               Runner("diffusers", diffusers_runner(pipe, case, settings), lambda: denoiser(pipe))]
    tradeoffs = settings.tradeoffs()
    if settings.taesd:
        model.models_dir = taesd_models_dir(comps, settings)
    for label, fields in tradeoffs:  # per request only: they can take turns with the plain rows
        runners.append(Runner(f"underpaint {label}", underpaint_runner(model, case, settings, **fields),
                              lambda: model.unet))
    if settings.vae_precision:  # set for this row's calls only: it takes turns too, compared as a trade-off
        tradeoffs.append((f"vae={settings.vae_precision}", {}))
        plain_call = underpaint_runner(model, case, settings)
        runners.append(Runner(f"underpaint vae={settings.vae_precision}",
                              with_vae_precision(model, settings.vae_precision, plain_call), lambda: model.unet))
    with posterior_mean() if settings.flux else nullcontext():
        measured = measure(runners, case, settings)
    (plain, plain_out), (eager, eager_out) = measured[:2]
    results, checks = [plain], []
    for (label, _), (row, row_out) in zip(tradeoffs, measured[2:]):
        results.append(row)
        checks.append(compare(case, label, plain_out, row_out, lossy=True))  # different by design: reported
        _log(f"  output difference: {asdict(checks[-1])}")
    if settings.flux:
        checks.append(witness(case, settings, plain_out, eager_out))
        _log(f"  output check: {asdict(checks[-1])}")
    from underpaint.models.optimize import LOSSY  # switches that change the picture: measured, not checked

    for speed in settings.speeds:  # each set alone, undone before the next
        names = "+".join(speed.describe().split(","))
        with optimized(model, speed):
            [(fast, fast_out)] = measure([Runner(f"underpaint+{names}", underpaint_runner(model, case, settings),
                                                 lambda: model.unet)], case, settings)
        results.append(fast)
        checks.append(compare(case, names, plain_out, fast_out, lossy=any(n in LOSSY for n in speed.names)))
        _log(f"  output check: {asdict(checks[-1])}")
    if settings.vram != "high":
        with vram_mode(model, settings):
            [(offloaded, _)] = measure([Runner(f"underpaint vram={settings.vram}", underpaint_runner(model, case, settings),
                                               lambda: model.unet)], case, settings)
        results.append(offloaded)
    results.append(eager)
    compiled = None
    if settings.compile_diffusers:
        with compiled_unet(pipe, settings):
            [(compiled, _)] = measure([Runner("diffusers+compile", diffusers_runner(pipe, case, settings),
                                              lambda: denoiser(pipe))], case, settings)
        results.append(compiled)
    for m in results:
        m.vs_diffusers = eager.latency_s / m.latency_s
        m.vs_diffusers_compiled = compiled.latency_s / m.latency_s if compiled else None
    return results, checks


# --- output -----------------------------------------------------------------------------------


def machine_info(settings: Settings) -> dict:
    import diffusers
    import transformers

    dev = settings.device
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    return dict(device=card, torch=torch.__version__, diffusers=diffusers.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table(results: list[Measurement], settings: Settings) -> str:
    head = ["case", "runner", "latency s (median)", "images/s", "UNet ms/step", "peak VRAM GiB", "first call s",
            "× diffusers"]
    if settings.compile_diffusers:
        head.append("× diffusers+compile")
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m in results:
        row = [m.case, m.runner, _fmt(m.latency_s, ".3f"), _fmt(m.images_per_s, ".2f"), _fmt(m.unet_ms_per_step, ".1f"),
               _fmt(m.peak_vram_gib, ".2f"), _fmt(m.first_call_s, ".2f"), _fmt(m.vs_diffusers, ".2f")]
        if settings.compile_diffusers:
            row.append(_fmt(m.vs_diffusers_compiled, ".2f"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _quiet() -> None:
    """diffusers warns on every SDXL call that upcasts the VAE, and on every batch made from one
    picture (num_images_per_prompt, the way its documentation asks for several images)."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- command line -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU in fp32 (tests the script)")
    p.add_argument("--cases", default=",".join(c.name for c in CASES),
                   help="comma-separated: " + ", ".join(c.name for c in CASES + FLUX_CASES) + " (FLUX: opt-in)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per row (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first call")
    p.add_argument("--steps", type=int, help=f"default {SD_STEPS}; FLUX cases: their own (dev 28, schnell 4)")
    p.add_argument("--strength", type=float, help=f"default {SD_STRENGTH}; FLUX cases: dev 0.65, schnell 0.75")
    p.add_argument("--cfg", type=float, help=f"default {SD_CFG}; FLUX cases: 1 (distilled guidance only)")
    p.add_argument("--size", type=int, help="override every case's picture size (pixels, square)")
    p.add_argument("--batch", type=int, help="override every case's batch size")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"],
                   help="auto: fp16 on CUDA (bf16 for FLUX), fp32 on CPU")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 with --tiny)")
    p.add_argument("--optimize", action="append", default=[], metavar="LIST",
                   help="comma-separated speed switches for an extra underpaint row: " + ", ".join(OPTIMIZATIONS)
                   + "; give it again for another row (each measured alone)")
    p.add_argument("--attention", default="auto", choices=["auto", "flash", "efficient", "cudnn", "math"],
                   help="attention kernel for every optimized row (adds a row by itself when not auto and no "
                   "--optimize is given)")
    p.add_argument("--token-merging", type=float, default=0.0, metavar="RATIO",
                   help="add an underpaint row with token merging at this ratio (0-0.9; SD cases only)")
    p.add_argument("--deepcache", type=int, default=0, metavar="INTERVAL",
                   help="add an underpaint row with DeepCache, a full UNet step every INTERVAL steps (SD cases only)")
    p.add_argument("--ngms", type=float, default=0.0, metavar="SIGMA",
                   help="add an underpaint row with A1111's Negative Guidance minimum sigma: below SIGMA every other "
                        "model evaluation runs the prompt alone")
    p.add_argument("--taesd", action="store_true",
                   help="add an underpaint row with A1111's VAE type TAESD for encode and decode (random weights)")
    p.add_argument("--vram", default="high", choices=["high", "medium", "low"],
                   help="add an underpaint row in this memory mode, run alone (its peak VRAM shows the mode's effect)")
    p.add_argument("--vae-precision", default="", choices=["fp32", "fp16", "bf16"],
                   help="add an underpaint row with its VAE at this precision, taking turns with the plain rows "
                        "(fp16/bf16 change the picture: the difference is reported, not judged)")
    p.add_argument("--compile-diffusers", action="store_true", help="add a diffusers + torch.compile row")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default, max-autotune, ...)")
    p.add_argument("--fp16-vae", action="store_true", help="clear the SDXL VAE's force_upcast, so neither library "
                   "runs it in fp32 (as with an fp16-safe VAE)")
    p.add_argument("--stub-unet", action="store_true", help="replace the UNet by a stand-in that answers at once, "
                   "to time each library's overhead around it (not a speed figure)")
    p.add_argument("--profile", type=Path, metavar="DIR", help="after each row's timed runs, profile one more call "
                   "(torch.profiler) and write DIR/<case>--<row>.txt; its summary also goes into the log and JSON")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    device = torch.device("cpu" if args.tiny else ("cuda" if args.device == "auto" and torch.cuda.is_available()
                                                    else ("cpu" if args.device == "auto" else args.device)))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available here")
    names = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    dtype = names.get(args.dtype) or (torch.float16 if device.type == "cuda" else torch.float32)
    optimize = tuple(tuple(n for n in given.split(",") if n) for given in args.optimize)
    unknown = [n for names in optimize for n in names if n not in OPTIMIZATIONS]
    if unknown:
        raise SystemExit(f"--optimize: unknown {', '.join(unknown)}; expected {', '.join(OPTIMIZATIONS)}")
    s = Settings(device, dtype, _given(args.steps, SD_STEPS), _given(args.strength, SD_STRENGTH),
                 _given(args.cfg, SD_CFG), args.runs, args.warmup, optimize, args.compile_diffusers, args.compile_mode,
                 vram=args.vram, attention=args.attention, token_merging=args.token_merging, deepcache=args.deepcache,
                 ngms=args.ngms, taesd=args.taesd, profile=args.profile, vae_precision=args.vae_precision)
    rows = [speed.describe() for speed in s.speeds]
    twice = sorted({row for row in rows if rows.count(row) > 1})
    if twice:
        raise SystemExit(f"--optimize: {'; '.join(twice)} given twice (the same switches in any order make the "
                         "same row)")
    if not 0 <= s.token_merging <= 0.9:
        raise SystemExit("--token-merging: a ratio from 0 to 0.9")
    if s.deepcache < 0:
        raise SystemExit("--deepcache: an interval of 2 or more (0: no DeepCache row)")
    if s.ngms < 0:
        raise SystemExit("--ngms: a sigma of 0 or more (0: no NGMS row)")
    _check_steps(s, args)
    return s


def _given(value, default):
    return default if value is None else value


def _check_steps(s: Settings, args: argparse.Namespace) -> None:
    if s.steps_run < 1 or args.runs < 1:
        raise SystemExit("steps × strength must give at least one denoising step, and --runs at least 1")


def case_settings(case: Case, arch: Arch, settings: Settings, args: argparse.Namespace) -> Settings:
    """The settings one case runs with: its own steps, strength, CFG and guidance unless given on the
    command line; FLUX in bf16 on CUDA unless --dtype says otherwise."""
    if arch.family != "flux":
        return settings
    dtype = torch.bfloat16 if args.dtype == "auto" and settings.device.type == "cuda" else settings.dtype
    s = replace(settings, dtype=dtype, steps=_given(args.steps, case.steps), strength=_given(args.strength, case.strength),
                cfg=_given(args.cfg, case.cfg), guidance=case.guidance, flux=arch.variant)
    _check_steps(s, args)
    return s


def select_cases(args: argparse.Namespace) -> list[Case]:
    by_name = {c.name: c for c in CASES + FLUX_CASES}
    chosen = []
    for name in (n for n in args.cases.split(",") if n):
        if name not in by_name:
            raise SystemExit(f"--cases: unknown {name}; expected {', '.join(by_name)}")
        case = by_name[name]
        size = args.size or (TINY_SIZES[name] if args.tiny else case.size)
        chosen.append(replace(case, size=size, batch=args.batch or case.batch))
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads or args.tiny:
        # One thread by default for --tiny: on a busy machine two spinning threads can run 10x slower.
        torch.set_num_threads(args.threads or 1)
    _quiet()
    settings = settings_from(args)
    cases = select_cases(args)
    archs = TINY_ARCHS if args.tiny else ARCHS
    info = machine_info(settings)
    if settings.profile is not None:
        settings.profile.mkdir(parents=True, exist_ok=True)
    _log(f"{info['device']}, torch {info['torch']}, diffusers {info['diffusers']}, {info['date']}")
    device_warmup(settings)
    results, checks = [], []
    per_case = {c.name: case_settings(c, archs[c.arch], settings, args) for c in cases}
    for arch_name in dict.fromkeys(c.arch for c in cases):  # one architecture in memory at a time
        arch = archs[arch_name]
        arch_cases = [c for c in cases if c.arch == arch_name]
        check_param_counts(arch)
        t0 = time.perf_counter()
        comps = build_components(arch, per_case[arch_cases[0].name], vae_upcast=not args.fp16_vae)
        if args.stub_unet:
            stub_unet(comps.unet)
        _log(f"{arch.name}: random weights built in {time.perf_counter() - t0:.1f} s")
        for case in arch_cases:
            r, c = run_case(case, comps, per_case[case.name])
            results += r
            checks += c
        del comps
        torch._dynamo.reset()  # compiled graphs would keep the modules alive
        gc.collect()
        if settings.device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json:
        payload = dict(machine=info, settings=_settings_json(settings, args), checks=[asdict(c) for c in checks],
                       cases={name: _settings_json(s, args) for name, s in per_case.items()},
                       results=[dict(asdict(m), latency_s=m.latency_s, images_per_s=m.images_per_s) for m in results])
        args.json.write_text(json.dumps(payload, indent=2))
    for c in checks:
        verdict = "lossy, measured only" if c.lossy else ("ok" if c.passed else "FAILED")
        print(f"output check {c.case} ({c.optimizations}): max |Δ| {c.max_abs}, mean |Δ| {c.mean_abs:.3f}, "
              f"PSNR {c.psnr_db:.1f} dB: {verdict}")
    print(f"{info['device']}; torch {info['torch']}, diffusers {info['diffusers']}; {info['date']}; "
          f"median of {settings.runs} runs")
    groups: dict[str, list[str]] = {}
    for name, s in per_case.items():
        groups.setdefault(_settings_line(s), []).append(name)
    for line, names in groups.items():
        print(f"  {', '.join(names)}: {line}")
    print(table(results, settings))
    return 0 if all(c.passed for c in checks) else 1


def _settings_line(s: Settings) -> str:
    return (f"{str(s.dtype).removeprefix('torch.')}; {s.steps} steps at strength {s.strength} ({s.steps_run} run), "
            f"{s.recipe}")


def _settings_json(settings: Settings, args: argparse.Namespace) -> dict:
    return dict(tiny=args.tiny, device=str(settings.device), dtype=str(settings.dtype).removeprefix("torch."),
                steps=settings.steps, strength=settings.strength, steps_run=settings.steps_run,
                underpaint_strength=settings.underpaint_strength, cfg=settings.cfg, runs=settings.runs,
                warmup=settings.warmup, optimize=[list(names) for names in settings.optimize],
                attention=settings.attention, profile=str(settings.profile) if settings.profile else None,
                token_merging=settings.token_merging, deepcache=settings.deepcache, ngms=settings.ngms,
                taesd=settings.taesd, compile_diffusers=settings.compile_diffusers,
                compile_mode=settings.compile_mode, fp16_vae=args.fp16_vae, stub_unet=args.stub_unet, vram=settings.vram,
                guidance=settings.guidance,
                sampler=("Euler/Simple (diffusers: FlowMatchEulerDiscreteScheduler)" if settings.flux else
                         "DPM++ 2M Karras (diffusers: DPMSolverMultistepScheduler, use_karras_sigmas)"))


if __name__ == "__main__":
    faulthandler.enable()  # a crash in compiled code prints the Python stack into the log
    sys.exit(main())
