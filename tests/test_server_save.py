"""``save_images``: pictures kept on the server in A1111's layout, only under ``--outdir``.

A1111 1.10 (modules/images.py, shared_options.py, api/api.py) saves an API job's pictures when
``save_images`` is true into ``outputs/txt2img-images`` or ``outputs/img2img-images``, a subfolder
per day named by the ISO date, as ``<5-digit number>-<seed>.png`` with the infotext in the PNG's
``parameters`` chunk, the number one more than the highest number that starts a name there.
PNG text is read back with Pillow; files are compared with what the response returned.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from test_server_support import FakeBackend, FakeEngine, decode_b64, make_models_dir, png_b64
from underpaint.errors import InvalidParameter
from underpaint.server.app import create_app
from underpaint.server.config import ServerConfig
from underpaint.server.saving import PATH_OPTIONS

NAME = re.compile(r"^(\d{5}-\d+|grid-\d{4})\.png$")
SMALL = {"steps": 2, "width": 64, "height": 64}


def _client(tmp_path, outdir, backend=None, **config):
    models = tmp_path / "models"
    if not models.exists():
        make_models_dir(models)
    app = create_app(ServerConfig(models_dir=models, preload=False, outdir=outdir, **config),
                     loader=backend or FakeBackend())
    return TestClient(app, base_url="http://127.0.0.1")


def _today_folder(root, kind: str):
    """The one dated folder under ``root/kind``, checked against the date around the request."""
    folders = list((root / kind).iterdir())
    assert len(folders) == 1, folders
    today = datetime.date.today()
    assert folders[0].name in {today.isoformat(), (today - datetime.timedelta(days=1)).isoformat()}
    return folders[0]


def _files(root) -> set:
    return {p for p in root.rglob("*") if p.is_file()}


def test_saved_files_have_a1111_names_and_infotext(tmp_path, photo):
    outdir = tmp_path / "out"
    with _client(tmp_path, outdir) as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a red barn", "negative_prompt": "fog", "seed": 100,
                                              "batch_size": 2, "save_images": True, **SMALL})
        assert r.status_code == 200, r.text
        body = r.json()
        info = json.loads(body["info"])
        assert "save_error" not in info
        folder = _today_folder(outdir, "txt2img-images")
        assert sorted(p.name for p in folder.iterdir()) == ["00000-100.png", "00001-101.png"]
        # A1111 with save_images: the batch's grid first (saved with the grids), then the pictures.
        assert info["index_of_first_image"] == 1 and len(body["images"]) == len(info["infotexts"]) == 3
        for i, name in enumerate(["00000-100.png", "00001-101.png"], start=1):
            saved = Image.open(folder / name)
            assert saved.format == "PNG"
            assert saved.text["parameters"] == info["infotexts"][i]
            returned = decode_b64(body["images"][i])
            assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(returned.convert("RGB")))
        grid = Image.open(_today_folder(outdir, "txt2img-grids") / "grid-0000.png")
        assert grid.size == (128, 64) and grid.text["parameters"] == info["infotexts"][0] == info["infotexts"][1]
        pictures = [np.asarray(decode_b64(b).convert("RGB")) for b in body["images"]]
        assert np.array_equal(pictures[0], np.concatenate(pictures[1:], axis=1))
        assert np.array_equal(np.asarray(grid.convert("RGB")), pictures[0])

        r = c.post("/sdapi/v1/img2img", json={"init_images": [png_b64(photo.resize((64, 64)))], "seed": 7,
                                              "save_images": True, **SMALL})
        assert r.status_code == 200, r.text
        folder = _today_folder(outdir, "img2img-images")
        assert [p.name for p in folder.iterdir()] == ["00000-7.png"]
        assert Image.open(folder / "00000-7.png").text["parameters"] == json.loads(r.json()["info"])["infotexts"][0]
    assert all(NAME.match(p.name) for p in _files(outdir))


def test_numbering_continues_across_requests_and_after_a_restart(tmp_path):
    outdir = tmp_path / "out"
    job = {"prompt": "x", "save_images": True, **SMALL}
    with _client(tmp_path, outdir) as c:
        assert c.post("/sdapi/v1/txt2img", json={**job, "seed": 5}).status_code == 200
        assert c.post("/sdapi/v1/txt2img", json={**job, "seed": 5, "n_iter": 2}).status_code == 200
    folder = _today_folder(outdir, "txt2img-images")
    assert sorted(p.name for p in folder.iterdir()) == ["00000-5.png", "00001-5.png", "00002-6.png"]
    # Files of other tools count by their leading number (A1111's get_next_sequence_number); others not.
    (folder / "00041-from-the-ui.png").write_bytes(b"x")
    (folder / "notes.txt").write_text("hello")
    with _client(tmp_path, outdir) as c:  # a new server on the same folder
        assert c.post("/sdapi/v1/txt2img", json={**job, "seed": 9}).status_code == 200
    assert (folder / "00042-9.png").is_file()


def test_an_existing_file_is_never_overwritten(tmp_path, monkeypatch):
    """Another writer takes the next name after the folder was listed: the number moves on."""
    import underpaint.imageio.metadata as metadata

    outdir = tmp_path / "out"
    folder = outdir / "txt2img-images" / datetime.date.today().isoformat()
    folder.mkdir(parents=True)
    monkeypatch.setattr(metadata, "next_sequence_number", lambda directory: 3)  # a stale listing
    taken = {folder / "00003-50.png": b"someone else's picture", folder / "00004-51.png": b"and another"}
    for path, data in taken.items():
        path.write_bytes(data)
    with _client(tmp_path, outdir) as c:
        r = c.post("/sdapi/v1/txt2img", json={"seed": 50, "batch_size": 2, "save_images": True, **SMALL})
        assert r.status_code == 200, r.text
    for path, data in taken.items():
        assert path.read_bytes() == data
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["00003-50.png", "00004-50.png", "00004-51.png", "00005-51.png"]
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_save_images_false_writes_nothing(tmp_path, photo):
    outdir = tmp_path / "out"
    with _client(tmp_path, outdir) as c:
        assert c.post("/sdapi/v1/txt2img", json={"prompt": "x", **SMALL}).status_code == 200
        assert c.post("/sdapi/v1/txt2img", json={"save_images": False, "do_not_save_samples": False,
                                                 **SMALL}).status_code == 200
        assert c.post("/sdapi/v1/img2img", json={"init_images": [png_b64(photo)], "save_images": False,
                                                 **SMALL}).status_code == 200
    assert not outdir.exists()


def test_options_show_the_folders_and_cannot_redirect_them(tmp_path):
    outdir = tmp_path / "out"
    elsewhere = tmp_path / "elsewhere"
    with _client(tmp_path, outdir) as c:
        options = c.get("/sdapi/v1/options").json()
        assert options["outdir_samples"] == ""
        assert options["outdir_txt2img_samples"] == str(outdir.absolute() / "txt2img-images")
        assert options["outdir_img2img_samples"] == str(outdir.absolute() / "img2img-images")
        for key in sorted(PATH_OPTIONS):
            r = c.post("/sdapi/v1/options", json={key: str(elsewhere), "CLIP_stop_at_last_layers": 2})
            assert r.status_code == 422, (key, r.text)
            assert r.json()["field"] == key
        assert c.get("/sdapi/v1/options").json() == options  # nothing changed, not even clip skip
        # Posting back what was read (a common client pattern) is fine.
        assert c.post("/sdapi/v1/options", json=options).status_code == 200
        # Nor per request.
        r = c.post("/sdapi/v1/txt2img", json={"save_images": True, **SMALL,
                                              "override_settings": {"outdir_txt2img_samples": str(elsewhere)}})
        assert r.status_code == 422 and r.json()["field"] == "override_settings.outdir_txt2img_samples"
        r = c.post("/sdapi/v1/txt2img", json={"save_images": True, "seed": 1, **SMALL})
        assert r.status_code == 200
    assert not elsewhere.exists()
    assert [p.name for p in _files(outdir)] == ["00000-1.png"]


HOSTILE = {
    "prompt": "../../../escaped [seed] /etc/passwd", "negative_prompt": "..\\..\\x", "seed": 3, "subseed": 4,
    "sampler_name": "Euler", "comments": {"path": "/tmp"}, "script_args": ["../x"],
    # Fields A1111 and its forks have used for paths: unknown here, so ignored.
    "outpath_samples": "../escaped", "outdir": "/tmp/escaped", "filename": "../escaped.png",
    "samples_filename_pattern": "../[prompt]", "do_not_save_samples": False, "save_images": True,
}


def test_no_request_field_can_put_a_file_outside_the_folder(tmp_path, monkeypatch, photo):
    monkeypatch.chdir(tmp_path)  # anything relative would land here, where it is seen
    outdir = tmp_path / "out"
    with _client(tmp_path, outdir) as c:
        before = _files(tmp_path)
        assert c.post("/sdapi/v1/txt2img", json={**HOSTILE, **SMALL, "force_task_id": ".."}).status_code == 200
        r = c.post("/sdapi/v1/img2img", json={**HOSTILE, **SMALL, "init_images": [png_b64(photo)]})
        assert r.status_code == 200, r.text
        for key in ("samples_filename_pattern", "directories_filename_pattern", "outdir_samples"):
            r = c.post("/sdapi/v1/txt2img", json={**HOSTILE, **SMALL, "override_settings": {key: "../../x"}})
            assert r.status_code == 422 and r.json()["field"] == f"override_settings.{key}"
        new = _files(tmp_path) - before
    assert len(new) == 2
    for path in new:
        assert path.parent.parent.parent == outdir.absolute(), path
        assert path.parent.parent.name in ("txt2img-images", "img2img-images") and NAME.match(path.name)


def test_a_failed_save_still_returns_the_pictures(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with _client(tmp_path, blocker / "out") as c, caplog.at_level(logging.WARNING, "underpaint.server"):
        r = c.post("/sdapi/v1/txt2img", json={"seed": 2, "batch_size": 2, "save_images": True, **SMALL})
    assert r.status_code == 200, r.text
    assert len(r.json()["images"]) == 3  # the grid, then the two pictures
    error = json.loads(r.json()["info"])["save_error"]
    assert error.startswith("saved 0 of 2 pictures in txt2img-images/") and "Not a directory" in error
    assert str(tmp_path) not in error  # the server's own paths stay in its log
    assert any("saved 0 of 2" in rec.getMessage() for rec in caplog.records)


def test_a_disk_that_fills_up_part_way(tmp_path, monkeypatch):
    import underpaint.imageio.metadata as metadata

    real = metadata.save_image
    calls = []

    def fill_up(image, path, **kwargs):
        calls.append(path)
        if len(calls) > 1:
            raise InvalidParameter("output", str(path), "a writable location (No space left on device)") \
                from OSError(errno.ENOSPC, "No space left on device")
        return real(image, path, **kwargs)

    monkeypatch.setattr(metadata, "save_image", fill_up)
    outdir = tmp_path / "out"
    with _client(tmp_path, outdir) as c:
        r = c.post("/sdapi/v1/txt2img", json={"seed": 20, "batch_size": 3, "save_images": True, **SMALL})
    assert r.status_code == 200 and len(r.json()["images"]) == 4
    error = json.loads(r.json()["info"])["save_error"]
    assert error.startswith("saved 1 of 3 pictures") and "No space left on device" in error
    assert [p.name for p in _files(outdir)] == ["00000-20.png"]


class _StopsBatch(FakeEngine):
    """Interrupts or skips itself at a step of one batch, as a client's /interrupt or /skip would."""

    def __init__(self, path, backend, *, stop: str, job: int, step: int = 1):
        super().__init__(path, backend)
        self.stop, self.job, self.step = stop, job, step

    def generate(self, params, *, progress=None, cancel=None):
        def report(p):
            if p.job == self.job and p.step == self.step:
                getattr(cancel, self.stop)()
            if progress is not None:
                progress(p)

        return super().generate(params, progress=report, cancel=cancel)


@pytest.mark.parametrize(("stop", "job", "saved"), [
    ("interrupt", 1, ["00000-30.png"]),  # the finished first batch only
    ("skip", 0, ["00000-31.png"]),  # the batch that ran whole only
])
def test_a_stopped_batch_is_returned_but_not_saved(tmp_path, stop, job, saved):
    """As A1111 with "save incomplete images" off: a batch an interrupt or a skip stopped part way."""
    backend = FakeBackend()
    outdir = tmp_path / "out"
    app = create_app(ServerConfig(models_dir=make_models_dir(tmp_path / "models"), preload=False, outdir=outdir),
                     loader=lambda path: _StopsBatch(path, backend, stop=stop, job=job))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        r = c.post("/sdapi/v1/txt2img", json={"seed": 30, "n_iter": 2, "steps": 3, "save_images": True, **SMALL})
    assert r.status_code == 200 and json.loads(r.json()["info"])["all_seeds"] == [30, 31]  # both returned
    assert [p.name for p in _files(outdir)] == saved


def test_outdir_defaults_beside_the_models_folder(tmp_path):
    models = make_models_dir(tmp_path / "home" / "models")
    assert ServerConfig(models_dir=models).resolved_outdir == (tmp_path / "home" / "outputs").absolute()
    # An A1111 install, given by its root or its models/ folder: the install's own outputs/.
    webui = tmp_path / "stable-diffusion-webui"
    (webui / "models" / "Stable-diffusion").mkdir(parents=True)
    assert ServerConfig(models_dir=webui).resolved_outdir == webui / "outputs"
    assert ServerConfig(models_dir=webui / "models").resolved_outdir == webui / "outputs"
    assert ServerConfig(models_dir=webui).resolved_styles_file == webui / "styles.csv"
    with pytest.raises(InvalidParameter) as exc:
        ServerConfig(models_dir=models, outdir=models / "checkpoints" / "alpha.safetensors")
    assert exc.value.field == "outdir"


def test_serve_flag_sets_the_folder(tmp_path):
    import argparse

    from underpaint.server.cli import add_serve_command, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_command(parser.add_subparsers())
    args = parser.parse_args(["serve", "--outdir", str(tmp_path / "pics")])
    assert config_from_args(args).resolved_outdir == tmp_path / "pics"


def test_real_engine_saves_what_it_returns(tmp_path, sd1_engine):
    outdir = tmp_path / "out"
    app = create_app(ServerConfig(models_dir=make_models_dir(tmp_path / "models"), preload=False, outdir=outdir),
                     loader=lambda path: sd1_engine)
    with TestClient(app, base_url="http://127.0.0.1") as c:
        r = c.post("/sdapi/v1/txt2img", json={"prompt": "a lighthouse", "seed": 11, "sampler_name": "Euler",
                                              "save_images": True, **SMALL})
    assert r.status_code == 200, r.text
    folder = _today_folder(outdir, "txt2img-images")
    saved = Image.open(folder / "00000-11.png")
    returned = decode_b64(r.json()["images"][0])
    assert saved.text["parameters"] == returned.info["parameters"] == json.loads(r.json()["info"])["infotexts"][0]
    assert saved.text["parameters"].startswith("a lighthouse\nSteps: 2, Sampler: Euler")
    assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(returned.convert("RGB")))


def test_batch_grids_as_a1111_lays_them_out(tmp_path):
    """round(√n) rows: 3 pictures in 2 x 2 (the last cell black), 5 in 2 rows of 3; grid numbers run on; a single
    picture and a request without save_images get none."""
    outdir = tmp_path / "out"
    with _client(tmp_path, outdir) as c:
        for count, size in ((3, (128, 128)), (5, (192, 128))):
            r = c.post("/sdapi/v1/txt2img", json={"seed": 1, "batch_size": count, "save_images": True, **SMALL})
            assert decode_b64(r.json()["images"][0]).size == size
        single = c.post("/sdapi/v1/txt2img", json={"seed": 1, "save_images": True, **SMALL}).json()
        unsaved = c.post("/sdapi/v1/txt2img", json={"seed": 1, "batch_size": 2, **SMALL}).json()
    assert len(single["images"]) == 1 and json.loads(single["info"])["index_of_first_image"] == 0
    assert len(unsaved["images"]) == 2 and json.loads(unsaved["info"])["index_of_first_image"] == 0
    assert sorted(p.name for p in _today_folder(outdir, "txt2img-grids").iterdir()) == ["grid-0000.png",
                                                                                        "grid-0001.png"]


def test_grid_settings_choose_returning_and_saving(tmp_path):
    """A1111's "Show grid in gallery" (return_grid) and "Always save all generated image grids" (grid_save), as
    settings and per request in override_settings."""
    outdir = tmp_path / "out"
    job = {"seed": 3, "batch_size": 2, "save_images": True, **SMALL}

    def grids():
        folder = outdir / "txt2img-grids"
        return sorted(p.name for p in folder.rglob("*.png")) if folder.exists() else []

    with _client(tmp_path, outdir) as c:
        assert c.post("/sdapi/v1/options", json={"return_grid": False}).status_code == 200
        assert c.get("/sdapi/v1/options").json()["return_grid"] is False
        body = c.post("/sdapi/v1/txt2img", json=job).json()
        assert len(body["images"]) == 2 and json.loads(body["info"])["index_of_first_image"] == 0
        assert grids() == ["grid-0000.png"]  # saved all the same
        body = c.post("/sdapi/v1/txt2img", json={**job, "override_settings": {"return_grid": True,
                                                                             "grid_save": False}}).json()
        assert len(body["images"]) == 3 and grids() == ["grid-0000.png"]  # returned, not saved
        r = c.post("/sdapi/v1/txt2img", json={**job, "override_settings": {"grid_save": "yes"}})
        assert r.status_code == 422 and r.json()["field"] == "override_settings.grid_save"


def test_saved_files_take_the_file_format_setting(tmp_path):
    """A1111's "File format for images": a request's override (A1111 saves while it is set) or /options'
    samples_format names the files' type, their infotext in an EXIF UserComment; the running number goes on
    across types, and the grids follow."""
    from underpaint.imageio.metadata import read_metadata

    outdir = tmp_path / "out"
    job = {"seed": 100, "batch_size": 2, "save_images": True, **SMALL}
    with _client(tmp_path, outdir) as c:
        r = c.post("/sdapi/v1/txt2img", json={**job, "override_settings": {"samples_format": "jpg",
                                                                           "jpeg_quality": 95}})
        assert r.status_code == 200, r.text
        texts = json.loads(r.json()["info"])["infotexts"]
        assert c.post("/sdapi/v1/options", json={"samples_format": "webp"}).status_code == 200
        assert c.post("/sdapi/v1/txt2img", json={**job, "seed": 7}).status_code == 200
    folder = _today_folder(outdir, "txt2img-images")
    assert sorted(p.name for p in folder.iterdir()) == ["00000-100.jpg", "00001-101.jpg", "00002-7.webp",
                                                        "00003-8.webp"]
    assert Image.open(folder / "00000-100.jpg").format == "JPEG"
    assert read_metadata(folder / "00001-101.jpg").infotext == texts[2]
    assert Image.open(folder / "00002-7.webp").format == "WEBP"
    assert sorted(p.name for p in _today_folder(outdir, "txt2img-grids").iterdir()) == ["grid-0000.jpg",
                                                                                        "grid-0001.webp"]
