"""``--optimize aot``: UNet packages compiled ahead of time by AOTInductor, weights bound from the
module. The witness is diffusers' own UNet run eager with the same weights.

Compiling a tiny UNet takes about a minute on a small CPU, so each architecture is compiled once
per module (fixtures) and the other tests reuse or copy its package folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import UNet2DConditionModel  # noqa: E402

from tiny_models import SD1_UNET, SDXL_UNET, _unet_config  # noqa: E402

# Smaller still than the other tests' UNets (each package is compiled by a C++ compiler, a minute on
# this machine): one resnet per level, one transformer block where SDXL has two. The layouts that
# matter here stay: cross-attention, SDXL's added conditioning, the up/down path.
SD1_UNET = replace(SD1_UNET, layers=1)  # noqa: F811
SDXL_UNET = replace(SDXL_UNET, depth=(0, 1), mid_depth=1)  # noqa: F811
from underpaint.errors import InvalidParameter  # noqa: E402
from underpaint.models import aot  # noqa: E402
from underpaint.models.optimize import SpeedOptions, check  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLAGS = {"channels_last": False, "fused_qkv": False, "attention": "auto"}


def _unet(u, seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(_unet_config(u)).eval()


def _twin(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """An independent eager copy with the same weights."""
    other = UNet2DConditionModel.from_config(unet.config).eval()
    other.load_state_dict(unet.state_dict())
    return other


def _sd15_inputs(batch: int = 2, size: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, size, size, generator=g), timestep=torch.full((batch,), 500.0),
                encoder_hidden_states=torch.randn(batch, 77, SD1_UNET.context_dim, generator=g))


def _sdxl_inputs(batch: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, 8, 8, generator=g), timestep=torch.full((batch,), 300.0),
                encoder_hidden_states=torch.randn(batch, 77, SDXL_UNET.context_dim, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(batch, 16, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)})


def _run(unet, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():  # as the pipeline calls it
        return unet(**inputs, return_dict=False)[0]


def _compiled(tmp_path_factory, name: str, config, seed: int, inputs: dict) -> dict:
    """A tiny UNet with aot installed, its eager twin, and the first call's output (which builds the package)."""
    folder = tmp_path_factory.mktemp(f"aot-{name}")
    unet = _unet(config, seed=seed)
    reference = _twin(unet)
    aot.install(unet, flags=FLAGS, folder=folder)
    before = aot.stats["built"]
    out = _run(unet, inputs)
    assert aot.stats["built"] == before + 1
    return dict(unet=unet, reference=reference, folder=folder, first=out)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    return _compiled(tmp_path_factory, "sd15", SD1_UNET, 1, _sd15_inputs())


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return _compiled(tmp_path_factory, "sdxl", SDXL_UNET, 3, _sdxl_inputs())


def test_sd15_package_matches_eager_and_holds_no_weights(sd15):
    expected = _run(sd15["reference"], _sd15_inputs())
    torch.testing.assert_close(sd15["first"], expected, rtol=1e-4, atol=1e-5)
    calls = aot.stats["compiled_calls"]
    again = _run(sd15["unet"], _sd15_inputs(seed=5))
    assert aot.stats["compiled_calls"] == calls + 1
    torch.testing.assert_close(again, _run(sd15["reference"], _sd15_inputs(seed=5)), rtol=1e-4, atol=1e-5)
    (package,) = sd15["folder"].glob("*.pt2")
    weights = sum(p.numel() * p.element_size() for p in sd15["unet"].parameters())
    # The package is code only: a distinctive weight's bytes are nowhere in it.
    probe = sd15["unet"].conv_in.weight.detach().flatten()[:16].numpy().tobytes()
    assert probe not in package.read_bytes(), f"weights ({weights} bytes) were packaged"
    record = json.loads(package.with_suffix(".json").read_text())
    assert record["key"]["torch"] == torch.__version__ and record["key"]["flags"] == FLAGS


def test_sdxl_package_with_added_cond_matches_eager(sdxl):
    torch.testing.assert_close(sdxl["first"], _run(sdxl["reference"], _sdxl_inputs()), rtol=1e-4, atol=1e-5)
    record = json.loads(next(sdxl["folder"].glob("*.json")).read_text())
    assert [name for name, *_ in record["key"]["inputs"]] == ["sample", "timestep", "encoder_hidden_states",
                                                              "text_embeds", "time_ids"]
    calls = aot.stats["compiled_calls"]
    inputs = _sdxl_inputs(seed=2)
    with torch.no_grad():  # return_dict=True, outside inference mode but without grad
        out = sdxl["unet"](**inputs).sample
    assert aot.stats["compiled_calls"] == calls + 1
    torch.testing.assert_close(out, _run(sdxl["reference"], inputs), rtol=1e-4, atol=1e-5)


_CHILD = textwrap.dedent("""
    import json, sys
    import torch
    sys.path.insert(0, {tests!r})
    from dataclasses import replace
    from tiny_models import SD1_UNET, _unet_config
    SD1_UNET = replace(SD1_UNET, layers=1)  # as the tests' own
    from diffusers import UNet2DConditionModel
    def refuse(*a, **k):
        raise AssertionError("traced or compiled in the second process")
    torch.export.export = refuse
    torch._inductor.aoti_compile_and_package = refuse
    torch.compile = refuse
    from torch._dynamo.utils import counters
    from underpaint.models import aot
    torch.manual_seed(7)   # another checkpoint of the same architecture: every weight differs
    unet = UNet2DConditionModel.from_config(_unet_config(SD1_UNET)).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference = UNet2DConditionModel.from_config(unet.config).eval()
    reference.load_state_dict(unet.state_dict())
    aot.install(unet, flags={flags!r})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g); t = torch.full((2,), 500.0); c = torch.randn(2, 77, 16, generator=g)
    with torch.inference_mode():
        out = unet(x, t, encoder_hidden_states=c, return_dict=False)[0]
        ref = reference(x, t, encoder_hidden_states=c, return_dict=False)[0]
    print(json.dumps(dict(stats=dict(aot.stats), dynamo=sum(sum(c.values()) for c in counters.values()),
                          diff=(out - ref).abs().max().item())))
""")


def test_second_process_loads_the_package_without_tracing(sd15, tmp_path):
    cache = tmp_path / "xdg"
    shutil.copytree(sd15["folder"], cache / "underpaint" / "aot")  # the default folder under XDG_CACHE_HOME
    env = {**os.environ, "XDG_CACHE_HOME": str(cache),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    code = _CHILD.format(tests=str(ROOT / "tests"), flags=FLAGS)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["stats"].get("loaded") == 1 and result["stats"].get("compiled_calls") == 1
    assert not result["stats"].get("built") and not result["stats"].get("eager_calls")
    assert result["dynamo"] == 0
    assert result["diff"] < 1e-5


def test_lora_merged_in_place_after_load_changes_output_as_eager(sd15):
    unet, reference = sd15["unet"], sd15["reference"]
    inputs = _sd15_inputs(seed=3)
    before = _run(unet, inputs)
    g = torch.Generator().manual_seed(11)
    saved = {}
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith(("attn1.to_q", "attn2.to_k", "proj_in")) and hasattr(module, "weight"):
                down = torch.randn(2, module.weight.shape[1], generator=g) * 0.3
                up = torch.randn(module.weight.shape[0], 2, generator=g) * 0.3
                delta = (up @ down).reshape(module.weight.shape)
                saved[name] = module.weight.detach().clone()
                module.weight.add_(delta)  # a merge in place: the package's pointers see it
                reference.get_submodule(name).weight.add_(delta)
    assert saved
    try:
        calls = aot.stats["compiled_calls"]
        after = _run(unet, inputs)
        assert aot.stats["compiled_calls"] == calls + 1
        expected = _run(reference, inputs)
        assert (expected - before).abs().max() > 1e-3  # the LoRA matters
        torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)
        # A weight whose storage was replaced (as an offload swap does) is bound again before the call.
        conv = unet.conv_in.weight
        old = conv.data
        conv.data = old.clone() * 1.5
        with torch.no_grad():
            reference.conv_in.weight.mul_(1.5)
        torch.testing.assert_close(_run(unet, inputs), _run(reference, inputs), rtol=1e-4, atol=1e-5)
        conv.data = old
        with torch.no_grad():
            reference.conv_in.weight.div_(1.5)
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                unet.get_submodule(name).weight.copy_(weight)
                reference.get_submodule(name).weight.copy_(weight)
    torch.testing.assert_close(_run(unet, inputs), before, rtol=0, atol=0)


def test_calls_outside_the_package_run_eager(sd15, tmp_path):
    folder = tmp_path / "aot"
    shutil.copytree(sd15["folder"], folder)
    unet = _unet(SD1_UNET, seed=1)
    reference = _twin(unet)
    forward = aot.install(unet, flags=FLAGS, folder=folder, build_new=False)
    files = sorted(p.name for p in folder.iterdir())
    eager = aot.stats["eager_calls"]
    other_size = _sd15_inputs(batch=1, size=16)
    torch.testing.assert_close(_run(unet, other_size), _run(reference, other_size), rtol=1e-5, atol=1e-6)
    assert aot.stats["eager_calls"] == eager + 1 and sorted(p.name for p in folder.iterdir()) == files
    # ControlNet residuals at the packaged shape: eager (the package has no residual inputs).
    inputs = _sd15_inputs()
    with torch.inference_mode():
        skips = reference(**inputs, return_dict=False)[0]
        # diffusers adds residuals only when both are given: zeros for the down blocks of this UNet.
        down = tuple(torch.zeros(2, ch, size, size) for ch, size in ((32, 8),) * 2 + ((32, 4), (64, 4)))
        mid = torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(4))  # not constant: norms remove that
        control = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        got = unet(**inputs, **control, return_dict=False)[0]
        want = reference(**inputs, **control, return_dict=False)[0]
    assert aot.stats["eager_calls"] == eager + 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got - skips).abs().max() > 1e-4
    # Gradients needed: eager. A hook on the UNet itself: eager.
    with torch.enable_grad():
        unet(**inputs)
    handle = unet.register_forward_pre_hook(lambda module, args: None)
    _run(unet, inputs)
    handle.remove()
    assert aot.stats["eager_calls"] == eager + 4
    _run(unet, inputs)
    assert aot.stats["eager_calls"] == eager + 4 and forward.packages


def _corrupt_and_run(sd15, tmp_path, damage) -> tuple[torch.Tensor, torch.Tensor, Path]:
    folder = tmp_path / "aot"
    shutil.copytree(sd15["folder"], folder)
    damage(folder)
    unet = _unet(SD1_UNET, seed=1)
    reference = _twin(unet)
    aot.install(unet, flags=FLAGS, folder=folder, build_new=False)
    inputs = _sd15_inputs()
    return _run(unet, inputs), _run(reference, inputs), folder


@pytest.mark.parametrize("damage", ["truncated", "flipped", "no record", "record of another torch"])
def test_a_damaged_package_is_not_used(sd15, tmp_path, damage):
    def harm(folder: Path) -> None:
        (package,) = folder.glob("*.pt2")
        record = package.with_suffix(".json")
        if damage == "truncated":
            package.write_bytes(package.read_bytes()[: package.stat().st_size // 2])
        elif damage == "flipped":
            data = bytearray(package.read_bytes())
            data[len(data) // 2] ^= 0xFF
            package.write_bytes(bytes(data))
        elif damage == "no record":
            record.unlink()
        else:
            content = json.loads(record.read_text())
            content["key"]["torch"] = "2.0.0"
            record.write_text(json.dumps(content))

    rejected, loaded = aot.stats["rejected"], aot.stats["loaded"]
    got, want, folder = _corrupt_and_run(sd15, tmp_path, harm)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert aot.stats["rejected"] == rejected + 1 and aot.stats["loaded"] == loaded
    assert not list(folder.glob("*.pt2")), "a rejected package is removed (rebuilt at the next start)"


def test_another_torch_version_looks_for_another_package(sd15, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    loaded, rejected = aot.stats["loaded"], aot.stats["rejected"]
    got, want, folder = _corrupt_and_run(sd15, tmp_path, lambda folder: None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert aot.stats["loaded"] == loaded and aot.stats["rejected"] == rejected  # not found, not tried
    assert len(list(folder.glob("*.pt2"))) == 1


def test_switch_combinations():
    assert SpeedOptions.parse("channels_last,fused_qkv,aot").names == ("channels_last", "fused_qkv", "aot")
    cpu = torch.device("cpu")
    check(SpeedOptions.parse("channels_last,fused_qkv,aot"), device=cpu, vram="high")
    check(SpeedOptions.parse("aot"), device=cpu, vram="medium")
    for names, vram, device in (("aot,compile", "high", cpu), ("aot,fp8", "high", cpu), ("aot", "low", cpu),
                                ("aot", "high", torch.device("mps"))):
        with pytest.raises(InvalidParameter, match="aot"):
            check(SpeedOptions.parse(names), device=device, vram=vram)


# --- FLUX transformers -------------------------------------------------------------------------


def _flux(seed: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()


def _flux_inputs(seed: int = 0, guidance: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(2, 16, 16, generator=g), encoder_hidden_states=torch.randn(2, 8, 32, generator=g),
                pooled_projections=torch.randn(2, 24, generator=g), timestep=torch.full((2,), 0.6),
                img_ids=torch.randint(0, 4, (16, 3), generator=g).float(), txt_ids=torch.zeros(8, 3),
                guidance=torch.full((2,), 3.5) if guidance else None)


def _run_flux(transformer, inputs: dict, **extra) -> torch.Tensor:
    with torch.inference_mode():  # as pipeline/flux.py calls it
        return transformer(**inputs, **extra, return_dict=False)[0]


def test_flux_transformer_package_matches_eager(tmp_path):
    transformer = _flux(seed=5)
    reference = _flux(seed=6)
    reference.load_state_dict(transformer.state_dict())
    aot.install(transformer, flags=FLAGS, folder=tmp_path)
    built = aot.stats["built"]
    first = _run_flux(transformer, _flux_inputs())
    assert aot.stats["built"] == built + 1
    torch.testing.assert_close(first, _run_flux(reference, _flux_inputs()), rtol=1e-4, atol=1e-5)
    calls = aot.stats["compiled_calls"]
    with torch.inference_mode():
        again = transformer(**_flux_inputs(seed=3)).sample  # return_dict: diffusers' output type
    assert aot.stats["compiled_calls"] == calls + 1
    torch.testing.assert_close(again, _run_flux(reference, _flux_inputs(seed=3)), rtol=1e-4, atol=1e-5)
    (package,) = tmp_path.glob("*.pt2")
    probe = transformer.x_embedder.weight.detach().flatten()[:16].numpy().tobytes()
    assert probe not in package.read_bytes()  # code only: the weights are bound from the module
    assert "FluxTransformer2DModel" in json.loads(package.with_suffix(".json").read_text())["key"]["class"]
    # ControlNet samples are not inputs of the package: eager, and they change the output.
    eager = aot.stats["eager_calls"]
    blocks = [torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(9))]
    got = _run_flux(transformer, _flux_inputs(), controlnet_block_samples=blocks)
    assert aot.stats["eager_calls"] == eager + 1
    torch.testing.assert_close(got, _run_flux(reference, _flux_inputs(), controlnet_block_samples=blocks),
                               rtol=1e-5, atol=1e-6)
    assert (got - first).abs().max() > 1e-4


def test_flux_call_signatures():
    dev = aot.flux_call_inputs((), _flux_inputs())
    schnell = aot.flux_call_inputs((), _flux_inputs(guidance=False))
    assert [n for n, _ in dev] == list(aot._FLUX_TENSORS)
    assert [n for n, _ in schnell] == list(aot._FLUX_TENSORS[:-1])  # no guidance: a package of its own
    assert aot.flux_call_inputs((), {**_flux_inputs(), "joint_attention_kwargs": {"scale": 0.5}}) is None
    assert aot.flux_call_inputs((), {**_flux_inputs(), "timestep": 0.6}) is None  # a Python number
    assert aot.flux_call_inputs((), {k: v for k, v in _flux_inputs().items() if k != "img_ids"}) is None
