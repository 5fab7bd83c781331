"""ADetailer's detailing, as its users know it from A1111: after a picture is made, the faces (hands,
people) in it are found and each is inpainted again, "only masked" at the request's size, so that a
small face gets the whole resolution.

For each tab (:class:`~underpaint.params.DetailerUnit`), in order, on the picture the tab before
left:

1. The tab's model finds things scored above its confidence: ADetailer's YOLO file of that name in
   the models folder's ``adetailer/`` (models/yolo.py: boxes, and a segmentation model's masks);
   without the file, a face model's name (and ADetailer's MediaPipe names) finds faces with the
   RetinaFace detector that face restoration uses (``detection_Resnet50_Final.pth`` in the models
   folder's ``GFPGAN/`` or ``Codeformer/``); other names are refused.
2. Each find gets a mask: a segmentation model's own, else its box (cut to the picture) filled. Finds
   whose box's area is outside the tab's ratios of the picture are dropped, then only the k largest
   boxes are kept (0: all, largest first); the masks are dilated (a positive "dilate erode", with a square kernel of that many pixels) or
   eroded (negative), moved by the offsets (x to the right, y upwards; wrapping around) and, with
   "Merge", made one (and inverted with "Merge and Invert"); empty masks are dropped.
3. Mask j is inpainted on the picture so far: masked content "original", the tab's mask blur,
   denoising strength and "only masked" padding, at the request's size (or the tab's inpaint
   size), with the request's steps, CFG scale and sampler unless the tab gives its own, seed and
   variation seed + j. Its prompt is the tab's (the request's when empty; ``[PROMPT]`` in it stands
   for the request's, ``[SEP]`` separates one prompt per mask, the last one serving the rest, and a
   mask whose prompt is ``[SKIP]`` is left alone); likewise the negative prompt.

The pictures' infotext records the tabs as ADetailer writes them ("ADetailer model",
"ADetailer confidence", ..., a second tab's keys ending in " 2nd"), and "ADetailer version".
Where underpaint differs: without the model's file, faces come from RetinaFace; the detailing runs
after inpainting's overlay and colour correction (ADetailer runs before them), so an img2img
picture's faces outside the mask are detailed too.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InvalidParameter, ModelError, ModelNotFound
from ..prompts.parser import split_trimmed

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..params import DetailerUnit, GenerationParams

#: The version the infotext records (ADetailer's own key).
VERSION = "underpaint"
#: Detection model names taken as face models (ADetailer's, and its MediaPipe ones).
_FACE = re.compile(r"^(face_|mediapipe_face|yolov8n-face|retinaface)", re.IGNORECASE)
#: ADetailer's infotext names of the tab's fields, in its order, with each value's default (not written).
INFOTEXT: tuple[tuple[str, str, object], ...] = (
    ("model", "ADetailer model", None), ("model_classes", "ADetailer model classes", ""),
    ("prompt", "ADetailer prompt", ""),
    ("negative_prompt", "ADetailer negative prompt", ""), ("confidence", "ADetailer confidence", None),
    ("mask_filter_method", "ADetailer method to decide top k masks", None),
    ("mask_k", "ADetailer mask only top k", 0), ("mask_min_ratio", "ADetailer mask min ratio", 0.0),
    ("mask_max_ratio", "ADetailer mask max ratio", 1.0), ("x_offset", "ADetailer x offset", 0),
    ("y_offset", "ADetailer y offset", 0), ("dilate_erode", "ADetailer dilate erode", None),
    ("mask_merge_invert", "ADetailer mask merge invert", "None"), ("mask_blur", "ADetailer mask blur", None),
    ("denoising_strength", "ADetailer denoising strength", None),
    ("inpaint_only_masked", "ADetailer inpaint only masked", None),
    ("inpaint_only_masked_padding", "ADetailer inpaint padding", None),
    ("restore_face", "ADetailer restore face", False),
    ("controlnet_model", "ADetailer ControlNet model", None), ("controlnet_module", "ADetailer ControlNet module", None),
    ("controlnet_weight", "ADetailer ControlNet weight", 1.0),
    ("controlnet_guidance_start", "ADetailer ControlNet guidance start", 0.0),
    ("controlnet_guidance_end", "ADetailer ControlNet guidance end", 1.0),
)
#: The key ADetailer wrote for ``mask_k`` before its "Confidence" filter (still read).
_OLD_TOP_K = "ADetailer mask only top k largest"


def is_face_model(name: str) -> bool:
    return bool(_FACE.match(name.strip()))


def yolo_file(folder, name: str) -> Path | None:
    """The file in the models folder's ``adetailer/`` (A1111's ``models/adetailer``) that a tab's model
    names by its file name, as ADetailer lists them; None when there is none."""
    from ..models.registry import list_named_files
    from ..models.yolo import YOLO_EXTENSIONS

    name = name.strip()
    if folder is None or not name or "/" in name or "\\" in name:
        return None
    return next((entry.path for entry in list_named_files(folder.folders("adetailer"), YOLO_EXTENSIONS)
                 if entry.path.name == name), None)


def yolo_files(folder) -> list[str]:
    """The detection model files in the models folder's ``adetailer/``, by the names a tab gives them."""
    from ..models.registry import list_named_files
    from ..models.yolo import YOLO_EXTENSIONS

    if folder is None:
        return []
    return list(dict.fromkeys(e.path.name for e in list_named_files(folder.folders("adetailer"), YOLO_EXTENSIONS)))


def check_unit(unit: "DetailerUnit", field: str = "ad_model", folder=None) -> None:
    """A tab this detailer can run: a model file in the models folder's ``adetailer/``, or a face model's
    name (RetinaFace finds the faces when its file is not there). Without ``folder`` nothing can be
    checked yet: the generation checks it against its models folder before the work begins."""
    if is_face_model(unit.model) or folder is None or yolo_file(folder, unit.model) is not None:
        return
    where = folder.folder("adetailer")
    there = ", ".join(yolo_files(folder)[:12]) or "none there now"
    raise InvalidParameter(field, unit.model, f"a detection model file in {where} ({there}; ADetailer's "
                                              f"hand_yolov8n.pt, person_yolov8n-seg.pt, ... go there) or a face "
                                              f"model's name (face_yolov8n.pt, mediapipe_face_full, ...: RetinaFace "
                                              f"finds the faces when the file is not there)")


def suffix(n: int) -> str:
    """ADetailer's key suffix for tab ``n`` (0-based): "", " 2nd", " 3rd", " 4th", ..."""
    if n == 0:
        return ""
    number = n + 1
    end = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f" {number}{end}"


def infotext_entries(units: tuple) -> tuple[tuple[str, object], ...]:
    """The infotext keys of the tabs (their non-default values) and the version, as ADetailer writes them."""
    entries: list[tuple[str, object]] = []
    for n, unit in enumerate(units):
        for attr, name, default in INFOTEXT:
            value = getattr(unit, attr)
            if default is not None and value == default:
                continue
            if attr == "inpaint_only_masked_padding" and not unit.inpaint_only_masked:
                continue
            if attr == "mask_filter_method" and not unit.mask_k:
                continue  # says something only with a top k
            if attr.startswith("controlnet_"):
                if unit.controlnet_model is None or (attr != "controlnet_model" and value is None):
                    continue
                if attr == "controlnet_model":
                    value = _model_name(value)  # a file's name, never where it is
            entries.append((name + suffix(n), value))
        if unit.inpaint_width is not None and unit.inpaint_height is not None:
            entries += [("ADetailer use inpaint width height" + suffix(n), True),
                        ("ADetailer inpaint width" + suffix(n), unit.inpaint_width),
                        ("ADetailer inpaint height" + suffix(n), unit.inpaint_height)]
        for attr, name in (("steps", "steps"), ("cfg_scale", "CFG scale"), ("sampler", "sampler"),
                           ("noise_multiplier", "noise multiplier"), ("clip_skip", "CLIP skip"),
                           ("checkpoint", "checkpoint"), ("vae", "VAE")):
            if getattr(unit, attr) is not None:
                value = getattr(unit, attr)
                if attr == "checkpoint":  # the loaded checkpoint's title, never where its file is
                    value = unit.checkpoint_title or Path(value).stem
                elif attr == "vae" and value != "None":  # a file's name, never where it is
                    value = Path(value).name
                entries += [(f"ADetailer use separate {name}" + suffix(n), True),
                            (f"ADetailer {name}" + suffix(n), value)]
                if attr == "sampler" and unit.scheduler is not None:
                    entries.append(("ADetailer scheduler" + suffix(n), unit.scheduler))
    return (*entries, ("ADetailer version", VERSION)) if entries else ()


def units_from_infotext(params) -> tuple:
    """The ADetailer tabs an infotext records ("ADetailer model", "ADetailer model 2nd", ...), as ADetailer's
    paste reads them back; () when it records none. A value that does not parse is refused naming its key."""
    from ..params import DetailerUnit

    kinds = {"confidence": float, "mask_k": int, "mask_min_ratio": float, "mask_max_ratio": float,
             "x_offset": int, "y_offset": int, "dilate_erode": int, "mask_blur": int, "denoising_strength": float,
             "inpaint_only_masked": bool, "inpaint_only_masked_padding": int, "restore_face": bool,
             "controlnet_weight": float, "controlnet_guidance_start": float, "controlnet_guidance_end": float}
    units = []
    for n in range(10):
        end = suffix(n)
        if "ADetailer model" + end not in params:
            break
        fields: dict = {}
        for attr, name, _ in INFOTEXT:
            key = name + end
            if attr == "mask_k" and key not in params and _OLD_TOP_K + end in params:
                key = _OLD_TOP_K + end
            if key in params:
                fields[attr] = _typed(params[key], kinds.get(attr, str), key)
        for attr, name, kind in (("steps", "steps", int), ("cfg_scale", "CFG scale", float), ("sampler", "sampler", str),
                                 ("noise_multiplier", "noise multiplier", float), ("clip_skip", "CLIP skip", int),
                                 ("checkpoint", "checkpoint", str), ("vae", "VAE", str)):
            if str(params.get(f"ADetailer use separate {name}{end}", "")).lower() == "true" \
                    and f"ADetailer {name}{end}" in params:
                fields[attr] = _typed(params[f"ADetailer {name}{end}"], kind, f"ADetailer {name}{end}")
        if "ADetailer scheduler" + end in params and "sampler" in fields:
            fields["scheduler"] = params["ADetailer scheduler" + end]
        if str(params.get("ADetailer use inpaint width height" + end, "")).lower() == "true":
            for attr, name in (("inpaint_width", "width"), ("inpaint_height", "height")):
                fields[attr] = _typed(params.get(f"ADetailer inpaint {name}{end}", "512"), int,
                                      f"ADetailer inpaint {name}{end}")
        try:
            units.append(DetailerUnit(**fields))
        except InvalidParameter as exc:
            raise InvalidParameter(f"ADetailer {exc.field.removeprefix('ad_')}{end}", exc.value, exc.expected) from None
    return tuple(units)


def _model_name(value: str) -> str:
    """A ControlNet model as the infotext names it: a file's name without its folder or extension."""
    path = Path(value)
    return path.stem if path.suffix.lower() in (".safetensors", ".pth", ".pt", ".ckpt", ".bin") else path.name


def _typed(text, kind, key: str):
    if kind is bool:
        if str(text).lower() not in ("true", "false"):
            raise InvalidParameter(key, text, "True or False")
        return str(text).lower() == "true"
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise InvalidParameter(key, text, "a number" if kind in (int, float) else "text") from None


def prompts(text: str, default: str) -> list[str]:
    """A tab's prompts, one per mask (the last serving the rest): ``[SEP]`` separates them, an empty one is
    ``default``, and ``[PROMPT]`` in one stands for ``default``."""
    out = []
    for part in split_trimmed(text, "[SEP]"):
        if not part:
            part = default
        elif "[PROMPT]" in part:
            part = part.replace("[PROMPT]", f" {default} ")
        out.append(part)
    return out


def masks(found, size: tuple[int, int], unit: "DetailerUnit") -> list["Image"]:
    """The tab's masks from what was found (:class:`~underpaint.models.yolo.Detection`, or rows x1, y1, x2,
    y2, score, ... of face boxes), as ADetailer makes and shapes them: a segmentation model's own mask, else
    the filled box; finds kept by their boxes' area ratio, the k largest boxes (or, by "Confidence", the k
    most confident finds) first (ties as NumPy's argsort leaves them, reversed); then each mask moved,
    dilated or eroded (those left empty dropped), and the rest merged (and inverted) when asked."""
    import cv2
    from PIL import Image, ImageChops, ImageDraw

    w, h = size
    area = float(w * h)
    shapes = [(np.clip(np.asarray(getattr(f, "box", f)[:4], np.float64), 0, [w, h, w, h]), getattr(f, "mask", None),
               float(f.score if hasattr(f, "score") else (f[4] if len(f) > 4 else 1.0)))
              for f in found]  # boxes within the picture, as YOLO's are
    kept = [(b, m, s) for b, m, s in shapes
            if unit.mask_min_ratio <= (b[2] - b[0]) * (b[3] - b[1]) / area <= unit.mask_max_ratio]
    if unit.mask_k > 0 and kept:
        keys = [s if unit.mask_filter_method == "Confidence" else (b[2] - b[0]) * (b[3] - b[1]) for b, _, s in kept]
        kept = [kept[i] for i in np.argsort(keys)[-unit.mask_k:][::-1]]
    out = []
    for box, shape, _ in kept:
        if shape is not None:
            mask = Image.fromarray(np.where(shape, 255, 0).astype(np.uint8), "L")
        else:
            mask = Image.new("L", size, 0)
            ImageDraw.Draw(mask).rectangle([float(v) for v in box], fill=255)
        if unit.x_offset or unit.y_offset:
            mask = ImageChops.offset(mask, unit.x_offset, -unit.y_offset)
        out.append(mask)
    k = unit.dilate_erode
    if k:
        kernel = np.ones((abs(k), abs(k)), np.uint8)
        out = [Image.fromarray((cv2.dilate if k > 0 else cv2.erode)(np.asarray(mask), kernel, iterations=1), "L")
               for mask in out]
        out = [mask for mask in out if mask.getbbox() is not None]
    if out and unit.mask_merge_invert != "None":
        merged = out[0]
        for mask in out[1:]:
            merged = ImageChops.lighter(merged, mask)
        out = [ImageChops.invert(merged) if unit.mask_merge_invert == "Merge and Invert" else merged]
    return out


def detail(picture: "Image", seed: int, subseed: int, params: "GenerationParams", find: Callable,
           inpaint: Callable[["GenerationParams", "DetailerUnit"], "Image"], *, size: tuple[int, int],
           interrupted: Callable[[], bool] = lambda: False) -> "Image":
    """``picture`` with every tab's finds inpainted again. ``find(unit, picture)`` gives what the tab's model
    finds (detections or face boxes); ``inpaint(request, unit)`` runs one inpainting request for the tab
    (on its own checkpoint when it names one) and gives its picture; ``size`` is the request's."""
    from ..params import InpaintOptions

    base = params.replace(detailer=(), hires=None, refiner=None, xyz_plot=None, prompt_matrix=None,
                          prompts_from_file=None, loopback=None, sd_upscale=None, batch_size=1, n_iter=1,
                          control_units=(), restore_faces=False, img2img_color_correction=False,
                          color_reference=None, extra_infotext=())
    for unit in params.detailer:
        if interrupted():
            break
        found = masks(find(unit, picture), picture.size, unit)
        ad_prompts = prompts(_uncommented(unit.prompt, params), params.prompt)
        ad_negatives = prompts(_uncommented(unit.negative_prompt, params), params.negative_prompt)
        width, height = (unit.inpaint_width, unit.inpaint_height) if unit.inpaint_width and unit.inpaint_height \
            else size
        for j, mask in enumerate(found):
            if interrupted():
                break
            prompt = ad_prompts[min(j, len(ad_prompts) - 1)]
            if re.match(r"^\s*\[SKIP\]\s*$", prompt):
                continue
            request = base.replace(
                init_images=(picture.convert("RGB"),), mask=mask, strength=unit.denoising_strength,
                prompt=prompt, negative_prompt=ad_negatives[min(j, len(ad_negatives) - 1)],
                seed=(seed + j) % 2**64, subseed=(subseed + j) % 2**64, width=width, height=height, resize_mode=0,
                steps=unit.steps or params.steps, cfg_scale=params.cfg_scale if unit.cfg_scale is None else unit.cfg_scale,
                sampler=unit.sampler or params.sampler, restore_faces=unit.restore_face,
                noise_multiplier=params.noise_multiplier if unit.noise_multiplier is None else unit.noise_multiplier,
                clip_skip=unit.clip_skip or params.clip_skip, control_units=_control(unit, params),
                scheduler=params.scheduler if unit.sampler is None else (unit.scheduler or "Automatic"),
                inpaint=InpaintOptions(mask_blur_x=unit.mask_blur, mask_blur_y=unit.mask_blur, masked_content="original",
                                       full_res=unit.inpaint_only_masked,
                                       full_res_padding=unit.inpaint_only_masked_padding))
            picture = inpaint(request, unit)
    return picture


def _control(unit: "DetailerUnit", params: "GenerationParams") -> tuple:
    """A find's ControlNet units, as ADetailer sets them: none, the request's own ("Passthrough"), or the
    tab's model reading the picture being fixed (and, for inpaint models, the find's mask), pixel perfect."""
    if unit.controlnet_model is None:
        return ()
    if unit.controlnet_model == "Passthrough":
        return params.control_units
    from .control import ControlUnit

    return (ControlUnit(module=unit.controlnet_module, model=unit.controlnet_model, weight=unit.controlnet_weight,
                        guidance_start=unit.controlnet_guidance_start, guidance_end=unit.controlnet_guidance_end,
                        pixel_perfect=True),)


def _uncommented(text: str, params: "GenerationParams") -> str:
    from ..prompts.comments import strip_comments

    return strip_comments(text) if params.prompt_comments else text


# --- the face detector ------------------------------------------------------------------------------


def detector_file(folder, field: str = "alwayson_scripts.ADetailer") -> Path:
    """RetinaFace's file in the models folder (what face restoration uses); ModelNotFound naming ``field``."""
    from .face_restore import _DETECTOR_FILE, _first

    folders = () if folder is None else tuple(dict.fromkeys((*folder.folders("gfpgan"), *folder.folders("codeformer"))))
    found = _first(folders, _DETECTOR_FILE)
    if found is None:
        where = folder.root / "GFPGAN" if folder is not None else Path("GFPGAN")
        raise ModelNotFound(f"face detailing finds faces with RetinaFace: put {_DETECTOR_FILE} (facexlib's, as "
                            f"A1111's face restoration uses) in {where}", field=field)
    return found


_lock = threading.Lock()
#: Detectors kept loaded (RetinaFace and YOLO models), by file, its change time and device; the newest few.
_kept: dict = {}
_KEEP = 4


def _keep(key, load: Callable):
    with _lock:
        if key not in _kept:
            while len(_kept) >= _KEEP:
                _kept.pop(next(iter(_kept)))
            _kept[key] = load()
        return _kept[key]


def class_names(text: str) -> list[str]:
    """``ad_model_classes`` as ADetailer splits it: comma-separated names, trimmed, empty ones left out."""
    return [name.strip() for name in text.split(",") if name.strip()]


def finder(folder, device, name: str, field: str = "ad_model", classes: str = "") -> Callable:
    """``find(picture, confidence)``: what the tab's model ``name`` finds in a picture: the YOLO file of that
    name in the models folder's ``adetailer/`` (models/yolo.py; a YOLO-World model looks for ``classes``,
    ADetailer's ``ad_model_classes``), else, for a face model's name, the faces RetinaFace finds (as
    boxes). Anything else is refused naming ``field``, classes a YOLO-World file holds no text for naming
    its ``model_classes`` beside it."""
    from ..params import DetailerUnit

    path = yolo_file(folder, name)
    if path is None:
        check_unit(DetailerUnit(model=name), field=field, folder=folder)
        faces = face_finder(folder, device)
        shape = _MESH_SHAPES.get(name.strip().lower())
        return faces if shape is None else lambda picture, confidence: shape(faces(picture, confidence), picture.size)
    from ..models.yolo import detect, load_yolo

    key = (str(path), path.stat().st_mtime_ns, str(device))
    model = _keep(key, lambda: load_yolo(path).to(device))
    wanted = class_names(classes) if model.text is not None else []
    chosen = None
    if wanted:  # their text features made once, here
        encode = None if set(wanted) <= set(model.names.values()) else world_text_encoder(folder, device)
        try:
            chosen = model.classes(wanted, encode)
        except ModelError as exc:
            raise InvalidParameter(field.rsplit(".", 1)[0] + ".model_classes" if "." in field else "ad_model_classes",
                                   classes, exc.message.removeprefix(f"{path}: ")) from None

    def find(picture: "Image", confidence: float):
        with _lock:
            return detect(model, picture, confidence, classes=chosen)

    return find


def eye_shapes(rows, size: tuple[int, int], *, length: float = 0.25, height: float = 0.12) -> list:
    """ADetailer's ``mediapipe_face_mesh_eyes_only`` made from RetinaFace's finds: per face one mask of both
    eyes, each an ellipse at its landmark along the line between them, ``length`` and ``height`` times the
    eyes' distance across (half-axes; an eye's opening is about half that distance long and a fifth of it
    high), its box the mask's. Faces without landmarks keep their boxes. (MediaPipe's mesh traces the
    eyelids themselves; this is the shape of an average eye where the detector puts it.)"""
    from PIL import Image, ImageDraw

    from ..models.yolo import Detection

    out: list = []
    turns = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    for row in rows:
        row = np.asarray(row, np.float64)
        if len(row) < 9:
            out.append(row)
            continue
        (lx, ly), (rx, ry) = row[5:7], row[7:9]
        across = float(np.hypot(rx - lx, ry - ly))
        cos, sin = (rx - lx) / across if across else 1.0, (ry - ly) / across if across else 0.0
        a, b = length * across, height * across
        mask = Image.new("L", size, 0)
        draw = ImageDraw.Draw(mask)
        for cx, cy in ((lx, ly), (rx, ry)):
            draw.polygon([(cx + a * np.cos(t) * cos - b * np.sin(t) * sin, cy + a * np.cos(t) * sin + b * np.sin(t) * cos)
                          for t in turns], fill=255)
        box = mask.getbbox()
        if box is not None:
            out.append(Detection(tuple(float(v) for v in box), float(row[4]), "eyes", np.asarray(mask) > 0))
    return out


def oval_shapes(rows, size: tuple[int, int]) -> list:
    """ADetailer's ``mediapipe_face_mesh`` (a mask of the face's outline) made from RetinaFace's finds: the
    ellipse within each face's box."""
    from PIL import Image, ImageDraw

    from ..models.yolo import Detection

    out = []
    for row in rows:
        mask = Image.new("L", size, 0)
        ImageDraw.Draw(mask).ellipse([float(v) for v in row[:4]], fill=255)
        box = mask.getbbox()
        if box is not None:
            out.append(Detection(tuple(float(v) for v in box), float(row[4]), "face", np.asarray(mask) > 0))
    return out


#: ADetailer's MediaPipe face-mesh models, whose masks are shapes rather than boxes (without MediaPipe: the
#: shapes made from RetinaFace's boxes and landmarks).
_MESH_SHAPES = {"mediapipe_face_mesh_eyes_only": eye_shapes, "mediapipe_face_mesh": oval_shapes}


def world_text_encoder(folder, device) -> Callable | None:
    """``encode(names) -> (n, 512)``: CLIP ViT-B/32's normalised text features, from the models folder's
    CLIP/ (``models.interrogate.WORLD_CLIP_NAMES``; kept loaded); None when it is not there."""
    from ..models.interrogate import _candidates, is_world_clip, load_ranker

    for path in _candidates(folder.folders("clip")) if folder is not None else ():
        if is_world_clip(path):
            key = ("world-clip", str(path), path.stat().st_mtime_ns, str(device))
            return _keep(key, lambda: load_ranker(path, str(device))).text_features
    return None


def face_finder(folder, device) -> Callable:
    """``find(picture, confidence)``: face boxes in a picture, from the models folder's RetinaFace (kept loaded)."""
    import torch

    from ..models.face_detect import detect_faces, load_retinaface
    from ..models.upscaler import read_weights, unwrap_weights

    path = detector_file(folder)
    key = (str(path), path.stat().st_mtime_ns, str(device))
    net = _keep(key, lambda: load_retinaface(unwrap_weights(read_weights(path)), str(path)).to(device).eval())

    def find(picture: "Image", confidence: float) -> np.ndarray:
        bgr = np.asarray(picture.convert("RGB"))[:, :, ::-1]
        with _lock, torch.inference_mode():
            return detect_faces(net, bgr, threshold=confidence)

    return find
