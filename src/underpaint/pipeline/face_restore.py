"""A1111's "Restore faces": every face in a finished picture found, aligned, restored by CodeFormer
(A1111's default) or GFPGAN, and blended back.

As A1111 1.10 runs it (its face-restoration helper over facexlib's, no upscaling):

1. The picture (BGR) is resized so its short side is 640 px (Lanczos) and RetinaFace finds the faces
   scoring above 0.97, boxes and landmarks taken back to the picture's scale; a face whose eyes are
   less than 5 px apart is left alone.
2. Each face is warped onto FFHQ's 512² five-point template (a similarity transform fitted by
   least median of squares, the outside filled with grey 135, 133, 132).
3. The restorer restores it (RGB in [-1, 1]; the output clamped, scaled to 0-255 and truncated):
   CodeFormer with A1111's "CodeFormer weight" (0.5; 0 is the strongest restoration), or GFPGAN.
4. ParseNet parses the restored face; its face classes (skin, brows, eyes, glasses, ears, earrings,
   nose, mouth, lips and hair, not the neck, necklace or clothes) make a mask, blurred twice
   (101 px Gaussian, σ 11), its 10-px border cleared; the face and its mask are warped back and the
   face laid over the picture through the mask.

The networks come from the models folder as A1111 keeps them: ``Codeformer/codeformer-v0.1.0.pth``
(any ``codeformer*`` file), ``GFPGAN/GFPGANv1.4.pth`` (any ``GFPGAN*`` file; the last by name), and
``detection_Resnet50_Final.pth`` and ``parsing_parsenet.pth`` in either folder. Pickle-based files are
read with ``torch.load(weights_only=True)``, never run. One set is kept loaded between requests.
Difference from A1111: GFPGAN's noise inputs are its stored noise maps, so a face restores the same
way every time (A1111 draws new noise for every face).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import ModelNotFound
from ..params import FACE_RESTORERS  # noqa: F401 - re-exported

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["FaceRestorer", "restore_faces", "load_face_restorer", "face_restorer_for", "FACE_RESTORERS"]

#: Where each restorer's file is, as (models folder kind, file name prefix, the released file's name).
_RESTORER_FILES = {"CodeFormer": ("codeformer", "codeformer", "codeformer-v0.1.0.pth"),
                   "GFPGAN": ("gfpgan", "gfpgan", "GFPGANv1.4.pth")}
FACE_SIZE = 512
#: FFHQ's five landmarks (eyes, nose tip, mouth corners) on a 512² face.
FFHQ_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]])
DETECT_SHORT_SIDE = 640
DETECT_THRESHOLD = 0.97
MIN_EYE_DISTANCE = 5.0
_GREY_BGR = (135, 133, 132)
#: ParseNet's 19 classes: those that belong to the pasted face (background, neck, necklace and clothes do not).
_FACE_CLASSES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15)
_DETECTOR_FILE, _PARSER_FILE = "detection_Resnet50_Final.pth", "parsing_parsenet.pth"


@dataclass
class FaceRestorer:
    """The three networks, on one device in float32."""

    detector: torch.nn.Module
    parser: torch.nn.Module
    restorer: torch.nn.Module
    name: str = "GFPGAN"
    paths: tuple[Path, ...] = ()

    @property
    def device(self) -> torch.device:
        return next(self.restorer.parameters()).device

    @contextmanager
    def visiting(self, device: torch.device | None) -> Iterator["FaceRestorer"]:
        """The networks on ``device`` for the block, back where they were after (None: where they are),
        as a model's other parts visit the GPU in the medium and low memory modes."""
        nets = (self.detector, self.parser, self.restorer)
        home = self.device
        if device is None or torch.device(device) == home:
            yield self
            return
        for net in nets:
            net.to(device)
        try:
            yield self
        finally:
            for net in nets:
                net.to(home)

    def restore(self, face: torch.Tensor, weight: float) -> torch.Tensor:
        """One aligned face through the restorer (``weight``: CodeFormer's; GFPGAN has none)."""
        with torch.no_grad():
            return self.restorer(face, weight) if self.name == "CodeFormer" else self.restorer(face)


def _to_face_tensor(bgr: np.ndarray, device: torch.device) -> torch.Tensor:
    """A BGR uint8 face as an RGB float tensor in [-1, 1], ``[1, 3, H, W]``."""
    rgb = bgr[:, :, ::-1].astype(np.float32) / 255.0
    return ((torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None] - 0.5) / 0.5).to(device)


def _from_face_tensor(t: torch.Tensor) -> np.ndarray:
    """An RGB tensor in [-1, 1] as a BGR uint8 face (clamped, scaled to 0-255, truncated)."""
    rgb = ((t[0].float().cpu().clamp(-1, 1) + 1) / 2).numpy().transpose(1, 2, 0)
    return (rgb[:, :, ::-1] * 255.0).astype(np.uint8)


def find_faces(restorer: FaceRestorer, bgr: np.ndarray) -> list[np.ndarray]:
    """The five landmarks (``[5, 2]``, in the picture's pixels) of each face found, best first."""
    import cv2

    from ..models.face_detect import detect_faces

    h, w = bgr.shape[:2]
    scale = min(h, w) / DETECT_SHORT_SIDE
    small = cv2.resize(bgr, (int(w / scale), int(h / scale)), interpolation=cv2.INTER_LANCZOS4)
    rows = detect_faces(restorer.detector, small, DETECT_THRESHOLD) * scale
    faces = []
    for row in rows:
        points = row[5:15].reshape(5, 2)
        if np.linalg.norm(points[0] - points[1]) >= MIN_EYE_DISTANCE:
            faces.append(points)
    return faces


def alignment(landmarks: np.ndarray) -> np.ndarray | None:
    """The 2x3 similarity transform taking a face's landmarks onto FFHQ's template (None when none fits)."""
    import cv2

    return cv2.estimateAffinePartial2D(landmarks, FFHQ_TEMPLATE, method=cv2.LMEDS)[0]


def face_mask(restorer: FaceRestorer, face_bgr: np.ndarray) -> np.ndarray:
    """The soft mask (float64, 0-1, ``[512, 512]``) of where the restored face is pasted."""
    import cv2

    x = _to_face_tensor(cv2.resize(face_bgr, (FACE_SIZE, FACE_SIZE), interpolation=cv2.INTER_LINEAR),
                        restorer.device)
    with torch.no_grad():
        classes = restorer.parser(x).argmax(dim=1)[0].cpu().numpy()
    mask = np.isin(classes, _FACE_CLASSES).astype(np.float64) * 255.0
    for _ in range(2):
        mask = cv2.GaussianBlur(mask, (101, 101), 11)
    border = 10
    mask[:border, :] = mask[-border:, :] = 0
    mask[:, :border] = mask[:, -border:] = 0
    return cv2.resize(mask / 255.0, face_bgr.shape[:2])


def restore_faces(restorer: FaceRestorer, image: "Image.Image", check: Callable[[], None] | None = None, *,
                  weight: float = 0.5) -> "Image.Image":
    """``image`` with each face restored and blended back (an RGB picture of the same size); ``weight``:
    A1111's CodeFormer weight (GFPGAN ignores it)."""
    import cv2
    from PIL import Image

    rgb = np.asarray(image.convert("RGB"))
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    h, w = bgr.shape[:2]
    faces = find_faces(restorer, bgr)
    if not faces:
        return image.convert("RGB")
    result = bgr.copy().astype(np.float64)
    for landmarks in faces:
        if check is not None:
            check()
        matrix = alignment(landmarks)
        if matrix is None:  # landmarks no similarity transform fits (degenerate): the face is left alone
            continue
        crop = cv2.warpAffine(bgr, matrix, (FACE_SIZE, FACE_SIZE), borderMode=cv2.BORDER_CONSTANT,
                              borderValue=_GREY_BGR)
        restored = _from_face_tensor(restorer.restore(_to_face_tensor(crop, restorer.device), weight))
        inverse = cv2.invertAffineTransform(matrix)
        back = cv2.warpAffine(restored, inverse, (w, h))
        mask = cv2.warpAffine(face_mask(restorer, restored), inverse, (w, h), flags=cv2.INTER_AREA)[:, :, None]
        result = mask * back + (1 - mask) * result
    return Image.fromarray(np.ascontiguousarray(result.astype(np.uint8)[:, :, ::-1]), "RGB")


def restore_pictures(model, folder, images: list, params, interrupted: Callable[[], bool]) -> list:
    """A generation's pictures with their faces restored as ``params`` asks (the restorer, CodeFormer's
    weight), on ``model``'s device. In the medium and low memory modes the restorer rests in host memory
    and visits the GPU, as the text encoders and the VAE do. An interrupt leaves the pictures not yet
    restored as they are."""
    from ..models.offload import offload_of

    offload = offload_of(model)
    resting = offload is not None and offload.offloads_encoders
    restorer = face_restorer_for(folder, offload.home if resting else model.device, params.face_restoration_model)

    def check() -> None:
        if interrupted():
            raise _Stopped

    done = []
    with restorer.visiting(model.device if resting else None):
        for image in images:
            try:
                done.append(restore_faces(restorer, image, check, weight=params.code_former_weight))
            except _Stopped:
                done.append(image)
    return done


class _Stopped(Exception):
    """An interrupt between two faces."""


# --- the files ---------------------------------------------------------------------------------------


def face_model_files(folder, field: str = "restore_faces", restorer: str = "GFPGAN") -> tuple[Path, Path, Path]:
    """(restorer, detector, parser) files in the models folder; ModelNotFound naming what is missing and
    where it goes (and ``field``, the request's setting that needs them)."""
    kind, prefix, released = _RESTORER_FILES[restorer]
    own = folder.folders(kind) if folder is not None else ()
    shared = tuple(dict.fromkeys((*own, *(folder.folders("gfpgan") if folder is not None else ()),
                                  *(folder.folders("codeformer") if folder is not None else ()))))
    net = None
    for base in own:
        candidates = sorted((p for p in base.iterdir() if p.is_file() and p.name.lower().startswith(prefix)
                             and p.suffix.lower() in (".pth", ".safetensors")), key=lambda p: p.name.lower())
        net = net or (candidates[-1] if candidates else None)
    detector = _first(shared, _DETECTOR_FILE)
    parser = _first(shared, _PARSER_FILE)
    missing = [name for name, found in ((released, net), (_DETECTOR_FILE, detector), (_PARSER_FILE, parser))
               if found is None]
    if missing:
        where = folder.root if folder is not None else Path(".")
        folder_name = "Codeformer" if restorer == "CodeFormer" else "GFPGAN"
        raise ModelNotFound(f"face restoration with {restorer} needs {', '.join(missing)} in {where / folder_name} "
                            f"(A1111's models/{folder_name} holds the same files; `underpaint download "
                            f"{restorer.lower()}` fetches them)", field=field)
    return net, detector, parser


def _first(folders, name: str) -> Path | None:
    stem = name.rsplit(".", 1)[0]
    for base in folders:
        for candidate in (base / name, base / f"{stem}.safetensors"):
            if candidate.is_file():
                return candidate
    return None


def load_face_restorer(net: Path, detector: Path, parser: Path, *, device: str | torch.device = "cpu",
                       restorer: str = "GFPGAN") -> FaceRestorer:
    from ..models.codeformer import load_codeformer
    from ..models.face_detect import load_parsenet, load_retinaface
    from ..models.gfpgan import load_gfpgan
    from ..models.upscaler import read_weights, unwrap_weights

    load_net = load_codeformer if restorer == "CodeFormer" else load_gfpgan
    nets = []
    for path, load in ((detector, load_retinaface), (parser, load_parsenet), (net, load_net)):
        nets.append(load(unwrap_weights(read_weights(Path(path))), str(path)).to(device))
    return FaceRestorer(*nets, name=restorer, paths=(Path(net), Path(detector), Path(parser)))


_cache_lock = threading.Lock()
_cached: FaceRestorer | None = None


def face_restorer_for(folder, device: str | torch.device, restorer: str = "GFPGAN") -> FaceRestorer:
    """The models folder's face restorer on ``device``: loaded once and kept while its files and the
    device stay the same."""
    global _cached
    paths = face_model_files(folder, restorer=restorer)
    with _cache_lock:
        if _cached is None or _cached.paths != paths or _cached.device.type != torch.device(device).type:
            _cached = None  # the old set goes before the new one comes in
            _cached = load_face_restorer(*paths, device=device, restorer=restorer)
        return _cached
