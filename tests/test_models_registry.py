"""The models folder (own and A1111 layouts), A1111 hashes with their cache, and the offline download path."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import struct
from pathlib import Path

import pytest

from underpaint.errors import DownloadError, ModelNotFound, UnknownName
from underpaint.models import hashes
from underpaint.models.download import KNOWN_MODELS, download, known_model
from underpaint.models.registry import ModelsDir, default_models_dir


def _touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hash-cache.json"


# --- hashes ------------------------------------------------------------------------------------------


def test_model_hash_is_sha256_prefix(sd1_file, cache):
    data = sd1_file.read_bytes()
    assert hashes.file_sha256(sd1_file, cache=cache) == hashlib.sha256(data).hexdigest()
    assert hashes.model_hash(sd1_file, cache=cache) == hashlib.sha256(data).hexdigest()[:10]


def test_addnet_hash_covers_the_body_only(sd1_file, tmp_path, cache):
    data = sd1_file.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert hashes.addnet_hash(sd1_file, cache=cache) == hashlib.sha256(data[8 + n:]).hexdigest()[:12]
    # The same tensors with different metadata: same addnet hash, different model hash.
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other.safetensors"
    save_file(load_file(str(sd1_file)), str(other), metadata={"ss_output_name": "x"})
    assert hashes.addnet_hash(other, cache=cache) == hashes.addnet_hash(sd1_file, cache=cache)
    assert hashes.model_hash(other, cache=cache) != hashes.model_hash(sd1_file, cache=cache)


def test_hash_cache_is_used_until_size_or_mtime_change(tmp_path, cache):
    path = _touch(tmp_path / "m.safetensors", b"A" * 4096)
    first = hashes.model_hash(path, cache=cache)
    assert first == hashlib.sha256(b"A" * 4096).hexdigest()[:10]
    assert hashes.cached_model_hash(path, cache=cache) == first
    st = path.stat()
    path.write_bytes(b"B" * 4096)  # same size; put the old mtime back: the cache must answer
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert hashes.model_hash(path, cache=cache) == first
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert hashes.cached_model_hash(path, cache=cache) is None
    assert hashes.model_hash(path, cache=cache) == hashlib.sha256(b"B" * 4096).hexdigest()[:10]


def test_hash_reads_the_file_once(tmp_path, cache, monkeypatch):
    path = _touch(tmp_path / "m.ckpt", b"C" * 100)
    calls = []
    real = hashes.sha256_of
    monkeypatch.setattr(hashes, "sha256_of", lambda p, **kw: calls.append(p) or real(p, **kw))
    for _ in range(3):
        hashes.model_hash(path, cache=cache)
    assert len(calls) == 1


def test_default_hash_cache_location(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = _touch(tmp_path / "m.safetensors", b"D" * 10)
    hashes.model_hash(path)
    assert (tmp_path / "xdg" / "underpaint" / "hashes.json").is_file()


# --- models folder ----------------------------------------------------------------------------------


def test_default_models_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("UNDERPAINT_MODELS_DIR", str(tmp_path / "m"))
    assert default_models_dir() == tmp_path / "m"
    monkeypatch.delenv("UNDERPAINT_MODELS_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert default_models_dir() == tmp_path / "data" / "underpaint" / "models"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_models_dir() == tmp_path / "home" / ".local" / "share" / "underpaint" / "models"


@pytest.fixture
def own(tmp_path):
    root = tmp_path / "models"
    _touch(root / "checkpoints" / "v1-5-pruned-emaonly.safetensors", b"one")
    _touch(root / "checkpoints" / "sub" / "dreamy.ckpt", b"two")
    _touch(root / "checkpoints" / "notes.txt")
    _touch(root / "checkpoints" / "folder-model" / "model_index.json", b"{}")
    _touch(root / "checkpoints" / "folder-model" / "unet" / "diffusion_pytorch_model.safetensors")
    _touch(root / "vae" / "vae-ft-mse-840000-ema-pruned.safetensors")
    return ModelsDir(root)


def test_list_checkpoints(own, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    entries = own.list_checkpoints()
    assert [e.filename for e in entries] == ["folder-model", "sub/dreamy.ckpt", "v1-5-pruned-emaonly.safetensors"]
    assert [e.name for e in entries] == ["folder-model", "sub/dreamy", "v1-5-pruned-emaonly"]
    assert [e.title for e in entries] == [e.filename for e in entries]  # no hash known yet: none computed
    assert all(e.short_hash is None for e in entries)
    assert entries[1].model_name == "sub/dreamy"
    h = hashes.model_hash(entries[2].path)
    listed = own.list_checkpoints()[2]
    assert listed.title == f"v1-5-pruned-emaonly.safetensors [{h}]" and listed.short_hash == h
    assert [e.filename for e in own.list_vaes()] == ["vae-ft-mse-840000-ema-pruned.safetensors"]


def test_resolve_checkpoint_by_name_path_title_and_hash(own, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    ckpts = own.root / "checkpoints"
    target = ckpts / "v1-5-pruned-emaonly.safetensors"
    assert own.resolve_checkpoint("v1-5-pruned-emaonly.safetensors") == target
    assert own.resolve_checkpoint("v1-5-pruned-emaonly") == target
    assert own.resolve_checkpoint(str(target)) == target
    assert own.resolve_checkpoint("sub/dreamy") == ckpts / "sub" / "dreamy.ckpt"
    assert own.resolve_checkpoint("dreamy") == ckpts / "sub" / "dreamy.ckpt"
    assert own.resolve_checkpoint("folder-model") == ckpts / "folder-model"
    elsewhere = _touch(tmp_path / "elsewhere" / "x.safetensors")
    assert own.resolve_checkpoint(elsewhere) == elsewhere
    h = hashes.model_hash(target)
    assert own.resolve_checkpoint(f"v1-5-pruned-emaonly.safetensors [{h}]") == target
    assert own.resolve_checkpoint(h) == target


def test_unknown_checkpoint_lists_what_exists(own):
    with pytest.raises(ModelNotFound) as err:
        own.resolve_checkpoint("v1-5-pruned")
    msg = str(err.value)
    assert "'v1-5-pruned' not found" in msg and "v1-5-pruned-emaonly" in msg and "did you mean" in msg
    assert "sub/dreamy.ckpt" in msg and "\n" not in msg
    assert err.value.http_status == 404


def test_empty_folder_says_how_to_get_a_model(tmp_path):
    with pytest.raises(ModelNotFound) as err:
        ModelsDir(tmp_path / "nothing").resolve_checkpoint("sd15")
    assert "underpaint download sd15" in str(err.value)
    assert ModelsDir(tmp_path / "nothing").checkpoints_dir == tmp_path / "nothing" / "checkpoints"
    assert str(tmp_path / "nothing" / "checkpoints") in str(err.value)
    with pytest.raises(ModelNotFound, match="VAE 'x' not found: no vae in"):
        ModelsDir(tmp_path / "nothing").resolve_vae("x")


def test_ambiguous_stem(tmp_path):
    root = tmp_path / "m"
    _touch(root / "checkpoints" / "a" / "same.safetensors")
    _touch(root / "checkpoints" / "b" / "same.safetensors")
    with pytest.raises(ModelNotFound, match="ambiguous"):
        ModelsDir(root).resolve_checkpoint("same")
    assert ModelsDir(root).resolve_checkpoint("b/same") == root / "checkpoints" / "b" / "same.safetensors"


@pytest.mark.parametrize("point_at", ["root", "models"])
def test_a1111_layout(tmp_path, point_at):
    a = tmp_path / "stable-diffusion-webui"
    _touch(a / "models" / "Stable-diffusion" / "anything-v3.safetensors")
    _touch(a / "models" / "VAE" / "kl-f8-anime.ckpt")
    (a / "models" / "Lora").mkdir(parents=True)
    (a / "embeddings").mkdir()
    (a / "models" / "ControlNet").mkdir()
    md = ModelsDir(a if point_at == "root" else a / "models")
    assert [e.title for e in md.list_checkpoints()] == ["anything-v3.safetensors"]
    assert md.resolve_checkpoint("anything-v3") == a / "models" / "Stable-diffusion" / "anything-v3.safetensors"
    assert md.resolve_vae("kl-f8-anime.ckpt") == a / "models" / "VAE" / "kl-f8-anime.ckpt"
    assert md.folders("loras") == (a / "models" / "Lora",)
    assert md.folders("embeddings") == (a / "embeddings",)
    assert md.folders("controlnet") == (a / "models" / "ControlNet",)
    assert md.folder("checkpoints") == md.checkpoints_dir == a / "models" / "Stable-diffusion"
    assert md.vae_dir == a / "models" / "VAE" and md.loras_dir == a / "models" / "Lora"


# --- downloads -----------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_offline_download_fails_with_one_line_instruction(tmp_path, no_network):
    with pytest.raises(DownloadError) as err:
        download("sd15", tmp_path / "models", progress=False)
    msg = str(err.value)
    assert "\n" not in msg
    assert ("https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"
            "v1-5-pruned-emaonly.safetensors") in msg
    assert str(tmp_path / "models" / "checkpoints") in msg
    assert "AssertionError" not in msg


def test_vae_download_goes_to_the_vae_folder(tmp_path, no_network):
    with pytest.raises(DownloadError, match=str(tmp_path / "m" / "vae")):
        download("vae-ft-mse", ModelsDir(tmp_path / "m"))


def test_already_downloaded_file_is_returned(tmp_path, no_network):
    done = _touch(tmp_path / "m" / "checkpoints" / "sd_xl_base_1.0.safetensors")
    assert download("sdxl", tmp_path / "m") == done


def test_downloaded_diffusers_folder_is_returned_and_offline_names_the_repository(tmp_path, no_network):
    done = _touch(tmp_path / "m" / "checkpoints" / "FLUX.1-schnell" / "model_index.json", b"{}").parent
    assert download("flux-schnell", tmp_path / "m") == done
    with pytest.raises(DownloadError, match="black-forest-labs/FLUX.1-dev"):
        download("flux-dev", tmp_path / "m")


class _Response(io.BytesIO):
    """What urlopen gives: a readable body with its headers; ``length`` the Content-Length it claims."""

    def __init__(self, body: bytes, length: int | None = None):
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body) if length is None else length)}


def test_face_restorers_come_from_their_releases_with_the_detector_and_parser(tmp_path, monkeypatch):
    """GFPGAN and CodeFormer come from their GitHub releases, as A1111 fetches them, under the names face
    restoration looks for; the detector and parser they need come first; files already there are kept."""
    import urllib.request

    from underpaint.pipeline.face_restore import face_model_files

    asked = []

    def urlopen(url, timeout):
        asked.append(url)
        return _Response(url.encode())

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    folder = ModelsDir(tmp_path / "m")
    with pytest.raises(ModelNotFound, match="underpaint download gfpgan"):
        face_model_files(folder)
    done = download("gfpgan", folder, progress=False)
    assert done == tmp_path / "m" / "GFPGAN" / "GFPGANv1.4.pth"
    assert asked == [KNOWN_MODELS[name].source for name in ("face-detector", "face-parser", "gfpgan")]
    assert asked[-1] == "https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth"
    assert face_model_files(folder) == (done, tmp_path / "m" / "GFPGAN" / "detection_Resnet50_Final.pth",
                                        tmp_path / "m" / "GFPGAN" / "parsing_parsenet.pth")
    assert done.read_bytes() == asked[-1].encode()
    assert download("codeformer", folder, progress=False) == tmp_path / "m" / "Codeformer" / "codeformer-v0.1.0.pth"
    assert asked[3:] == ["https://github.com/sczhou/CodeFormer/releases/download/v0.1.0/codeformer.pth"]
    assert face_model_files(folder, restorer="CodeFormer")[0].name == "codeformer-v0.1.0.pth"
    assert sorted(p.name for p in (tmp_path / "m" / "GFPGAN").iterdir()) == [
        "GFPGANv1.4.pth", "detection_Resnet50_Final.pth", "parsing_parsenet.pth"]  # no temporary files left


def test_a1111s_upscaler_names_say_which_download_brings_them(tmp_path):
    """A1111 lists R-ESRGAN 4x+, SwinIR 4x ... and fetches them on first use; here the refusal names the
    download that brings the file, and the file, once there, goes by that name."""
    from underpaint.pipeline.upscale import resolve

    folder = ModelsDir(tmp_path / "m")
    for name, download_name, file in (("R-ESRGAN 4x+", "realesrgan-x4plus", "RealESRGAN_x4plus.pth"),
                                      ("swinir 4x", "swinir-4x", "003_realSR_BSRGAN_DFOWMFC_s64w8_SwinIR-L_x4_GAN.pth"),
                                      ("DAT x3", "dat-x3", "DAT_x3.pth"),
                                      ("ScuNET PSNR", "scunet-psnr", "scunet_color_real_psnr.pth")):
        with pytest.raises(UnknownName) as err:
            resolve(folder, name, "hr_upscaler")
        assert f"underpaint download {download_name}" in str(err.value) and file in str(err.value)
        assert KNOWN_MODELS[download_name].filename == file and KNOWN_MODELS[download_name].kind == "upscalers"
        _touch(tmp_path / "m" / "upscale_models" / file)
        assert resolve(folder, name, "hr_upscaler").path.name == file
    with pytest.raises(UnknownName, match="4x-UltraSharp.pth, go in"):
        resolve(folder, "4x-Nothing", "hr_upscaler")


def test_a_cut_off_download_leaves_no_file_and_offline_names_the_release(tmp_path, monkeypatch, no_network):
    import urllib.request

    with pytest.raises(DownloadError) as err:
        download("face-parser", tmp_path / "m", progress=False)
    assert "https://github.com/xinntao/facexlib/releases/download/v0.2.2/parsing_parsenet.pth" in str(err.value)
    assert str(tmp_path / "m" / "GFPGAN") in str(err.value) and "HF_HUB_OFFLINE" in str(err.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _Response(b"half", length=1000))
    with pytest.raises(DownloadError, match="closed after 4 of 1000 bytes"):
        download("face-parser", tmp_path / "m", progress=False)
    assert list((tmp_path / "m" / "GFPGAN").iterdir()) == []


def test_a_download_whose_hash_differs_from_the_published_one_is_not_kept(tmp_path, monkeypatch):
    """DAT's files come with the SHA-256 A1111 checks: other bytes are refused and leave nothing behind;
    the published bytes are kept under the file's name."""
    import hashlib
    import urllib.request

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    asked = []

    def urlopen(url, timeout):
        asked.append(url)
        return _Response(b"not the weights")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(DownloadError) as err:
        download("dat-x4", tmp_path / "m", progress=False)
    assert "SHA-256" in str(err.value) and KNOWN_MODELS["dat-x4"].sha256 in str(err.value)
    assert asked == ["https://huggingface.co/w-e-w/DAT/resolve/main/experiments/pretrained_models/DAT/DAT_x4.pth"]
    assert list((tmp_path / "m" / "upscale_models").iterdir()) == []

    import dataclasses

    import underpaint.models.download as download_module

    body = b"published bytes"
    published = dataclasses.replace(KNOWN_MODELS["dat-x4"], sha256=hashlib.sha256(body).hexdigest().upper())
    monkeypatch.setattr(download_module, "KNOWN_MODELS", {**KNOWN_MODELS, "dat-x4": published})
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _Response(body))
    done = download("dat-x4", tmp_path / "m", progress=False)
    assert done == tmp_path / "m" / "upscale_models" / "DAT_x4.pth" and done.read_bytes() == body


def test_interrogate_models_go_to_their_folders(tmp_path, no_network):
    done = _touch(tmp_path / "m" / "CLIP" / "clip-vit-large-patch14" / "config.json", b"{}").parent
    assert download("clip-vit-l", tmp_path / "m") == done
    with pytest.raises(DownloadError) as err:
        download("blip", tmp_path / "m")
    assert "Salesforce/blip-image-captioning-base" in str(err.value)
    assert str(tmp_path / "m" / "BLIP" / "blip-image-captioning-base") in str(err.value)


def test_known_model_table():
    assert {"sd15", "sd21", "sdxl", "sd-turbo", "sdxl-turbo"} <= set(KNOWN_MODELS)
    assert all(name == m.name for name, m in KNOWN_MODELS.items())
    assert all((m.folder or m.filename.endswith(".safetensors") or (m.kind, m.filename[-3:]) == ("adetailer", ".pt")
                or (m.kind in ("gfpgan", "codeformer", "upscalers", "deepbooru")
                    and m.source.startswith("https://github.com/"))
                or (m.kind == "upscalers" and m.source.startswith(f"https://huggingface.co/{m.repo_id}/resolve/")
                    and len(m.sha256) == 64)
                or (m.kind in ("controlnet", "clip_vision")
                    and m.source.startswith(f"https://huggingface.co/{m.repo_id}/resolve/main/")))
               and "/" in m.repo_id and m.description and set(m.needs) <= set(KNOWN_MODELS)
               for m in KNOWN_MODELS.values())
    assert {m.filename for m in KNOWN_MODELS.values() if m.kind == "adetailer"} >= {"face_yolov8n.pt", "hand_yolov8n.pt"}
    assert {"flux-dev", "flux-schnell"} <= {name for name, m in KNOWN_MODELS.items() if m.folder}
    with pytest.raises(TypeError):
        KNOWN_MODELS["mine"] = KNOWN_MODELS["sd15"]  # read-only table
    with pytest.raises(UnknownName, match="sd15"):
        known_model("sd1.5")


def test_vae_folder_path_resolves(tmp_path):
    folder = _touch(tmp_path / "sdxl-vae-fp16-fix" / "config.json", b"{}").parent
    assert ModelsDir(tmp_path / "m").resolve_vae(folder) == folder
    with pytest.raises(ModelNotFound):
        ModelsDir(tmp_path / "m").resolve_checkpoint(folder)  # a checkpoint folder needs model_index.json


def test_titles_split_from_their_hash_as_a1111s_expression_splits_them():
    import random
    import re

    from underpaint.models.registry import split_hash

    title = re.compile(r"^(.*?)\s*\[([0-9a-fA-F]{8,64})\]$")
    rng = random.Random(3)
    pieces = ["a", " ", "[", "]", "abcdef12", "0", "\n", ".safetensors", "x y"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8))).strip()
        found = title.match(text)
        assert split_hash(text) == ((found.group(1), found.group(2)) if found else (text, None)), repr(text)
    assert split_hash(" " * 100_000 + "x") == (" " * 100_000 + "x", None)
