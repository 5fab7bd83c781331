"""PiDiNet soft edges and scribbles, M-LSD straight lines and OpenPose faces: random weights in the
real layouts of the annotator collection's files (names and shapes checked against the published
files' facts), each annotator run on a scikit-image photo, and their decoding parts checked
against hand-built inputs and direct computations."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from underpaint.errors import ModelError
from underpaint.preprocess import get_preprocessor, run_preprocessor
from underpaint.preprocess.common import AnnotatorContext, fit_map

cv2 = pytest.importorskip("cv2")
skimage_data = pytest.importorskip("skimage.data")

RES = 128
NEW_ROWS = ["softedge_pidinet", "softedge_pidisafe", "scribble_pidinet", "mlsd", "openpose_face", "openpose_faceonly",
            "openpose_full"]


@pytest.fixture(scope="module")
def cat() -> np.ndarray:
    """Chelsea the cat, 300 x 451 RGB (public domain)."""
    return skimage_data.chelsea()


def _random(shapes: dict[str, tuple[int, ...]], dtype=torch.float32, scale: float = 0.1) -> dict:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("num_batches_tracked"):
            out[name] = torch.tensor(1000, dtype=torch.long)
        elif name.endswith("running_var"):
            out[name] = (torch.rand(shape, generator=gen) + 0.5).to(dtype)
        else:
            out[name] = (torch.randn(shape, generator=gen) * scale).to(dtype)
    return out


def _shapes(build) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build().state_dict().items()}


def _flat_pose_shapes(build) -> dict[str, tuple[int, ...]]:
    """The hand/face pose machines' flat layer names."""
    from underpaint.preprocess.openpose import _short_name

    return {_short_name(k): v for k, v in _shapes(build).items()}


def _flat_body_shapes() -> dict[str, tuple[int, ...]]:
    from underpaint.preprocess.openpose import build_body_model

    return {(k.split(".", 1)[1] if k.startswith("front.") else k.split(".", 3)[3]): v
            for k, v in _shapes(build_body_model).items()}


@pytest.fixture(scope="module")
def annotators(tmp_path_factory) -> Path:
    """The standard files with random weights: PiDiNet nested under "state_dict" with "module." names as
    published; M-LSD flat; the OpenPose body, hand and face networks with flat layer names (half precision
    keeps the full-size files small)."""
    from underpaint.preprocess.face import build_face_model
    from underpaint.preprocess.mlsd import build_mlsd
    from underpaint.preprocess.openpose import build_hand_model
    from underpaint.preprocess.pidinet import file_layout

    folder = tmp_path_factory.mktemp("annotators")
    pidinet = {"module." + k: v for k, v in _random(file_layout(), scale=0.3).items()}
    torch.save({"epoch": 14, "state_dict": pidinet}, folder / "table5_pidinet.pth")
    torch.save(_random(_shapes(build_mlsd)), folder / "mlsd_large_512_fp32.pth")
    body = {k: (v - 1.0 if k.endswith("bias") else v) for k, v in _random(_flat_body_shapes(), torch.float16,
                                                                         0.01).items()}
    torch.save(body, folder / "body_pose_model.pth")
    torch.save(_random(_flat_pose_shapes(build_hand_model), torch.float16, 0.01), folder / "hand_pose_model.pth")
    face = _random(_flat_pose_shapes(build_face_model), torch.float16, 0.01)
    face["Mconv7_stage6.bias"] += 1.0  # every belief map above the 0.05 threshold somewhere: points are found
    torch.save(face, folder / "facenet.pth")
    return folder


@pytest.fixture
def quick_faces(monkeypatch):
    """The face network reads 64 x 64 instead of 384 x 384 (same weights), to keep the tests quick."""
    import underpaint.preprocess.face as face

    monkeypatch.setattr(face, "FACE_INPUT", 64)


def _expected_shape(image: np.ndarray, res: int) -> tuple[int, int]:
    h, w = image.shape[:2]
    k = res / min(h, w)
    return int(round(h * k)), int(round(w * k))


# --- the table -------------------------------------------------------------------------------------------


def test_rows_use_the_extension_names_defaults_and_files():
    pidinet = get_preprocessor("pidinet")
    assert (pidinet.name, pidinet.kind, pidinet.weights) == ("softedge_pidinet", "softedge", ("table5_pidinet.pth",))
    assert get_preprocessor("pidinet_safe").name == "softedge_pidisafe"
    assert get_preprocessor("pidinet_scribble").name == "scribble_pidinet"
    assert get_preprocessor("scribble_pidinet").kind == "scribble"
    mlsd = get_preprocessor("straight_lines")
    assert (mlsd.name, mlsd.kind, mlsd.a, mlsd.b, mlsd.weights) == ("mlsd", "mlsd", 0.1, 0.1,
                                                                    ("mlsd_large_512_fp32.pth",))
    for name in ("openpose_face", "openpose_faceonly", "openpose_full"):
        assert "facenet.pth" in get_preprocessor(name).weights and get_preprocessor(name).kind == "openpose"


@pytest.mark.parametrize("name", NEW_ROWS)
def test_each_new_preprocessor_makes_a_map(name, cat, annotators, quick_faces):
    picture = cat[:, :200] if name.startswith("openpose") else cat  # a narrow crop keeps the full-size pose net quick
    out = run_preprocessor(name, picture, res=RES, ctx=AnnotatorContext(annotators))
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
    assert out.shape[:2] == _expected_shape(picture, RES)
    values = set(np.unique(out).tolist())
    if name in ("scribble_pidinet", "mlsd", "openpose_faceonly"):
        assert values <= {0, 255}
    elif name == "softedge_pidisafe":
        assert values <= {0, 128, 255}
    if name.startswith(("softedge", "scribble")):
        assert np.array_equal(out[:, :, 0], out[:, :, 2])
    if name.startswith("softedge"):
        assert len(values) > 1  # random weights still give a map that varies over the picture
    assert fit_map(out, 96, 64, "Crop and Resize").shape[:2] == (64, 96)


@pytest.mark.parametrize(("name", "filename"), [("softedge_pidinet", "table5_pidinet.pth"),
                                                ("scribble_pidinet", "table5_pidinet.pth"),
                                                ("mlsd", "mlsd_large_512_fp32.pth"),
                                                ("openpose_face", "facenet.pth"),
                                                ("openpose_faceonly", "facenet.pth")])
def test_missing_weights_name_the_file_and_the_folder(name, filename, cat, tmp_path):
    with pytest.raises(ModelError) as err:
        run_preprocessor(name, cat, res=RES, ctx=AnnotatorContext(tmp_path))
    assert filename in str(err.value) and str(tmp_path) in str(err.value)


# --- PiDiNet ---------------------------------------------------------------------------------------------


def test_pidinet_file_layout_is_the_published_one():
    from underpaint.preprocess.pidinet import file_layout

    layout = file_layout()
    assert len(layout) == 83
    # Facts of table5_pidinet.pth: 60 channels doubling twice, 3x3 difference kernels everywhere (radial ones
    # included), 1x1 shortcuts where a stage starts, 24-channel dilated context modules, a 4-to-1 classifier.
    assert layout["init_block.weight"] == (60, 3, 3, 3)
    assert layout["block1_2.conv1.weight"] == (60, 1, 3, 3)
    assert layout["block2_1.conv2.weight"] == (120, 60, 1, 1)
    assert layout["block2_1.shortcut.weight"] == (120, 60, 1, 1)
    assert layout["block4_3.conv1.weight"] == (240, 1, 3, 3)
    assert layout["block4_1.shortcut.bias"] == (240,)
    assert layout["dilations.0.conv1.weight"] == (24, 60, 1, 1)
    assert layout["dilations.3.conv2_4.weight"] == (24, 24, 3, 3)
    assert layout["attentions.2.conv2.weight"] == (1, 4, 3, 3)
    assert layout["conv_reduces.1.conv.bias"] == (1,)
    assert layout["classifier.weight"] == (1, 4, 1, 1)
    assert "block1_1.shortcut.weight" not in layout and "block4_2.shortcut.weight" not in layout
    assert 700_000 < sum(int(np.prod(s)) for s in layout.values()) < 730_000  # the paper's "710K parameters"


def _shift(xp: torch.Tensor, pad: int, dy: int, dx: int, h: int, w: int) -> torch.Tensor:
    """x[i + dy, j + dx] for every output pixel (zero outside), from the zero-padded input."""
    return xp[:, :, pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def _direct_pdc(kind: str, x: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
    """The pixel-difference convolution computed from its definition, pixel differences first.

    cv: sum w(o) x(o); cd: sum w(o) (x(o) - x(0)); ad: around the 3x3 ring clockwise from the top left,
    w(p) (x(p) - x(next p)); rd: for the 8 directions d in raster order, the k-th weight after the first
    (raster order) times (x(2d) - x(d)). o, p, d are offsets from the output pixel.
    """
    h, w = x.shape[2:]
    pad = 2
    xp = F.pad(x, (pad, pad, pad, pad))
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    terms: list[tuple[torch.Tensor, torch.Tensor]] = []  # (weight slice out x in, difference map batch x in x h x w)
    if kind in ("cv", "cd"):
        for i, (dy, dx) in enumerate(offsets):
            diff = _shift(xp, pad, dy, dx, h, w) - (x if kind == "cd" else 0)
            terms.append((weight[:, :, i // 3, i % 3], diff))
    elif kind == "ad":
        ring = [(-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1)]
        for i, (dy, dx) in enumerate(ring):
            ny, nx = ring[(i + 1) % len(ring)]
            diff = _shift(xp, pad, dy, dx, h, w) - _shift(xp, pad, ny, nx, h, w)
            terms.append((weight[:, :, dy + 1, dx + 1], diff))
    else:
        directions = [o for o in offsets if o != (0, 0)]
        for k, (dy, dx) in enumerate(directions, start=1):
            diff = _shift(xp, pad, 2 * dy, 2 * dx, h, w) - _shift(xp, pad, dy, dx, h, w)
            terms.append((weight.flatten(2)[:, :, k], diff))
    out = 0
    for wk, diff in terms:
        if groups == 1:
            out = out + torch.einsum("oc,bchw->bohw", wk, diff)
        else:
            out = out + wk[:, 0][None, :, None, None] * diff
    return out


@pytest.mark.parametrize("kind", ["cv", "cd", "ad", "rd"])
@pytest.mark.parametrize("groups", ["depthwise", "full"])
def test_pixel_difference_kernels_become_plain_convolutions(kind, groups):
    from underpaint.preprocess.pidinet import pdc_to_conv

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 9, 11, generator=gen, dtype=torch.float64)
    n_groups = 5 if groups == "depthwise" else 1
    weight = torch.randn(5 if groups == "depthwise" else 4, 5 // n_groups, 3, 3, generator=gen, dtype=torch.float64)
    plain = pdc_to_conv(kind, weight)
    assert plain.shape[2:] == ((5, 5) if kind == "rd" else (3, 3))
    ours = F.conv2d(x, plain, padding=plain.shape[-1] // 2, groups=n_groups)
    torch.testing.assert_close(ours, _direct_pdc(kind, x, weight, n_groups), rtol=1e-10, atol=1e-10)


def test_pidinet_weights_load_converted_and_wrong_layouts_are_refused(annotators, tmp_path):
    from underpaint.preprocess.networks import load_network
    from underpaint.preprocess.pidinet import build_pidinet, convert_file_weights, pdc_to_conv

    model = load_network(build_pidinet, annotators / "table5_pidinet.pth", convert=convert_file_weights)
    stored = torch.load(annotators / "table5_pidinet.pth", weights_only=True)["state_dict"]
    rd = stored["module.block2_3.conv1.weight"]  # a radial layer (the 7th of carv4's cd/ad/rd/cv cycle)
    assert torch.equal(model.block2_3.conv1.weight, pdc_to_conv("rd", rd.float()))
    assert torch.equal(model.init_block.weight, pdc_to_conv("cd", stored["module.init_block.weight"].float()))
    assert torch.equal(model.block1_3.conv1.weight, stored["module.block1_3.conv1.weight"].float())  # a plain layer

    bad = dict(stored)
    bad["module.block1_2.conv1.weight"] = torch.zeros(60, 1, 5, 5)  # a converted kernel is not the trained layout
    torch.save({"state_dict": bad}, tmp_path / "table5_pidinet.pth")
    with pytest.raises(ModelError, match=r"block1_2\.conv1\.weight"):
        run_preprocessor("pidinet", skimage_data.chelsea(), res=64, ctx=AnnotatorContext(tmp_path))
    torch.save({"conv1_1.weight": torch.zeros(1)}, tmp_path / "table5_pidinet.pth")
    with pytest.raises(ModelError, match="PiDiNet"):
        run_preprocessor("pidinet", skimage_data.chelsea(), res=64, ctx=AnnotatorContext(tmp_path))


def test_pidisafe_is_the_soft_edge_map_at_three_levels(cat, annotators):
    ctx = AnnotatorContext(annotators)
    soft = run_preprocessor("softedge_pidinet", cat, res=RES, ctx=ctx)[:, :, 0].astype(np.float64) / 255.0
    safe = run_preprocessor("softedge_pidisafe", cat, res=RES, ctx=ctx)[:, :, 0]
    certain = np.abs(soft * 3.0 - np.round(soft * 3.0)) > 0.02  # away from the level boundaries
    expected = np.rint(np.clip(np.floor(soft * 3.0) / 2.0, 0, 1) * 255.0)
    assert np.array_equal(safe[certain], expected[certain])


# --- M-LSD -----------------------------------------------------------------------------------------------


def test_mlsd_file_layout_is_the_published_one():
    from underpaint.preprocess.mlsd import build_mlsd

    layout = _shapes(build_mlsd)
    # Facts of mlsd_large_512_fp32.pth: a 4-channel MobileNetV2 stem, 14 backbone layers up to 96 channels,
    # decoder blocks 15-23 with 64-channel 1x1 joins, a 16-map head.
    assert layout["backbone.features.0.0.weight"] == (32, 4, 3, 3)
    assert layout["backbone.features.1.conv.0.0.weight"] == (32, 1, 3, 3)
    assert layout["backbone.features.2.conv.0.0.weight"] == (96, 16, 1, 1)
    assert layout["backbone.features.13.conv.2.weight"] == (96, 576, 1, 1)
    assert "backbone.features.14.conv.0.0.weight" not in layout
    assert layout["block15.conv1.0.weight"] == (64, 96, 1, 1)
    assert layout["block15.conv2.0.weight"] == (64, 64, 1, 1)
    assert layout["block16.conv1.0.weight"] == (128, 128, 3, 3)
    assert layout["block21.conv2.0.weight"] == (64, 16, 1, 1)
    assert layout["block23.conv1.0.weight"] == (64, 64, 3, 3)
    assert layout["block23.conv3.weight"] == (16, 64, 1, 1)
    params = sum(int(np.prod(s)) for k, s in layout.items() if not k.endswith(("running_mean", "running_var",
                                                                                  "num_batches_tracked")))
    assert 1_450_000 < params < 1_600_000  # the paper's "1.5M parameters"


def test_mlsd_network_gives_the_tp_map_at_half_size(annotators):
    from underpaint.preprocess.mlsd import build_mlsd
    from underpaint.preprocess.networks import load_network

    model = load_network(build_mlsd, annotators / "mlsd_large_512_fp32.pth")
    with torch.inference_mode():
        tp = model(torch.zeros(1, 4, 64, 96))
    assert tp.shape == (1, 9, 32, 48)


def test_mlsd_files_without_batch_counters_load_and_wrong_layouts_are_refused(annotators, tmp_path):
    sd = torch.load(annotators / "mlsd_large_512_fp32.pth", weights_only=True)
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")},
               tmp_path / "mlsd_large_512_fp32.pth")
    out = run_preprocessor("mlsd", skimage_data.chelsea(), res=64, ctx=AnnotatorContext(tmp_path))
    assert out.shape[:2] == (64, 96)
    del sd["block23.conv3.weight"]
    torch.save(sd, tmp_path / "mlsd_large_512_fp32.pth")
    with pytest.raises(ModelError, match=r"block23\.conv3\.weight"):
        run_preprocessor("mlsd", skimage_data.chelsea(), res=64, ctx=AnnotatorContext(tmp_path))


def _tp_map(h: int = 40, w: int = 50) -> np.ndarray:
    """Centre logits -8 everywhere, with: a line centre at (x 25, y 20) going from (15, 16) to (35, 24); a
    weaker neighbour that 3x3 suppression must remove; a faint centre (sigmoid 0.047); a strong centre whose
    segment has no length."""
    tp = np.zeros((9, h, w), dtype=np.float32)
    tp[0] = -8.0
    tp[0, 20, 25], tp[1:5, 20, 25] = 4.0, (-10.0, -4.0, 10.0, 4.0)
    tp[0, 20, 26], tp[1:5, 20, 26] = 3.5, (-9.0, -4.0, 11.0, 4.0)
    tp[0, 5, 5], tp[1:5, 5, 5] = -3.0, (0.0, 0.0, 6.0, 0.0)
    tp[0, 30, 40], tp[1:5, 30, 40] = 3.0, (0.0, 0.0, 0.0, 0.0)
    return tp


def test_mlsd_decoding_recovers_the_line():
    from underpaint.preprocess.mlsd import decode_segments

    segments = decode_segments(_tp_map(), 0.1, 0.1)
    np.testing.assert_allclose(segments, [[15.0, 16.0, 35.0, 24.0]])
    faint = decode_segments(_tp_map(), 0.01, 0.1)  # a lower score threshold lets the faint centre through
    assert sorted(map(tuple, faint.tolist())) == [(5.0, 5.0, 11.0, 5.0), (15.0, 16.0, 35.0, 24.0)]
    assert decode_segments(_tp_map(), 0.1, 30.0).shape == (0, 4)  # the line is ~21.5 long: too short for 30


def test_mlsd_draws_one_pixel_white_lines_at_twice_the_map_size():
    from underpaint.preprocess.mlsd import decode_segments, draw_segments

    drawn = draw_segments(decode_segments(_tp_map(), 0.1, 0.1) * 2.0, 80, 100)
    reference = np.zeros((80, 100), dtype=np.uint8)
    cv2.line(reference, (30, 32), (70, 48), 255, 1)
    assert np.array_equal(drawn, reference)
    assert drawn[32, 30] == 255 and drawn[48, 70] == 255 and set(np.unique(drawn).tolist()) == {0, 255}


# --- OpenPose faces --------------------------------------------------------------------------------------


def test_face_file_layout_is_the_published_one():
    from underpaint.preprocess.face import build_face_model

    layout = _flat_pose_shapes(build_face_model)
    # Facts of facenet.pth: flat layer names, VGG front to conv5_3_CPM, 71 maps (70 points + background),
    # stages 2-6 reading 71 + 128 channels with 7x7 convolutions.
    assert len(layout) == 2 * (15 + 2 + 5 * 7)  # weight and bias of 15 front, 2 first-guess, 5 x 7 stage layers
    assert layout["conv1_1.weight"] == (64, 3, 3, 3)
    assert layout["conv4_4.weight"] == (512, 512, 3, 3)
    assert layout["conv5_3_CPM.weight"] == (128, 512, 3, 3)
    assert layout["conv6_2_CPM.weight"] == (71, 512, 1, 1)
    assert layout["Mconv1_stage2.weight"] == (128, 199, 7, 7)
    assert layout["Mconv7_stage6.bias"] == (71,)


def _person(points: dict[int, tuple[float, float]]):
    from underpaint.preprocess.openpose import Keypoint

    parts = [None] * 18
    for i, (x, y) in points.items():
        parts[i] = Keypoint(float(x), float(y), 1.0, i)
    return parts


def test_face_boxes_are_placed_from_nose_eyes_and_ears():
    from underpaint.preprocess.face import face_boxes

    people = [
        _person({0: (100, 100), 14: (108, 96), 17: (125, 103)}),  # half side max(3 * 8, 1.5 * 25) = 37.5
        _person({14: (108, 96), 15: (90, 96)}),  # no nose
        _person({0: (100, 100), 1: (100, 130)}),  # a nose but no eye or ear
        _person({0: (190, 50), 15: (196, 50)}),  # half 18: cut at the right edge
        _person({0: (5, 5), 16: (15, 5)}),  # half 15: moved inside the top left corner
        _person({0: (60, 60), 14: (62, 60)}),  # half 6: under 20 pixels
    ]
    assert face_boxes(people, 150, 200) == [(62, 62, 75), None, None, (172, 32, 28), (0, 0, 30), None]


def test_face_peaks_take_each_maximum_above_the_threshold():
    from underpaint.preprocess.face import FACE_POINTS, face_peaks

    yy, xx = np.mgrid[0:50, 0:60]
    maps = np.zeros((50, 60, FACE_POINTS + 1), dtype=np.float32)
    truth: list[tuple[int, int] | None] = []
    for i in range(FACE_POINTS):
        x, y = 3 + (i * 7) % 55, 2 + (i * 5) % 46
        maps[:, :, i] = 0.8 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 6.0)
        truth.append((x, y))
    maps[:, :, 3] *= 0.05  # too faint
    maps[:, :, 4] = 0.0
    maps[10, 0, 4] = 0.9  # on the crop's left edge: not a point
    maps[:, :, FACE_POINTS] = 1.0  # the background map is not a point
    truth[3] = truth[4] = None
    assert face_peaks(maps) == truth


class _FixedFaceNet(torch.nn.Module):
    """A stand-in face network: point 0 at cell (row 3, column 5), point 1 at (6, 2) of its 1/8-size output."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        n = x.shape[2] // 8
        out = torch.zeros(1, 71, n, n)
        out[0, 0, 3, 5] = out[0, 1, 6, 2] = 1.0
        return out * self.scale


def test_face_points_land_in_picture_coordinates(quick_faces):
    from underpaint.preprocess.face import detect_faces, draw_faces

    person = _person({0: (60, 50), 14: (66, 50)})  # box (42, 32, 36)
    picture = np.zeros((120, 100, 3), dtype=np.uint8)
    (points,) = detect_faces(_FixedFaceNet(), picture, [person])
    # 8 cells stretched over 36 pixels with corners aligned: cell c → c * 35 / 7 = 5c
    assert points[0] == (42 + 25, 32 + 15) and points[1] == (42 + 10, 32 + 30)
    assert all(p is None for p in points[2:]) and len(points) == 70
    canvas = draw_faces(np.zeros((120, 100, 3), dtype=np.uint8), [points])
    reference = np.zeros_like(canvas)
    for p in points[:2]:
        cv2.circle(reference, p, 3, (255, 255, 255), thickness=-1)
    assert np.array_equal(canvas, reference)


def test_face_maps_combine_with_the_body_as_the_extension_draws_them(annotators, monkeypatch, quick_faces, tmp_path):
    """With a person placed on the astronaut's face: faceonly is white dots inside the face box, openpose_face
    is the body drawing with those dots on top, openpose_full adds faces only when facenet.pth is there."""
    import underpaint.preprocess.openpose as openpose

    person = _person({0: (58, 40), 1: (58, 62), 14: (54, 36), 15: (63, 36), 16: (49, 38), 17: (68, 38),
                      2: (44, 62), 5: (72, 62)})
    monkeypatch.setattr(openpose, "detect_bodies", lambda model, rgb, device="cpu": [person])
    photo = skimage_data.astronaut()
    ctx = AnnotatorContext(annotators)
    faces = run_preprocessor("openpose_faceonly", photo, res=RES, ctx=ctx)
    body = run_preprocessor("openpose", photo, res=RES, ctx=ctx)
    both = run_preprocessor("openpose_face", photo, res=RES, ctx=ctx)
    assert faces.shape == body.shape == both.shape == (RES, RES, 3)
    assert set(np.unique(faces).tolist()) == {0, 255}
    ys, xs = np.nonzero(faces[:, :, 0])
    # box: half max(3 * 5, 1.5 * 10) = 15 around the nose → (43, 25, 30); dots have radius 3
    assert xs.min() >= 43 - 3 and xs.max() <= 43 + 30 + 3 and ys.min() >= 25 - 3 and ys.max() <= 25 + 30 + 3
    assert np.array_equal(both, np.maximum(body, faces))
    assert np.array_equal(run_preprocessor("openpose_full", photo, res=RES, ctx=ctx), both)  # no arms: no hands

    for name in ("body_pose_model.pth", "hand_pose_model.pth"):
        shutil.copy(annotators / name, tmp_path / name)
    without_faces = run_preprocessor("openpose_full", photo, res=RES, ctx=AnnotatorContext(tmp_path))
    assert np.array_equal(without_faces, body)


def test_face_weights_in_the_wrong_layout_are_refused(annotators, tmp_path):
    shutil.copy(annotators / "body_pose_model.pth", tmp_path / "body_pose_model.pth")
    torch.save({"conv1_1.weight": torch.zeros(1)}, tmp_path / "facenet.pth")
    with pytest.raises(ModelError, match="face"):
        run_preprocessor("openpose_face", skimage_data.chelsea()[:, :200], res=64, ctx=AnnotatorContext(tmp_path))
