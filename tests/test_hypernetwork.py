"""Hypernetworks (``<hypernet:name:strength>``): A1111's file layouts rebuilt exactly, the UNet's
attention fed as a hand-written attention processor feeds it, and requests that leave the model
as it was."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from underpaint.errors import InvalidParameter, ModelError, UnknownName, UnsafeModelFile
from underpaint.models.hypernetwork import (HypernetworkRequest, attention_layers, hypernetworks_applied,
                                            list_hypernetworks, load_hypernetwork)
from underpaint.models.loader import load_model
from underpaint.models.registry import ModelsDir
from underpaint.params import GenerationParams, HiresOptions, RefinerOptions
from underpaint.pipeline.engine import Engine
from underpaint.pipeline.networks import ExtraNetworkWarning

_ACT = {"relu": F.relu, "tanh": torch.tanh, "swish": F.hardswish, "linear": lambda x: x, None: lambda x: x}


def _branch(width, structure, gen, *, layer_norm=False):
    """Random parameters of one residual MLP: [(weight, bias, (ln_weight, ln_bias) or None), ...]."""
    sizes = [int(width * s) for s in structure]
    return [(torch.randn(o, i, generator=gen) * 0.4, torch.randn(o, generator=gen) * 0.2,
             (1 + torch.randn(o, generator=gen) * 0.1, torch.randn(o, generator=gen) * 0.1) if layer_norm else None)
            for i, o in zip(sizes, sizes[1:])]


def _state_dict(branch, activation, *, dropout=False, activate_output=False):
    """The tensors A1111 saves for a branch: its layer list numbered as modules follow each other
    (Linear, then the activation unless it is the last Linear, then LayerNorm, then Dropout)."""
    sd, index = {}, 0
    for n, (weight, bias, norm) in enumerate(branch):
        sd[f"linear.{index}.weight"], sd[f"linear.{index}.bias"] = weight, bias
        index += 1
        if activation not in (None, "linear") and (n < len(branch) - 1 or activate_output):
            index += 1
        if norm is not None:
            sd[f"linear.{index}.weight"], sd[f"linear.{index}.bias"] = norm
            index += 1
        if dropout and n < len(branch) - 1:
            index += 1
    return sd


def _reference(branch, activation, x, *, activate_output=False):
    """x + MLP(x), written out with functional ops."""
    h = x
    for n, (weight, bias, norm) in enumerate(branch):
        h = F.linear(h, weight, bias)
        if n < len(branch) - 1 or activate_output:
            h = _ACT[activation](h)
        if norm is not None:
            h = F.layer_norm(h, (h.shape[-1],), norm[0], norm[1])
    return h


def _write(path, widths, *, seed=0, activation="relu", structure=(1, 2, 1), layer_norm=False, dropout=False,
           activate_output=False):
    """A hypernetwork file as A1111 saves it; returns {width: (key branch, value branch)}."""
    gen = torch.Generator().manual_seed(seed)
    branches = {w: (_branch(w, structure, gen, layer_norm=layer_norm), _branch(w, structure, gen, layer_norm=layer_norm))
                for w in widths}
    obj = {w: [_state_dict(b, activation, dropout=dropout, activate_output=activate_output) for b in pair]
           for w, pair in branches.items()}
    obj.update(step=1000, name=path.stem, layer_structure=list(structure), activation_func=activation,
               is_layer_norm=layer_norm, weight_initialization="Normal", use_dropout=dropout,
               activate_output=activate_output, sd_checkpoint="a9263745", sd_checkpoint_name="v1-5")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return branches


@pytest.mark.parametrize("layout", [
    dict(activation="relu"),
    dict(activation="tanh", structure=(1, 1.5, 1), layer_norm=True, dropout=True, activate_output=True),
    dict(activation="linear", structure=(1, 2, 2, 1)),
    dict(activation="swish", layer_norm=True),  # A1111 runs "swish" as hard swish
])
def test_file_layouts_compute_what_a1111_computes(tmp_path, layout):
    branches = _write(tmp_path / "net.pt", (16, 24), **layout)
    network = load_hypernetwork(tmp_path / "net.pt")
    assert network.widths == (16, 24) and network.name == "net"
    x = torch.randn(2, 5, 24)
    for part in (0, 1):
        got = network.layers[24][part](x)
        want = _reference(branches[24][part], layout["activation"], x,
                          activate_output=layout.get("activate_output", False))
        torch.testing.assert_close(got, want)


def test_other_devices_get_copies_made_once(tmp_path):
    _write(tmp_path / "net.pt", (16,))
    network = load_hypernetwork(tmp_path / "net.pt")
    elsewhere = network.pair(16, torch.device("meta"))
    assert all(p.device.type == "meta" for mlp in elsewhere for p in mlp.parameters())
    assert all(p.device.type == "cpu" for mlp in network.layers[16] for p in mlp.parameters())
    assert network.pair(16, torch.device("meta"))[0] is elsewhere[0] and network.pair(24, torch.device("meta")) is None


def test_the_oldest_files_name_two_linear_layers(tmp_path):
    gen = torch.Generator().manual_seed(3)
    pair = [{"linear1.weight": torch.randn(32, 16, generator=gen), "linear1.bias": torch.randn(32, generator=gen),
             "linear2.weight": torch.randn(16, 32, generator=gen), "linear2.bias": torch.randn(16, generator=gen)}
            for _ in range(2)]
    torch.save({16: pair}, tmp_path / "nai.pt")
    network = load_hypernetwork(tmp_path / "nai.pt")
    x = torch.randn(3, 16)
    want = F.linear(F.linear(x, pair[1]["linear1.weight"], pair[1]["linear1.bias"]),
                    pair[1]["linear2.weight"], pair[1]["linear2.bias"])
    torch.testing.assert_close(network.layers[16][1](x), want)


def test_bad_files_are_refused_naming_the_problem(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({16: [Evil(), Evil()]}, f)
    with pytest.raises(UnsafeModelFile):
        load_hypernetwork(tmp_path / "evil.pt")
    branches = _write(tmp_path / "odd.pt", (16,), activation="relu")
    obj = torch.load(tmp_path / "odd.pt", weights_only=True)
    obj["activation_func"] = "sparkle"
    torch.save(obj, tmp_path / "odd.pt")
    with pytest.raises(ModelError, match="activation_func 'sparkle'"):
        load_hypernetwork(tmp_path / "odd.pt")
    obj["activation_func"] = "relu"
    obj[16][0]["linear.2.weight"] = torch.zeros(16, 31)  # does not chain from the first layer's 32
    torch.save(obj, tmp_path / "odd.pt")
    with pytest.raises(ModelError, match="16/k: Linear layer 2 is 31"):
        load_hypernetwork(tmp_path / "odd.pt")
    torch.save({"name": "empty"}, tmp_path / "empty.pt")
    with pytest.raises(ModelError, match="no hypernetwork layers"):
        load_hypernetwork(tmp_path / "empty.pt")
    assert branches  # the file was written as A1111 writes it before being spoilt


def test_strength_and_flag_parsing():
    assert HypernetworkRequest.parse("anime:0.5") == HypernetworkRequest("anime", 0.5)
    assert HypernetworkRequest.parse("anime").tag() == "<hypernet:anime:1>"
    with pytest.raises(InvalidParameter, match="strength"):
        HypernetworkRequest.from_args("anime", ("lots",))
    with pytest.raises(InvalidParameter) as err:
        HypernetworkRequest.parse(":1")
    assert err.value.field == "hypernet"


# --------------------------------------------------------------------------- in the UNet


class _HandWritten:
    """Attention with the hypernetwork chain applied to the key and value inputs, written out."""

    def __init__(self, chains):
        self.chains = chains  # width → [(key branch, value branch, activation, strength), ...]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        assert attention_mask is None and not attn.residual_connection and attn.rescale_output_factor == 1
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        ck = cv = context
        for k_branch, v_branch, activation, strength in self.chains.get(context.shape[-1], ()):
            ck = ck + _reference(k_branch, activation, ck) * strength
            cv = cv + _reference(v_branch, activation, cv) * strength
        q, k, v = attn.to_q(hidden_states), attn.to_k(ck), attn.to_v(cv)
        b, heads = q.shape[0], attn.heads
        q, k, v = (t.reshape(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, q.shape[-1] * heads)
        return attn.to_out[1](attn.to_out[0](out))


@pytest.fixture(scope="module")
def model(sd1_file):
    return load_model(sd1_file)


def _widths(model):
    self_widths = {layer.to_k.in_features for layer in attention_layers(model.unet) if not layer.is_cross_attention}
    cross_widths = {layer.to_k.in_features for layer in attention_layers(model.unet) if layer.is_cross_attention}
    return sorted(self_widths), sorted(cross_widths)


def _unet_out(model, context, latents):
    with torch.no_grad():
        return model.unet(latents, torch.tensor([500.0]), encoder_hidden_states=context).sample


def test_unet_attention_matches_a_hand_written_processor(model, tmp_path):
    self_widths, cross_widths = _widths(model)
    assert self_widths and cross_widths
    # one network over every width (self- and cross-attention), one over the text width only
    first = _write(tmp_path / "a.pt", self_widths + cross_widths, seed=1, activation="relu", layer_norm=True)
    second = _write(tmp_path / "b.pt", cross_widths, seed=2, activation="tanh")
    networks = [(load_hypernetwork(tmp_path / "a.pt"), 0.7), (load_hypernetwork(tmp_path / "b.pt"), -0.4)]
    gen = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 77, cross_widths[0], generator=gen)
    plain = _unet_out(model, context, latents)
    with hypernetworks_applied(model.unet, networks) as count:
        hooked = _unet_out(model, context, latents)
    assert count == len(attention_layers(model.unet))
    assert torch.equal(_unet_out(model, context, latents), plain)  # the hooks are gone

    chains = {w: [(first[w][0], first[w][1], "relu", 0.7)] for w in first}
    chains[cross_widths[0]].append((second[cross_widths[0]][0], second[cross_widths[0]][1], "tanh", -0.4))
    processors = model.unet.attn_processors
    model.unet.set_attn_processor(_HandWritten(chains))
    try:
        want = _unet_out(model, context, latents)
    finally:
        model.unet.set_attn_processor(processors)
    torch.testing.assert_close(hooked, want, rtol=1e-4, atol=1e-5)
    assert (hooked - plain).abs().max() > 1e-2


# --------------------------------------------------------------------------- requests


@pytest.fixture(scope="module")
def engine(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    self_widths, cross_widths = _widths(model)
    _write(root / "hypernetworks" / "styles" / "anime.pt", self_widths + cross_widths, seed=4, activation="relu")
    _write(root / "hypernetworks" / "other-model.pt", (999,), seed=5)
    return Engine(model, models_dir=ModelsDir(root))


def _pixels(engine, prompt, **extra) -> np.ndarray:
    params = GenerationParams(prompt=prompt, steps=3, sampler="Euler", width=64, height=64, seed=7, **extra)
    return np.asarray(engine.generate(params).images[0], dtype=np.int16)


def test_a_request_applies_the_tag_and_leaves_the_model_as_it_was(engine):
    plain = _pixels(engine, "a red barn")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExtraNetworkWarning)
        styled = _pixels(engine, "a red barn <hypernet:anime:1>")
        by_path = _pixels(engine, "a red barn <hypernet:styles/anime:1>")
    assert np.abs(styled - plain).mean() > 2 and np.array_equal(styled, by_path)
    assert np.array_equal(_pixels(engine, "a red barn <hypernet:anime:0>"), plain)
    assert np.array_equal(_pixels(engine, "a red barn <hypernet:anime:1>", extra_networks=False), plain)
    assert np.array_equal(_pixels(engine, "a red barn"), plain)
    assert not any(hook for layer in attention_layers(engine.model.unet)
                   for hook in (layer.to_k._forward_pre_hooks, layer.to_v._forward_pre_hooks))


@pytest.mark.parametrize("second", ["refiner", "hires checkpoint"])
def test_a_refiner_or_hires_checkpoint_runs_the_hypernetwork_too(engine, sd1_file, second):
    """A1111 runs a hypernetwork in whichever model is sampling: with the model's own file as the refiner
    or the hires checkpoint, the picture is the model's alone, hypernetwork and all."""
    hires = dict(scale=1.5, upscaler="Lanczos", steps=2, strength=0.5)
    if second == "refiner":
        other, alone = dict(refiner=RefinerOptions(str(sd1_file), 0.5)), {}
    else:
        other, alone = dict(hires=HiresOptions(**hires, checkpoint=str(sd1_file))), dict(hires=HiresOptions(**hires))
    styled = _pixels(engine, "a red barn <hypernet:anime:1>", **other)
    assert np.array_equal(styled, _pixels(engine, "a red barn <hypernet:anime:1>", **alone))
    assert np.abs(styled - _pixels(engine, "a red barn", **other)).mean() > 2
    second_model = engine.refiner_model(str(sd1_file))
    assert second_model is not engine.model
    assert not any(hook for layer in attention_layers(second_model.unet)
                   for hook in (layer.to_k._forward_pre_hooks, layer.to_v._forward_pre_hooks))


def test_unknown_names_bad_strengths_and_other_models(engine):
    with pytest.raises(UnknownName) as err:
        _pixels(engine, "a barn <hypernet:anmie:1>")
    assert err.value.field == "hypernet" and "anime" in str(err.value)
    with pytest.raises(InvalidParameter, match="strength"):
        _pixels(engine, "a barn <hypernet:anime:strong>")
    with pytest.warns(ExtraNetworkWarning, match="'other-model' changes nothing.*999"):
        assert np.array_equal(_pixels(engine, "a red barn <hypernet:other-model>"), _pixels(engine, "a red barn"))
    names = [(e.name, e.relative) for e in list_hypernetworks(engine.model.models_dir.folders("hypernetworks"))]
    assert names == [("other-model", "other-model"), ("anime", "styles/anime")]


def test_cli_flag_is_the_prompt_tag(engine, sd1_file, tmp_path, capsys):
    from underpaint.cli.main import main
    from underpaint.imageio.metadata import read_metadata

    root = engine.model.models_dir.root
    common = ["txt2img", "--model", str(sd1_file), "--models-dir", str(root), "--steps", "2", "--sampler", "Euler",
              "--seed", "3", "-W", "64", "-H", "64"]
    assert main([*common, "-p", "a barn <hypernet:anime:0.8>", "-o", str(tmp_path / "tag.png")]) == 0
    assert main([*common, "-p", "a barn ", "--hypernet", "anime:0.8", "-o", str(tmp_path / "flag.png")]) == 0
    pictures = [np.asarray(Image.open(tmp_path / n)) for n in ("tag.png", "flag.png")]
    assert np.array_equal(*pictures)
    assert read_metadata(tmp_path / "flag.png").infotext.startswith("a barn <hypernet:anime:0.8>\n")
    capsys.readouterr()
    assert main([*common, "-p", "a barn", "--hypernet", "animu", "-o", str(tmp_path / "bad.png")]) == 2
    err = capsys.readouterr().err
    assert "hypernet" in err and "'anime'" in err and not (tmp_path / "bad.png").exists()
