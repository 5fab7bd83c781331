"""What one running server holds: its settings, queue, engine slot, models folder, options, output
folder and prompt styles.

One :class:`ServerState` per app (``app.state.underpaint``), made by ``create_app``; nothing
lives at module level, so two apps in one process (as in the tests) never share anything.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Request

from .catalog import Catalog
from .config import ServerConfig
from .engine_slot import EngineLoader, EngineSlot
from .images import PictureLedger
from .jobs import JobQueue
from .saving import SampleFolders

if TYPE_CHECKING:
    from ..prompts.styles import StylesFile


@dataclass(frozen=True)
class ServerOptions:
    """The A1111 settings that change generation, as /options sets them; requests may override each."""

    clip_skip: int = 1
    eta_noise_seed_delta: int = 0
    rng: str = "gpu"
    #: A1111's "File format for images" and "Quality for saved jpeg and webp images": how the API returns
    #: pictures (png, jpg, jpeg or webp; the infotext in a PNG chunk or an EXIF UserComment).
    samples_format: str = "png"
    jpeg_quality: int = 80
    #: A1111's "Enable comments": ``#`` hides the rest of a prompt's line (prompts/comments.py).
    enable_prompt_comments: bool = True
    img2img_fix_steps: bool = False
    #: A1111's "Live preview method": Full, Approx NN, Approx cheap or TAESD (pipeline/preview.py).
    show_progress_type: str = "Approx NN"
    #: False: /progress never makes or returns a preview picture.
    live_previews_enable: bool = True
    #: A1111's token merging ratios (models/tome.py): txt2img and the default; img2img's own
    #: when not 0; the hires. fix pass's when not 0.
    token_merging_ratio: float = 0.0
    token_merging_ratio_img2img: float = 0.0
    token_merging_ratio_hr: float = 0.0
    #: A1111's "Negative Guidance minimum sigma" (NGMS), its "all steps" switch and "Ignore negative
    #: prompt during early sampling" (Skip Early CFG): pipeline/guidance.py.
    s_min_uncond: float = 0.0
    s_min_uncond_all: bool = False
    skip_early_cond: float = 0.0
    #: A1111's "VAE type for encode" / "VAE type for decode": "Full" or "TAESD" (pipeline/vae_type.py).
    sd_vae_encode_method: str = "Full"
    sd_vae_decode_method: str = "Full"
    #: A1111's "Apply color correction to img2img results to match original colors"
    #: (pipeline/color_correction.py).
    img2img_color_correction: bool = False
    #: A1111's "Tiling" setting: the default of a request that leaves ``tiling`` out (models/seamless.py).
    tiling: bool = False
    #: A1111's "Noise multiplier for img2img" and "Extra noise multiplier for img2img and hires fix".
    initial_noise_multiplier: float = 1.0
    img2img_extra_noise: float = 0.0
    #: A1111's "SDXL high/low aesthetic score": what an SDXL refiner-architecture model is conditioned
    #: on for the prompt and for the negative prompt (pipeline/conditioning.py).
    sdxl_crop_top: int = 0
    sdxl_crop_left: int = 0
    sdxl_refiner_high_aesthetic_score: float = 6.0
    #: A1111's "UniPC order" and "SGM noise multiplier" (Settings → Sampler parameters).
    uni_pc_order: int = 3
    #: A1111's "Restore faces" default (requests that leave restore_faces out), its restorer and CodeFormer's weight.
    face_restoration: bool = False
    face_restoration_model: str = "CodeFormer"
    code_former_weight: float = 0.5
    #: A1111's "Beta scheduler - alpha/beta": the Beta schedule's shape.
    beta_dist_alpha: float = 0.6
    beta_dist_beta: float = 0.6
    sgm_noise_multiplier: bool = False
    #: A1111's Settings → Sampler parameters, for requests that set none of their own: eta for DDIM and for
    #: the ancestral and SDE samplers, sigma churn/tmin/tmax/noise (tmax 0: no upper bound), the schedule's
    #: sigma min/max and rho (0: the model's and the schedule's own), "Always discard next-to-last sigma".
    eta_ddim: float = 0.0
    eta_ancestral: float = 1.0
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = 0.0
    s_noise: float = 1.0
    sigma_min: float = 0.0
    sigma_max: float = 0.0
    rho: float = 0.0
    always_discard_next_to_last_sigma: bool = False
    #: A1111's "Hires fix: which pass to enable refiner for": first pass, second pass or both passes.
    hires_fix_refiner_pass: str = "second pass"
    sdxl_refiner_low_aesthetic_score: float = 2.5
    #: A1111's Interrogate settings (models/interrogate.py): the scores beside the word-list matches,
    #: BLIP's beams and caption length in tokens, and the most lines read from each word list (0: all).
    interrogate_return_ranks: bool = False
    interrogate_clip_num_beams: int = 1
    interrogate_clip_min_length: int = 24
    interrogate_clip_max_length: int = 48
    interrogate_clip_dict_limit: int = 1500
    #: A1111's deepbooru settings (models/deepbooru.py): the least probability a tag needs, tags by name
    #: (else by probability), underscores as spaces, brackets escaped, and tags left out (comma-separated).
    interrogate_deepbooru_score_threshold: float = 0.5
    deepbooru_sort_alpha: bool = True
    deepbooru_use_spaces: bool = True
    deepbooru_escape: bool = True
    deepbooru_filter_tags: str = ""
    #: A1111's "SD VAE": "Automatic", "None" or a VAE file's name as /sd-vae lists it (catalog.py).
    sd_vae: str = "Automatic"
    #: A1111's "Upscaler for img2img": "None" (Lanczos) or an upscaler's name as /upscalers lists it.
    upscaler_for_img2img: str = "None"
    #: A1111's "Add hypernetwork to prompt" ("None" or a name as /hypernetworks lists it: its tag ends every
    #: prompt that has none of it) and "Default multiplier for extra networks" (that tag's strength).
    sd_hypernetwork: str = "None"
    extra_networks_default_multiplier: float = 1.0
    #: A1111's "Show grid in gallery" and "Always save all generated image grids": a saved batch's grid
    #: is returned first / saved in the grids folder (saving.py).
    return_grid: bool = True
    grid_save: bool = True

    def replace(self, **changes) -> "ServerOptions":
        return replace(self, **changes)


class ServerState:
    def __init__(self, config: ServerConfig, loader: EngineLoader):
        self.config = config
        self.catalog = Catalog(config.models_dir)
        self.queue = JobQueue(max_waiting=config.queue_size)
        #: The decoded pictures waiting and running requests hold (images.PictureLedger).
        self.pictures = PictureLedger(config.limits.max_held_pixels)
        self.slot = EngineSlot(loader, self.default_model, self.vae_file)
        self.options = ServerOptions()
        #: Where ``save_images`` writes: only the server's configuration decides.
        self.outputs = SampleFolders(config.resolved_outdir)
        self.styles = _styles_file(config.resolved_styles_file)
        #: Annotator networks for /controlnet/detect, made on first use by the worker thread.
        self.annotators = None
        #: Embedding files read for the lists, by path: ((size, mtime), embedding or None), read again on change.
        self.embedding_files: dict[Path, tuple] = {}
        #: The token counter (prompts/counter.py) and the embeddings it was made with.
        self.token_counter: tuple = ((), None)

    def default_model(self) -> Path | None:
        """The checkpoint loaded when nothing else was asked for: --model, else the first listed."""
        if self.config.model:
            return self.catalog.folder.resolve_checkpoint(self.config.model)
        return self.catalog.first()

    def vae_file(self, checkpoint: Path, choice: str | None = None) -> Path | None:
        """The VAE file a job on ``checkpoint`` loads (None: the checkpoint's own): for the request's
        ``sd_vae`` override ``choice``, else for the sd_vae option as it is when the job starts."""
        return self.catalog.vae_file(checkpoint, self.options.sd_vae if choice is None else choice)


def _styles_file(path: Path) -> "StylesFile":
    from ..prompts.styles import StylesFile

    return StylesFile(path, source=path.name)  # messages name the file, not where it is on the server


def server_state(request: Request) -> ServerState:
    return request.app.state.underpaint
