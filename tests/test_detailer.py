"""ADetailer's face detailing: each face found in a finished picture is inpainted again, "only masked". The
references are the masks ADetailer's rules make (drawn here with PIL and OpenCV) and the same inpainting
requests made by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageChops, ImageDraw

from underpaint.errors import InvalidParameter, ModelNotFound
from underpaint.params import DetailerUnit, GenerationParams, InpaintOptions
from underpaint.pipeline import detailer

BASE = dict(prompt="a portrait", negative_prompt="blurry", steps=2, sampler="Euler", rng="cpu", width=64, height=64,
            seed=21, subseed=5)
BOXES = np.array([[8, 10, 24, 30, 0.99], [36, 30, 60, 58, 0.9], [2, 2, 6, 6, 0.8]], dtype=np.float32)


def _rect(size, box) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle([float(v) for v in box[:4]], fill=255)
    return mask


def test_masks_follow_adetailers_rules():
    import cv2

    size = (64, 64)
    plain = detailer.masks(BOXES, size, DetailerUnit(dilate_erode=0))
    assert [np.asarray(m).sum() for m in plain] == [np.asarray(_rect(size, b)).sum() for b in BOXES]
    dilated = detailer.masks(BOXES[:1], size, DetailerUnit(dilate_erode=4))[0]
    want = cv2.dilate(np.asarray(_rect(size, BOXES[0])), np.ones((4, 4), np.uint8), iterations=1)
    assert np.array_equal(np.asarray(dilated), want)
    eroded = detailer.masks(BOXES[:1], size, DetailerUnit(dilate_erode=-2))[0]
    assert np.asarray(eroded).sum() < np.asarray(_rect(size, BOXES[0])).sum()
    # the two largest, largest first; the smallest area ratio filtered out
    largest = detailer.masks(BOXES, size, DetailerUnit(dilate_erode=0, mask_k=2))
    assert [m.getbbox() for m in largest] == [(36, 30, 61, 59), (8, 10, 25, 31)]
    assert len(detailer.masks(BOXES, size, DetailerUnit(dilate_erode=0, mask_min_ratio=0.02))) == 2
    # ADetailer's "Confidence" filter: the most confident first (the first box, not the largest)
    confident = detailer.masks(BOXES, size, DetailerUnit(dilate_erode=0, mask_k=1,
                                                         mask_filter_method="confidence"))
    assert [m.getbbox() for m in confident] == [(8, 10, 25, 31)]
    # offsets: x to the right, y upwards
    moved = detailer.masks(BOXES[:1], size, DetailerUnit(dilate_erode=0, x_offset=3, y_offset=2))[0]
    assert moved.getbbox() == (11, 8, 28, 29)
    merged = detailer.masks(BOXES[:2], size, DetailerUnit(dilate_erode=0, mask_merge_invert="Merge"))
    assert len(merged) == 1 and np.array_equal(np.asarray(merged[0]),
                                               np.asarray(ImageChops.lighter(_rect(size, BOXES[0]), _rect(size, BOXES[1]))))
    inverted = detailer.masks(BOXES[:2], size, DetailerUnit(dilate_erode=0, mask_merge_invert="merge and invert"))[0]
    assert np.array_equal(np.asarray(inverted), 255 - np.asarray(merged[0]))
    assert detailer.masks(np.zeros((0, 5), np.float32), size, DetailerUnit()) == []
    # ADetailer's order: moved, then dilated or eroded, the empty ones dropped, then merged and inverted: finds
    # that erode away leave nothing to invert (not the whole picture)
    tiny = np.array([[8, 8, 10, 10, 0.9], [30, 30, 32, 32, 0.8]], np.float32)
    assert detailer.masks(tiny, size, DetailerUnit(dilate_erode=-4, mask_merge_invert="Merge and Invert")) == []
    edge = detailer.masks(BOXES[:1], size, DetailerUnit(dilate_erode=4, x_offset=-8))[0]
    want = cv2.dilate(np.asarray(ImageChops.offset(_rect(size, BOXES[0]), -8, 0)), np.ones((4, 4), np.uint8))
    assert np.array_equal(np.asarray(edge), want)  # moved first (wrapping round the edge), then dilated
    # equal areas: NumPy's argsort order, reversed (which find gets seed + j follows from it)
    same = np.array([[0, 0, 10, 10, 0.9], [20, 20, 30, 30, 0.8], [40, 40, 50, 50, 0.7]], np.float32)
    order = [m.getbbox() for m in detailer.masks(same, size, DetailerUnit(dilate_erode=0, mask_k=3))]
    assert order == [tuple(int(v) + (1 if i >= 2 else 0) for i, v in enumerate(same[j, :4]))
                     for j in np.argsort([100, 100, 100])[-3:][::-1]]


def test_prompts_sep_prompt_and_infotext_names():
    assert detailer.prompts("", "a cat") == ["a cat"]
    assert detailer.prompts("[PROMPT], smiling [SEP] angry [SEP]", "a cat") == [" a cat , smiling", "angry", "a cat"]
    entries = dict(detailer.infotext_entries((DetailerUnit(), DetailerUnit(model="mediapipe_face_full", prompt="x",
                                                                           steps=9, inpaint_only_masked=False))))
    assert entries["ADetailer model"] == "face_yolov8n.pt" and entries["ADetailer confidence"] == 0.3
    assert entries["ADetailer inpaint padding"] == 32 and "ADetailer prompt" not in entries
    assert entries["ADetailer model 2nd"] == "mediapipe_face_full" and entries["ADetailer prompt 2nd"] == "x"
    assert entries["ADetailer steps 2nd"] == 9 and entries["ADetailer use separate steps 2nd"] is True
    assert "ADetailer inpaint padding 2nd" not in entries and "ADetailer version" in entries
    assert [detailer.suffix(n) for n in range(5)] == ["", " 2nd", " 3rd", " 4th", " 5th"]
    assert detailer.infotext_entries(()) == ()


def test_each_face_is_a_plain_inpainting_request(sd1_engine, monkeypatch):
    boxes = BOXES[:2]
    monkeypatch.setattr(detailer, "face_finder", lambda folder, device: lambda picture, confidence: boxes)
    unit = DetailerUnit(prompt="[PROMPT] [SEP] a smile", denoising_strength=0.5, inpaint_only_masked_padding=8)
    result = sd1_engine.generate(GenerationParams(**BASE, detailer=(unit,)))
    # by hand: the picture, then each face in turn (seed and variation seed + j), ADetailer's request
    picture = sd1_engine.generate(GenerationParams(**BASE)).images[0]
    for j, (mask, prompt) in enumerate(zip(detailer.masks(boxes, (64, 64), unit), (" a portrait ", "a smile"))):
        picture = sd1_engine.generate(GenerationParams(**{**BASE, "seed": 21 + j, "subseed": 5 + j, "prompt": prompt},
                                                       init_images=(picture,), mask=mask, strength=0.5,
                                                       inpaint=InpaintOptions(full_res=True, full_res_padding=8))).images[0]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(picture))
    text = result.infotexts[0]
    assert "ADetailer model: face_yolov8n.pt, ADetailer prompt: [PROMPT] [SEP] a smile, ADetailer confidence: 0.3," in text
    assert "ADetailer denoising strength: 0.5, ADetailer inpaint only masked: True, ADetailer inpaint padding: 8" in text
    assert text.startswith("a portrait\nNegative prompt: blurry\n")


def test_a_tabs_own_noise_multiplier_and_clip_skip_go_to_its_passes(sd1_engine, monkeypatch):
    """ADetailer's "separate noise multiplier" and "separate CLIP skip": each find's request has them; the
    API's switches set them, and the infotext records them under ADetailer's keys."""
    boxes = BOXES[:1]
    monkeypatch.setattr(detailer, "face_finder", lambda folder, device: lambda picture, confidence: boxes)
    unit = DetailerUnit(denoising_strength=0.5, noise_multiplier=0.8, clip_skip=2)
    result = sd1_engine.generate(GenerationParams(**BASE, detailer=(unit,)))
    picture = sd1_engine.generate(GenerationParams(**BASE)).images[0]
    (mask,) = detailer.masks(boxes, (64, 64), unit)
    want = sd1_engine.generate(GenerationParams(**{**BASE, "seed": 21, "subseed": 5}, init_images=(picture,), mask=mask,
                                                strength=0.5, noise_multiplier=0.8, clip_skip=2,
                                                inpaint=InpaintOptions(full_res=True))).images[0]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(want))
    plain = sd1_engine.generate(GenerationParams(**BASE, detailer=(DetailerUnit(denoising_strength=0.5),))).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(want))
    text = result.infotexts[0]
    assert "ADetailer use separate noise multiplier: True, ADetailer noise multiplier: 0.8" in text
    assert "ADetailer use separate CLIP skip: True, ADetailer CLIP skip: 2" in text
    from underpaint.server.a1111.convert import _detailer_unit

    tab = {"ad_model": "face_yolov8n.pt", "ad_denoising_strength": 0.5, "ad_use_noise_multiplier": True,
           "ad_noise_multiplier": 0.8, "ad_use_clip_skip": True, "ad_clip_skip": 2.0}
    assert _detailer_unit(tab, "args[2]", DetailerUnit) == unit  # the switches as ADetailer's clients send them
    same = {**tab, "ad_use_sampler": True, "ad_sampler": "Use same sampler", "ad_scheduler": "Use same scheduler"}
    assert _detailer_unit(same, "args[2]", DetailerUnit) == unit  # ADetailer's "Use same sampler" choice


def _models_with_tiny_sd1(root, sd1_file):
    """A models folder at ``root`` holding the tiny checkpoint as tiny-sd1; its path."""
    (root / "checkpoints").mkdir()
    path = root / "checkpoints" / "tiny-sd1.safetensors"
    path.write_bytes(sd1_file.read_bytes())
    return path


def _assert_cli_flag(root, flag: str, good: str, want) -> None:
    """``--adetailer-FLAG good`` makes ``want`` on the command line; ``--adetailer-FLAG nothing`` is a clean
    error naming the flag."""
    from cli_runner import run_cli

    from test_cli import assert_clean_error

    common = ["txt2img", "-p", "a portrait", "-n", "blurry", "--steps", "2", "--sampler", "Euler", "--rng", "cpu",
              "-W", "64", "-H", "64", "--seed", "21", "--subseed", "5", "--models-dir", str(root),
              "--model", "tiny-sd1", "--adetailer", "--adetailer-strength", "0.6"]
    proc = run_cli(*common, f"--adetailer-{flag}", good, "-o", str(root / f"{flag}-a.png"))
    assert proc.returncode == 0, proc.stderr
    assert np.array_equal(np.asarray(Image.open(root / f"{flag}-a.png").convert("RGB")), np.asarray(want))
    assert_clean_error(run_cli(*common, f"--adetailer-{flag}", "nothing", "-o", str(root / f"{flag}-b.png")),
                       f"--adetailer-{flag}")


def test_a_tabs_own_checkpoint_runs_its_passes(tmp_path, sd1_file, monkeypatch):
    """ADetailer's "separate checkpoint": each find is inpainted by the checkpoint the tab names (loaded by the
    engine as a second checkpoint), exactly as that checkpoint inpaints it on its own; the infotext records its
    title under ADetailer's keys, which read back; a name that is not there is refused before any work."""
    from tiny_models import write_sd1
    from underpaint.pipeline.engine import Engine

    base_file = _models_with_tiny_sd1(tmp_path, sd1_file)
    write_sd1(tmp_path / "checkpoints" / "face-model.safetensors", seed=7)
    engine = Engine.load(base_file, device="cpu", dtype="fp32", models_dir=tmp_path)
    boxes = BOXES[:1]
    monkeypatch.setattr(detailer, "face_finder", lambda folder, device: lambda picture, confidence: boxes)
    unit = DetailerUnit(denoising_strength=0.6, checkpoint="face-model")
    result = engine.generate(GenerationParams(**BASE, detailer=(unit,)))
    picture = engine.generate(GenerationParams(**BASE)).images[0]
    (mask,) = detailer.masks(boxes, (64, 64), unit)
    face_engine = Engine.load(tmp_path / "checkpoints" / "face-model.safetensors", device="cpu", dtype="fp32",
                              models_dir=tmp_path)
    request = GenerationParams(**{**BASE, "seed": 21, "subseed": 5}, init_images=(picture,), mask=mask,
                               strength=0.6, inpaint=InpaintOptions(full_res=True))
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(face_engine.generate(request).images[0]))
    own = engine.generate(GenerationParams(**BASE, detailer=(DetailerUnit(denoising_strength=0.6),))).images[0]
    assert not np.array_equal(np.asarray(own), np.asarray(result.images[0]))
    text = result.infotexts[0]
    title = engine.refiner_model("face-model").short_title
    assert f"ADetailer use separate checkpoint: True, ADetailer checkpoint: {title}," in text
    from underpaint.imageio.infotext import parse_infotext
    from underpaint.pipeline.reproduce import params_from_infotext

    (back,) = params_from_infotext(parse_infotext(text))["detailer"]
    assert back.checkpoint == title
    with pytest.raises(ModelNotFound) as err:
        engine.generate(GenerationParams(**BASE, detailer=(DetailerUnit(checkpoint="no-such-model"),)))
    assert err.value.field == "detailer[0].checkpoint" and "face-model" in str(err.value)
    _assert_cli_flag(tmp_path, "checkpoint", "face-model", result.images[0])


def test_a_tabs_own_vae_runs_its_passes_and_the_model_gets_its_own_back(tmp_path, sd1_file, monkeypatch):
    """ADetailer's "separate VAE": the finds' passes encode and decode with the tab's VAE (as that inpainting
    request makes it with the VAE loaded), the picture before them and every request after keep the model's
    own; a VAE that is not there is refused naming the tab's field."""
    from tiny_models import write_vae
    from underpaint.pipeline.engine import Engine

    base_file = _models_with_tiny_sd1(tmp_path, sd1_file)
    write_vae(tmp_path / "vae" / "sharp-vae.safetensors", seed=3)
    engine = Engine.load(base_file, device="cpu", dtype="fp32", models_dir=tmp_path)
    boxes = BOXES[:1]
    monkeypatch.setattr(detailer, "face_finder", lambda folder, device: lambda picture, confidence: boxes)
    before = engine.generate(GenerationParams(**BASE)).images[0]
    unit = DetailerUnit(denoising_strength=0.6, vae="sharp-vae.safetensors")
    result = engine.generate(GenerationParams(**BASE, detailer=(unit,)))
    after = engine.generate(GenerationParams(**BASE)).images[0]
    assert np.array_equal(np.asarray(before), np.asarray(after))  # the model's own VAE is back
    (mask,) = detailer.masks(boxes, (64, 64), unit)
    with_vae = Engine.load(base_file, device="cpu", dtype="fp32", models_dir=tmp_path,
                           vae=tmp_path / "vae" / "sharp-vae.safetensors")
    request = GenerationParams(**{**BASE, "seed": 21, "subseed": 5}, init_images=(before,), mask=mask,
                               strength=0.6, inpaint=InpaintOptions(full_res=True))
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(with_vae.generate(request).images[0]))
    assert "ADetailer use separate VAE: True, ADetailer VAE: sharp-vae.safetensors" in result.infotexts[0]
    with pytest.raises(ModelNotFound) as err:
        engine.generate(GenerationParams(**BASE, detailer=(DetailerUnit(vae="nothing.safetensors"),)))
    assert err.value.field == "detailer[0].vae" and "sharp-vae.safetensors" in str(err.value)
    _assert_cli_flag(tmp_path, "vae", "sharp-vae", result.images[0])


def test_a_tabs_controlnet_guides_its_passes(sd1_engine, monkeypatch, tmp_path):
    """ADetailer's ControlNet for a tab: the model reads the picture being fixed, with the preprocessor ADetailer
    picks from the model's name (tile_resample for a tile model), pixel perfect; each find's pass equals the
    same inpainting request with that unit made by hand. A missing model is refused before any work, an API
    tab's model must be a listed one (never a path), and a model ADetailer picks no preprocessor for needs one."""
    from tiny_controlnet import write_controlnet

    from underpaint.errors import UnknownName
    from underpaint.models.registry import ModelsDir
    from underpaint.pipeline.control import ControlUnit
    from underpaint.server.a1111.convert import _detailer_unit

    (tmp_path / "controlnet").mkdir()
    write_controlnet(tmp_path / "controlnet" / "control_v11f1e_sd15_tile.safetensors", "sd1")
    boxes = BOXES[1:2]
    monkeypatch.setattr(detailer, "face_finder", lambda folder, device: lambda picture, confidence: boxes)
    monkeypatch.setattr(sd1_engine.model, "models_dir", ModelsDir(tmp_path), raising=False)
    unit = DetailerUnit(denoising_strength=0.6, controlnet_model="control_v11f1e_sd15_tile", controlnet_weight=0.8)
    assert unit.controlnet_module == "tile_resample"
    result = sd1_engine.generate(GenerationParams(**BASE, detailer=(unit,)))
    picture = sd1_engine.generate(GenerationParams(**BASE)).images[0]
    (mask,) = detailer.masks(boxes, (64, 64), unit)
    control = ControlUnit(module="tile_resample", model="control_v11f1e_sd15_tile", weight=0.8, pixel_perfect=True)
    want = sd1_engine.generate(GenerationParams(**BASE, init_images=(picture,), mask=mask, strength=0.6,
                                                inpaint=InpaintOptions(full_res=True), control_units=(control,)))
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(want.images[0]))
    plain = sd1_engine.generate(GenerationParams(**BASE, detailer=(DetailerUnit(denoising_strength=0.6),))).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(want.images[0]))
    text = result.infotexts[0]
    assert "ADetailer ControlNet model: control_v11f1e_sd15_tile, ADetailer ControlNet module: tile_resample, " \
           "ADetailer ControlNet weight: 0.8" in text
    with pytest.raises(UnknownName) as err:
        sd1_engine.generate(GenerationParams(**BASE, detailer=(DetailerUnit(controlnet_model="control_v11p_sd15_openpose"),)))
    assert err.value.field == "detailer[0].controlnet_model"
    folder = ModelsDir(tmp_path)
    tab = {"ad_model": "face_yolov8n.pt", "ad_controlnet_model": "control_v11f1e_sd15_tile [0123abcd]",
           "ad_controlnet_module": "None", "ad_controlnet_weight": 0.8}
    taken = _detailer_unit(tab, "args[2]", DetailerUnit, folder)
    assert Path(taken.controlnet_model) == tmp_path / "controlnet" / "control_v11f1e_sd15_tile.safetensors"
    with pytest.raises(UnknownName) as err:
        _detailer_unit({**tab, "ad_controlnet_model": "/etc/passwd"}, "args[2]", DetailerUnit, folder)
    assert err.value.field == "args[2].ad_controlnet_model"
    with pytest.raises(InvalidParameter) as err:
        DetailerUnit(controlnet_model="control_v11p_sd15_scribble")
    assert err.value.field == "ad_controlnet_module"


def test_skip_and_no_faces_leave_the_picture(sd1_engine, monkeypatch):
    plain = sd1_engine.generate(GenerationParams(**BASE)).images[0]
    monkeypatch.setattr(detailer, "face_finder", lambda folder, device: lambda picture, confidence: BOXES[:0])
    none = sd1_engine.generate(GenerationParams(**BASE, detailer=(DetailerUnit(),))).images[0]
    assert np.array_equal(np.asarray(none), np.asarray(plain))
    monkeypatch.setattr(detailer, "face_finder", lambda folder, device: lambda picture, confidence: BOXES[:1])
    skipped = sd1_engine.generate(GenerationParams(**BASE, detailer=(DetailerUnit(prompt="[SKIP]"),))).images[0]
    assert np.array_equal(np.asarray(skipped), np.asarray(plain))


#: Faces as RetinaFace gives them: box, score, then the landmarks (left eye, right eye, nose, mouth corners).
FACES = np.array([[10, 8, 54, 56, 0.99, 22, 28, 42, 28, 32, 38, 24, 46, 40, 46],
                  [60, 60, 100, 100, 0.9, 70, 70, 90, 90, 80, 80, 70, 92, 92, 70]], dtype=np.float32)


def test_mesh_eye_masks_are_both_eyes_of_each_face():
    """mediapipe_face_mesh_eyes_only: per face one mask of two ellipses at the eye landmarks, along the line
    between them (a quarter of the distance across long each way, an eighth high), its box the mask's."""
    found = detailer.eye_shapes(FACES, (128, 128))
    assert [d.label for d in found] == ["eyes", "eyes"] and [d.score for d in found] == pytest.approx([0.99, 0.9])
    level = found[0].mask
    ys, xs = np.nonzero(level)
    assert level[28, 22] and level[28, 42] and not level[28, 32]  # both eyes, not the bridge of the nose
    assert abs(ys - 28).max() <= 0.12 * 20 + 1 and {xs.min(), xs.max() + 1} == {17, 48}  # 5 px each side
    assert found[0].box == (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    tilted = found[1].mask  # eyes on a diagonal: the ellipses lie along it
    assert tilted[70, 70] and tilted[90, 90] and tilted[74, 74] and not tilted[66, 74] and not tilted[80, 80]
    ovals = detailer.oval_shapes(FACES[:1], (128, 128))
    assert ovals[0].mask[32, 32] and not ovals[0].mask[9, 11] and ovals[0].box == (10.0, 8.0, 55.0, 57.0)


def test_mesh_models_inpaint_their_shapes(sd1_engine, monkeypatch):
    """A tab on mediapipe_face_mesh_eyes_only inpaints the eye masks (as a mask-shaped find: ADetailer's
    dilation and the rest apply), the same as the request by hand."""
    faces = FACES[:1] * 0.5
    monkeypatch.setattr(detailer, "face_finder", lambda folder, device: lambda picture, confidence: faces)
    unit = DetailerUnit(model="mediapipe_face_mesh_eyes_only", denoising_strength=0.5)
    result = sd1_engine.generate(GenerationParams(**BASE, detailer=(unit,)))
    picture = sd1_engine.generate(GenerationParams(**BASE)).images[0]
    (mask,) = detailer.masks(detailer.eye_shapes(faces, (64, 64)), (64, 64), unit)
    x1, y1, x2, y2 = mask.getbbox()  # the eyes (11 and 21 across, 14 down), dilated by 4: not the face's box
    assert x1 <= 9 and y1 <= 12 and x2 >= 24 and y2 >= 17 and x2 - x1 < 22 and y2 - y1 < 10
    want = sd1_engine.generate(GenerationParams(**BASE, init_images=(picture,), mask=mask, strength=0.5,
                                                inpaint=InpaintOptions(full_res=True))).images[0]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(want))


@pytest.mark.parametrize("unit, field", [
    (dict(model="hand_yolov8n.pt"), "detailer[0].model"),
])
def test_refusals(sd1_engine, unit, field):
    with pytest.raises(InvalidParameter) as err:
        sd1_engine.generate(GenerationParams(**BASE, detailer=(DetailerUnit(**unit),)))
    assert err.value.field == field


@pytest.mark.parametrize("fields, field", [
    (dict(confidence=2), "ad_confidence"), (dict(mask_merge_invert="Both"), "ad_mask_merge_invert"),
    (dict(sampler="Eulr"), "ad_sampler"), (dict(inpaint_width=10, inpaint_height=64), "ad_inpaint_width"),
])
def test_unit_values_are_checked(fields, field):
    with pytest.raises(InvalidParameter) as err:
        DetailerUnit(**fields)
    assert err.value.field == field


def test_missing_detector_is_refused_naming_the_file(sd1_file, tmp_path):
    from underpaint.pipeline.engine import Engine

    engine = Engine.load(sd1_file, device="cpu", dtype="fp32", models_dir=tmp_path)
    with pytest.raises(ModelNotFound) as err:
        engine.generate(GenerationParams(**BASE, detailer=(DetailerUnit(),)))
    assert "detection_Resnet50_Final.pth" in err.value.message


from test_face_restore import ref  # noqa: E402,F401  (facexlib's RetinaFace: the detector's random weights)


def test_the_face_restorers_detector_finds_the_faces(ref, sd1_file, tmp_path):  # noqa: F811
    import torch
    from test_face_restore import _detector_weights

    from underpaint.models.face_detect import detect_faces, load_retinaface
    from underpaint.pipeline.engine import Engine

    (tmp_path / "GFPGAN").mkdir()
    weights = _detector_weights(ref, seed=9, box_growth=-2.0)
    torch.save({"module." + k: v for k, v in weights.items()}, tmp_path / "GFPGAN" / "detection_Resnet50_Final.pth")
    engine = Engine.load(sd1_file, device="cpu", dtype="fp32", models_dir=tmp_path)
    params = GenerationParams(**{**BASE, "width": 128, "height": 128})
    plain = engine.generate(params).images[0]
    boxes = detect_faces(load_retinaface(weights), np.asarray(plain)[:, :, ::-1], threshold=0.3)
    assert len(boxes)  # the random detector finds something to detail
    detailed = engine.generate(params.replace(detailer=(DetailerUnit(denoising_strength=0.6),)))
    assert np.abs(np.asarray(detailed.images[0], dtype=int) - np.asarray(plain, dtype=int)).max() > 0


# --------------------------------------------------------------------------- the A1111 API (ADetailer's args)


@pytest.fixture(scope="module")
def api(sd1_file, tmp_path_factory):
    from test_server_support import real_api, tiny_models_dir

    with real_api(tiny_models_dir(tmp_path_factory.mktemp("adetailer-models"), sd1_file)) as client:
        yield client


def test_api_takes_adetailers_args(api, monkeypatch, sd1_engine):
    import json

    from test_server_support import decode_b64

    monkeypatch.setattr(detailer, "face_finder", lambda folder, device: lambda picture, confidence: BOXES[:1])
    assert "adetailer" in api.get("/sdapi/v1/scripts").json()["txt2img"]
    assert "face_yolov8n.pt" in api.get("/adetailer/v1/ad_model").json()["ad_model"]
    assert api.get("/adetailer/v1/version").json()["version"]
    tab = {"ad_model": "face_yolov8n.pt", "ad_prompt": "", "ad_denoising_strength": 0.5, "ad_use_steps": True,
           "ad_steps": 3, "ad_use_checkpoint": False, "ad_controlnet_model": "None", "ad_tap_enable": True}
    body = {**{k: v for k, v in BASE.items() if k not in ("sampler", "rng")}, "sampler_name": "Euler",
            "override_settings": {"randn_source": "CPU"},
            "alwayson_scripts": {"ADetailer": {"args": [True, False, tab, {"ad_model": "None"}]}}}
    r = api.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert "ADetailer model: face_yolov8n.pt" in info["infotexts"][0] and "ADetailer steps: 3" in info["infotexts"][0]
    want = sd1_engine.generate(GenerationParams(**BASE, detailer=(DetailerUnit(denoising_strength=0.5, steps=3),)))
    assert np.array_equal(np.asarray(decode_b64(r.json()["images"][0]).convert("RGB")), np.asarray(want.images[0]))
    off = api.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"ADetailer": {"args": [False, False, tab]}}})
    assert off.status_code == 200 and "ADetailer" not in off.json()["info"]


def test_api_takes_current_and_older_adetailer_clients(api, monkeypatch, sd1_engine):
    """ADetailer's current names (``ad_mask_k``, ``ad_mask_filter_method``) and the older
    ``ad_mask_k_largest``; whole numbers sent as 2.0 (webuiapi does); A1111's built-in Seed, Sampler and
    Refiner scripts in ``alwayson_scripts``, whose args its API ignores (the request's fields count)."""
    import json

    from test_server_support import decode_b64

    monkeypatch.setattr(detailer, "face_finder", lambda folder, device: lambda picture, confidence: BOXES)
    assert api.get("/adetailer/v1/version").json()["version"] >= "24.9"
    body = {**{k: v for k, v in BASE.items() if k not in ("sampler", "rng")}, "sampler_name": "Euler",
            "override_settings": {"randn_source": "CPU"}}
    unit = DetailerUnit(denoising_strength=0.5, mask_k=1, mask_filter_method="Confidence", dilate_erode=2)
    want = np.asarray(sd1_engine.generate(GenerationParams(**BASE, detailer=(unit,))).images[0])
    builtins = {"Seed": {"args": [-1, False, -1, 0, 0, 0]}, "Sampler": {"args": [20, "DPM++ 2M", "Karras"]},
                "Refiner": {"args": [True, "sd_xl_refiner_1.0.safetensors", 0.8]}, "Comments": {"args": []}}
    for tab in ({"ad_model": "face_yolov8n.pt", "ad_mask_k": 1.0, "ad_mask_filter_method": "Confidence",
                 "ad_dilate_erode": 2.0, "ad_denoising_strength": 0.5, "ad_model_classes": ""},
                {"ad_model": "face_yolov8n.pt", "ad_mask_k_largest": 1, "ad_mask_filter_method": "Confidence",
                 "ad_dilate_erode": 2, "ad_denoising_strength": 0.5}):
        r = api.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {**builtins,
                                                                              "ADetailer": {"args": [True, False, tab]}}})
        assert r.status_code == 200, r.text
        assert np.array_equal(np.asarray(decode_b64(r.json()["images"][0]).convert("RGB")), want)
        text = json.loads(r.json()["info"])["infotexts"][0]
        assert "ADetailer method to decide top k masks: Confidence, ADetailer mask only top k: 1," in text
    r = api.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"ADetailer": {"args": [
        True, False, {"ad_model": "face_yolov8n.pt", "ad_mask_k": 1.5}]}}})
    assert r.status_code == 422 and r.json()["field"] == "alwayson_scripts.ADetailer.args[2].ad_mask_k", r.text


def test_a_tab_restoring_faces_needs_the_restorer_and_restores_each_pass(sd1_engine, monkeypatch):
    """ADetailer's "Restore faces after ADetailer" (``ad_restore_face``): each find's inpainting request
    restores faces, as A1111's own would; without the restorer's files the request is refused before any
    work, naming the tab's setting."""
    from underpaint.errors import ModelNotFound

    monkeypatch.setattr(detailer, "face_finder", lambda folder, device: lambda picture, confidence: BOXES[:1])
    with pytest.raises(ModelNotFound) as err:
        sd1_engine.generate(GenerationParams(**BASE, detailer=(DetailerUnit(restore_face=True),)))
    assert err.value.field == "detailer[0].restore_face"
    monkeypatch.setattr(detailer, "masks", lambda found, size, unit: [Image.new("L", size, 255)])
    from underpaint.pipeline import face_restore

    monkeypatch.setattr(face_restore, "face_model_files", lambda *a, **k: None)
    monkeypatch.setattr(face_restore, "restore_pictures", lambda model, folder, images, params, cancelled: [
        Image.new("RGB", images[0].size, (255, 0, 0)) for _ in images])
    result = sd1_engine.generate(GenerationParams(**BASE, detailer=(DetailerUnit(restore_face=True),)))
    assert np.asarray(result.images[0])[..., 0].min() == 255  # the inpainted picture was restored (here: red)
    plain = sd1_engine.generate(GenerationParams(**BASE, detailer=(DetailerUnit(),)))
    assert np.asarray(plain.images[0])[..., 0].min() < 255
    assert "ADetailer restore face: True" in result.infotexts[0]


@pytest.mark.parametrize("args, field", [
    ([True, False, {"ad_model": "hand_yolov8n.pt"}], "alwayson_scripts.ADetailer.args[2].ad_model"),
    ([True, False, {"ad_modle": "face_yolov8n.pt"}], "alwayson_scripts.ADetailer.args[2].ad_modle"),
    ([True, False, {"ad_model": "face_yolov8n.pt", "ad_confidence": 3}], "alwayson_scripts.ADetailer.args[2].ad_confidence"),
    ([True, False, {"ad_model": "face_yolov8n.pt", "ad_use_vae": True, "ad_vae": "no-such-vae.safetensors"}],
     "alwayson_scripts.ADetailer.args[2].ad_vae"),
    ([True, True, {"ad_model": "face_yolov8n.pt"}], "alwayson_scripts.ADetailer.args[1]"),
    ([True, False, "face"], "alwayson_scripts.ADetailer.args[2]"),
])
def test_api_refusals_name_the_setting(api, args, field):
    r = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                            "alwayson_scripts": {"ADetailer": {"args": args}}})
    assert r.status_code == 422 and r.json()["field"] == field, r.text


def test_api_tab_with_its_own_checkpoint(api, monkeypatch):
    """``ad_use_checkpoint`` with a listed checkpoint runs the tab's passes on it and records its title; a name
    that is not listed is a 404 naming ``ad_checkpoint`` (never read as a path)."""
    import json

    monkeypatch.setattr(detailer, "face_finder", lambda folder, device: lambda picture, confidence: BOXES[:1])
    tab = {"ad_model": "face_yolov8n.pt", "ad_use_checkpoint": True, "ad_checkpoint": "tiny-sd1"}
    body = {"prompt": "x", "steps": 1, "width": 64, "height": 64,
            "alwayson_scripts": {"ADetailer": {"args": [True, False, tab]}}}
    r = api.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])["infotexts"][0]
    assert "ADetailer use separate checkpoint: True, ADetailer checkpoint: tiny-sd1 [" in info
    for name in ("no-such-model", "../checkpoints/tiny-sd1.safetensors"):
        r = api.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"ADetailer": {"args": [
            True, False, {**tab, "ad_checkpoint": name}]}}})
        assert r.status_code == 404 and r.json()["field"] == "alwayson_scripts.ADetailer.args[2].ad_checkpoint", r.text
    same = {**tab, "ad_checkpoint": "Use same checkpoint"}
    r = api.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"ADetailer": {"args": [True, False, same]}}})
    assert r.status_code == 200 and "separate checkpoint" not in json.loads(r.json()["info"])["infotexts"][0]


def test_cli_adetailer_flags(tmp_path, sd1_file, sd1_engine, monkeypatch):
    from cli_runner import run_cli

    from test_cli import assert_clean_error

    monkeypatch.setattr(detailer, "face_finder", lambda folder, device: lambda picture, confidence: BOXES[:1])
    common = ["txt2img", "-p", "a portrait", "-n", "blurry", "--steps", "2", "--sampler", "Euler", "--rng", "cpu",
              "-W", "64", "-H", "64", "--seed", "21", "--subseed", "5", "--model", str(sd1_file)]
    proc = run_cli(*common, "-o", str(tmp_path / "a.png"), "--adetailer", "--adetailer-strength", "0.5",
                   "--adetailer-padding", "8")
    assert proc.returncode == 0, proc.stderr
    want = sd1_engine.generate(GenerationParams(**BASE, detailer=(DetailerUnit(denoising_strength=0.5,
                                                                               inpaint_only_masked_padding=8),)))
    made = Image.open(tmp_path / "a.png")
    assert np.array_equal(np.asarray(made.convert("RGB")), np.asarray(want.images[0]))
    assert "ADetailer denoising strength: 0.5" in made.text["parameters"]
    assert_clean_error(run_cli(*common, "-o", str(tmp_path / "b.png"), "--adetailer-strength", "0.5"),
                       "--adetailer beside it")
    assert_clean_error(run_cli(*common, "-o", str(tmp_path / "c.png"), "--adetailer", "--adetailer-strength", "2"),
                       "--adetailer-strength")
    assert_clean_error(run_cli(*common, "-o", str(tmp_path / "d.png"), "--adetailer", "hand_yolov8n.pt"),
                       "--adetailer", "hand")
    # ADetailer's top k, its method and classes; a value out of range names its flag
    proc = run_cli(*common, "-o", str(tmp_path / "e.png"), "--adetailer", "--adetailer-strength", "0.5",
                   "--adetailer-top-k", "1", "--adetailer-top-k-by", "Confidence", "--adetailer-classes", "face")
    assert proc.returncode == 0, proc.stderr
    text = Image.open(tmp_path / "e.png").text["parameters"]
    assert "ADetailer model classes: face," in text
    assert "ADetailer method to decide top k masks: Confidence, ADetailer mask only top k: 1," in text
    assert_clean_error(run_cli(*common, "-o", str(tmp_path / "f.png"), "--adetailer", "--adetailer-top-k", "-1"),
                       "--adetailer-top-k")


def test_infotext_reads_back_the_tabs():
    from underpaint.imageio.infotext import format_infotext, parse_infotext
    from underpaint.pipeline.reproduce import params_from_infotext

    units = (DetailerUnit(prompt="a smile, happy", denoising_strength=0.5, steps=9, mask_k=2),
             DetailerUnit(model="mediapipe_face_full", inpaint_only_masked=False, sampler="Euler a"),
             DetailerUnit(model="yolov8x-worldv2.pt", model_classes="person, dog", mask_k=1,
                          mask_filter_method="Confidence", restore_face=True, noise_multiplier=0.9, clip_skip=2))
    text = format_infotext("a portrait", "", {"Steps": 20, **dict(detailer.infotext_entries(units))})
    assert params_from_infotext(parse_infotext(text))["detailer"] == units
    assert "ADetailer mask only top k: 2," in text and 'ADetailer model classes 3rd: "person, dog"' in text
    older = text.replace("ADetailer mask only top k:", "ADetailer mask only top k largest:")  # before ADetailer 24.9
    assert params_from_infotext(parse_infotext(older))["detailer"] == units
    assert "detailer" not in params_from_infotext(parse_infotext(format_infotext("x", "", {"Steps": 20})))
    with pytest.raises(InvalidParameter) as err:
        detailer.units_from_infotext({"ADetailer model": "face_yolov8n.pt", "ADetailer confidence": "high"})
    assert err.value.field == "ADetailer confidence"


def test_api_infotext_field_brings_the_tabs(api, monkeypatch):
    import json

    from underpaint.imageio.infotext import format_infotext

    monkeypatch.setattr(detailer, "face_finder", lambda folder, device: lambda picture, confidence: BOXES[:1])
    unit = DetailerUnit(denoising_strength=0.5, steps=3)
    text = format_infotext("a portrait", "blurry", {"Steps": 2, "Sampler": "Euler", "Seed": 21, "Size": "64x64",
                                                    **dict(detailer.infotext_entries((unit,)))})
    r = api.post("/sdapi/v1/txt2img", json={"infotext": text, "override_settings": {"randn_source": "CPU"}})
    assert r.status_code == 200, r.text
    assert "ADetailer denoising strength: 0.5" in json.loads(r.json()["info"])["infotexts"][0]
