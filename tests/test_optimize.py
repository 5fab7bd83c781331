"""Speed switches (--optimize, --attention): same pictures as the model as loaded, LoRAs still
take effect through fused and compiled layers, refusals name the switch, and undo is complete.

torch.compile runs with the ``eager`` backend through the engine here (the same graph capture and
guards as inductor, without generating C++ code, which takes minutes for a UNet on this machine;
``aot_eager`` cannot run the VAE on the CPU: its group-norm decomposition needs contiguous
inputs). Inductor itself is checked on a one-layer module in two fresh processes: its kernels
persist on disk, and a weight changed in place after compiling (a LoRA merge) is what they use.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flux_fixtures import flux_files  # noqa: F401 - a session fixture
from tiny_models import write_hypernetwork
from underpaint.errors import InvalidParameter
from underpaint.models import optimize
from underpaint.models.optimize import SpeedOptions
from underpaint.params import GenerationParams
from underpaint.pipeline.engine import Engine


def _load(path, models_dir=None, **speed):
    return Engine.load(path, device="cpu", dtype="fp32", models_dir=models_dir, **speed)


def _request(photo, **fields) -> GenerationParams:
    base = dict(prompt="a red house by the sea", negative_prompt="blurry", init_images=(photo.resize((64, 64)),),
                strength=0.6, steps=4, cfg_scale=7.0, sampler="DPM++ 2M", seed=1234, rng="cpu", batch_size=2)
    return GenerationParams(**{**base, **fields})


def _pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in result.images])


def _assert_close(a: np.ndarray, b: np.ndarray, levels: int = 1) -> None:
    assert a.shape == b.shape
    assert int(np.abs(a - b).max()) <= levels


def _eager(**fields) -> SpeedOptions:
    return SpeedOptions(compile_backend="eager", **fields)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, sd1_file):
    """A models folder with a LoRA over every UNet attention projection (made on the model as loaded).

    Requests use it at 0.3: at full strength these random weights push the tiny UNet into a
    regime where a rounding difference anywhere (another attention kernel, NHWC convolutions)
    grows to a different picture, with or without any switch."""
    root = tmp_path_factory.mktemp("speed-models")
    (root / "loras").mkdir()
    unet = _load(sd1_file).model.unet
    write_attention_lora(unet, root / "loras" / "strong.safetensors")
    write_hypernetwork(root / "hypernetworks" / "soft.pt",
                       sorted({m.in_features for name, m in unet.named_modules() if name.endswith(".to_k")}))
    return root


def write_attention_lora(unet: torch.nn.Module, path) -> None:
    """A kohya LoRA (rank 4, random) over every attention projection of ``unet``: each ``nn.Linear``
    whose name has ``.attn`` (self- and cross-attention q, k, v, out)."""
    gen = torch.Generator().manual_seed(7)
    sd = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and ".attn" in name:
            key = "lora_unet_" + name.replace(".", "_")
            out_features, in_features = module.weight.shape
            sd[f"{key}.lora_down.weight"] = torch.randn(4, in_features, generator=gen)
            sd[f"{key}.lora_up.weight"] = torch.randn(out_features, 4, generator=gen) * 0.5
            sd[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(sd, str(path))


@pytest.fixture(scope="module")
def plain(sd1_file, models_dir):
    return _load(sd1_file, models_dir)


@pytest.fixture(scope="module")
def reference(plain, photo):
    return {"plain": _pixels(plain.generate(_request(photo))),
            "lora": _pixels(plain.generate(_request(photo, prompt="a red house by the sea <lora:strong:0.3>"))),
            "hypernet": _pixels(plain.generate(_request(photo, prompt="a red house by the sea <hypernet:soft:0.5>")))}


# --- names and refusals -----------------------------------------------------------------------


def test_parse_names_and_attention():
    options = SpeedOptions.parse("channels-last, compile", attention="Flash")
    assert options.names == ("channels_last", "compile") and options.attention == "flash"
    assert options.describe() == "channels_last,compile,attention=flash"
    assert SpeedOptions.parse("none") == SpeedOptions() == SpeedOptions.parse(None)
    assert SpeedOptions().describe() == "none"


def test_unknown_names_are_refused_naming_the_option():
    with pytest.raises(InvalidParameter) as err:
        SpeedOptions.parse("compile,turbo")
    assert err.value.field == "optimize" and "turbo" in str(err.value) and "cuda_graphs" in str(err.value)
    with pytest.raises(InvalidParameter) as err:
        SpeedOptions.parse("", attention="xformers")
    assert err.value.field == "attention" and "cudnn" in str(err.value)


@pytest.mark.parametrize(("options", "vram", "field", "needs"), [
    (SpeedOptions(cuda_graphs=True), "high", "optimize", "CUDA"),
    (SpeedOptions(attention="efficient"), "high", "attention", "CUDA"),
    (SpeedOptions(fused_qkv=True), "medium", "optimize", "--vram high"),
    (SpeedOptions(compile=True), "low", "optimize", "--vram high or medium"),
])
def test_combinations_that_cannot_run_are_refused(options, vram, field, needs):
    with pytest.raises(InvalidParameter) as err:
        optimize.check(options, device=torch.device("cpu"), vram=vram)
    assert err.value.field == field and needs in str(err.value)


def test_engine_refuses_before_loading(sd1_file):
    with pytest.raises(InvalidParameter, match="cuda_graphs"):
        _load(sd1_file, optimize="cuda_graphs")


# --- each switch against the model as loaded ----------------------------------------------------


def test_channels_last_gives_the_same_pictures(sd1_file, photo, reference):
    engine = _load(sd1_file, optimize="channels_last")
    conv = engine.model.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert engine.model.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    _assert_close(_pixels(engine.generate(_request(photo))), reference["plain"])


def test_channels_last_weights_are_pinned_again_where_the_mode_pins(sd1_file, photo, reference):
    """Reordering makes new tensors; those resting in host memory are pinned again (pinning itself
    needs CUDA: a recording stand-in here)."""
    from underpaint.models import offload

    engine = _load(sd1_file)
    model = engine.model
    pinned: list[torch.Tensor] = []
    offload.place(model, "low", device="cpu", pin=True, pinner=lambda t: pinned.append(t.clone()) or pinned[-1])
    first = len(pinned)
    optimize.apply(model, SpeedOptions(channels_last=True))
    reordered = [t for m in (model.unet, model.vae) for t in m.parameters() if t.dim() == 4]
    # (the stand-in's copies do not say they are pinned, so everything goes through it again)
    again = {p.data_ptr() for p in pinned[first:]}
    assert reordered and all(t.data_ptr() in again for t in reordered)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in reordered)
    _assert_close(_pixels(engine.generate(_request(photo))), reference["plain"])


def test_fused_projections_follow_loras(sd1_file, models_dir, photo, reference):
    engine = _load(sd1_file, models_dir, optimize="fused_qkv")
    unet = engine.model.unet
    fused = [m for m in unet.modules() if getattr(m, "fused_projections", False)]
    self_attn = [m for m in fused if hasattr(m, "to_qkv")]
    cross = [m for m in fused if hasattr(m, "to_kv")]
    assert self_attn and cross and type(fused[0].processor).__name__ == "FusedAttnProcessor2_0"
    before = {id(m): m.to_qkv.weight.clone() for m in self_attn}

    _assert_close(_pixels(engine.generate(_request(photo))), reference["plain"])
    with_lora = _pixels(engine.generate(_request(photo, prompt="a red house by the sea <lora:strong:0.3>")))
    # The LoRA reached the fused weights (the picture is the unfused model's with the LoRA, not without).
    _assert_close(with_lora, reference["lora"])
    assert np.abs(with_lora - reference["plain"]).max() > 10
    # ... and left them again: the fused weights are the model's own once the request ends.
    for module in self_attn:
        assert torch.equal(module.to_qkv.weight, before[id(module)])
        assert torch.equal(module.to_qkv.weight, torch.cat([module.to_q.weight, module.to_k.weight, module.to_v.weight]))


def test_compiled_model_keeps_its_names_and_sees_loras(sd1_file, models_dir, photo, reference):
    engine = _load(sd1_file, models_dir, optimize=_eager(compile=True))
    unet = engine.model.unet
    assert optimize.is_compiled(unet) and optimize.is_compiled(engine.model.vae.decoder)
    assert all(not name.startswith("_orig_mod") for name, _ in unet.named_parameters())
    _assert_close(_pixels(engine.generate(_request(photo))), reference["plain"])
    _assert_close(_pixels(engine.generate(_request(photo, prompt="a red house by the sea <lora:strong:0.3>"))),
                  reference["lora"])
    _assert_close(_pixels(engine.generate(_request(photo))), reference["plain"])


def test_all_switches_together_then_undo(sd1_file, models_dir, photo, reference):
    engine = _load(sd1_file, models_dir, optimize=_eager(channels_last=True, fused_qkv=True, compile=True,
                                                       attention="math"))
    _assert_close(_pixels(engine.generate(_request(photo, prompt="a red house by the sea <lora:strong:0.3>"))),
                  reference["lora"])
    # Hypernetworks hook the projections: the fused ones run unfused and the UNet uncompiled meanwhile.
    hypernet = _pixels(engine.generate(_request(photo, prompt="a red house by the sea <hypernet:soft:0.5>")))
    _assert_close(hypernet, reference["hypernet"])
    assert np.abs(hypernet - reference["plain"]).max() > 10
    assert optimize.is_compiled(engine.model.unet)
    assert {type(m.processor).__name__ for m in engine.model.unet.modules()
            if getattr(m, "fused_projections", False)} == {"FusedAttnProcessor2_0"}
    _assert_close(_pixels(engine.generate(_request(photo))), reference["plain"])
    optimize.undo(engine.model)
    unet = engine.model.unet
    assert engine.model.speed is None and not optimize.is_compiled(unet)
    assert not any(hasattr(m, name) for m in unet.modules() for name in ("to_qkv", "to_kv"))
    assert unet.conv_in.weight.is_contiguous()
    assert np.array_equal(_pixels(engine.generate(_request(photo))), reference["plain"])


@pytest.mark.parametrize("backend", ["math", "flash"])
def test_attention_backend_holds_during_the_unet_call(sd1_file, photo, reference, backend):
    engine = _load(sd1_file, attention=backend)
    seen = []

    def record(module, args):
        from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends

        seen.append(set(_cur_sdpa_kernel_backends()) == {
            SDPBackend.MATH if backend == "math" else SDPBackend.FLASH_ATTENTION})

    handle = engine.model.unet.down_blocks[0].register_forward_pre_hook(record)
    try:
        _assert_close(_pixels(engine.generate(_request(photo))), reference["plain"])
    finally:
        handle.remove()
    assert seen and all(seen)


def test_flux_fused_and_compiled(flux_files, photo):  # noqa: F811 - the fixture
    def run(**speed):
        engine = Engine.load(flux_files["transformer"], device="cpu", dtype="fp32", clip_l=flux_files["clip_l"],
                             t5=flux_files["t5"], vae=flux_files["ae"], **speed)
        params = GenerationParams(prompt="a lighthouse", init_images=(photo.resize((64, 64)),), strength=0.7,
                                  steps=4, cfg_scale=1.0, sampler="Euler", scheduler="Simple", seed=3, rng="cpu")
        return engine, _pixels(engine.generate(params))

    _, plain = run()
    engine, fast = run(optimize=_eager(fused_qkv=True, compile=True))
    transformer = engine.model.unet
    assert any(getattr(m, "fused_projections", False) for m in transformer.modules())
    assert optimize.is_compiled(transformer)
    _assert_close(fast, plain)


# --- the compile cache ------------------------------------------------------------------------


def test_compile_cache_dir_follows_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = optimize.compile_cache_dir()
    assert path == tmp_path / "underpaint" / "torch-compile" and path.is_dir()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(path)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert optimize.compile_cache_dir() == tmp_path / "mine"  # a folder the user chose wins


_CACHE_PROBE = textwrap.dedent("""
    import torch
    from torch._dynamo.utils import counters
    from underpaint.models import optimize

    class Net(torch.nn.Module):  # a model's own module, as diffusers' are (torch.nn's own are not traced)
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.nn.functional.silu(self.conv(x)) * 2

    optimize.compile_cache_dir()
    net = Net()
    optimize._compile_forward(net, backend="inductor")
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():  # as the engine runs (grad mode is part of what a compiled graph assumes)
        net(x)
        net.conv.weight.add_(1.0)  # as a LoRA merge writes in place
        follows = torch.allclose(net(x), Net.forward(net, x), atol=1e-5)
    print("follows", follows)
    print("hits", counters["inductor"]["fxgraph_cache_hit"], "misses", counters["inductor"]["fxgraph_cache_miss"])
""")


def test_compiled_kernels_persist_between_processes(tmp_path):
    """The second process finds the first one's kernels in the cache folder (what makes a restart fast)."""
    env = {"XDG_CACHE_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}

    def run() -> str:
        done = subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        lines = done.stdout.strip().splitlines()
        assert lines[-2] == "follows True"
        return lines[-1]

    assert run() == "hits 0 misses 1"
    assert run() == "hits 1 misses 0"
    assert any((tmp_path / "underpaint" / "torch-compile").iterdir())


# --- command line and server ------------------------------------------------------------------


@pytest.mark.parametrize(("flags", "needles"), [
    (["--optimize", "compile,turbo"], ["optimize", "turbo"]),
    (["--optimize", "cuda_graphs"], ["cuda_graphs", "CUDA"]),
    (["--optimize", "fused_qkv", "--vram", "low"], ["fused_qkv", "--vram high"]),
])
def test_cli_refuses_with_one_line(tmp_path, sd1_file, photo, flags, needles, capsys):
    from underpaint.cli.main import main

    picture = tmp_path / "in.png"
    photo.resize((64, 64)).save(picture)
    status = main(["img2img", str(picture), "-p", "x", "--model", str(sd1_file), "--device", "cpu", "--steps", "2",
                   "-o", str(tmp_path / "out.png"), *flags])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert all(needle in err for needle in needles), err
    assert not (tmp_path / "out.png").exists()


def test_server_config_checks_the_names_at_start():
    from underpaint.server.config import ServerConfig

    with pytest.raises(InvalidParameter, match="optimize"):
        ServerConfig(optimize="channels_last,warp")
    with pytest.raises(InvalidParameter, match="attention"):
        ServerConfig(attention="sage")
    assert ServerConfig(optimize="compile", attention="flash").optimize == "compile"
