"""ADetailer's YOLO models (models/yolo.py) against ultralytics itself: tiny YOLOv8, YOLOv9, YOLO11 and YOLO26
detection and segmentation models built by ultralytics from its own YAML files (random weights, saved in
half precision as its checkpoints are), read back without running code from the file; the network's
outputs, the predictor's boxes after letterbox, NMS (or an end-to-end head's best pairs) and scaling, and
the segmentation masks equal ultralytics'. Files that name code are refused or inert; architectures
underpaint does not run are refused naming the layer."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from underpaint.errors import ModelError, UnsafeModelFile
from underpaint.models.yolo import detect, load_yolo


def _picture(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour blobs (something for random convolutions to respond to)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


#: The test pictures: wide (enlarged), tall (odd sizes, made smaller: padding on both sides) and square (no
#: padding), fitted to 320 pixels rather than ADetailer's 640 to keep the CPU time short.
PICTURES = (_picture(300, 200, seed=1), _picture(181, 397, seed=2), _picture(320, 320, seed=3))
IMAGE_SIZE = 320


@pytest.fixture(scope="module")
def ultralytics():
    from ultralytics_ref import reference

    try:
        return reference()
    except ImportError:
        pytest.skip("ultralytics is not installed")


def _build(ultralytics, cfg, names: tuple[str, ...], seed: int, end2end: bool = False):
    """A model ultralytics builds from its YAML, in eval mode: its batch-norm statistics those of the test
    pictures (so that its features follow the picture), its box branches peaked at a few bins (boxes a
    few cells wide; a head without bins: distances of a few cells), its class logits spread by about 1.5 at
    most (scores far from 0 and 1, each anchor's its own). An end-to-end head's one-to-one branches are the
    one-to-many ones changed a little (so that which ones run shows), and it is left in end-to-end mode."""
    torch.manual_seed(seed)
    world = "world" in str(cfg)
    kind = ultralytics.tasks.SegmentationModel if "-seg" in str(cfg) else ultralytics.tasks.DetectionModel
    model = (ultralytics.tasks.WorldModel if world else kind)(cfg, nc=len(names), verbose=False)
    model.names = dict(enumerate(names))
    model.end2end = False
    inputs = [_letterboxed(ultralytics, picture) for picture in PICTURES]
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None
        model.train()
        for x in inputs:
            model(x)
        model.eval()
        head = model.model[-1]
        bins = torch.arange(head.reg_max, dtype=torch.float32)
        for branch in head.cv2:
            branch[-1].weight.mul_(0.2)
            peaked = (-0.5 * (bins - 2.5) ** 2) if head.reg_max > 1 else torch.full((1,), 2.5)
            branch[-1].bias.copy_(peaked.repeat(4) + torch.randn(4 * head.reg_max) * 0.3)
        if world:  # class scores are embeddings against the texts: their scale and bias set the spread
            for score in head.cv4:  # small enough that no score rounds to 0 or 1
                score.logit_scale.fill_(math.log(1e-3))
                score.bias.zero_()
            logits = torch.cat([torch.logit(model(x)[0][0, 4:].double()).flatten() for x in inputs])
            middle = logits.median()
            gain = 4e-3 / float((logits - middle).abs().max())  # every logit of the test pictures within ±4
            middle = middle / 1e-3
            for score in head.cv4:
                score.logit_scale.fill_(math.log(gain))
                score.bias.fill_(-gain * float(middle))
            return model
        for branch in head.cv3:
            branch[-1].bias.zero_()
        spread = torch.zeros(len(names))
        for x in inputs:
            out = model(x)[0]
            scores = (out[0] if isinstance(out, tuple) else out)[0, 4:4 + len(names)]
            spread = torch.maximum(spread, torch.logit(scores.clamp(1e-6, 1 - 1e-6)).std(dim=1))
        for branch in head.cv3:
            branch[-1].weight.div_(spread[:, None, None, None] / 1.5)
        if end2end:
            for name in ("cv2", "cv3", "cv4"):
                if hasattr(head, "one2one_" + name):
                    setattr(head, "one2one_" + name, copy.deepcopy(getattr(head, name)))
            for branch in head.one2one_cv2:
                branch[-1].bias.add_(torch.randn_like(branch[-1].bias) * 0.2)
            for branch in head.one2one_cv3:
                branch[-1].weight.mul_(1.2)
            model.end2end = True
    return model


def _letterboxed(ultralytics, picture: Image.Image) -> torch.Tensor:
    """The network's input for ``picture`` as ultralytics' predictor makes it (BGR array, letterbox, RGB, /255)."""
    boxed = ultralytics.LetterBox(IMAGE_SIZE, auto=True, stride=32)(image=np.asarray(picture)[:, :, ::-1])
    return torch.from_numpy(np.ascontiguousarray(boxed[:, :, ::-1])).permute(2, 0, 1)[None].float() / 255


def _save(model, path):
    """As ultralytics leaves a trained model: the model object in half precision, the rest bookkeeping."""
    torch.save({"date": "2024-01-01T00:00:00", "version": "8.0.196", "epoch": -1, "best_fitness": None,
                "model": copy.deepcopy(model).half(), "ema": None, "updates": None, "optimizer": None,
                "train_args": {"task": "segment" if hasattr(model.model[-1], "proto") else "detect", "imgsz": 640}},
               path)
    return copy.deepcopy(model).half().float().eval()  # the weights as the file holds them


def _model_file(ultralytics, tmp_path_factory, name: str, cfg, names: tuple[str, ...], **build):
    """(the file ``name``, the model as it holds it): :func:`_build`'s model saved as ultralytics saves one."""
    path = tmp_path_factory.mktemp("adetailer") / name
    return path, _save(_build(ultralytics, cfg, names, **build), path)


def _fused(reference):
    """The model as ultralytics' predictor runs it: batch norms folded into the convolutions."""
    return copy.deepcopy(reference).fuse(verbose=False).eval()


@pytest.fixture(scope="module")
def detector(ultralytics, tmp_path_factory):
    return _model_file(ultralytics, tmp_path_factory, "hand_yolov8n.pt", "yolov8n.yaml", ("hand", "glove"), seed=3)


@pytest.fixture(scope="module")
def v9_detector(ultralytics, tmp_path_factory):
    """YOLOv9c's layers (RepNCSPELAN4, RepCSP, RepConv, ADown, SPPELAN) at an eighth of its width."""
    from ultralytics.nn.tasks import yaml_model_load

    cfg = {**yaml_model_load("yolov9c.yaml"), "width_multiple": 0.125, "depth_multiple": 0.34}
    return _model_file(ultralytics, tmp_path_factory, "face_yolov9c.pt", cfg, ("face",), seed=5)


@pytest.fixture(scope="module")
def v11_detector(ultralytics, tmp_path_factory):
    """YOLO11n (C3k2, C3k, C2PSA's attention, the depthwise class branch)."""
    return _model_file(ultralytics, tmp_path_factory, "face_yolo11n.pt", "yolo11n.yaml", ("face", "mask"), seed=6)


@pytest.fixture(scope="module")
def v26_detector(ultralytics, tmp_path_factory):
    """YOLO26n as ultralytics builds it: no distance bins, its one-to-many branches with suppression."""
    return _model_file(ultralytics, tmp_path_factory, "hand_yolo26n.pt", "yolo26n.yaml", ("hand",), seed=7)


@pytest.fixture(scope="module")
def v26_segmenter(ultralytics, tmp_path_factory):
    """YOLO26n-seg in end-to-end mode: its one-to-one branches, no suppression, prototypes from every level."""
    return _model_file(ultralytics, tmp_path_factory, "person_yolo26n-seg.pt", "yolo26n-seg.yaml", ("person", "dog"), seed=8, end2end=True)


@pytest.fixture(scope="module")
def world_detector(ultralytics, tmp_path_factory):
    """YOLOv8-Worldv2 (C2fAttn's text-guided attention, WorldDetect's contrastive heads) with the text
    embeddings of three classes, as ultralytics saves a world model after ``set_classes``."""
    return _model_file(ultralytics, tmp_path_factory, "yolov8n-worldv2.pt", "yolov8n-worldv2.yaml", ("person", "cat", "dog"), seed=9)


@pytest.fixture(scope="module")
def segmenter(ultralytics, tmp_path_factory):
    return _model_file(ultralytics, tmp_path_factory, "person_yolov8n-seg.pt", "yolov8n-seg.yaml", ("person",), seed=4)


def _xyxy(xywh: torch.Tensor) -> torch.Tensor:
    return torch.cat((xywh[..., :2] - xywh[..., 2:] / 2, xywh[..., :2] + xywh[..., 2:] / 2), -1)


def _xywh(xyxy: torch.Tensor) -> torch.Tensor:
    return torch.cat(((xyxy[..., :2] + xyxy[..., 2:]) / 2, xyxy[..., 2:] - xyxy[..., :2]), -1)


@pytest.mark.parametrize("which", ["detector", "segmenter", "v9_detector", "v11_detector", "v26_detector",
                                   "v26_segmenter", "world_detector"])
def test_the_network_gives_ultralytics_outputs(which, request):
    """Rebuilt in float64 (where folding batch norms changes nothing that shows) the outputs are ultralytics'
    own, run in float64 (an end-to-end head's: its one-to-one branches decoded); the float32 model's boxes
    stay within a pixel of them."""
    path, reference = request.getfixturevalue(which)
    ours = load_yolo(path, torch.float64)
    segments = "segmenter" in which
    assert ours.names == reference.names and ours.stride == 32 and ours.segments == segments
    assert ours.image_size == 640
    x = torch.rand(2, 3, 128, 160, generator=torch.Generator().manual_seed(0))
    twin = copy.deepcopy(reference).double()
    with torch.no_grad():
        boxes32 = load_yolo(path)(x).boxes
        theirs, out = twin(x.double()), ours(x.double())
    decoded, protos = (theirs[0][0], theirs[0][1]) if segments else (theirs[0], None)
    assert out.end2end == reference.end2end
    if reference.end2end:  # the forward pass gives its chosen rows; the decoded anchors come from the raw ones
        with torch.no_grad():
            decoded = twin.model[-1]._inference(theirs[1]["one2one"])
        decoded = torch.cat((_xywh(decoded[:, :4].transpose(1, 2)).transpose(1, 2), decoded[:, 4:]), 1)
    nc = len(reference.names)
    for b in range(2):
        torch.testing.assert_close(out.boxes[b], _xyxy(decoded[b, :4].T), rtol=1e-9, atol=1e-7)
        torch.testing.assert_close(out.scores[b], decoded[b, 4:4 + nc].T, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(boxes32[b], out.boxes[b].float(), rtol=0, atol=1.0)
    if protos is not None:
        torch.testing.assert_close(out.coefficients, decoded[:, 4 + nc:].transpose(1, 2), rtol=1e-9, atol=1e-8)
        torch.testing.assert_close(out.protos, protos, rtol=1e-9, atol=1e-8)


def _ultralytics_predict(ultralytics, reference, picture: Image.Image, count: int = 40):
    """ultralytics' predictor for a PIL picture, step by step: BGR array, letterbox (auto), RGB, /255, the model,
    NMS at IoU 0.7 (an end-to-end model: its rows above the confidence), boxes scaled back; a segmentation
    model's masks at the letterboxed size. The confidence is chosen so that ``count`` anchors (pairs) pass it
    (random weights score each picture differently)."""
    bgr = np.asarray(picture)[:, :, ::-1]
    x = _letterboxed(ultralytics, picture)
    with torch.no_grad():
        out = reference(x)
    segments = isinstance(out[0], tuple)
    preds, protos = (out[0][0], out[0][1]) if segments else (out[0], None)
    if reference.end2end:  # rows x1 y1 x2 y2 score class (mask coefficients), best first
        best = preds[0, :, 4]
    else:
        best = preds[0, 4:4 + len(reference.names)].amax(0).sort(descending=True).values
    confidence = float(best[count - 1] + best[count]) / 2
    found = ultralytics.non_max_suppression(preds, confidence, 0.7, max_det=300, nc=len(reference.names),
                                            end2end=reference.end2end)[0]
    masks = None
    if segments and len(found):
        masks = ultralytics.ops.process_mask(protos[0], found[:, 6:], found[:, :4], x.shape[2:], upsample=True)
    boxes = ultralytics.ops.scale_boxes(x.shape[2:], found[:, :4].clone(), bgr.shape)
    return found, boxes, masks, x.shape[2:], confidence


def _assert_same_finds(ours, theirs):
    """Each of ours is one of theirs (score, label, box): the same finds, those of nearly equal scores
    perhaps in another order. Scores within 1e-4 and boxes within 0.02 pixel (float32: each side folds its
    batch norms its own way)."""
    left = list(theirs)
    for mine in ours:
        match = next((want for want in left if want[1] == mine.label and abs(want[0] - mine.score) <= 1e-4
                      and np.allclose(mine.box, want[2], atol=0.02)), None)
        assert match is not None, (mine, sorted(left, key=lambda w: abs(w[0] - mine.score))[:2])
        left.remove(match)
    assert not left


@pytest.mark.parametrize("which, picture", [("detector", p) for p in PICTURES] + [
    ("v11_detector", PICTURES[1]), ("v26_detector", PICTURES[0]), ("world_detector", PICTURES[2])],
    ids=["wide", "tall", "square", "yolo11", "yolo26", "world"])
def test_detections_are_ultralytics_predictions(ultralytics, which, picture, request):
    path, reference = request.getfixturevalue(which)
    found, boxes, _, _, confidence = _ultralytics_predict(ultralytics, _fused(reference), picture)
    ours = detect(load_yolo(path), picture, confidence, size=IMAGE_SIZE)
    assert len(found) >= 10 and len(ours) == len(found)
    theirs = [(float(s), reference.names[int(c)], tuple(b)) for s, c, b in zip(found[:, 4], found[:, 5], boxes.tolist())]
    assert [d.score for d in ours] == sorted((d.score for d in ours), reverse=True)
    assert all(d.mask is None for d in ours)
    _assert_same_finds(ours, theirs)
    assert len(detect(load_yolo(path), picture, 0.9999, size=IMAGE_SIZE)) == 0


@pytest.mark.parametrize("which", ["segmenter", "v26_segmenter"])
def test_segmentation_masks_are_ultralytics_masks_without_the_padding(ultralytics, which, request):
    """Also an end-to-end YOLO26 head: its best (anchor, class) pairs above the confidence, unsuppressed."""
    path, reference = request.getfixturevalue(which)
    picture = PICTURES[0]
    found, boxes, masks, shape, confidence = _ultralytics_predict(ultralytics, _fused(reference), picture, 20)
    keep = masks.flatten(1).amax(1) > 0
    ours = detect(load_yolo(path), picture, confidence, size=IMAGE_SIZE)
    assert int(keep.sum()) >= 1 and len(ours) == int(keep.sum())
    assert [d.label for d in ours] == [reference.names[int(c)] for c in found[keep, 5]]
    np.testing.assert_allclose([d.box for d in ours], boxes[keep].numpy(), atol=2e-3)
    # ultralytics' masks are at the letterboxed size: cut the padding off, scale to the picture (Pillow's filter)
    gain = min(shape[0] / 200, shape[1] / 300)
    new_w, new_h = round(300 * gain), round(200 * gain)
    left, top = round((shape[1] - new_w) / 2 - 0.1), round((shape[0] - new_h) / 2 - 0.1)
    for detection, mask in zip(ours, masks[keep].numpy()):
        cut = Image.fromarray(mask[top:top + new_h, left:left + new_w].astype(np.uint8) * 255, "L")
        want = np.asarray(cut.resize((300, 200), Image.Resampling.BILINEAR)) > 127
        assert detection.mask.shape == (200, 300) and detection.mask.any()
        # the same but for pixels whose logit is within rounding of 0 (each side folds its batch norms itself)
        assert (detection.mask != want).sum() <= max(4, 0.002 * want.sum()), (detection.mask != want).sum()


class _Runs:
    """A pickled object that asks the unpickler to call ``exec`` with code that writes a file."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return exec, (f"open({self.target!r}, 'w').write('ran')",)


class _System:
    def __reduce__(self):
        import os

        return os.system, ("echo ran",)


def test_files_never_run_code(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"model": _Runs(marker)}, tmp_path / "exec.pt")
    with pytest.raises(ModelError, match="not an ultralytics YOLO detection or segmentation model"):
        load_yolo(tmp_path / "exec.pt")
    assert not marker.exists()
    torch.save({"model": _System()}, tmp_path / "system.pt")
    with pytest.raises(UnsafeModelFile):
        load_yolo(tmp_path / "system.pt")
    (tmp_path / "plain.pt").write_bytes(pickle.dumps({"model": 1}))
    with pytest.raises(ModelError):
        load_yolo(tmp_path / "plain.pt")
    (tmp_path / "text.pt").write_text("not a model")
    with pytest.raises(ModelError, match="text.pt"):
        load_yolo(tmp_path / "text.pt")


def test_other_architectures_are_refused_naming_the_layer(ultralytics, tmp_path):
    torch.manual_seed(0)
    model = ultralytics.tasks.DetectionModel("yolov10n.yaml", nc=1, verbose=False).eval()
    torch.save({"model": model.half()}, tmp_path / "face_yolov10n.pt")
    with pytest.raises(ModelError, match="face_yolov10n.pt: a YOLO model ending in v10Detect"):
        load_yolo(tmp_path / "face_yolov10n.pt")


def test_a_world_model_looks_for_the_classes_asked(ultralytics, world_detector):
    """ADetailer's ``ad_model_classes`` on a YOLO-World model: the classes asked, in that order, as
    ultralytics' ``set_classes`` leaves the model (their text embeddings, the head's class count), each
    from the embeddings the file holds; a class it holds none for is refused naming it."""
    path, reference = world_detector
    twin = _fused(reference)
    twin.txt_feats = reference.txt_feats[:, [2, 0]].clone()
    twin.model[-1].nc = 2
    twin.names = {0: "dog", 1: "person"}
    found, boxes, _, _, confidence = _ultralytics_predict(ultralytics, twin, PICTURES[0])
    model = load_yolo(path)
    ours = detect(model, PICTURES[0], confidence, size=IMAGE_SIZE, classes=model.classes(["dog", "person"]))
    assert len(ours) == len(found) >= 10
    theirs = [(float(s), twin.names[int(c)], tuple(b)) for s, c, b in zip(found[:, 4], found[:, 5], boxes.tolist())]
    _assert_same_finds(ours, theirs)
    assert {d.label for d in ours} <= {"dog", "person"}
    with pytest.raises(ModelError, match="yolov8n-worldv2.pt: no text embeddings for 'hand'.*person, cat, dog"):
        model.classes(["person", "hand"])


def test_a_tabs_classes_reach_a_world_model_and_unknown_ones_are_refused_first(world_detector, tmp_path):
    """A tab's ``model_classes`` (ADetailer's ``ad_model_classes``) go to its YOLO-World model; names its
    file holds no text for are refused when the tab's model is set up, naming the setting."""
    import shutil

    from underpaint.errors import InvalidParameter
    from underpaint.models.registry import ModelsDir
    from underpaint.pipeline import detailer

    path, _ = world_detector
    (tmp_path / "adetailer").mkdir()
    shutil.copy(path, tmp_path / "adetailer" / path.name)
    folder = ModelsDir(tmp_path)
    find = detailer.finder(folder, "cpu", path.name, field="detailer[0].model", classes=" dog ,, ")
    assert {d.label for d in find(PICTURES[0], 0.05)} == {"dog"}
    assert {d.label for d in detailer.finder(folder, "cpu", path.name)(PICTURES[0], 0.05)} > {"dog"}
    with pytest.raises(InvalidParameter) as err:
        detailer.finder(folder, "cpu", path.name, field="detailer[0].model", classes="dog, hand")
    assert err.value.field == "detailer[0].model_classes" and "'hand'" in err.value.expected
    assert "underpaint download clip-vit-b32" in err.value.expected


def test_new_classes_come_from_clip_vit_b32s_text_encoder(ultralytics, world_detector, tmp_path):
    """Classes the file holds no embeddings for get CLIP ViT-B/32's normalised text features (as ultralytics'
    set_classes makes them), from the models folder's CLIP/; the finds equal ultralytics' world model given
    the same features. Interrogate CLIP leaves that model to YOLO-World (A1111 ranks with ViT-L/14)."""
    import shutil

    from tiny_models import write_clip

    from underpaint.models import interrogate
    from underpaint.models.registry import ModelsDir
    from underpaint.pipeline import detailer

    path, reference = world_detector
    (tmp_path / "adetailer").mkdir()
    shutil.copy(path, tmp_path / "adetailer" / path.name)
    write_clip(tmp_path / "CLIP" / "clip-vit-base-patch32.safetensors", projection_dim=512, patch_size=32,
               vision_layers=1, seed=2)
    folder = ModelsDir(tmp_path)
    detailer.finder(folder, "cpu", path.name, field="detailer[0].model", classes="zebra, dog")  # taken now
    zebra = interrogate.load_ranker(tmp_path / "CLIP" / "clip-vit-base-patch32.safetensors").text_features(["zebra"])
    assert torch.allclose(zebra.norm(dim=-1), torch.ones(1))
    twin = _fused(reference)
    twin.txt_feats = torch.cat([zebra[None].float(), reference.txt_feats[:, [2]].float()], 1)
    twin.model[-1].nc = 2
    twin.names = {0: "zebra", 1: "dog"}
    found, boxes, _, _, confidence = _ultralytics_predict(ultralytics, twin, PICTURES[2])
    model = load_yolo(path)
    ours = detect(model, PICTURES[2], confidence, size=IMAGE_SIZE,
                  classes=model.classes(["zebra", "dog"], detailer.world_text_encoder(folder, "cpu")))
    assert len(ours) == len(found) >= 10 and {d.label for d in ours} <= {"zebra", "dog"}
    _assert_same_finds(ours, [(float(s), twin.names[int(c)], tuple(b))
                              for s, c, b in zip(found[:, 4], found[:, 5], boxes.tolist())])
    (tmp_path / "BLIP" / "blip").mkdir(parents=True)
    (tmp_path / "BLIP" / "blip" / "config.json").write_text("{}")
    assert interrogate.interrogate_files(folder).clip is None  # Interrogate CLIP does not rank with ViT-B/32


def test_a_fused_end_to_end_head_runs_its_one_to_one_branches(v26_segmenter, tmp_path):
    """A file whose head was saved with only its one-to-one branches (ultralytics' fusing drops the others)
    gives the end-to-end file's outputs; the same file in one-to-many mode gives other scores."""
    path, reference = v26_segmenter
    head_only = copy.deepcopy(reference)
    head_only.model[-1].cv2 = head_only.model[-1].cv3 = head_only.model[-1].cv4 = None
    head_only.model[-1]._end2end = False
    _save(head_only, tmp_path / "fused.pt")
    many = copy.deepcopy(reference)
    many.end2end = False
    _save(many, tmp_path / "many.pt")
    x = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, fused, other = (load_yolo(p, torch.float64)(x.double()) for p in (path, tmp_path / "fused.pt",
                                                                                 tmp_path / "many.pt"))
    assert fused.end2end and not other.end2end
    torch.testing.assert_close(fused.scores, want.scores, rtol=0, atol=0)
    torch.testing.assert_close(fused.coefficients, want.coefficients, rtol=0, atol=0)
    assert (other.scores - want.scores).abs().max() > 0.01


def test_an_attention_layer_over_too_many_positions_is_refused(v11_detector, tmp_path):
    """YOLO11's attention holds heads × positions² scores at once; a file that puts it where that is gigabytes
    is refused naming the file, both when it is read and when a picture would make it so."""
    from underpaint.models import yolo

    path, reference = v11_detector
    model = load_yolo(path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(yolo, "_MAX_ATTENTION", 4 ** 2)  # the 64x64 check picture's 2x2 positions pass, no more
        with pytest.raises(ModelError, match="face_yolo11n.pt: an attention layer over 7x10 positions \(2 heads\)"):
            detect(model, PICTURES[0], 0.5, size=IMAGE_SIZE)
        patch.setattr(yolo, "_MAX_ATTENTION", 1)
        with pytest.raises(ModelError, match="face_yolo11n.pt: an attention layer over 2x2 positions"):
            load_yolo(path)


# --------------------------------------------------------------------------- in ADetailer's tabs


@pytest.fixture(scope="module")
def detailing(segmenter, sd1_file, tmp_path_factory):
    """An engine whose models folder's adetailer/ holds the segmentation model."""
    import shutil

    from underpaint.models.loader import load_model
    from underpaint.models.registry import ModelsDir
    from underpaint.pipeline.engine import Engine

    root = tmp_path_factory.mktemp("models")
    (root / "adetailer").mkdir()
    shutil.copy(segmenter[0], root / "adetailer" / "person_yolov8n-seg.pt")
    return Engine(load_model(sd1_file), models_dir=ModelsDir(root)), root / "adetailer" / "person_yolov8n-seg.pt"


def test_a_tab_naming_a_file_in_adetailer_inpaints_what_it_finds(detailing):
    """A tab whose model is a file in the models folder's adetailer/ inpaints that model's finds, each its own
    request with its mask (a segmentation model's own shape); the same request by hand gives the same picture."""
    from underpaint.params import DetailerUnit, GenerationParams, InpaintOptions
    from underpaint.pipeline import detailer

    engine, path = detailing
    base = dict(prompt="a person", steps=2, sampler="Euler", rng="cpu", width=64, height=64, seed=8, subseed=3)
    unit = DetailerUnit(model="person_yolov8n-seg.pt", mask_k=2, dilate_erode=0, denoising_strength=0.5)
    result = engine.generate(GenerationParams(**base, detailer=(unit,)))
    picture = engine.generate(GenerationParams(**base)).images[0]
    found = detect(load_yolo(path), picture, unit.confidence)
    masks = detailer.masks(found, picture.size, unit)
    assert len(masks) == 2 and any(d.mask is not None for d in found)
    for j, mask in enumerate(masks):
        picture = engine.generate(GenerationParams(**{**base, "seed": 8 + j, "subseed": 3 + j}, init_images=(picture,),
                                                   mask=mask, strength=0.5, inpaint=InpaintOptions(full_res=True))
                                  ).images[0]
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(picture))
    assert "ADetailer model: person_yolov8n-seg.pt" in result.infotexts[0]
    assert detailer.yolo_files(engine.model.models_dir) == ["person_yolov8n-seg.pt"]


def test_a_tab_naming_a_missing_file_is_refused_with_the_folder(detailing):
    from underpaint.errors import InvalidParameter
    from underpaint.params import DetailerUnit, GenerationParams

    engine, path = detailing
    with pytest.raises(InvalidParameter) as err:
        engine.generate(GenerationParams(prompt="x", steps=1, width=64, height=64,
                                         detailer=(DetailerUnit(model="hand_yolov8n.pt"),)))
    assert err.value.field == "detailer[0].model"
    assert str(path.parent) in err.value.expected and "person_yolov8n-seg.pt" in err.value.expected


def test_the_api_lists_the_files_and_runs_a_tab_with_one(segmenter, sd1_file, tmp_path_factory, detailing):
    import json
    import shutil

    from test_server_support import decode_b64, real_api, tiny_models_dir

    from underpaint.params import DetailerUnit, GenerationParams

    root = tiny_models_dir(tmp_path_factory.mktemp("api-models"), sd1_file)
    (root / "adetailer").mkdir()
    shutil.copy(segmenter[0], root / "adetailer" / "person_yolov8n-seg.pt")
    base = dict(prompt="a person", steps=2, width=64, height=64, seed=8, subseed=3)
    with real_api(root) as api:
        models = api.get("/adetailer/v1/ad_model").json()["ad_model"]
        assert models[:3] == ["None", "person_yolov8n-seg.pt", "face_yolov8n.pt"]
        tab = {"ad_model": "person_yolov8n-seg.pt", "ad_mask_k_largest": 1, "ad_denoising_strength": 0.5}
        r = api.post("/sdapi/v1/txt2img", json={**base, "sampler_name": "Euler", "override_settings": {"randn_source": "CPU"},
                                                "alwayson_scripts": {"ADetailer": {"args": [True, False, tab]}}})
        assert r.status_code == 200, r.text
        missing = api.post("/sdapi/v1/txt2img", json={**base, "alwayson_scripts": {"ADetailer": {"args": [
            True, False, {"ad_model": "hand_yolov8n.pt"}]}}})
        assert missing.status_code == 422 and "adetailer" in missing.json()["detail"]
        assert str(root) not in missing.text and str(root.resolve()) not in missing.text  # no server paths
    assert "ADetailer model: person_yolov8n-seg.pt" in json.loads(r.json()["info"])["infotexts"][0]
    engine, _ = detailing
    want = engine.generate(GenerationParams(**base, sampler="Euler", rng="cpu", detailer=(
        DetailerUnit(model="person_yolov8n-seg.pt", mask_k=1, denoising_strength=0.5),)))
    assert np.array_equal(np.asarray(decode_b64(r.json()["images"][0]).convert("RGB")), np.asarray(want.images[0]))


def test_files_as_ultralytics_reads_them(ultralytics, detector, tmp_path):
    """The EMA weights where a file holds them (as ultralytics takes them), and the size it was trained at,
    from a dict or ultralytics' own namespace object."""
    from ultralytics.utils import IterableSimpleNamespace

    path, reference = detector
    other = copy.deepcopy(reference)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.9)
    torch.save({"model": copy.deepcopy(reference).half(), "ema": copy.deepcopy(other).half(),
                "train_args": IterableSimpleNamespace(imgsz=1024, task="detect")}, tmp_path / "both.pt")
    ours = load_yolo(tmp_path / "both.pt", torch.float64)
    assert ours.image_size == 1024
    x = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = _xyxy(copy.deepcopy(other).half().double()(x.double())[0][0, :4].T)  # as the file holds them
        torch.testing.assert_close(ours(x.double()).boxes[0], want, rtol=1e-9, atol=1e-7)


def _tampered(reference, path, change):
    model = copy.deepcopy(reference).half()
    change(model)
    torch.save({"model": model, "train_args": {"imgsz": 640}}, path)
    return path


@pytest.mark.parametrize("change, words", [
    (lambda m: setattr(m.model[9], "n", 10**7), "SPPF layer of 10000000 pools"),  # hangs a detection
    (lambda m: setattr(m.model[10], "scale_factor", 200.0), "upsampling by 200"),  # 16 GB at detection
    (lambda m: setattr(m.model[0].conv, "weight", torch.nn.Parameter(
        torch.zeros(1, 1, 1, 1, dtype=torch.half).expand(4000, 4000, 1, 1))),
     "repeats, its data"),  # two bytes in the file, 32 MB as a weight
    (lambda m: m.model[2].m._modules.__setitem__("again", m.model[2].m), "nested more than"),  # a cycle
    (lambda m: setattr(m, "stride", torch.tensor([0.0])), "stride"),
    (lambda m: setattr(m.model[-1], "reg_max", 10**6), "distance bins"),
    (lambda m: setattr(m, "names", {"x": 1}), "rebuild"),
])
def test_crafted_files_are_refused_not_run(detector, tmp_path, change, words):
    path = _tampered(detector[1], tmp_path / "crafted.pt", change)
    with pytest.raises(ModelError, match=words):
        load_yolo(path)


def test_compressed_or_oversized_data_and_other_loads_are_untouched(detector, tmp_path):
    """Tensor data must be stored as PyTorch stores it (a compressed entry could hold a thousand times its
    size); reading a YOLO file leaves PyTorch's own allowlists as they were."""
    import zipfile

    path, _ = detector
    squeezed = tmp_path / "squeezed.pt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(squeezed, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            target.writestr(info.filename, source.read(info))
    with pytest.raises(ModelError, match="compressed"):
        load_yolo(squeezed)
    before = list(torch.serialization.get_safe_globals())
    load_yolo(path)
    assert list(torch.serialization.get_safe_globals()) == before
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        torch.load(path, weights_only=True)  # PyTorch still refuses the file's classes on its own
