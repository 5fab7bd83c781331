"""The explicit ``underpaint download NAME`` command: a few well-known models from the Hugging Face Hub
(checkpoints, a VAE, Interrogate CLIP's BLIP captioner and CLIP models, ADetailer's detectors), and the face
restorers (GFPGAN, CodeFormer, and the face detector and parser both need) and A1111's named upscalers from
where A1111 fetches them (their authors' GitHub releases; DAT's from a Hugging Face copy, checked against
the SHA-256 A1111 checks).

Nothing else in underpaint touches the network. When the download cannot happen (offline,
``HF_HUB_OFFLINE=1``, a gated repository, a moved file), the error says in one line which file
to fetch by hand and where to put it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ..errors import DownloadError, UnknownName
from .registry import ModelsDir


@dataclass(frozen=True)
class KnownModel:
    name: str
    repo_id: str
    filename: str
    #: Which models-folder kind it goes into (registry.py's kinds: "checkpoints", "vae", "upscalers", ...).
    kind: str
    description: str
    #: A whole folder (``filename`` is then the folder's name): a diffusers folder's subfolders and
    #: model_index.json (not the single files beside them), or with ``transformers`` a transformers
    #: model's configuration, tokenizer and safetensors weights.
    folder: bool = False
    transformers: bool = False
    #: Where the file is when it is not on the hub (``repo_id`` is then its GitHub repository), and the
    #: known models it needs beside it (fetched first).
    source: str = ""
    needs: tuple[str, ...] = ()
    #: The file's SHA-256 where its publisher (or A1111, which checks it) states one: a download that
    #: differs is not kept.
    sha256: str = ""

    @property
    def marker(self) -> str:
        """The file whose presence says the folder is there."""
        return "config.json" if self.transformers else "model_index.json"

    @property
    def patterns(self) -> list[str]:
        return ["*.json", "*.txt", "*.safetensors"] if self.transformers else ["model_index.json", "*/*"]

    @property
    def url(self) -> str:
        if self.source:
            return self.source
        if self.folder:
            return f"https://huggingface.co/{self.repo_id}/tree/main"
        return f"https://huggingface.co/{self.repo_id}/resolve/main/{self.filename}"


_GITHUB = "https://github.com"

_TABLE = (
    KnownModel("sd15", "stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors",
               "checkpoints", "Stable Diffusion 1.5 (512 px, eps)"),
    KnownModel("sd21", "stabilityai/stable-diffusion-2-1", "v2-1_768-ema-pruned.safetensors",
               "checkpoints", "Stable Diffusion 2.1 (768 px, v-prediction)"),
    KnownModel("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors",
               "checkpoints", "SDXL base 1.0 (1024 px)"),
    KnownModel("sdxl-refiner", "stabilityai/stable-diffusion-xl-refiner-1.0", "sd_xl_refiner_1.0.safetensors",
               "checkpoints", "SDXL refiner 1.0 (--refiner after SDXL base, or img2img at low strength)"),
    KnownModel("sd-turbo", "stabilityai/sd-turbo", "sd_turbo.safetensors",
               "checkpoints", "SD-Turbo (SD2.1 distilled, 512 px, 1-4 steps)"),
    KnownModel("sdxl-turbo", "stabilityai/sdxl-turbo", "sd_xl_turbo_1.0_fp16.safetensors",
               "checkpoints", "SDXL-Turbo (512 px, 1-4 steps)"),
    KnownModel("flux-schnell", "black-forest-labs/FLUX.1-schnell", "FLUX.1-schnell", "checkpoints",
               "FLUX.1 [schnell] as a diffusers folder (transformer, autoencoder, CLIP-L, T5-XXL and its "
               "spiece.model; 1024 px, 1-4 steps)", folder=True),
    KnownModel("flux-dev", "black-forest-labs/FLUX.1-dev", "FLUX.1-dev", "checkpoints",
               "FLUX.1 [dev] as a diffusers folder (gated: accept its licence on the hub and log in first)",
               folder=True),
    KnownModel("vae-ft-mse", "stabilityai/sd-vae-ft-mse-original", "vae-ft-mse-840000-ema-pruned.safetensors",
               "vae", "SD1 VAE fine-tuned on MSE (sharper faces)"),
    KnownModel("blip", "Salesforce/blip-image-captioning-base", "blip-image-captioning-base", "blip",
               "BLIP captioner for Interrogate CLIP (underpaint interrogate, /sdapi/v1/interrogate)",
               folder=True, transformers=True),
    KnownModel("clip-vit-l", "openai/clip-vit-large-patch14", "clip-vit-large-patch14", "clip",
               "OpenAI CLIP ViT-L/14, which ranks Interrogate CLIP's word lists", folder=True, transformers=True),
    KnownModel("clip-vit-b32", "openai/clip-vit-base-patch32", "clip-vit-base-patch32", "clip",
               "OpenAI CLIP ViT-B/32, whose text encoder gives a YOLO-World model new classes (ad_model_classes)",
               folder=True, transformers=True),
    KnownModel("deepbooru", "AUTOMATIC1111/TorchDeepDanbooru", "model-resnet_custom_v3.pt", "deepbooru",
               "DeepDanbooru's tagger for Interrogate DeepBooru (underpaint interrogate --model deepdanbooru)",
               source=f"{_GITHUB}/AUTOMATIC1111/TorchDeepDanbooru/releases/download/v1/model-resnet_custom_v3.pt"),
    # IP-Adapters and the CLIP vision models that read their pictures, from Tencent's repository.
    *(KnownModel(name, "h94/IP-Adapter", file.rsplit("/", 1)[1], "controlnet", description,
                 source=f"https://huggingface.co/h94/IP-Adapter/resolve/main/{file}")
      for name, file, description in (
          ("ip-adapter-sd15", "models/ip-adapter_sd15.safetensors",
           "IP-Adapter for SD 1.5 (a picture as a prompt; needs clip-vision-h)"),
          ("ip-adapter-plus-sd15", "models/ip-adapter-plus_sd15.safetensors",
           "IP-Adapter Plus for SD 1.5 (closer to the picture; needs clip-vision-h)"),
          ("ip-adapter-plus-face-sd15", "models/ip-adapter-plus-face_sd15.safetensors",
           "IP-Adapter Plus Face for SD 1.5 (a face picture; needs clip-vision-h)"),
          ("ip-adapter-sdxl-vit-h", "sdxl_models/ip-adapter_sdxl_vit-h.safetensors",
           "IP-Adapter for SDXL (needs clip-vision-h)"),
          ("ip-adapter-plus-sdxl-vit-h", "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
           "IP-Adapter Plus for SDXL (needs clip-vision-h)"),
          ("ip-adapter-sdxl", "sdxl_models/ip-adapter_sdxl.safetensors",
           "IP-Adapter for SDXL read by ViT-bigG (needs clip-vision-g)"))),
    KnownModel("flux-ip-adapter", "XLabs-AI/flux-ip-adapter", "flux-ip-adapter.safetensors", "controlnet",
               "XLabs' IP-Adapter for FLUX.1 [dev] (needs clip-vit-l, which reads its pictures)",
               source="https://huggingface.co/XLabs-AI/flux-ip-adapter/resolve/main/ip_adapter.safetensors"),
    KnownModel("clip-vision-h", "h94/IP-Adapter", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "clip_vision",
               "CLIP ViT-H/14 vision model, which reads the pictures of most IP-Adapters",
               source="https://huggingface.co/h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors"),
    KnownModel("clip-vision-g", "h94/IP-Adapter", "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors", "clip_vision",
               "CLIP ViT-bigG/14 vision model, which reads ip-adapter_sdxl's pictures",
               source="https://huggingface.co/h94/IP-Adapter/resolve/main/sdxl_models/image_encoder/model.safetensors"),
    # ADetailer's detection models, from the repository ADetailer itself downloads them from.
    KnownModel("adetailer-face", "Bingsu/adetailer", "face_yolov8n.pt", "adetailer",
               "ADetailer's face_yolov8n.pt (YOLOv8n faces) for --adetailer / ADetailer tabs"),
    KnownModel("adetailer-hand", "Bingsu/adetailer", "hand_yolov8n.pt", "adetailer",
               "ADetailer's hand_yolov8n.pt (YOLOv8n hands)"),
    KnownModel("adetailer-person", "Bingsu/adetailer", "person_yolov8n-seg.pt", "adetailer",
               "ADetailer's person_yolov8n-seg.pt (YOLOv8n-seg people, with their outlines)"),
    # Face restoration, from the releases A1111 downloads them from, under the names it gives them.
    KnownModel("gfpgan", "TencentARC/GFPGAN", "GFPGANv1.4.pth", "gfpgan",
               "GFPGAN v1.4 face restorer, with the face detector and parser (--restore-faces, A1111's "
               "\"Restore faces\")", source=f"{_GITHUB}/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth",
               needs=("face-detector", "face-parser")),
    KnownModel("codeformer", "sczhou/CodeFormer", "codeformer-v0.1.0.pth", "codeformer",
               "CodeFormer face restorer, with the face detector and parser (--face-restorer CodeFormer)",
               source=f"{_GITHUB}/sczhou/CodeFormer/releases/download/v0.1.0/codeformer.pth",
               needs=("face-detector", "face-parser")),
    KnownModel("face-detector", "xinntao/facexlib", "detection_Resnet50_Final.pth", "gfpgan",
               "RetinaFace face detector (face restoration; ADetailer's face tabs without a YOLO file)",
               source=f"{_GITHUB}/xinntao/facexlib/releases/download/v0.1.0/detection_Resnet50_Final.pth"),
    KnownModel("face-parser", "xinntao/facexlib", "parsing_parsenet.pth", "gfpgan",
               "ParseNet face parser (face restoration's blend mask)",
               source=f"{_GITHUB}/xinntao/facexlib/releases/download/v0.2.2/parsing_parsenet.pth"),
    # The upscalers A1111 lists by name and fetches on first use, from the same releases.
    *(KnownModel(name, repo, file, "upscalers", f"{a1111} upscaler ({file}) for hires. fix and Extras",
                 source=f"{_GITHUB}/{repo}/releases/download/{release}/{file}")
      for name, a1111, repo, release, file in (
          ("realesrgan-x4plus", "R-ESRGAN 4x+", "xinntao/Real-ESRGAN", "v0.1.0", "RealESRGAN_x4plus.pth"),
          ("realesrgan-x4plus-anime", "R-ESRGAN 4x+ Anime6B", "xinntao/Real-ESRGAN", "v0.2.2.4",
           "RealESRGAN_x4plus_anime_6B.pth"),
          ("realesrgan-x2plus", "R-ESRGAN 2x+", "xinntao/Real-ESRGAN", "v0.2.1", "RealESRGAN_x2plus.pth"),
          ("realesrgan-general", "R-ESRGAN General 4xV3", "xinntao/Real-ESRGAN", "v0.2.5.0",
           "realesr-general-x4v3.pth"),
          ("realesrgan-animevideo", "R-ESRGAN AnimeVideo", "xinntao/Real-ESRGAN", "v0.2.5.0",
           "realesr-animevideov3.pth"),
          ("swinir-4x", "SwinIR 4x", "JingyunLiang/SwinIR", "v0.0",
           "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth"),
          ("scunet-gan", "ScuNET GAN", "cszn/KAIR", "v1.0", "scunet_color_real_gan.pth"),
          ("scunet-psnr", "ScuNET PSNR", "cszn/KAIR", "v1.0", "scunet_color_real_psnr.pth"))),
    # DAT's authors' models, from the copy A1111 fetches them from, with the hashes it checks.
    *(KnownModel(f"dat-x{n}", "w-e-w/DAT", f"DAT_x{n}.pth", "upscalers",
                 f"DAT x{n} upscaler (DAT_x{n}.pth) for hires. fix and Extras",
                 source=f"https://huggingface.co/w-e-w/DAT/resolve/main/experiments/pretrained_models/DAT/DAT_x{n}.pth",
                 sha256=digest)
      for n, digest in ((2, "7760aa96e4ee77e29d4f89c3a4486200042e019461fdb8aa286f49aa00b89b51"),
                        (3, "581973e02c06f90d4eb90acf743ec9604f56f3c2c6f9e1e2c2b38ded1f80d197"),
                        (4, "391a6ce69899dff5ea3214557e9d585608254579217169faf3d4c353caff049e"))),
)

#: name → KnownModel, read-only (the CLI lists it and the API validates against it).
KNOWN_MODELS: Mapping[str, KnownModel] = MappingProxyType({m.name: m for m in _TABLE})


def known_for_file(stem: str) -> KnownModel | None:
    """The known model whose file is named ``stem`` (without its extension), if there is one."""
    return next((m for m in _TABLE if not m.folder and m.filename.rsplit(".", 1)[0] == stem), None)


def known_model(name: str) -> KnownModel:
    if name not in KNOWN_MODELS:
        raise UnknownName("model", name, list(KNOWN_MODELS))
    return KNOWN_MODELS[name]


def download(name: str, models_dir: ModelsDir | str | os.PathLike, *, progress: bool = True) -> Path:
    """Fetch a known model (and those it needs) into its models-folder kind's folder and return its path;
    one already there is returned as it is."""
    model = known_model(name)
    folders = models_dir if isinstance(models_dir, ModelsDir) else ModelsDir(Path(models_dir))
    for other in model.needs:
        download(other, folders, progress=progress)
    target = folders.folder(model.kind)
    done = target / model.filename
    if done.is_file() or (model.folder and (done / model.marker).is_file()):
        return done
    try:
        if model.source:
            return _fetch(model.source, done, progress, sha256=model.sha256)
        from huggingface_hub import hf_hub_download, snapshot_download

        kwargs = {}
        if not progress:
            kwargs["tqdm_class"] = _silent_progress()
        target.mkdir(parents=True, exist_ok=True)
        if model.folder:
            # A diffusers folder: its subfolders and model_index.json, not the multi-GB single files at the top.
            snapshot_download(model.repo_id, local_dir=done, allow_patterns=model.patterns, **kwargs)
            return done
        return Path(hf_hub_download(model.repo_id, model.filename, local_dir=target, **kwargs))
    except Exception as exc:  # offline, HTTP errors, disk full: all become the same instruction
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        where = (f"put its {model.marker} and the rest in {done}" if model.folder else f"put it in {target}")
        raise DownloadError(f"could not download {model.name} ({exc.__class__.__name__}: {clipped(reason)}); "
                            f"get {model.url} and {where}") from None


def _fetch(url: str, done: Path, progress: bool, *, sha256: str = "") -> Path:
    """``url`` (https) saved as ``done``: written beside it under a temporary name, synced and then named, so
    an interrupted download (or one whose SHA-256 is not ``sha256``, when given) leaves no file under the
    real name. ``HF_HUB_OFFLINE`` stops it too."""
    import hashlib
    import urllib.request

    from ..imageio.metadata import publish, temp_beside

    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ConnectionError("offline: HF_HUB_OFFLINE is set")
    if not url.startswith("https://"):
        raise ValueError(f"not an https address: {url}")
    done.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_beside(done)
    try:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=60) as response, open(temp, "xb") as out:
            total = int(response.headers.get("Content-Length") or 0)
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=total or None, unit="B", unit_scale=True, desc=done.name)
            try:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
            finally:
                if bar is not None:
                    bar.close()
            if total and out.tell() != total:
                raise ConnectionError(f"the connection closed after {out.tell()} of {total} bytes")
            if sha256 and digest.hexdigest() != sha256.lower():
                raise ValueError(f"the file is not the published one (SHA-256 {sha256.lower()})")
            out.flush()
            os.fsync(out.fileno())
        publish(temp, done)
    finally:
        temp.unlink(missing_ok=True)
    return done


def clipped(text: str, limit: int = 160) -> str:
    """``text`` cut to about ``limit`` characters at a word boundary, marked with an ellipsis when cut.

    >>> clipped("the host cannot be reached right now", 20)
    'the host cannot be …'
    """
    if len(text) <= limit:
        return text
    head = text[:limit]
    return (head.rsplit(" ", 1)[0] if " " in head else head) + " …"


def _silent_progress():
    """A tqdm class that never draws (hf_hub_download takes a class, not a flag)."""
    from tqdm.auto import tqdm

    class Silent(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent

