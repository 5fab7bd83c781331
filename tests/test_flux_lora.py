"""FLUX LoRAs: original (BFL/kohya/ComfyUI) and diffusers names merged into the diffusers transformer.

The reference for a LoRA on the original fused modules is the full-weight route: add up·down to
the original checkpoint weights, then convert with diffusers' own FLUX converter. The merged
model must hold exactly those weights, and the originals again after the request.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_fixtures import flux_files  # noqa: F401  (session fixture)
from test_flux_models import witness_state_dict

pytest.importorskip("sentencepiece")

RANK, ALPHA = 4, 2.0
# Original modules of the tiny transformer: fused (qkv, linear1), swapped (final modulation) and plain.
MODULES = ("double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1",
           "final_layer.adaLN_modulation.1", "img_in", "double_blocks.0.img_mlp.0", "single_blocks.0.linear2")


@pytest.fixture(scope="module")
def model(flux_files):  # noqa: F811
    from underpaint.models.loader import load_flux

    return load_flux(flux_files["transformer"], clip_l=flux_files["clip_l"], t5=flux_files["t5"],
                     vae=flux_files["ae"], dtype=torch.float32)


@pytest.fixture(scope="module")
def original(flux_files):  # noqa: F811
    return load_file(str(flux_files["transformer"]))


def _updates(original: dict, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in MODULES:
        rows, cols = original[name + ".weight"].shape
        out[name] = (torch.randn(rows, RANK, generator=g) * 0.1, torch.randn(RANK, cols, generator=g) * 0.1)
    return out


def _write(path, updates, style: str):
    tensors = {}
    for name, (up, down) in updates.items():
        if style == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            tensors.update({f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": down,
                            f"{key}.alpha": torch.tensor(ALPHA)})
        else:  # ComfyUI / PEFT-style original names
            key = "diffusion_model." + name
            tensors.update({f"{key}.lora_B.weight": up, f"{key}.lora_A.weight": down,
                            f"{key}.alpha": torch.tensor(ALPHA)})
    save_file(tensors, str(path))
    return path


def _expected(original: dict, updates, multiplier: float, monkeypatch) -> dict[str, torch.Tensor]:
    merged = {k: v.float().clone() for k, v in original.items()}
    for name, (up, down) in updates.items():
        merged[name + ".weight"] += (up @ down) * (ALPHA / RANK) * multiplier
    return witness_state_dict(merged, monkeypatch)


@pytest.mark.parametrize("style", ["kohya", "comfyui"])
def test_lora_on_original_fused_modules_equals_merging_before_conversion(style, model, original, tmp_path,
                                                                         monkeypatch):
    from underpaint.models.lora import LoraPatcher, LoraRequest, ModuleIndex, load_lora

    updates = _updates(original)
    path = _write(tmp_path / f"tiny_{style}.safetensors", updates, style)
    network = load_lora(path, ModuleIndex(model))
    assert not network.unmatched
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    patcher = LoraPatcher()
    changed = patcher.apply([(network, LoraRequest("tiny", te=0.8, unet=0.8))])
    try:
        assert changed == 3 + 3 + 4 + 1 + 1 + 1 + 1  # qkv → 3, txt qkv → 3, linear1 → 4, then one each
        expected = _expected(original, updates, 0.8, monkeypatch)
        state = model.unet.state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, atol=1e-6, rtol=1e-5, msg=key)
    finally:
        patcher.restore()
    for key, value in model.unet.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_diffusers_named_flux_lora(model, tmp_path):
    from underpaint.models.lora import LoraPatcher, LoraRequest, ModuleIndex, load_lora

    layer = model.unet.transformer_blocks[0].attn.to_q
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(RANK, layer.in_features, generator=g), torch.randn(layer.out_features, RANK, generator=g)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b}, str(path))
    base = layer.weight.detach().clone()
    patcher = LoraPatcher()
    patcher.apply([(load_lora(path, ModuleIndex(model)), LoraRequest("x", te=0.5, unet=0.5))])
    try:
        torch.testing.assert_close(layer.weight, base + 0.5 * (b @ a))  # no alpha: scale 1, as diffusers
    finally:
        patcher.restore()
    assert torch.equal(layer.weight, base)


def test_lora_tag_in_a_flux_prompt_changes_the_picture_and_is_recorded(flux_files, original, tmp_path, photo):  # noqa: F811
    from underpaint.pipeline.engine import Engine

    models = tmp_path / "models"
    (models / "loras").mkdir(parents=True)
    _write(models / "loras" / "inkstyle.safetensors", _updates(original, seed=5), "kohya")
    engine = Engine.load(flux_files["transformer"], models_dir=models, clip_l=flux_files["clip_l"],
                         t5=flux_files["t5"], vae=flux_files["ae"], device="cpu", dtype="fp32")
    picture = photo.resize((64, 64))
    plain = engine.img2img(picture, prompt="a boat", strength=0.7, steps=3, seed=4)
    styled = engine.img2img(picture, prompt="a boat <lora:inkstyle:1>", strength=0.7, steps=3, seed=4)
    again = engine.img2img(picture, prompt="a boat", strength=0.7, steps=3, seed=4)
    assert styled.images[0].tobytes() != plain.images[0].tobytes()
    assert again.images[0].tobytes() == plain.images[0].tobytes()  # the weights came back
    assert "Lora hashes: \"inkstyle: " in styled.infotexts[0]


@pytest.mark.parametrize("style", ["kohya", "comfyui"])
def test_lora_on_compressed_weights_runs_at_run_time_and_equals_merging(style, flux_files, original, tmp_path):  # noqa: F811
    from underpaint.models.loader import load_flux
    from underpaint.models.lora import LoraPatcher, LoraRequest, ModuleIndex, load_lora

    parts = dict(clip_l=flux_files["clip_l"], t5=flux_files["t5"], vae=flux_files["ae"], dtype=torch.float32)
    kept = load_flux(flux_files["gguf"], keep_quantized=True, **parts)
    expanded = load_flux(flux_files["gguf"], keep_quantized=False, **parts)
    assert kept.unet.weight_storage.startswith("gguf")
    path = _write(tmp_path / f"q_{style}.safetensors", _updates(original, seed=9), style)
    torch.manual_seed(0)
    tokens, text = torch.randn(1, 16, 64), torch.randn(1, 7, 32)
    inputs = dict(hidden_states=tokens, encoder_hidden_states=text, pooled_projections=torch.randn(1, 16),
                  timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(7, 3),
                  guidance=torch.tensor([3.5]), return_dict=False)
    with torch.no_grad():
        before = kept.unet(**inputs)[0]
    outputs = []
    patchers = []
    for model in (kept, expanded):
        patcher = LoraPatcher()
        patcher.apply([(load_lora(path, ModuleIndex(model)), LoraRequest("q", te=0.7, unet=0.7))])
        patchers.append(patcher)
        with torch.no_grad():
            outputs.append(model.unet(**inputs)[0])
    runtime = [m for m in kept.unet.modules() if getattr(m, "low_rank", None)]
    assert len(runtime) >= 4  # fused qkv / linear1 updates split over compressed layers, applied at run time
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)
    assert (outputs[0] - before).abs().max() > 1e-3  # the LoRA changed the answer
    for patcher in patchers:
        patcher.restore()
    with torch.no_grad():
        torch.testing.assert_close(kept.unet(**inputs)[0], before, atol=0, rtol=0)
