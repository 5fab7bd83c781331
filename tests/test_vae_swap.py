"""Changing the VAE of a loaded engine (``Engine.use_vae``): the pictures and infotext of a fresh
``Engine.load(checkpoint, vae=...)`` with the same settings, without reading the checkpoint's
other weights, in every memory mode and with the speed switches that touch the VAE; a VAE whose
config differs is refused with nothing changed (the caller loads the checkpoint again)."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest
import torch

import tiny_models as tm
from flux_fixtures import flux_files  # noqa: F401 - a session fixture
from underpaint.errors import ModelError
from underpaint.models import loader as loader_module
from underpaint.models.detect import VAE_PREFIX
from underpaint.models.optimize import SpeedOptions
from underpaint.pipeline.engine import Engine


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    """Two VAE files for the tiny SD1 model, each with its own weights (and the checkpoint's own, a third)."""
    folder = tmp_path_factory.mktemp("vaes")
    return {"a": tm.write_vae(folder / "vae-a.safetensors", seed=21),
            "b": tm.write_vae(folder / "vae-b.safetensors", seed=22)}


def _load(path, vae=None, **settings) -> Engine:
    return Engine.load(path, device="cpu", dtype="fp32", vae=vae, **settings)


def _picture(engine: Engine, photo) -> tuple[bytes, str]:
    result = engine.img2img(photo.resize((64, 64)), prompt="a lighthouse at dusk", strength=0.6, steps=3, seed=5,
                            sampler_name="Euler")
    return np.asarray(result.images[0]).tobytes(), result.infotexts[0]


def _tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


SETTINGS = {
    "high": {},
    "medium, channels_last": {"vram": "medium", "optimize": "channels_last"},
    "low, channels_last": {"vram": "low", "optimize": "channels_last"},
    "high, compiled": {"optimize": SpeedOptions(compile=True, compile_backend="eager")},
}


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_each_swap_paints_as_a_fresh_load_with_that_vae(sd1_file, vaes, photo, settings):
    """own → file → other file → own → file, each picture and infotext equal to a fresh load's with
    the same settings; the running VAE's tensors stay the same tensors (device, layout, storage)."""
    expected = {key: _picture(_load(sd1_file, vaes.get(key), **settings), photo) for key in ("own", "a", "b")}
    assert len({pixels for pixels, _ in expected.values()}) == 3  # each VAE paints its own picture
    engine = _load(sd1_file, **settings)
    vae = engine.model.vae
    before = {name: (t.data_ptr(), t.stride(), t.device) for name, t in _tensors(vae).items()}
    compiled = {"encoder": vae.encoder.__dict__.get("forward"), "decoder": vae.decoder.__dict__.get("forward")}
    if isinstance(settings.get("optimize"), SpeedOptions):
        assert all(compiled.values())
    for key in ("a", "b", None, "a"):
        assert engine.use_vae(vaes.get(key)) is True
        assert engine.model.vae is vae
        assert _picture(engine, photo) == expected[key or "own"], key
        assert engine.model.vae_path == vaes.get(key)
    assert {name: (t.data_ptr(), t.stride(), t.device) for name, t in _tensors(vae).items()} == before
    assert {"encoder": vae.encoder.__dict__.get("forward"), "decoder": vae.decoder.__dict__.get("forward")} == compiled
    if settings.get("optimize") == "channels_last":
        assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    if settings.get("vram") == "low":
        assert vae.use_tiling


def test_vae_hash_and_name_follow_the_swap(sd1_file, vaes):
    engine = _load(sd1_file, vaes["a"])
    assert engine.info.vae_hash == hashlib.sha256(vaes["a"].read_bytes()).hexdigest()[:10]
    engine.use_vae(vaes["b"])
    assert (engine.info.vae_name, engine.info.vae_hash) == (
        "vae-b.safetensors", hashlib.sha256(vaes["b"].read_bytes()).hexdigest()[:10])
    engine.use_vae(None)
    assert (engine.info.vae_name, engine.info.vae_hash) == (None, None)


def test_pinned_resting_weights_stay_pinned(sd1_file, vaes, photo):
    """In a mode that pins the VAE's resting weights, the swap writes into those pinned tensors and
    pins nothing new (pinning needs CUDA: a recording stand-in here)."""
    from underpaint.models import offload

    engine = _load(sd1_file)
    model = engine.model
    pinned: list[torch.Tensor] = []
    offload.place(model, "medium", device="cpu", pin=True, pinner=lambda t: pinned.append(t.clone()) or pinned[-1])
    vae_pins = {p.data_ptr() for p in pinned} & {t.data_ptr() for t in _tensors(model.vae).values()}
    assert vae_pins
    count = len(pinned)
    assert engine.use_vae(vaes["a"])
    assert len(pinned) == count
    assert {t.data_ptr() for t in _tensors(model.vae).values()} == vae_pins
    assert _picture(engine, photo) == _picture(_load(sd1_file, vaes["a"], vram="medium"), photo)


def test_the_checkpoint_is_read_for_its_vae_only(sd1_file, vaes, photo, monkeypatch):
    """Back to the checkpoint's own VAE, only its first_stage_model.* tensors are read: the whole-file
    readers and the UNet and text encoder builders are never called."""
    import safetensors

    engine = _load(sd1_file, vaes["a"])
    expected = _picture(_load(sd1_file), photo)

    def refuse(*args, **kwargs):
        raise AssertionError("the whole checkpoint was read")

    with safetensors.safe_open(str(sd1_file), "pt") as f:
        vae_names = sorted(name for name in f.keys() if name.startswith(VAE_PREFIX))
    for name in ("_read", "load_state_dict", "_build_unet", "_build_text_encoder", "load_model"):
        monkeypatch.setattr(loader_module, name, refuse)
    read: list[tuple[str, str]] = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, path, *args, **kwargs):
            self.path, self.handle = str(path), real_open(path, *args, **kwargs)

        def __enter__(self):
            self.file = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def get_tensor(self, name):
            read.append((self.path, name))
            return self.file.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    assert engine.use_vae(None)
    assert {path for path, _ in read} == {str(sd1_file)}
    assert sorted(name for _, name in read) == vae_names
    monkeypatch.undo()
    assert _picture(engine, photo) == expected


def test_own_vae_of_a_torch_checkpoint(tmp_path, sd1_file, vaes, photo):
    """A .ckpt checkpoint's own VAE comes back too (read through torch.load, memory-mapped)."""
    from safetensors.torch import load_file

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(sd1_file))}, ckpt)
    engine = _load(ckpt, vaes["b"])
    assert engine.use_vae(None)
    assert _picture(engine, photo) == _picture(_load(ckpt), photo)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in _tensors(module).items()}


def _assert_unchanged(engine: Engine, weights: dict[str, torch.Tensor], vae_path) -> None:
    assert engine.model.vae_path == vae_path
    now = _tensors(engine.model.vae)
    assert now.keys() == weights.keys() and all(torch.equal(now[k], weights[k]) for k in weights)


def test_a_vae_with_another_config_is_not_swapped(tmp_path, sd1_file, vaes):
    """Another config (channels; a diffusers VAE folder saying force_upcast, which this SD1 VAE does
    not): False, nothing changed, and a fresh load with it works."""
    from diffusers import AutoencoderKL

    engine = _load(sd1_file, vaes["a"])
    weights = _weights(engine.model.vae)
    wide = tm.write_vae(tmp_path / "wide.safetensors", vae=tm.TinyVAE(channels=(32, 64, 64), layers=2))
    assert engine.use_vae(wide) is False
    _assert_unchanged(engine, weights, vaes["a"])

    folder = tmp_path / "vae-folder"
    config = {k: v for k, v in dict(engine.model.vae.config).items() if not k.startswith("_")}
    torch.manual_seed(3)
    AutoencoderKL(**{**config, "force_upcast": True}).save_pretrained(str(folder))
    assert engine.use_vae(folder) is False
    _assert_unchanged(engine, weights, vaes["a"])
    assert _load(sd1_file, folder).model.vae.config.force_upcast is True


def test_a_diffusers_vae_folder_with_the_same_config_is_swapped(tmp_path, sd1_file, vaes, photo):
    from diffusers import AutoencoderKL

    engine = _load(sd1_file)
    folder = tmp_path / "vae-folder"
    config = {k: v for k, v in dict(engine.model.vae.config).items() if not k.startswith("_")}
    torch.manual_seed(4)
    AutoencoderKL(**config).save_pretrained(str(folder))
    assert engine.use_vae(folder)
    assert _picture(engine, photo) == _picture(_load(sd1_file, folder), photo)


def test_a_vae_that_does_not_fit_raises_with_nothing_changed(tmp_path, sd1_file, vaes, flux_files):  # noqa: F811
    engine = _load(sd1_file, vaes["a"])
    weights = _weights(engine.model.vae)
    with pytest.raises(ModelError, match="16 latent channels"):
        engine.use_vae(flux_files["ae"])
    _assert_unchanged(engine, weights, vaes["a"])
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x08")
    with pytest.raises(ModelError, match="broken.safetensors"):
        engine.use_vae(broken)
    _assert_unchanged(engine, weights, vaes["a"])


def test_a_diffusers_checkpoint_folder_takes_its_vae_folder_back(tmp_path, sd1_file, photo):
    """A diffusers pipeline folder's own VAE is its vae/ subfolder, read alone."""
    from diffusers import AutoencoderKL

    model = tm.write_diffusers_folder(tmp_path / "tiny-sd1-diffusers", "sd1")
    engine = _load(model)
    config = {k: v for k, v in dict(engine.model.vae.config).items() if not k.startswith("_")}
    other = tmp_path / "other-vae"
    torch.manual_seed(8)
    AutoencoderKL(**config).save_pretrained(str(other))
    expected = _picture(engine, photo)
    assert engine.use_vae(other)
    assert _picture(engine, photo) == _picture(_load(model, other), photo) != expected
    assert engine.use_vae(None)
    assert _picture(engine, photo) == expected and engine.model.vae_path is None


# --- FLUX ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flux_models(tmp_path_factory, flux_files):  # noqa: F811
    """A FLUX models folder: the transformer, its text encoders, ae.safetensors (the one Engine.load
    takes) and a second autoencoder whose name it does not match."""
    import tiny_flux

    root = tmp_path_factory.mktemp("flux-vae-models")
    for key, sub in (("transformer", "checkpoints"), ("all_in_one", "checkpoints"), ("clip_l", "text_encoders"),
                     ("t5", "text_encoders"), ("ae", "vae")):
        (root / sub).mkdir(exist_ok=True)
        shutil.copy(flux_files[key], root / sub / flux_files[key].name)
    shutil.copy(flux_files["spiece_dir"] / "spiece.model", root / "text_encoders" / "spiece.model")
    tiny_flux.write_ae(root / "vae" / "other-autoencoder.safetensors", seed=31)
    return root


def _flux(models, name, vae=None) -> Engine:
    return Engine.load(models / "checkpoints" / name, models_dir=models, device="cpu", dtype="fp32", vae=vae)


def test_flux_swaps_its_vae_file_and_returns_to_the_models_folders_one(flux_models, flux_files, photo):  # noqa: F811
    pytest.importorskip("sentencepiece")
    name = flux_files["transformer"].name
    engine = _flux(flux_models, name)
    own = flux_models / "vae" / "ae.safetensors"
    assert engine.model.vae_path == own
    expected = _picture(engine, photo)
    assert engine.use_vae("other-autoencoder.safetensors")
    assert _picture(engine, photo) == _picture(_flux(flux_models, name, "other-autoencoder.safetensors"), photo)
    assert engine.info.vae_name == "other-autoencoder.safetensors"
    assert engine.use_vae(None)
    assert engine.model.vae_path == own and _picture(engine, photo) == expected


def test_a_flux_files_bundled_vae_needs_a_reload(flux_models, flux_files):  # noqa: F811
    pytest.importorskip("sentencepiece")
    engine = _flux(flux_models, flux_files["all_in_one"].name, "other-autoencoder.safetensors")
    weights = _weights(engine.model.vae)
    assert engine.use_vae(None) is False
    _assert_unchanged(engine, weights, flux_models / "vae" / "other-autoencoder.safetensors")


def test_config_mismatch_names_the_difference():
    from diffusers import AutoencoderKL

    from underpaint.models.vae_swap import mismatch

    config = tm.vae_config(0.18215)
    config.pop("_class_name")
    with torch.device("meta"):
        a = AutoencoderKL(**config)
        b = AutoencoderKL(**{**config, "force_upcast": False})
        c = AutoencoderKL(**{**config, "block_out_channels": tuple(config["block_out_channels"])})
    assert mismatch(a, b) == "another config: force_upcast False instead of True"
    assert mismatch(a, c) is None  # tuples and lists alike, as a config read from JSON has lists
