"""Preprocessors on a real photo (scikit-image's public-domain test pictures): each makes a map of
the right size and type; canny is OpenCV's; annotator weights are random numbers in the real
file layouts, read from an annotators folder; a missing file names itself and where it goes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from underpaint.errors import ModelError
from underpaint.preprocess import PREPROCESSORS, get_preprocessor, run_preprocessor
from underpaint.preprocess.common import AnnotatorContext, fit_map, resize_with_pad

cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")

RES = 128


@pytest.fixture(scope="module")
def cat() -> np.ndarray:
    """Chelsea the cat, 300 x 451 RGB (public domain)."""
    return skimage_data.chelsea()


def _flat(model) -> dict:
    return {k: v.detach().clone().half() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def annotators(tmp_path_factory) -> Path:
    """An annotators folder with the standard file names, random weights in their real layouts."""
    from transformers import (DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTConfig,
                              DPTForDepthEstimation)

    from underpaint.preprocess.networks import build_hed, build_lineart
    from underpaint.preprocess.openpose import build_body_model

    folder = tmp_path_factory.mktemp("annotators")
    torch.manual_seed(0)
    body = build_body_model().state_dict()
    flat = {(k.split(".", 1)[1] if k.startswith("front.") else k.split(".", 3)[3]): v.half() for k, v in body.items()}
    torch.save(flat, folder / "body_pose_model.pth")
    from underpaint.preprocess.openpose import _short_name, build_hand_model

    hand = {_short_name(k): v.half() for k, v in build_hand_model().state_dict().items()}
    torch.save(hand, folder / "hand_pose_model.pth")
    torch.save(_flat(build_hed()), folder / "ControlNetHED.pth")
    torch.save(_flat(build_lineart()), folder / "sk_model.pth")
    dpt = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=64,
                    patch_size=16, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                    backbone_out_indices=[0, 1, 2, 3], reassemble_factors=[4, 2, 1, 0.5])
    DPTForDepthEstimation(dpt).save_pretrained(str(folder / "dpt-hybrid-midas"))
    dino = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                        image_size=56, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                        reshape_hidden_states=False)
    da = DepthAnythingConfig(backbone_config=dino, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
                             reassemble_hidden_size=32, patch_size=14, head_hidden_size=8)
    DepthAnythingForDepthEstimation(da).save_pretrained(str(folder / "depth-anything-small-hf"))
    return folder


def _expected_shape(image: np.ndarray, res: int) -> tuple[int, int]:
    h, w = image.shape[:2]
    k = res / min(h, w)
    return int(round(h * k)), int(round(w * k))


def test_canny_is_opencv_canny():
    photo = skimage_data.astronaut()  # 512 x 512: no rescaling or padding at resolution 512
    ours = run_preprocessor("canny", photo, res=512, a=50, b=150)
    assert np.array_equal(ours[:, :, 0], cv2.Canny(photo, 50, 150))
    assert np.array_equal(ours[:, :, 0], ours[:, :, 2])


def test_canny_at_a_working_resolution(cat):
    ours = run_preprocessor("canny", cat, res=RES)
    h, w = _expected_shape(cat, RES)
    small = cv2.resize(cat, (w, h), interpolation=cv2.INTER_AREA)
    padded = np.pad(small, [[0, -h % 64], [0, -w % 64], [0, 0]], mode="edge")
    assert np.array_equal(ours[:, :, 0], cv2.Canny(padded, 100, 200)[:h, :w])


WEIGHT_FREE = ["none", "invert", "threshold", "scribble_threshold", "scribble_xdog", "lineart_standard",
               "blur_gaussian", "tile_resample", "shuffle", "inpaint"]
WITH_WEIGHTS = ["depth_midas", "depth_anything", "normal_midas", "openpose", "openpose_hand", "softedge_hed", "softedge_hedsafe",
                "scribble_hed", "lineart_realistic"]


@pytest.mark.parametrize("name", WEIGHT_FREE + WITH_WEIGHTS)
def test_each_preprocessor_makes_a_map(name, cat, annotators):
    pre = get_preprocessor(name)
    picture = cat[:, :200] if name.startswith("openpose") else cat  # a narrow crop keeps the full-size pose net quick
    out = run_preprocessor(name, picture, res=RES, ctx=AnnotatorContext(annotators))
    assert out.dtype == np.uint8 and out.ndim == 3
    assert out.shape[2] == (4 if name == "inpaint" else 3)
    expected = _expected_shape(picture, RES) if pre.uses_resolution else picture.shape[:2]
    assert out.shape[:2] == expected
    fitted = fit_map(out, 96, 64, "Crop and Resize")
    assert fitted.shape[:2] == (64, 96)


#: Rows whose maps are made in test_control_preprocess_more.py, and the IP-Adapter modules (no map: the
#: picture goes to a CLIP vision model; test_ip_adapter.py).
TESTED_ELSEWHERE = {"softedge_pidinet", "softedge_pidisafe", "scribble_pidinet", "mlsd", "openpose_face",
                    "openpose_faceonly", "openpose_full", "ip-adapter-auto", "ip-adapter_clip_h", "ip-adapter_clip_g"}


def test_every_table_row_is_tested():
    tested = {get_preprocessor(n).name for n in WEIGHT_FREE + WITH_WEIGHTS + ["canny", "inpaint_only"]}
    assert TESTED_ELSEWHERE <= {p.name for p in PREPROCESSORS}
    assert {p.name for p in PREPROCESSORS} - tested - TESTED_ELSEWHERE == {"lineart_coarse"}


def test_depth_is_white_near_and_spans_the_range(cat, annotators):
    out = run_preprocessor("depth", cat, res=RES, ctx=AnnotatorContext(annotators))
    assert out.min() == 0 and out.max() == 255


def test_shuffle_is_seeded(cat):
    a = run_preprocessor("shuffle", cat, res=RES, seed=1)
    assert np.array_equal(a, run_preprocessor("shuffle", cat, res=RES, seed=1))
    assert not np.array_equal(a, run_preprocessor("shuffle", cat, res=RES, seed=2))


def test_tile_downsamples_by_threshold_a(cat):
    assert run_preprocessor("tile", cat, a=2.0).shape[:2] == (150, 225)


@pytest.mark.parametrize(("name", "filename"), [("openpose", "body_pose_model.pth"), ("hed", "ControlNetHED.pth"),
                                                ("lineart", "sk_model.pth"), ("depth", "dpt-hybrid-midas")])
def test_missing_weights_name_the_file_and_the_folder(name, filename, cat, tmp_path):
    with pytest.raises(ModelError) as err:
        run_preprocessor(name, cat, res=RES, ctx=AnnotatorContext(tmp_path))
    assert filename in str(err.value) and str(tmp_path) in str(err.value)


def test_weights_in_the_wrong_layout_are_refused(cat, tmp_path):
    torch.save({"conv1_1.weight": torch.zeros(1)}, tmp_path / "body_pose_model.pth")
    with pytest.raises(ModelError, match="OpenPose"):
        run_preprocessor("openpose", cat, res=RES, ctx=AnnotatorContext(tmp_path))


def test_resize_with_pad_geometry(cat):
    padded = resize_with_pad(cat, 100)
    assert (padded.height, padded.width) == (100, 150)
    assert padded.image.shape[:2] == (128, 192)


def test_fit_map_modes():
    grid = np.zeros((20, 40, 3), dtype=np.uint8)
    grid[:, 20:] = 200
    assert fit_map(grid, 40, 40, "Just Resize").shape == (40, 40, 3)
    cropped = fit_map(grid, 20, 20, "Crop and Resize")  # covers, keeps the centre
    assert cropped.shape == (20, 20, 3) and cropped[:, :10].max() == 0 and cropped[:, 10:].min() == 200
    filled = fit_map(grid, 40, 40, "Resize and Fill")
    assert filled.shape == (40, 40, 3)


def _synthetic_pose(points: dict[int, tuple[int, int]], h: int = 120, w: int = 100):
    """Heatmaps with a blob at each part and affinity fields along each limb, as a trained net gives."""
    from underpaint.preprocess.openpose import LIMB_PAF, LIMBS

    yy, xx = np.mgrid[0:h, 0:w]
    heat = np.zeros((h, w, 19), dtype=np.float32)
    for part, (x, y) in points.items():
        heat[:, :, part] = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.0**2))
    paf = np.zeros((h, w, 38), dtype=np.float32)
    for (a, b), (cx, cy) in zip(LIMBS, LIMB_PAF):
        if a not in points or b not in points:
            continue
        (x0, y0), (x1, y1) = points[a], points[b]
        v = np.array([x1 - x0, y1 - y0], dtype=np.float32)
        v /= np.linalg.norm(v)
        for t in np.linspace(0, 1, 50):
            x, y = int(round(x0 + t * (x1 - x0))), int(round(y0 + t * (y1 - y0)))
            paf[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3, cx] = v[0]
            paf[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3, cy] = v[1]
    return heat, paf


def test_pose_decoding_and_drawing_recover_a_person():
    from underpaint.preprocess.openpose import COLOURS, assemble_people, draw_bodies, find_limbs, find_peaks

    points = {0: (50, 15), 1: (50, 30), 2: (38, 30), 3: (32, 48), 4: (30, 64), 5: (62, 30), 6: (68, 48), 7: (70, 64),
              8: (42, 62), 9: (42, 85), 10: (42, 108), 11: (58, 62), 12: (58, 85), 13: (58, 108),
              14: (46, 12), 15: (54, 12), 16: (42, 14), 17: (58, 14)}
    heat, paf = _synthetic_pose(points)
    peaks = find_peaks(heat)
    people = assemble_people(peaks, find_limbs(peaks, paf))
    assert len(people) == 1
    found = {i: (k.x, k.y) for i, k in enumerate(people[0]) if k is not None}
    assert found.keys() == points.keys()
    assert all(abs(found[i][0] - x) <= 1 and abs(found[i][1] - y) <= 1 for i, (x, y) in points.items())
    canvas = draw_bodies(people, 120, 100)
    assert tuple(canvas[15, 50]) == COLOURS[0] and tuple(canvas[108, 58]) == COLOURS[13]
    assert canvas[2, 2].tolist() == [0, 0, 0]


def test_hand_boxes_sit_beyond_the_wrist():
    from underpaint.preprocess.openpose import Keypoint, hand_boxes

    parts = [None] * 18
    parts[5], parts[6], parts[7] = Keypoint(100, 50, 1, 0), Keypoint(100, 90, 1, 1), Keypoint(100, 120, 1, 2)
    (x, y, side), = hand_boxes([parts], 300, 300)
    # wrist + (wrist - elbow) / 3 = (100, 130); side 1.5 * max(30, 0.9 * 40) = 54
    assert (x, y, side) == (73, 103, 54)
    assert hand_boxes([parts], 110, 300) == []  # clipped below 20 px by the picture's edge


def test_hand_peaks_and_drawing():
    from underpaint.preprocess.openpose import HAND_POINTS, draw_hands, hand_peaks

    maps = np.zeros((60, 60, HAND_POINTS + 1), dtype=np.float32)
    yy, xx = np.mgrid[0:60, 0:60]
    truth = [(10 + 2 * i, 5 + 2 * i) for i in range(HAND_POINTS - 1)] + [None]
    for i, point in enumerate(truth):
        if point is not None:
            maps[:, :, i] = np.exp(-((xx - point[0]) ** 2 + (yy - point[1]) ** 2) / 8.0)
    peaks = hand_peaks(maps)
    assert peaks[:-1] == truth[:-1] and peaks[-1] == (0, 0)
    canvas = draw_hands(np.zeros((60, 60, 3), dtype=np.uint8), [truth])
    assert tuple(canvas[5, 10]) == (0, 0, 255) and canvas[55, 2].tolist() == [0, 0, 0]


def test_hand_weights_in_the_wrong_layout_are_refused(cat, annotators, tmp_path):
    import shutil

    shutil.copy(annotators / "body_pose_model.pth", tmp_path / "body_pose_model.pth")
    torch.save({"conv1_1.weight": torch.zeros(1)}, tmp_path / "hand_pose_model.pth")
    with pytest.raises(ModelError, match="hand"):
        run_preprocessor("openpose_hand", cat[:, :200], res=64, ctx=AnnotatorContext(tmp_path))
