"""A1111's "Restore faces": the networks against the code A1111 runs them with (spandrel's GFPGAN and
CodeFormer, facexlib's RetinaFace and ParseNet) on the same random weights, the whole find → align →
restore → paste flow against facexlib's FaceRestoreHelper driven as A1111 drives it (with GFPGAN; the
released CodeFormer's size makes a file of it too big to write here), and the request wiring (engine,
CLI, API, infotext, Extras)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import facexlib_ref
import spandrel_ref
from underpaint.errors import ModelNotFound
from underpaint.params import GenerationParams


@pytest.fixture(scope="module")
def ref():
    try:
        return facexlib_ref.reference()
    except ImportError:
        pytest.skip("facexlib is not installed")


def _randomise_norms(module: torch.nn.Module, seed: int) -> None:
    """Batch norms with statistics and affine terms of their own, so that eval mode is tested."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def _spandrel_gfpgan(size: int, seed: int = 0):
    spandrel_ref.model_loader()  # imports spandrel with its torchvision stand-in
    from spandrel.architectures.GFPGAN.__arch.gfpganv1_clean_arch import GFPGANv1Clean

    torch.manual_seed(seed)
    return GFPGANv1Clean(out_size=size, num_style_feat=16, channel_multiplier=1, narrow=0.125, num_mlp=2).eval()


def test_gfpgan_is_spandrels(tmp_path):
    """GFPGAN v1 clean, built from the widths in the file: spandrel's network (A1111 loads GFPGAN with it) with
    its stored noise maps, to the last bit; the widths of the released 512² model derive from its layout."""
    from underpaint.models.gfpgan import gfpgan_config, load_gfpgan

    theirs = _spandrel_gfpgan(64)
    ours = load_gfpgan(theirs.state_dict())
    assert ours.cfg.size == 64 and ours.cfg.unet_widths == (16, 32, 32, 32, 32)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = theirs(x, return_rgb=False, randomize_noise=False)[0]
        assert torch.equal(ours(x), expected)

    from spandrel.architectures.GFPGAN.__arch.gfpganv1_clean_arch import GFPGANv1Clean

    with torch.device("meta"):
        released = GFPGANv1Clean(out_size=512, num_style_feat=512, channel_multiplier=2, narrow=1)
    cfg = gfpgan_config(released.state_dict())
    assert (cfg.size, cfg.style_dim, cfg.style_mlp_layers) == (512, 512, 8)
    assert cfg.unet_widths == (32, 64, 128, 256, 256, 256, 256, 256)
    assert cfg.decoder_widths == (512, 512, 512, 512, 512, 256, 128, 64)


def test_parsenet_is_facexlibs(ref):
    from underpaint.models.face_detect import load_parsenet

    torch.manual_seed(2)
    theirs = ref.parsenet.ParseNet(in_size=64, out_size=64, min_feat_size=16, base_ch=16, res_depth=2,
                                   ch_range=[16, 32]).eval()
    _randomise_norms(theirs, 3)
    ours = load_parsenet(theirs.state_dict())
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x)[0])
    with torch.device("meta"):
        released = ref.parsenet.ParseNet(in_size=512, out_size=512, parsing_ch=19)
    load_parsenet({k: torch.empty_like(v, device="cpu") for k, v in released.state_dict().items()})


def _detector_weights(ref, seed: int = 5, box_growth: float = 0.0) -> dict[str, torch.Tensor]:
    """facexlib's RetinaFace with small random weights, batch norms of their own, and heads that make
    well-formed faces: the 512-px anchors of the coarsest level score as faces, every anchor's landmarks
    sit where a face's would in its box (with a little of the picture's influence). ``box_growth``: the
    boxes' log size offset (so that NMS, over larger boxes, leaves fewer faces)."""
    torch.manual_seed(seed)
    net = ref.retina_face()
    _randomise_norms(net, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim == 4:
                p.mul_(0.5)
        for level, head in enumerate(net.ClassHead):
            head.conv1x1.weight.mul_(0.3)
            head.conv1x1.bias.copy_(torch.tensor([4.0, -4.0, 4.0, -4.0]))
        net.ClassHead[2].conv1x1.bias.copy_(torch.tensor([4.0, -4.0, -3.0, 3.0]))  # 512-px anchors: faces
        points = torch.tensor([-1.2, -1.0, 1.2, -1.0, 0.0, 0.2, -0.9, 1.2, 0.9, 1.2])  # eyes, nose, mouth (×0.1 box)
        for head in net.LandmarkHead:
            head.conv1x1.weight.copy_(torch.randn(head.conv1x1.weight.shape, generator=g) * 1e-3)
            head.conv1x1.bias.copy_(points.repeat(2))
        for head in net.BboxHead:
            head.conv1x1.weight.copy_(torch.randn(head.conv1x1.weight.shape, generator=g) * 1e-3)
            head.conv1x1.bias.copy_(torch.tensor([0.0, 0.0, box_growth, box_growth] * 2))
    return {k: v.clone() for k, v in net.state_dict().items()}


def _picture(h: int = 640, w: int = 704, seed: int = 6) -> np.ndarray:
    """A BGR picture with structure: gradients, discs and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / w, yy * 255 / h, 128 + 100 * np.sin(xx / 37.0) * np.cos(yy / 23.0)], -1)
    for _ in range(6):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(20, 120)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 255, 3)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_retinaface_detects_as_facexlib(ref):
    """Boxes, scores and landmarks of every face above the threshold after NMS, as facexlib's detect_faces
    gives them (its anchors, offsets, mean and NMS), from the same weights."""
    from underpaint.models.face_detect import detect_faces, load_retinaface

    weights = _detector_weights(ref)
    theirs = ref.retina_face()
    theirs.load_state_dict(weights)
    ours = load_retinaface(weights)
    bgr = _picture(320, 352)
    x = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(7)) * 255
    with torch.no_grad():
        for a, b in zip(ours(x), theirs(x)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for threshold in (0.97, 0.5):
        with torch.no_grad():
            expected = theirs.detect_faces(bgr, threshold)
        got = detect_faces(ours, bgr, threshold)
        assert len(expected) > 0 and got.shape == expected.shape, (threshold, got.shape, expected.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_nms_keeps_the_best_of_overlapping_boxes():
    from underpaint.models.face_detect import nms

    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 5]], dtype=np.float32)
    scores = np.array([0.9, 0.95, 0.5, 0.8], dtype=np.float32)
    # IoU(1, 0) = 81/119 > 0.4: dropped; box 3 overlaps box 1 by 36/(100+50-36) < 0.4: kept.
    assert nms(boxes, scores, 0.4) == [1, 3, 2]


@pytest.fixture(scope="module")
def face_files(ref, tmp_path_factory):
    """A models folder whose GFPGAN/ holds the three networks (random weights), as A1111's files are named,
    and the reference networks built from the same weights."""
    folder = tmp_path_factory.mktemp("faces")
    (folder / "GFPGAN").mkdir()
    gfpgan = _spandrel_gfpgan(512, seed=8)
    torch.save({"params_ema": gfpgan.state_dict()}, folder / "GFPGAN" / "GFPGANv1.4.pth")
    weights = _detector_weights(ref, seed=9, box_growth=4.0)  # two or three faces a picture
    torch.save({"module." + k: v for k, v in weights.items()}, folder / "GFPGAN" / "detection_Resnet50_Final.pth")
    torch.manual_seed(10)
    parser = ref.parsenet.ParseNet(in_size=512, out_size=512, min_feat_size=128, base_ch=16, res_depth=1,
                                   ch_range=[16, 32]).eval()
    _randomise_norms(parser, 11)
    torch.save(parser.state_dict(), folder / "GFPGAN" / "parsing_parsenet.pth")
    detector = ref.retina_face()
    detector.load_state_dict(weights)
    return folder, gfpgan, detector, parser


def _a1111_restore(ref, bgr: np.ndarray, gfpgan, detector, parser) -> np.ndarray:
    """A1111 1.10's face restoration with GFPGAN, step by step as its helper calls facexlib."""
    ref.detector, ref.parser = detector, parser
    helper = ref.helper.FaceRestoreHelper(1, face_size=512, crop_ratio=(1, 1), det_model="retinaface_resnet50",
                                          save_ext="png", use_parse=True, device=torch.device("cpu"))
    helper.clean_all()
    helper.read_image(bgr)
    helper.get_face_landmarks_5(only_center_face=False, resize=640, eye_dist_threshold=5)
    helper.align_warp_face()
    for face in helper.cropped_faces:
        t = torch.from_numpy(face[:, :, ::-1].astype(np.float32).transpose(2, 0, 1) / 255.0)
        t = ((t - 0.5) / 0.5).unsqueeze(0)
        with torch.no_grad():
            out = gfpgan(t, return_rgb=False, randomize_noise=False)[0]
        rgb = ((out.squeeze(0).clamp(-1, 1) + 1) / 2).numpy().transpose(1, 2, 0)
        helper.add_restored_face((rgb[:, :, ::-1] * 255.0).astype("uint8"))
    helper.get_inverse_affine(None)
    return helper.paste_faces_to_input_image(), len(helper.cropped_faces)


def test_restore_faces_is_a1111s_flow(ref, face_files):
    """The picture with its faces restored equals A1111's flow over facexlib (detect at 640, align, GFPGAN,
    parse, paste) with the same three networks, within one level; pixels far from every face are unchanged."""
    from PIL import Image

    from underpaint.models.registry import ModelsDir
    from underpaint.pipeline.face_restore import face_restorer_for, restore_faces

    folder, gfpgan, detector, parser = face_files
    bgr = _picture(640, 704)
    expected, faces = _a1111_restore(ref, bgr, gfpgan, detector, parser)
    assert faces > 0
    restorer = face_restorer_for(ModelsDir(folder), "cpu")
    got = np.asarray(restore_faces(restorer, Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1]))))
    diff = np.abs(got.astype(np.int16) - expected[:, :, ::-1].astype(np.int16))
    assert diff.max() <= 1, (diff.max(), (diff > 0).mean())
    assert (got != bgr[:, :, ::-1]).any()  # something was restored
    assert face_restorer_for(ModelsDir(folder), "cpu") is restorer  # kept loaded


def test_the_engine_restores_faces_and_records_it(sd1_engine, face_files, photo):
    """restore_faces=True runs the restorer on each finished picture (txt2img and img2img), records A1111's
    "Face restoration: GFPGAN", and the infotext brings it back; without the files, a clear error before any
    work."""
    from underpaint.imageio.infotext import parse_infotext
    from underpaint.models.registry import ModelsDir
    from underpaint.pipeline.reproduce import params_from_infotext, unavailable_features

    folder = face_files[0]
    saved = getattr(sd1_engine.model, "models_dir", None)
    sd1_engine.model.models_dir = ModelsDir(folder)
    try:
        common = dict(prompt="a portrait", steps=2, seed=3, width=64, height=64, face_restoration_model="GFPGAN")
        plain = sd1_engine.generate(GenerationParams(**common))
        restored = sd1_engine.generate(GenerationParams(**common, restore_faces=True))
        assert "Face restoration: GFPGAN" in restored.infotexts[0] and "Face restoration" not in plain.infotexts[0]
        parsed = parse_infotext(restored.infotexts[0])
        fields = params_from_infotext(parsed)
        assert fields["restore_faces"] and fields["face_restoration_model"] == "GFPGAN"
        assert unavailable_features(parsed) == []
        img = sd1_engine.generate(GenerationParams(**common, init_images=(photo,), strength=0.5, restore_faces=True))
        assert "Face restoration: GFPGAN" in img.infotexts[0]
        sd1_engine.model.models_dir = ModelsDir(folder / "nowhere")
        with pytest.raises(ModelNotFound, match="GFPGANv1.4.pth"):
            sd1_engine.generate(GenerationParams(**common, restore_faces=True))
        with pytest.raises(ModelNotFound, match="codeformer-v0.1.0.pth"):
            sd1_engine.generate(GenerationParams(**{**common, "face_restoration_model": "CodeFormer"},
                                                 restore_faces=True))
    finally:
        sd1_engine.model.models_dir = saved


def test_infotext_restorers():
    """A1111's two restorers come back as they were; another program's is restored with CodeFormer, warned of."""
    from underpaint.imageio.infotext import parse_infotext
    from underpaint.pipeline.reproduce import params_from_infotext, unavailable_features

    for name in ("CodeFormer", "GFPGAN"):
        parsed = parse_infotext(f"x\nSteps: 4, Seed: 1, Face restoration: {name}")
        fields = params_from_infotext(parsed)
        assert fields["restore_faces"] and fields["face_restoration_model"] == name
        assert unavailable_features(parsed) == []
    parsed = parse_infotext("x\nSteps: 4, Seed: 1, Face restoration: RestoreFormer")
    assert params_from_infotext(parsed)["face_restoration_model"] == "CodeFormer"
    assert unavailable_features(parsed) == ["face restoration (RestoreFormer)"]


def test_cli_and_api(api):
    from underpaint.cli.generate import params_from_args
    from underpaint.cli.main import build_parser

    p = params_from_args(build_parser().parse_args(["txt2img", "-p", "x", "--restore-faces"]))
    assert (p.restore_faces, p.face_restoration_model, p.code_former_weight) == (True, "CodeFormer", 0.5)
    p = params_from_args(build_parser().parse_args(["txt2img", "-p", "x", "--restore-faces", "--face-restorer",
                                                    "gfpgan", "--codeformer-weight", "0.2"]))
    assert (p.face_restoration_model, p.code_former_weight) == ("GFPGAN", 0.2)
    assert not params_from_args(build_parser().parse_args(["txt2img", "-p", "x"])).restore_faces
    client, backend = api
    options = client.get("/sdapi/v1/options").json()
    assert (options["face_restoration"], options["face_restoration_model"], options["code_former_weight"]) == (
        False, "CodeFormer", 0.5)
    for body in ({"steps": 1}, {"steps": 1, "restore_faces": True},
                 {"steps": 1, "override_settings": {"face_restoration": True, "face_restoration_model": "GFPGAN",
                                                    "code_former_weight": 0.3}},
                 {"infotext": "x\nSteps: 1, Seed: 1, Face restoration: GFPGAN"}):
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
    assert client.post("/sdapi/v1/options", json={"face_restoration_model": "gfpgan",
                                                  "code_former_weight": 0.7}).status_code == 200
    assert client.post("/sdapi/v1/txt2img", json={"steps": 1, "restore_faces": True}).status_code == 200
    assert [(p.restore_faces, p.face_restoration_model, p.code_former_weight) for p in backend.params] == [
        (False, "CodeFormer", 0.5), (True, "CodeFormer", 0.5), (True, "GFPGAN", 0.3), (True, "GFPGAN", 0.5),
        (True, "GFPGAN", 0.7)]
    r = client.post("/sdapi/v1/txt2img", json={"steps": 1, "restore_faces": True,
                                               "override_settings": {"face_restoration_model": "RestoreFormer"}})
    assert r.status_code == 422 and r.json()["field"] == "override_settings.face_restoration_model", r.text
    r = client.post("/sdapi/v1/options", json={"code_former_weight": 2})
    assert r.status_code == 422 and r.json()["field"] == "code_former_weight", r.text


def test_files_that_are_not_the_networks_are_refused_by_name(tmp_path):
    from underpaint.errors import ModelError
    from underpaint.models.registry import ModelsDir
    from underpaint.pipeline.face_restore import face_model_files, load_face_restorer

    gfp = tmp_path / "GFPGAN"
    gfp.mkdir()
    with pytest.raises(ModelNotFound) as err:
        face_model_files(ModelsDir(tmp_path))
    assert all(name in str(err.value) for name in ("GFPGANv1.4.pth", "detection_Resnet50_Final.pth",
                                                   "parsing_parsenet.pth"))
    for name in ("GFPGANv1.4.safetensors", "detection_Resnet50_Final.safetensors", "parsing_parsenet.safetensors"):
        save_file({"x": torch.zeros(1)}, str(gfp / name))
    paths = face_model_files(ModelsDir(tmp_path))
    with pytest.raises(ModelError, match="not a RetinaFace"):
        load_face_restorer(*paths)


def test_extras_gfpgan_visibility(face_files):
    """A1111's Extras "GFPGAN visibility": after the upscale the faces are restored and blended in by that much,
    recorded in the postprocessing text; CodeFormer without its file is a 404 naming it."""
    import base64
    import io

    from PIL import Image
    from test_server_support import fake_api, png_b64

    from underpaint.models.registry import ModelsDir
    from underpaint.pipeline.face_restore import face_restorer_for, restore_faces

    folder = face_files[0]
    picture = Image.fromarray(np.ascontiguousarray(_picture(640, 704)[:, :, ::-1]))
    expected = Image.blend(picture, restore_faces(face_restorer_for(ModelsDir(folder), "cpu"), picture), 0.5)
    with fake_api(folder) as (client, _):
        r = client.post("/sdapi/v1/extra-single-image", json={"image": png_b64(picture), "upscaler_1": "None",
                                                                "gfpgan_visibility": 0.5})
        assert r.status_code == 200, r.text
        got = Image.open(io.BytesIO(base64.b64decode(r.json()["image"])))
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(expected))
        assert got.info.get("postprocessing") == "GFPGAN visibility: 0.5"
        # /face-restorers lists the restorers whose files are there (no CodeFormer file here).
        assert client.get("/sdapi/v1/face-restorers").json() == [{"name": "GFPGAN", "cmd_dir": "GFPGAN"}]
        r = client.post("/sdapi/v1/extra-single-image", json={"image": png_b64(picture), "codeformer_visibility": 1})
        assert r.status_code == 404 and r.json()["field"] == "codeformer_visibility", r.text
        assert "codeformer-v0.1.0.pth" in r.json()["detail"]


def test_codeformer_is_spandrels():
    """CodeFormer (the released size: a 512² VQGAN, a 9-layer transformer over a 1024-entry codebook) equals
    spandrel's (spandrel_extra_arches, which ComfyUI and Forge load it with), at A1111's weight 0.5."""
    import importlib.util
    from pathlib import Path

    from underpaint.models.codeformer import load_codeformer

    spec = importlib.util.find_spec("spandrel_extra_arches")
    if spec is None:
        pytest.skip("spandrel_extra_arches is not installed")
    spandrel_ref.model_loader()  # spandrel itself, with its torchvision stand-in
    path = Path(list(spec.submodule_search_locations)[0]) / "architectures/CodeFormer/__arch/codeformer.py"
    module_spec = importlib.util.spec_from_file_location("_codeformer_reference", path)
    reference = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(reference)
    torch.manual_seed(12)
    theirs = reference.CodeFormer().eval()
    ours = load_codeformer(theirs.state_dict())
    x = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(13)) * 2 - 1
    with torch.no_grad():
        expected = theirs(x, weight=0.5)[0]
        torch.testing.assert_close(ours(x, 0.5), expected, rtol=1e-3, atol=1e-3)


def test_codeformer_restorer_gets_the_weight(face_files):
    """The flow hands CodeFormer A1111's weight with each face (GFPGAN takes none)."""
    from PIL import Image

    from underpaint.pipeline.face_restore import FaceRestorer, face_restorer_for, restore_faces

    gfpgan = face_restorer_for(__import__("underpaint.models.registry", fromlist=["ModelsDir"]).ModelsDir(
        face_files[0]), "cpu", "GFPGAN")
    seen = []

    class Stand(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, weight):
            seen.append(weight)
            return x

    codeformer = FaceRestorer(gfpgan.detector, gfpgan.parser, Stand(), name="CodeFormer")
    picture = Image.fromarray(np.ascontiguousarray(_picture(640, 704)[:, :, ::-1]))
    restore_faces(codeformer, picture, weight=0.3)
    assert seen and set(seen) == {0.3}


def test_the_restorer_visits_the_device_and_goes_home():
    """In the medium and low memory modes the networks rest in host memory and visit the model's device for
    a batch's faces, as the text encoders and VAE do."""
    from underpaint.pipeline.face_restore import FaceRestorer

    moves = []

    class Net(torch.nn.Linear):
        def to(self, device):
            moves.append((self.tag, str(device)))
            return self

    nets = []
    for tag in ("detector", "parser", "restorer"):
        net = Net(1, 1)
        net.tag = tag
        nets.append(net)
    restorer = FaceRestorer(*nets)
    with restorer.visiting(torch.device("cuda")):
        assert moves == [("detector", "cuda"), ("parser", "cuda"), ("restorer", "cuda")]
    assert moves[3:] == [("detector", "cpu"), ("parser", "cpu"), ("restorer", "cpu")]
    moves.clear()
    with restorer.visiting(None), restorer.visiting(torch.device("cpu")):
        pass
    assert moves == []


def test_alignment_is_the_similarity_onto_ffhqs_template():
    """Landmarks that are the template halved and shifted align by ×2 and the shift back; landmarks no
    similarity fits (all at one point) give none, and such a face is left alone."""
    from underpaint.pipeline.face_restore import FFHQ_TEMPLATE, alignment

    np.testing.assert_allclose(alignment((FFHQ_TEMPLATE * 0.5 + 10).astype(np.float32)),
                               [[2, 0, -20], [0, 2, -20]], atol=1e-4)
    assert alignment(np.zeros((5, 2), np.float32)) is None
