"""LoRAs and embeddings through the engine: tags in the prompt, exact restore, infotext hashes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from underpaint.errors import InvalidParameter, UnknownName
from underpaint.imageio.infotext import parse_infotext
from underpaint.models.loader import load_model
from underpaint.models.registry import ModelsDir
from underpaint.params import GenerationParams
from underpaint.pipeline.engine import Engine
from underpaint.pipeline.networks import ExtraNetworkWarning, lora_requests


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "loras").mkdir()
    (root / "embeddings").mkdir()
    return ModelsDir(root)


@pytest.fixture(scope="module")
def engine(sd1_file, folder):
    return Engine(load_model(sd1_file), models_dir=folder)


def _lora_file(path, model, seed, *, te=True):
    """A kohya LoRA over every attention projection (and the text encoder's), strong enough to show."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    modules = [("lora_unet_" + p.replace(".", "_"), m) for p, m in model.unet.named_modules()
               if isinstance(m, torch.nn.Linear) and ".attn" in p]
    if te:
        modules += [("lora_te_text_model_" + p.replace(".", "_"), m) for p, m in model.text_encoders[0].named_modules()
                    if isinstance(m, torch.nn.Linear)]
    for name, module in modules:
        out_features, in_features = module.weight.shape
        sd[f"{name}.lora_down.weight"] = torch.randn(4, in_features, generator=gen)
        sd[f"{name}.lora_up.weight"] = torch.randn(out_features, 4, generator=gen) * 0.5
        sd[f"{name}.alpha"] = torch.tensor(4.0)
    save_file(sd, str(path))
    return path


def _pixels(result) -> bytes:
    return b"".join(np.asarray(image).tobytes() for image in result.images)


def _weights(model) -> dict[str, torch.Tensor]:
    out = {f"unet.{k}": v.clone() for k, v in model.unet.state_dict().items()}
    out.update({f"te.{k}": v.clone() for k, v in model.text_encoders[0].state_dict().items()})
    return out


def _request(prompt="a red barn", **extra):
    return GenerationParams(prompt=prompt, steps=3, sampler="Euler", width=64, height=64, seed=7, **extra)


def test_lora_request_changes_image_and_never_the_base(engine, folder):
    path = _lora_file(folder.root / "loras" / "barn style.safetensors", engine.model, 1)
    before_weights = _weights(engine.model)
    plain = engine.generate(_request())
    with_lora = engine.generate(_request("a red barn <lora:barn style:0.8>"))
    after = engine.generate(_request())
    assert _pixels(plain) == _pixels(after)
    assert _pixels(with_lora) != _pixels(plain)
    after_weights = _weights(engine.model)
    assert all(torch.equal(before_weights[k], after_weights[k]) for k in before_weights)
    # A1111's record: the name as written in the prompt and the addnet hash (tensor bytes only).
    data = path.read_bytes()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    params = parse_infotext(with_lora.infotexts[0]).params
    assert params["Lora hashes"] == f"barn style: {addnet}"
    assert f'Lora hashes: "barn style: {addnet}"' in with_lora.infotexts[0]
    assert "Lora hashes" not in plain.infotexts[0]
    assert with_lora.infotexts[0].startswith("a red barn <lora:barn style:0.8>\n")


def test_te_and_unet_multipliers_and_several_loras(engine, folder):
    _lora_file(folder.root / "loras" / "a.safetensors", engine.model, 2)
    _lora_file(folder.root / "loras" / "b.safetensors", engine.model, 3, te=False)
    only_te = engine.generate(_request("barn <lora:a:1:0>"))
    only_unet = engine.generate(_request("barn <lora:a:0:1>"))
    nothing = engine.generate(_request("barn <lora:a:0:0>"))
    plain = engine.generate(_request("barn"))
    assert _pixels(nothing) == _pixels(plain)
    assert len({_pixels(only_te), _pixels(only_unet), _pixels(plain)}) == 3
    named = engine.generate(_request("barn <lora:a:te=0:unet=1>"))
    assert _pixels(named) == _pixels(only_unet)
    both = engine.generate(_request("barn <lora:a:0.5>, <lora:b:0.5>"))
    assert parse_infotext(both.infotexts[0]).params["Lora hashes"].count(":") == 2
    assert _pixels(engine.generate(_request("barn"))) == _pixels(plain)


def test_weights_restored_when_the_request_fails(engine, folder):
    _lora_file(folder.root / "loras" / "c.safetensors", engine.model, 4)
    before = _weights(engine.model)

    class Stop(Exception):
        pass

    def progress(report):
        raise Stop

    with pytest.raises(Stop):
        engine.generate(_request("barn <lora:c:1>"), progress=progress)
    after = _weights(engine.model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not engine.model._networks.patcher.active


def test_unknown_lora_lists_what_exists(engine, folder):
    _lora_file(folder.root / "loras" / "barn style.safetensors", engine.model, 1)
    with pytest.raises(UnknownName) as err:
        engine.generate(_request("a barn <lora:barn stile:1>"))
    assert "barn style" in str(err.value)
    with pytest.raises(InvalidParameter, match="multiplier"):
        engine.generate(_request("a barn <lora:barn style:heavy>"))


def test_other_extra_networks_are_ignored_with_a_warning():
    with pytest.warns(ExtraNetworkWarning, match="wildcard:anime"):
        requests = lora_requests("x <wildcard:anime:1> <hypernet:paint:1> <lyco:style:0.5>")
    assert [(r.name, r.te) for r in requests] == [("style", 0.5)]


def test_embeddings_from_the_folder_and_ti_hashes(engine, folder):
    hidden = engine.model.text_encoders[0].config.hidden_size
    gen = torch.Generator().manual_seed(9)
    emb = folder.root / "embeddings" / "barnstyle.safetensors"
    save_file({"emb_params": torch.randn(2, hidden, generator=gen)}, str(emb))
    neg = folder.root / "embeddings" / "badhands.pt"
    torch.save({"string_to_param": {"*": torch.randn(1, hidden, generator=gen)}}, neg)
    (folder.root / "embeddings" / "broken.pt").write_bytes(b"junk")
    with pytest.warns(ExtraNetworkWarning, match="broken.pt"):
        used = engine.generate(_request("a barnstyle barn", negative_prompt="badhands"))
    plain = engine.generate(_request("a barn"))
    assert _pixels(used) != _pixels(plain)
    sha = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in (emb, neg)}
    # A1111 encodes the negative prompt first and puts each later call's names in front.
    assert parse_infotext(used.infotexts[0]).params["TI hashes"] == \
        f"barnstyle: {sha['barnstyle']}, badhands: {sha['badhands']}"
    assert "TI hashes" not in plain.infotexts[0]
