"""OpenPose body keypoints (Cao et al. 2017, "Realtime Multi-Person 2D Pose Estimation using Part
Affinity Fields"), drawn as the coloured stick figures the ControlNet openpose models were trained on.

The network is the COCO 18-keypoint model of ``body_pose_model.pth`` (the annotator collection's
file): a VGG-19 front end to 128 features at 1/8 resolution, then six stages that each predict 38
part-affinity-field channels (19 limbs x (dx, dy)) and 19 heatmaps (18 parts + background) from
the features and the previous stage's output. The file's tensor names are the layer names
(``conv1_1.weight``, ``Mconv7_stage6_L2.bias``, ...), read with ``weights_only``.

Decoding: heatmap peaks (after a Gaussian blur, σ 3) above 0.1 are part candidates; two
candidates are joined along a limb when the affinity field, sampled at 10 points on the segment,
points along it (more than 80 % of samples above 0.05, mean score positive after a length prior);
joined limbs are grown into people greedily by score; people with fewer than 4 parts or a low
mean score are dropped.

Hands (``hand_pose_model.pth``, Simon et al. 2017) are looked for in square boxes placed from
each arm's wrist, elbow and shoulder; the hand network's 21 belief maps (averaged over four
scales) give one point each. Faces (``facenet.pth``, 70 points) are found the same way from the
nose, eyes and ears: see :mod:`underpaint.preprocess.face`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import ModelError
from .basic import Params
from .common import annotator_file, cached, load_annotator_weights, opencv, resize_with_pad

BODY_FILE = "body_pose_model.pth"
HAND_FILE = "hand_pose_model.pth"
PARTS = 18
# Limbs as pairs of parts (0-based: nose, neck, r-shoulder, r-elbow, r-wrist, l-shoulder, l-elbow,
# l-wrist, r-hip, r-knee, r-ankle, l-hip, l-knee, l-ankle, r-eye, l-eye, r-ear, l-ear).
LIMBS = ((1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
         (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17))
# The affinity-field channels (x, y) of each limb in the network's 38 outputs.
LIMB_PAF = ((12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
            (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27))
#: The colour of each part and of the limb with the same index, as the openpose ControlNets expect.
COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
           (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
           (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85))
#: Limbs drawn (the two ear-to-shoulder links are found but not drawn).
DRAWN_LIMBS = 17


# --- the network ------------------------------------------------------------------------------------------


def _front_layers() -> list[tuple[str, int, int, int]]:
    """(name, in, out, kernel) of the VGG-19 front end, 'pool' entries for 2x2 max pooling."""
    return [("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), ("pool", 0, 0, 0),
            ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3), ("pool", 0, 0, 0),
            ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3),
            ("pool", 0, 0, 0), ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3),
            ("conv4_3_CPM", 512, 256, 3), ("conv4_4_CPM", 256, 128, 3)]


def _stage_layers(stage: int, branch: int, n_out: int) -> list[tuple[str, int, int, int]]:
    """Stage 1 refines the features with 3x3 convs; stages 2-6 see features + both outputs with 7x7 convs."""
    if stage == 1:
        names = [f"conv5_{i}_CPM_L{branch}" for i in range(1, 6)]
        shapes = [(128, 128, 3), (128, 128, 3), (128, 128, 3), (128, 512, 1), (512, n_out, 1)]
    else:
        names = [f"Mconv{i}_stage{stage}_L{branch}" for i in range(1, 8)]
        shapes = [(185, 128, 7)] + [(128, 128, 7)] * 4 + [(128, 128, 1), (128, n_out, 1)]
    return [(n, i, o, k) for n, (i, o, k) in zip(names, shapes)]


def build_body_model():
    """The six-stage body network with the file's layer names as module names."""
    import torch
    from torch import nn

    class Sequence(nn.Module):
        def __init__(self, layers, relu_last: bool):
            super().__init__()
            self.order = []
            for idx, (name, cin, cout, k) in enumerate(layers):
                if name == "pool":
                    self.order.append(("pool", None))
                    continue
                self.add_module(name, nn.Conv2d(cin, cout, k, padding=k // 2))
                self.order.append((name, relu_last or idx < len(layers) - 1))

        def forward(self, x):
            for name, relu in self.order:
                if name == "pool":
                    x = nn.functional.max_pool2d(x, 2, 2)
                else:
                    x = getattr(self, name)(x)
                    x = torch.relu(x) if relu else x
            return x

    class BodyPose(nn.Module):
        def __init__(self):
            super().__init__()
            self.front = Sequence(_front_layers(), relu_last=True)
            self.stages = nn.ModuleList(
                nn.ModuleList([Sequence(_stage_layers(s, 1, 38), False), Sequence(_stage_layers(s, 2, 19), False)])
                for s in range(1, 7))

        def forward(self, x):
            features = self.front(x)
            h = features
            for paf_branch, heat_branch in self.stages:
                paf, heat = paf_branch(h), heat_branch(h)
                h = torch.cat([paf, heat, features], dim=1)
            return paf, heat

    return BodyPose()


def load_body_model(path, device: str = "cpu"):
    """The body network with the weights of ``body_pose_model.pth`` (flat layer names)."""
    import torch

    with torch.device("meta"):
        model = build_body_model()
    sd = load_annotator_weights(path)
    names = {}
    for full in model.state_dict():
        names[full.split(".", 1)[1] if full.startswith("front.") else full.split(".", 3)[3]] = full
    missing = sorted(set(names) - set(sd))
    if missing:
        raise ModelError(f"{path}: not an OpenPose body model ({len(missing)} layers missing, e.g. {missing[0]})")
    for short, full in names.items():
        if tuple(sd[short].shape) != tuple(model.state_dict()[full].shape):
            raise ModelError(f"{path}: layer {short} has shape {tuple(sd[short].shape)}, "
                             f"expected {tuple(model.state_dict()[full].shape)}")
    model.load_state_dict({full: sd[short].float() for short, full in names.items()}, assign=True)
    return model.eval().to(device)


def body_maps(model, bgr: np.ndarray, device: str = "cpu", box: int = 368) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (H x W x 19) and affinity fields (H x W x 38) at the picture's size.

    As the original: the picture (BGR) is scaled so its height is half of 368, padded right and
    down to a multiple of 8 with grey 128, given as x / 256 - 0.5; outputs are upsampled 8x, cropped
    and resized to the picture (cubic).
    """
    cv2 = opencv()
    import torch

    h, w = bgr.shape[:2]
    scale = 0.5 * box / h
    small = cv2.resize(bgr, (0, 0), fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
    sh, sw = small.shape[:2]
    padded = np.pad(small, [[0, -sh % 8], [0, -sw % 8], [0, 0]], constant_values=128)
    x = torch.from_numpy(padded.astype(np.float32).transpose(2, 0, 1)[None] / 256 - 0.5).to(device)
    with torch.inference_mode():
        paf, heat = model(x.to(next(model.parameters()).dtype))

    def upsample(t):
        a = t[0].float().cpu().numpy().transpose(1, 2, 0)
        a = cv2.resize(a, (0, 0), fx=8, fy=8, interpolation=cv2.INTER_CUBIC)[:sh, :sw]
        return cv2.resize(a, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, -1)

    return upsample(heat), upsample(paf)


# --- decoding ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keypoint:
    x: float
    y: float
    score: float
    #: Index over all candidates of all parts.
    id: int


def find_peaks(heatmaps: np.ndarray, threshold: float = 0.1) -> list[list[Keypoint]]:
    """Local maxima of each part's blurred heatmap above ``threshold``."""
    from scipy.ndimage import gaussian_filter

    peaks, counter = [], 0
    for part in range(PARTS):
        m = gaussian_filter(heatmaps[:, :, part], sigma=3)
        core = m[1:-1, 1:-1]
        is_peak = ((core >= m[:-2, 1:-1]) & (core >= m[2:, 1:-1]) & (core >= m[1:-1, :-2]) & (core >= m[1:-1, 2:])
                   & (core > threshold))
        ys, xs = np.nonzero(is_peak)
        found = []
        for y, x in zip(ys + 1, xs + 1):
            found.append(Keypoint(float(x), float(y), float(heatmaps[y, x, part]), counter))
            counter += 1
        peaks.append(found)
    return peaks


def _limb_score(a: Keypoint, b: Keypoint, paf: np.ndarray, pair: tuple[int, int], height: int,
                threshold: float) -> float | None:
    """How well the affinity field joins ``a`` to ``b``; None if it does not."""
    vec = np.array([b.x - a.x, b.y - a.y])
    norm = math.hypot(*vec)
    if norm < 1e-3:
        return None
    vec = vec / norm
    xs = np.linspace(a.x, b.x, 10).round().astype(int).clip(0, paf.shape[1] - 1)
    ys = np.linspace(a.y, b.y, 10).round().astype(int).clip(0, paf.shape[0] - 1)
    samples = paf[ys, xs][:, list(pair)] @ vec
    prior = samples.mean() + min(0.5 * height / norm - 1, 0)
    if np.count_nonzero(samples > threshold) > 0.8 * len(samples) and prior > 0:
        return float(prior)
    return None


def find_limbs(peaks: list[list[Keypoint]], paf: np.ndarray, threshold: float = 0.05):
    """For each limb, the accepted (a, b, score) joins, each candidate used at most once."""
    limbs = []
    for (pa, pb), pair in zip(LIMBS, LIMB_PAF):
        options = []
        for a in peaks[pa]:
            for b in peaks[pb]:
                score = _limb_score(a, b, paf, pair, paf.shape[0], threshold)
                if score is not None:
                    options.append((score + a.score + b.score, score, a, b))
        chosen, used_a, used_b = [], set(), set()
        for _, score, a, b in sorted(options, key=lambda o: o[0], reverse=True):
            if a.id in used_a or b.id in used_b:
                continue
            chosen.append((a, b, score))
            used_a.add(a.id)
            used_b.add(b.id)
            if len(chosen) >= min(len(peaks[pa]), len(peaks[pb])):
                break
        limbs.append(chosen)
    return limbs


def assemble_people(peaks: list[list[Keypoint]], limbs) -> list[list[Keypoint | None]]:
    """Grow people limb by limb: a join extends the person holding one end, merges two people whose
    parts do not overlap, or starts a new person; weak or tiny people are dropped."""
    people: list[dict] = []
    for k, ((pa, pb), joins) in enumerate(zip(LIMBS, limbs)):
        for a, b, score in joins:
            owners = [p for p in people if p["parts"][pa] is a or p["parts"][pb] is b]
            if len(owners) == 1:
                person = owners[0]
                if person["parts"][pb] is not b:
                    person["parts"][pb] = b
                    person["score"] += b.score + score
                    person["count"] += 1
            elif len(owners) == 2:
                p1, p2 = owners
                overlap = any(x is not None and y is not None for x, y in zip(p1["parts"], p2["parts"]))
                if not overlap:
                    p1["parts"] = [x if x is not None else y for x, y in zip(p1["parts"], p2["parts"])]
                    p1["score"] += p2["score"] + score
                    p1["count"] += p2["count"]
                    people.remove(p2)
                else:
                    p1["parts"][pb] = b
                    p1["score"] += b.score + score
                    p1["count"] += 1
            elif not owners and k < DRAWN_LIMBS:  # an ear-shoulder link alone starts no one
                parts: list[Keypoint | None] = [None] * PARTS
                parts[pa], parts[pb] = a, b
                people.append({"parts": parts, "score": a.score + b.score + score, "count": 2})
    return [p["parts"] for p in people if p["count"] >= 4 and p["score"] / p["count"] >= 0.4]


# --- drawing ----------------------------------------------------------------------------------------------


def draw_bodies(people, height: int, width: int) -> np.ndarray:
    """Limbs as filled ellipses 4 px wide in 60 % of their colour, then parts as dots of radius 4."""
    cv2 = opencv()

    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for i in range(DRAWN_LIMBS):
        pa, pb = LIMBS[i]
        for parts in people:
            a, b = parts[pa], parts[pb]
            if a is None or b is None:
                continue
            mx, my = (a.x + b.x) / 2, (a.y + b.y) / 2
            length = math.hypot(a.x - b.x, a.y - b.y)
            angle = math.degrees(math.atan2(a.y - b.y, a.x - b.x))
            poly = cv2.ellipse2Poly((int(mx), int(my)), (int(length / 2), 4), int(angle), 0, 360, 1)
            cv2.fillConvexPoly(canvas, poly, COLOURS[i])
    canvas = (canvas.astype(np.float32) * 0.6).astype(np.uint8)
    for i in range(PARTS):
        for parts in people:
            k = parts[i]
            if k is not None:
                cv2.circle(canvas, (int(k.x), int(k.y)), 4, COLOURS[i], thickness=-1)
    return canvas


def detect_bodies(model, rgb: np.ndarray, device: str = "cpu"):
    heat, paf = body_maps(model, np.ascontiguousarray(rgb[:, :, ::-1]), device)
    peaks = find_peaks(heat)
    return assemble_people(peaks, find_limbs(peaks, paf))


# --- preprocessors ----------------------------------------------------------------------------------------


def _body_model(p: Params):
    path = annotator_file(p.ctx, BODY_FILE, what="openpose")
    return cached(p.ctx, f"openpose-body:{path}", lambda: load_body_model(path, p.ctx.device))


def openpose(img: np.ndarray, p: Params) -> np.ndarray:
    """Body keypoints of everyone in the picture as coloured stick figures on black."""
    padded = resize_with_pad(img, p.res)
    picture = padded.crop(padded.image)
    people = detect_bodies(_body_model(p), picture, p.ctx.device)
    return draw_bodies(people, *picture.shape[:2])


def _hand_model(p: Params, what: str):
    path = annotator_file(p.ctx, HAND_FILE, what=what)
    return cached(p.ctx, f"openpose-hand:{path}", lambda: load_hand_model(path, p.ctx.device))


def _face_model(p: Params, what: str, *, required: bool = True):
    """The face network; ``required=False`` gives None when ``facenet.pth`` is not there."""
    from .face import FACE_FILE, load_face_model

    try:
        path = annotator_file(p.ctx, FACE_FILE, what=what)
    except ModelError:
        if required:
            raise
        return None
    return cached(p.ctx, f"openpose-face:{path}", lambda: load_face_model(path, p.ctx.device))


def _pose_map(img: np.ndarray, p: Params, *, body: bool, hand_model=None, face_model=None) -> np.ndarray:
    """Bodies are always detected (hands and faces are placed from them); what is drawn is chosen here."""
    padded = resize_with_pad(img, p.res)
    picture = padded.crop(padded.image)
    h, w = picture.shape[:2]
    people = detect_bodies(_body_model(p), picture, p.ctx.device)
    canvas = draw_bodies(people, h, w) if body else np.zeros((h, w, 3), dtype=np.uint8)
    if hand_model is not None:
        hands = []
        for x, y, side in hand_boxes(people, h, w):
            crop = np.ascontiguousarray(picture[y : y + side, x : x + side, ::-1])
            peaks = hand_peaks(hand_maps(hand_model, crop, p.ctx.device))
            hands.append([(px + x, py + y) if px or py else None for px, py in peaks])
        canvas = draw_hands(canvas, hands)
    if face_model is not None:
        from .face import detect_faces, draw_faces

        canvas = draw_faces(canvas, detect_faces(face_model, picture, people, p.ctx.device))
    return canvas


def openpose_hand(img: np.ndarray, p: Params) -> np.ndarray:
    """Body keypoints plus 21 keypoints per hand (Simon et al. 2017) where hands are found."""
    return _pose_map(img, p, body=True, hand_model=_hand_model(p, "openpose_hand"))


def openpose_face(img: np.ndarray, p: Params) -> np.ndarray:
    """Body keypoints plus 70 face keypoints per person whose face shows (white dots)."""
    return _pose_map(img, p, body=True, face_model=_face_model(p, "openpose_face"))


def openpose_faceonly(img: np.ndarray, p: Params) -> np.ndarray:
    """Only the face keypoints, on black (the body is detected to place the faces, and not drawn)."""
    return _pose_map(img, p, body=False, face_model=_face_model(p, "openpose_faceonly"))


def openpose_full(img: np.ndarray, p: Params) -> np.ndarray:
    """Body, hands and, when ``facenet.pth`` is in the annotators folder, faces."""
    hand_model = _hand_model(p, "openpose_full")
    return _pose_map(img, p, body=True, hand_model=hand_model,
                     face_model=_face_model(p, "openpose_full", required=False))


# --- hands ------------------------------------------------------------------------------------------------

HAND_POINTS = 21
# Finger bones: wrist (0) to each finger's four joints, thumb first.
HAND_EDGES = tuple((0 if j == 0 else 4 * f + j, 4 * f + j + 1) for f in range(5) for j in range(4))


def _hand_layers(maps: int = HAND_POINTS + 1) -> tuple[list, list]:
    front = [("conv1_1", 3, 64, 3), ("conv1_2", 64, 64, 3), ("pool", 0, 0, 0),
             ("conv2_1", 64, 128, 3), ("conv2_2", 128, 128, 3), ("pool", 0, 0, 0),
             ("conv3_1", 128, 256, 3), ("conv3_2", 256, 256, 3), ("conv3_3", 256, 256, 3), ("conv3_4", 256, 256, 3),
             ("pool", 0, 0, 0), ("conv4_1", 256, 512, 3), ("conv4_2", 512, 512, 3), ("conv4_3", 512, 512, 3),
             ("conv4_4", 512, 512, 3), ("conv5_1", 512, 512, 3), ("conv5_2", 512, 512, 3), ("conv5_3_CPM", 512, 128, 3)]
    first = [("conv6_1_CPM", 128, 512, 1), ("conv6_2_CPM", 512, maps, 1)]
    return front, first


def build_hand_model():
    """The hand network of ``hand_pose_model.pth``: a VGG front end, a first guess, five refinement stages
    (7x7 convs on features + previous belief maps), 22 maps (21 points + background)."""
    return build_cpm_model(HAND_POINTS + 1)


def build_cpm_model(maps: int):
    """The convolutional pose machine of OpenPose's hand and face networks, giving ``maps`` belief maps:
    the VGG front end to 128 features at 1/8 size, a first guess (1x1 convs), then five stages of
    7x7 convs on the previous maps joined with the features; the file's flat layer names."""
    import torch
    from torch import nn

    front, first = _hand_layers(maps)

    class Chain(nn.Module):
        def __init__(self, layers, relu_last: bool):
            super().__init__()
            self.order = []
            for idx, (name, cin, cout, k) in enumerate(layers):
                if name != "pool":
                    self.add_module(name, nn.Conv2d(cin, cout, k, padding=k // 2))
                self.order.append((name, relu_last or idx < len(layers) - 1))

        def forward(self, x):
            for name, relu in self.order:
                if name == "pool":
                    x = nn.functional.max_pool2d(x, 2, 2)
                else:
                    x = getattr(self, name)(x)
                    x = torch.relu(x) if relu else x
            return x

    class PoseMachine(nn.Module):
        def __init__(self):
            super().__init__()
            self.front = Chain(front, relu_last=True)
            self.first = Chain(first, relu_last=False)
            shapes = [(128 + maps, 128, 7)] + [(128, 128, 7)] * 4 + [(128, 128, 1), (128, maps, 1)]
            self.stages = nn.ModuleList(
                Chain([(f"Mconv{i + 1}_stage{s}", a, b, k) for i, (a, b, k) in enumerate(shapes)], relu_last=False)
                for s in range(2, 7))

        def forward(self, x):
            features = self.front(x)
            belief = self.first(features)
            for stage in self.stages:
                belief = stage(torch.cat([belief, features], dim=1))
            return belief

    return PoseMachine()


def _short_name(full: str) -> str:
    """The file's flat layer name for a module path (front.conv1_1.weight → conv1_1.weight)."""
    parts = full.split(".")
    return ".".join(parts[2:] if parts[0] == "stages" else parts[1:]) if parts[0] in ("front", "first", "stages") \
        else full


def load_hand_model(path, device: str = "cpu"):
    return load_cpm_model(path, build_hand_model, "an OpenPose hand model", device)


def load_cpm_model(path, build, what: str, device: str = "cpu"):
    """``build()`` (a pose machine) filled from a file with flat layer names; ``what`` names it in errors."""
    import torch

    with torch.device("meta"):
        model = build()
    sd = load_annotator_weights(path)
    expected = model.state_dict()
    names = {_short_name(k): k for k in expected}
    missing = sorted(set(names) - set(sd))
    if missing:
        raise ModelError(f"{path}: not {what} ({len(missing)} layers missing, e.g. {missing[0]})")
    for short, full in names.items():
        if tuple(sd[short].shape) != tuple(expected[full].shape):
            raise ModelError(f"{path}: layer {short} has shape {tuple(sd[short].shape)}, expected {tuple(expected[full].shape)}")
    model.load_state_dict({full: sd[short].float() for short, full in names.items()}, assign=True)
    return model.eval().to(device)


def hand_boxes(people, height: int, width: int) -> list[tuple[int, int, int]]:
    """Square boxes (x, y, side) around each hand, placed a third of the forearm beyond the wrist and
    sized from the forearm and upper arm, as OpenPose's body-based hand detector does; small ones dropped."""
    boxes = []
    for parts in people:
        for shoulder, elbow, wrist in ((5, 6, 7), (2, 3, 4)):
            s, e, w = parts[shoulder], parts[elbow], parts[wrist]
            if s is None or e is None or w is None:
                continue
            x, y = w.x + (w.x - e.x) / 3, w.y + (w.y - e.y) / 3
            side = 1.5 * max(math.hypot(w.x - e.x, w.y - e.y), 0.9 * math.hypot(e.x - s.x, e.y - s.y))
            x, y = max(0.0, x - side / 2), max(0.0, y - side / 2)
            side = min(side, width - x, height - y)
            if side >= 20:
                boxes.append((int(x), int(y), int(side)))
    return boxes


def hand_maps(model, bgr: np.ndarray, device: str = "cpu", box: int = 368) -> np.ndarray:
    """The 22 belief maps of a hand crop at its size, averaged over scales 0.5, 1, 1.5 and 2 of 368 px."""
    import torch

    cv2 = opencv()
    h, w = bgr.shape[:2]
    total = np.zeros((h, w, HAND_POINTS + 1), dtype=np.float32)
    scales = (0.5, 1.0, 1.5, 2.0)
    for scale in scales:
        k = scale * box / h
        small = cv2.resize(bgr, (0, 0), fx=k, fy=k, interpolation=cv2.INTER_CUBIC)
        sh, sw = small.shape[:2]
        padded = np.pad(small, [[0, -sh % 8], [0, -sw % 8], [0, 0]], constant_values=128)
        x = torch.from_numpy(padded.astype(np.float32).transpose(2, 0, 1)[None] / 256 - 0.5).to(device)
        with torch.inference_mode():
            out = model(x.to(next(model.parameters()).dtype))[0].float().cpu().numpy().transpose(1, 2, 0)
        out = cv2.resize(out, (0, 0), fx=8, fy=8, interpolation=cv2.INTER_CUBIC)[:sh, :sw]
        total += cv2.resize(out, (w, h), interpolation=cv2.INTER_CUBIC).reshape(h, w, -1)
    return total / len(scales)


def hand_peaks(maps: np.ndarray, threshold: float = 0.05) -> list[tuple[int, int]]:
    """Each point's position: the maximum of the largest region above ``threshold`` of its blurred map
    ((0, 0) when none)."""
    from scipy.ndimage import gaussian_filter, label

    peaks = []
    for part in range(HAND_POINTS):
        m = gaussian_filter(maps[:, :, part], sigma=3)
        regions, n = label(m > threshold)
        if n == 0:
            peaks.append((0, 0))
            continue
        biggest = 1 + int(np.argmax(np.bincount(regions.ravel())[1:]))
        y, x = np.unravel_index(np.argmax(np.where(regions == biggest, m, -np.inf)), m.shape)
        peaks.append((int(x), int(y)))
    return peaks


def draw_hands(canvas: np.ndarray, hands) -> np.ndarray:
    """Bones 2 px wide, coloured around the hue circle by bone index; joints as blue dots of radius 4."""
    import colorsys

    cv2 = opencv()
    for points in hands:
        for i, (a, b) in enumerate(HAND_EDGES):
            if points[a] is None or points[b] is None:
                continue
            colour = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(i / len(HAND_EDGES), 1.0, 1.0))
            cv2.line(canvas, points[a], points[b], colour, thickness=2)
        for point in points:
            if point is not None:
                cv2.circle(canvas, point, 4, (0, 0, 255), thickness=-1)
    return canvas
