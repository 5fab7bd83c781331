"""FLUX's T5 encoder in less memory: fp8 linear weights kept as stored, and block-by-block visits in low mode.

References: the same file loaded with everything expanded at load (``keep_quantized=False``),
transformers' ``T5EncoderModel`` given the file's weights upcast by hand, the stored sizes the
file itself reports, and high mode's output for the block-by-block runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tiny_flux as tf
from flux_fixtures import flux_files  # noqa: F401  (session fixture)
from underpaint.models import offload
from underpaint.models.flux_loader import load_flux, load_t5
from underpaint.models.quantized import StoredLinear, module_bytes

IDS = torch.tensor([[5, 17, 3, 42, 9, 1, 0, 0], [7, 7, 120, 1, 0, 0, 0, 0]])


@pytest.fixture(scope="module")
def files(flux_files, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    d = tmp_path_factory.mktemp("flux-t5")
    return {**flux_files, "t5_scaled": tf.write_scaled_fp8_t5(d / "t5xxl_fp8_e4m3fn_scaled.safetensors")}


def _stored_layers(module: torch.nn.Module) -> dict[str, StoredLinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, StoredLinear)}


def _encode(t5: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return t5(IDS).last_hidden_state


def _linear_names(path: Path) -> list[str]:
    """The file's fp8 linear weights (its position bias may be fp8 too, but it is no linear layer)."""
    stored = load_file(str(path))
    return sorted(k for k, v in stored.items() if v.dtype == torch.float8_e4m3fn and k.endswith(tf.T5_LINEARS))


def _witness(path: Path) -> torch.nn.Module:
    """transformers' T5EncoderModel with the file's weights upcast by hand (times their scale factors)."""
    from transformers import T5EncoderModel

    stored = load_file(str(path))
    tensors = {}
    for k, v in stored.items():
        if k.endswith(("scale_weight", "scale_input")) or k == "scaled_fp8":
            continue
        scale = stored.get(k[: -len("weight")] + "scale_weight")
        tensors[k] = v.float() * scale if scale is not None else v.float()
    ref = T5EncoderModel(tf.t5_config())
    missing, unexpected = ref.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}
    ref.encoder.set_input_embeddings(ref.shared)
    return ref.eval()


# --- fp8 kept as stored -------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["t5_fp8", "t5_scaled"])
def test_kept_t5_computes_what_the_expanded_t5_computes(files, key):
    kept, expanded = load_t5(files[key], dtype=torch.float32), load_t5(files[key], dtype=torch.float32,
                                                                         keep_quantized=False)
    linears = _linear_names(files[key])
    assert len(linears) == 7 * tf.T5.layers
    assert sorted(f"{name}.weight" for name in _stored_layers(kept)) == linears
    assert not _stored_layers(expanded)
    assert kept.weight_storage == "fp8_e4m3fn" and expanded.weight_storage == "fp32"
    # the position bias and the embedding are ordinary fp32 tensors, the embedding still tied
    assert {p.dtype for p in kept.parameters()} == {torch.float32}
    assert kept.encoder.embed_tokens.weight is kept.shared.weight
    kept_sd, expanded_sd = kept.state_dict(), expanded.state_dict()
    assert set(kept_sd) == set(expanded_sd)
    assert all(torch.equal(kept_sd[k], expanded_sd[k]) for k in kept_sd)
    out = _encode(kept)
    assert torch.equal(out, _encode(expanded))  # same values, same operations: exact in fp32
    torch.testing.assert_close(out, _encode(_witness(files[key])), rtol=0, atol=1e-5)


def test_kept_t5_in_bf16_equals_expanded(files):
    kept, expanded = (load_t5(files["t5_fp8"], keep_quantized=k) for k in (True, False))
    assert kept.weight_storage == "fp8_e4m3fn" and expanded.weight_storage == "bf16"
    assert {p.dtype for p in kept.parameters()} == {torch.bfloat16}
    out = _encode(kept)
    assert out.dtype == torch.bfloat16 and torch.equal(out, _encode(expanded))


def test_scaled_t5_layers_carry_their_factor(files):
    stored = load_file(str(files["t5_scaled"]))
    name = "encoder.block.1.layer.1.DenseReluDense.wo"
    layer = _stored_layers(load_t5(files["t5_scaled"], dtype=torch.float32))[name]
    scale = stored[f"{name}.scale_weight"]
    assert layer.scale == pytest.approx(float(scale)) and float(scale) != 1.0
    assert torch.equal(layer.dequantized_weight(torch.float32), stored[f"{name}.weight"].float() * scale)


@pytest.mark.parametrize(("dtype", "bytes_per_value"), [(torch.float32, 4), (torch.bfloat16, 2)])
def test_kept_t5_takes_its_stored_size(files, dtype, bytes_per_value):
    kept, expanded = (load_t5(files["t5_fp8"], dtype=dtype, keep_quantized=k) for k in (True, False))
    stored = load_file(str(files["t5_fp8"]))
    values = sum(stored[k].numel() for k in _linear_names(files["t5_fp8"]))
    everything = sum(v.numel() for v in stored.values())  # the file holds the embedding once
    assert module_bytes(expanded) == bytes_per_value * everything
    # the linear weights held at one byte a value, everything else as before
    assert module_bytes(kept) == module_bytes(expanded) - (bytes_per_value - 1) * values
    ratio = module_bytes(kept) / module_bytes(expanded)
    # the tiny T5's embedding is a fifth of its weights (T5-XXL's: under 3 %), so it saves less than a real one
    assert ratio < {torch.float32: 0.45, torch.bfloat16: 0.65}[dtype]


def test_load_flux_passes_keep_quantized_to_a_separate_t5(files):
    parts = dict(clip_l=files["clip_l"], t5=files["t5_fp8"], vae=files["ae"], dtype=torch.float32)
    kept = load_flux(files["transformer"], **parts).text_encoders[1]
    expanded = load_flux(files["transformer"], keep_quantized=False, **parts).text_encoders[1]
    assert _stored_layers(kept) and kept.weight_storage == "fp8_e4m3fn"
    assert not _stored_layers(expanded) and expanded.weight_storage == "fp32"
    plain = load_flux(files["transformer"], **{**parts, "t5": files["t5"]}).text_encoders[1]
    assert not _stored_layers(plain) and plain.weight_storage == "fp32"


def test_engine_generates_the_same_picture_with_a_kept_t5(files, photo):
    from underpaint.pipeline.engine import Engine

    parts = dict(clip_l=files["clip_l"], t5=files["t5_fp8"], vae=files["ae"], dtype=torch.float32)
    picture = photo.resize((64, 64))
    request = dict(prompt="a red house", strength=0.6, steps=2, seed=3, rng="cpu")
    images = [Engine(load_flux(files["transformer"], keep_quantized=k, **parts)).img2img(picture, **request).images[0]
              for k in (True, False)]
    assert np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


# --- low mode: T5 block by block ----------------------------------------------------------------------


def _engine(files, t5: str = "t5"):
    from underpaint.pipeline.engine import Engine

    return Engine(load_flux(files["transformer"], clip_l=files["clip_l"], t5=files[t5], vae=files["ae"],
                            dtype=torch.float32))


def _poison_and_place(model, mode: str, observer=None) -> None:
    """Every resting floating weight (and stored fp8 bytes) replaced by NaN (0xFF bytes, fp8 NaN);
    only the offload's transfer hands out the real ones."""
    real: dict[int, torch.Tensor] = {}
    for module in (*model.text_encoders, model.vae, model.unet):
        for tensor in (*module.parameters(), *module.buffers()):
            if (tensor.is_floating_point() or tensor.dtype == torch.uint8) and tensor.data_ptr() not in real:
                poison = (torch.full_like(tensor.data, float("nan")) if tensor.is_floating_point()
                          else torch.full_like(tensor.data, 0xFF))
                real[poison.data_ptr()] = tensor.data
                tensor.data = poison

    def transfer(tensor, device, dtype):
        return real.get(tensor.data_ptr(), tensor).to(device=device, dtype=dtype or tensor.dtype)

    offload.place(model, mode, device="cpu", home="cpu", transfer=transfer, observer=observer)


@pytest.mark.parametrize("t5", ["t5", "t5_fp8"])
def test_low_mode_t5_computes_only_with_visiting_blocks(files, photo, t5):
    """Low mode with every resting weight NaN: the picture is still high mode's byte for byte, so the
    T5's embedding, final norm and each of its blocks computed only on a visit."""
    picture = photo.resize((64, 64))
    request = dict(prompt="a red house", steps=3, strength=0.7, seed=5, rng="cpu")
    expected = np.asarray(_engine(files, t5).img2img(picture, **request).images[0])
    low = _engine(files, t5)
    _poison_and_place(low.model, "low")
    assert np.array_equal(np.asarray(low.img2img(picture, **request).images[0]), expected)
    t5_model = low.model.text_encoders[1]
    assert torch.isnan(t5_model.encoder.block[0].layer[0].layer_norm.weight).all()  # back home after
    assert torch.isnan(t5_model.shared.weight).all()


def test_low_mode_moves_each_t5_block_around_its_forward(files, photo):
    engine = _engine(files)
    model = engine.model
    t5 = model.text_encoders[1]
    events: list[tuple[str, str]] = []
    offload.place(model, "low", device="cpu", home="cpu", observer=lambda event, part: events.append((event, part)))
    blocks = offload.text_encoder_blocks(t5)
    assert [name for name, _ in blocks] == [f"encoder.block.{i}" for i in range(tf.T5.layers)]
    assert offload.text_encoder_blocks(model.text_encoders[0]) == []  # CLIP-L visits whole
    ran: list[tuple[str, tuple[str, str]]] = []
    handles = [block.register_forward_pre_hook(lambda mod, args, name=name: ran.append((name, events[-1])))
               for name, block in blocks]
    handles.append(t5.encoder.final_layer_norm.register_forward_pre_hook(
        lambda mod, args: ran.append(("final_layer_norm", events[-1]))))
    calls: list[int] = []
    handles.append(t5.register_forward_pre_hook(lambda mod, args: calls.append(len(events))))
    try:
        engine.img2img(photo.resize((64, 64)), prompt="a red house", steps=2, strength=0.5, seed=1, rng="cpu")
    finally:
        for h in handles:
            h.remove()
    text = events[: events.index(("out", "text")) + 1]
    parts = [f"text1.{name}" for name, _ in blocks]
    # within the text encoders' visit, each T5 call (prompt and negative prompt) gives one in/out pair
    # per block, in forward order, one block at a time
    assert calls and text[0] == ("in", "text")
    one_call = [(event, part) for part in parts for event in ("in", "out")]
    assert text[1:-1] == one_call * len(calls)
    # each block's forward starts right after its own arrival; the final norm after the last block left
    per_call = [(name, ("in", f"text1.{name}")) for name, _ in blocks] + [("final_layer_norm", ("out", parts[-1]))]
    assert ran == per_call * len(calls)
    assert not any(part.startswith("text1.") for _, part in events[len(text):])
    assert not model.offload.resident


def test_low_mode_leaves_t5_blocks_home_during_the_text_visit(files):
    """While the text encoders visit, a T5 block's tensors are still the resting ones; CLIP-L's and the
    T5 embedding's are device copies (seen as a transfer that marks what it hands out)."""
    model = _engine(files).model
    t5, clip = model.text_encoders[1], model.text_encoders[0]
    handed: set[int] = set()

    def transfer(tensor, device, dtype):
        out = tensor.clone()
        handed.add(out.data_ptr())
        return out

    offload.place(model, "low", device="cpu", home="cpu", transfer=transfer)
    with offload.on_device(model, "text"):
        assert t5.shared.weight.data_ptr() in handed
        assert t5.encoder.final_layer_norm.weight.data_ptr() in handed
        assert next(clip.parameters()).data_ptr() in handed
        assert not any(p.data_ptr() in handed for p in t5.encoder.block.parameters())
    offload.place(model, "medium", device="cpu", home="cpu", transfer=transfer)
    handed.clear()
    with offload.on_device(model, "text"):  # medium: the whole encoder at once, no block hooks
        assert all(p.data_ptr() in handed for p in t5.encoder.block.parameters())
    assert not model.offload.hooks


def test_high_and_medium_install_no_t5_hooks(files):
    model = _engine(files).model
    for mode in ("high", "medium"):
        assert not offload.place(model, mode, device="cpu", home="cpu").hooks
    low = offload.place(model, "low", device="cpu", home="cpu")
    n_unet = len(offload.offload_blocks(model.unet))
    assert len(low.hooks) == 2 * (n_unet + tf.T5.layers)
    offload.release(model)
    assert not low.hooks
