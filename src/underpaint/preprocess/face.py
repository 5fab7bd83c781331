"""OpenPose face keypoints (the 70-point face model of OpenPose, Cao et al. 2019; the annotator
collection's ``facenet.pth``), drawn as the white dots of the openpose_face/faceonly/full maps.

Faces are not searched for: as OpenPose does with a body model, a square box is placed on each
person's nose, half as wide as the larger of three times the nose-eye distance and one and a half
times the nose-ear distance (distances along the larger axis), moved inside the picture's top and
left edges and shrunk to end at its right and bottom edges; boxes under 20 pixels are dropped.

The network is the same pose machine as the hand model (VGG front end, a first guess, five
refinement stages) with 71 belief maps: 70 points and the background. The crop (BGR) is resized
to 384 x 384 and given as x / 256 - 0.5; the last stage's maps are resized bilinearly (corners
aligned) to the crop; each point is its map's maximum when that is above 0.05. A point on the
crop's top or left edge counts as not found, as in the extension's maps.
"""

from __future__ import annotations

import numpy as np

from .common import opencv

FACE_FILE = "facenet.pth"
FACE_POINTS = 70
#: The side of the square the network reads.
FACE_INPUT = 384
#: Body parts used to place a face box: nose, then eyes and ears with their distance multipliers.
NOSE = 0
FACE_GUIDES = ((14, 3.0), (15, 3.0), (16, 1.5), (17, 1.5))


def build_face_model():
    """The face network of ``facenet.pth`` (flat layer names ``conv1_1`` ... ``Mconv7_stage6``)."""
    from .openpose import build_cpm_model

    return build_cpm_model(FACE_POINTS + 1)


def load_face_model(path, device: str = "cpu"):
    from .openpose import load_cpm_model

    return load_cpm_model(path, build_face_model, "an OpenPose face model", device)


def face_boxes(people, height: int, width: int) -> list[tuple[int, int, int] | None]:
    """A square (x, y, side) around each person's face, None where the nose and every eye and ear are missing
    or the box would be under 20 pixels."""
    boxes: list[tuple[int, int, int] | None] = []
    for parts in people:
        nose = parts[NOSE]
        guides = [(parts[i], k) for i, k in FACE_GUIDES if parts[i] is not None]
        if nose is None or not guides:
            boxes.append(None)
            continue
        half = max(k * max(abs(nose.x - g.x), abs(nose.y - g.y)) for g, k in guides)
        x, y = max(0.0, nose.x - half), max(0.0, nose.y - half)
        side = min(2 * half, width - x, height - y)
        boxes.append((int(x), int(y), int(side)) if side >= 20 else None)
    return boxes


def face_maps(model, bgr: np.ndarray, device: str = "cpu", size: int | None = None) -> np.ndarray:
    """The 71 belief maps (H x W x 71) of a BGR face crop, at the crop's size."""
    import torch
    from torch.nn import functional as F

    cv2 = opencv()
    size = size or FACE_INPUT
    h, w = bgr.shape[:2]
    shrink = 2 * size < h + w
    x = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LANCZOS4)
    t = torch.from_numpy(x.astype(np.float32).transpose(2, 0, 1)[None] / 256.0 - 0.5).to(device)
    with torch.inference_mode():
        out = model(t.to(next(model.parameters()).dtype)).float()
        out = F.interpolate(out, (h, w), mode="bilinear", align_corners=True)
    return out[0].cpu().numpy().transpose(1, 2, 0)


def face_peaks(maps: np.ndarray, threshold: float = 0.05) -> list[tuple[int, int] | None]:
    """Each of the 70 points: where its map is largest, if above ``threshold``; None otherwise."""
    points: list[tuple[int, int] | None] = []
    for part in range(FACE_POINTS):
        m = maps[:, :, part]
        y, x = np.unravel_index(int(np.argmax(m)), m.shape)
        points.append((int(x), int(y)) if m[y, x] > threshold and x > 0 and y > 0 else None)
    return points


def detect_faces(model, rgb: np.ndarray, people, device: str = "cpu") -> list[list[tuple[int, int] | None]]:
    """Face points in picture coordinates for each person with a face box."""
    faces = []
    for box in face_boxes(people, *rgb.shape[:2]):
        if box is None:
            continue
        x, y, side = box
        crop = np.ascontiguousarray(rgb[y : y + side, x : x + side, ::-1])
        peaks = face_peaks(face_maps(model, crop, device))
        faces.append([None if pt is None else (pt[0] + x, pt[1] + y) for pt in peaks])
    return faces


def draw_faces(canvas: np.ndarray, faces) -> np.ndarray:
    """Each point as a filled white dot of radius 3."""
    cv2 = opencv()
    for points in faces:
        for point in points:
            if point is not None:
                cv2.circle(canvas, point, 3, (255, 255, 255), thickness=-1)
    return canvas
