"""The preprocessor table: one row per annotator, with the names A1111's ControlNet extension
uses (its UI labels and its internal names), default settings and the files it needs.

One table drives ``--control TYPE:...``, ``underpaint detect``, the API and infotext.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidParameter, UnknownName

if TYPE_CHECKING:
    import numpy as np

    from .basic import Params


@dataclass(frozen=True)
class Preprocessor:
    #: The name recorded in infotext (the extension's UI label).
    name: str
    #: Module path and function name, imported when first run (no work at import time).
    target: str
    #: Other accepted names: the extension's internal names, short forms.
    aliases: tuple[str, ...] = ()
    #: Which ControlNet it feeds (the word looked for in model file names).
    kind: str = ""
    #: Default threshold A and B (None: the module has no such setting).
    a: float | None = None
    b: float | None = None
    #: Whether the processor resolution matters (tile/none/inpaint use the picture as it is).
    uses_resolution: bool = True
    #: Annotator weight files it reads from models/annotators/ (for messages and listings).
    weights: tuple[str, ...] = ()
    #: The ranges of threshold A and B (the extension's sliders) where a value outside one is refused.
    a_range: tuple[float, float] | None = None
    b_range: tuple[float, float] | None = None

    def check_thresholds(self, a: float | None, b: float | None,
                         fields: tuple[str, str] = ("threshold_a", "threshold_b")) -> None:
        """Refuse a threshold outside its range (or not a finite number), naming its field."""
        import math

        for value, bounds, field, label in ((a, self.a_range, fields[0], "A"), (b, self.b_range, fields[1], "B")):
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise InvalidParameter(field, value, f"a number (threshold {label} of {self.name})")
            if bounds is not None and not bounds[0] <= value <= bounds[1]:
                raise InvalidParameter(field, value, f"a number from {bounds[0]:g} to {bounds[1]:g} (threshold "
                                                     f"{label} of {self.name})")

    def function(self) -> "Callable[[np.ndarray, Params], np.ndarray]":
        import importlib

        module, _, attr = self.target.rpartition(".")
        return getattr(importlib.import_module(module), attr)


_B = "underpaint.preprocess.basic."
_D = "underpaint.preprocess.depth."
_P = "underpaint.preprocess.openpose."
_N = "underpaint.preprocess.networks."
_PI = "underpaint.preprocess.pidinet."
_M = "underpaint.preprocess.mlsd."

PREPROCESSORS: tuple[Preprocessor, ...] = (
    Preprocessor("none", _B + "none", ("ready", "map"), uses_resolution=False),
    Preprocessor("canny", _B + "canny", (), "canny", a=100, b=200, a_range=(1, 255), b_range=(1, 255)),
    Preprocessor("invert (from white bg & black line)", _B + "invert", ("invert",), "lineart", uses_resolution=False),
    Preprocessor("threshold", _B + "threshold", ("binary",), "scribble", a=127, a_range=(0, 255)),
    Preprocessor("scribble_threshold", _B + "scribble_threshold", ("scribble",), "scribble"),
    Preprocessor("scribble_xdog", _B + "scribble_xdog", ("xdog",), "scribble", a=32, a_range=(1, 64)),
    Preprocessor("lineart_standard (from white bg & black line)", _B + "lineart_standard",
                 ("lineart_standard",), "lineart"),
    Preprocessor("blur_gaussian", _B + "blur_gaussian", ("blur",), "tile", a=9, a_range=(0.01, 64)),
    Preprocessor("tile_resample", _B + "tile_resample", ("tile",), "tile", a=1.0, uses_resolution=False,
                 a_range=(1, 8)),
    Preprocessor("shuffle", _B + "shuffle", ("content_shuffle",), "shuffle"),
    Preprocessor("inpaint_global_harmonious", _B + "inpaint", ("inpaint",), "inpaint", uses_resolution=False),
    Preprocessor("inpaint_only", _B + "inpaint", (), "inpaint", uses_resolution=False),
    Preprocessor("depth_midas", _D + "depth_midas", ("depth", "midas", "dpt"), "depth",
                 weights=("dpt-hybrid-midas/ (transformers DPT folder)",)),
    Preprocessor("depth_anything", _D + "depth_anything", ("depth_anything_v2",), "depth",
                 weights=("depth-anything-small-hf/ (transformers folder)",)),
    Preprocessor("normal_midas", _D + "normal_midas", ("normal", "normal_map"), "normal", a=0.4, a_range=(0, 1),
                 weights=("dpt-hybrid-midas/ (transformers DPT folder)",)),
    Preprocessor("openpose", _P + "openpose", ("pose", "openpose_body"), "openpose",
                 weights=("body_pose_model.pth",)),
    Preprocessor("openpose_hand", _P + "openpose_hand", (), "openpose",
                 weights=("body_pose_model.pth", "hand_pose_model.pth")),
    # openpose_full draws faces too when facenet.pth is there, and goes without them otherwise.
    Preprocessor("openpose_full", _P + "openpose_full", (), "openpose",
                 weights=("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")),
    Preprocessor("openpose_face", _P + "openpose_face", (), "openpose", weights=("body_pose_model.pth", "facenet.pth")),
    Preprocessor("openpose_faceonly", _P + "openpose_faceonly", (), "openpose",
                 weights=("body_pose_model.pth", "facenet.pth")),
    Preprocessor("softedge_hed", _N + "softedge_hed", ("hed", "softedge"), "softedge", weights=("ControlNetHED.pth",)),
    Preprocessor("softedge_hedsafe", _N + "softedge_hedsafe", ("hed_safe",), "softedge",
                 weights=("ControlNetHED.pth",)),
    Preprocessor("scribble_hed", _N + "scribble_hed", ("fake_scribble",), "scribble", weights=("ControlNetHED.pth",)),
    Preprocessor("softedge_pidinet", _PI + "softedge_pidinet", ("pidinet",), "softedge",
                 weights=("table5_pidinet.pth",)),
    Preprocessor("softedge_pidisafe", _PI + "softedge_pidisafe", ("pidinet_safe",), "softedge",
                 weights=("table5_pidinet.pth",)),
    Preprocessor("scribble_pidinet", _PI + "scribble_pidinet", ("pidinet_scribble",), "scribble",
                 weights=("table5_pidinet.pth",)),
    Preprocessor("mlsd", _M + "mlsd", ("straight_lines",), "mlsd", a=0.1, b=0.1, weights=("mlsd_large_512_fp32.pth",),
                 a_range=(0.01, 2), b_range=(0.01, 20)),
    Preprocessor("lineart_realistic", _N + "lineart_realistic", ("lineart",), "lineart", weights=("sk_model.pth",)),
    Preprocessor("lineart_coarse", _N + "lineart_coarse", (), "lineart", weights=("sk_model2.pth",)),
    # IP-Adapter units: the picture goes to a CLIP vision model, not to a map (models/ip_adapter.py); the
    # extension names the encoder in the module (ViT-H/14, or ViT-bigG/14 for ip-adapter_sdxl), "auto"
    # takes the one the adapter's widths call for.
    Preprocessor("ip-adapter-auto", _B + "none", ("ip-adapter",), "ip-adapter", uses_resolution=False,
                 weights=("clip_vision/ (a CLIP vision model: CLIP-ViT-H-14 or CLIP-ViT-bigG-14)",)),
    Preprocessor("ip-adapter_clip_h", _B + "none", ("ip-adapter_clip_sd15", "ip-adapter_clip_sdxl_plus_vith"),
                 "ip-adapter", uses_resolution=False, weights=("clip_vision/ (CLIP-ViT-H-14)",)),
    Preprocessor("ip-adapter_clip_g", _B + "none", ("ip-adapter_clip_sdxl", "ip-adapter_clip_bigg"), "ip-adapter",
                 uses_resolution=False, weights=("clip_vision/ (CLIP-ViT-bigG-14)",)),
)


def _key(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def get_preprocessor(name: str) -> Preprocessor:
    """The row for a name or alias (case-insensitive); unknown names suggest the nearest."""
    wanted = _key(str(name))
    for p in PREPROCESSORS:
        if wanted == _key(p.name) or wanted in (_key(a) for a in p.aliases):
            return p
    raise UnknownName("module", name, preprocessor_names())


def preprocessor_names() -> list[str]:
    """Names users type: the short aliases first where they exist, then the extension's labels."""
    names: list[str] = []
    for p in PREPROCESSORS:
        for n in (*p.aliases[:1], p.name):
            if n not in names:
                names.append(n)
    return names


def run_preprocessor(name: str, image, *, res: int = 512, a: float | None = None, b: float | None = None,
                     seed: int = 0, ctx=None) -> "np.ndarray":
    """Run one annotator on a picture (PIL image or uint8 array); thresholds default per module.

    Returns a uint8 map: H x W x 3 (H x W x 4 for inpaint: colour + mask), at the working
    resolution (short side ``res``) for annotators that use it, else at the picture's size.
    """
    import numpy as np

    from .basic import Params
    from .common import AnnotatorContext, check_finite_resolution

    pre = get_preprocessor(name)
    pre.check_thresholds(a, b)
    arr = np.asarray(image) if not isinstance(image, np.ndarray) else image
    if arr.dtype != np.uint8:
        arr = arr.astype(np.uint8)
    params = Params(res=check_finite_resolution(res), a=pre.a if a is None else a, b=pre.b if b is None else b,
                    seed=seed, ctx=ctx or AnnotatorContext())
    return pre.function()(arr, params)
