"""LoRA files in kohya, LyCORIS and diffusers layouts merged into the tiny SD1/SDXL models.

Witnesses, independent of ``underpaint.models.lora``:

- the original LDM tensor names of the tiny checkpoints (``tiny_models``), renamed to diffusers
  modules by the checkpoint loader's own converter;
- diffusers' kohya converter (``_maybe_map_sgm_blocks_to_diffusers`` and
  ``_convert_non_diffusers_lora_to_diffusers``, what ``load_lora_weights`` runs), whose output
  names the module each LoRA tensor belongs to;
- the update formulas written out by hand here (W + m·alpha/r·up@down, LoHa's Hadamard
  product, LoKr's Kronecker product, DoRA's column norm).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

import tiny_models as tm
from underpaint.errors import ModelError, UnknownName
from underpaint.models import configs, convert
from underpaint.models.header import read_header
from underpaint.models.loader import load_model
from underpaint.models.lora import (LoraPatcher, LoraRequest, LoraWarning, ModuleIndex, list_loras, load_lora,
                                    lora_short_hash, resolve_lora)

RANK, ALPHA = 2, 1.5
PREFIX = "model.diffusion_model."  # the UNet's tensors in an original checkpoint


@pytest.fixture(scope="module")
def sd1(sd1_file):
    return load_model(sd1_file)


@pytest.fixture(scope="module")
def sdxl(sdxl_file):
    return load_model(sdxl_file)


def _snapshot(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in (("unet", model.unet), *((f"te{i}", te) for i, te in enumerate(model.text_encoders))):
        out.update({f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    return out


def _assert_unchanged(model, before):
    after = _snapshot(model)
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, changed[:5]


def _pair(shape, gen, *, rank=RANK):
    """(down, up) for a weight of ``shape``: LoCon layout for convolutions (k×k down, 1×1 up)."""
    if len(shape) == 4:
        down = torch.randn(rank, shape[1], shape[2], shape[3], generator=gen) * 0.3
        up = torch.randn(shape[0], rank, 1, 1, generator=gen) * 0.3
    else:
        down = torch.randn(rank, shape[1], generator=gen) * 0.3
        up = torch.randn(shape[0], rank, generator=gen) * 0.3
    return down, up


def _kohya(entries, seed=0):
    """{kohya module name: weight shape} → a kohya state dict with random down/up and alpha."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in entries.items():
        down, up = _pair(shape, gen)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(ALPHA)
    return sd


def _expected_delta(sd, name, shape):
    down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
    delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return (delta * float(sd[f"{name}.alpha"]) / down.shape[0]).reshape(shape)


def _save(tmp_path, name, sd, metadata=None):
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def _apply(model, path, request=None):
    patcher = LoraPatcher()
    network = load_lora(path, ModuleIndex(model))
    patcher.apply([(network, request or LoraRequest(path.stem))])
    return patcher, network


# --- SD1: the original (LDM) names of the checkpoint -------------------------------------------------------

# Original module names in the tiny SD1 file, by kind: attention linears, a 1x1-conv proj_in,
# a 3x3 resnet conv (LoCon), the downsampler, an upsampler, the time embedding, the skip conv.
SD1_ORIGINAL = ["input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.1.proj_in",
                "middle_block.1.transformer_blocks.0.attn2.to_k", "output_blocks.4.1.transformer_blocks.0.ff.net.2",
                "input_blocks.1.0.in_layers.2", "input_blocks.3.0.op", "output_blocks.2.1.conv",
                "time_embed.0", "input_blocks.4.0.skip_connection", "output_blocks.5.0.emb_layers.1"]


def test_sd1_original_names_merge_by_hand(tmp_path, sd1, sd1_file):
    header = read_header(sd1_file)
    shapes = {name: header.shape(f"{PREFIX}{name}.weight") for name in SD1_ORIGINAL}
    sd = _kohya({"lora_unet_" + n.replace(".", "_"): s for n, s in shapes.items()})
    # Where the checkpoint loader puts each original module, as diffusers names it.
    renamed = convert.unet_to_diffusers({f"{n}.weight": torch.zeros(1) for n in SD1_ORIGINAL},
                                        configs.unet_layout(header))
    where = {n: d.removesuffix(".weight") for n, d in zip(SD1_ORIGINAL, renamed)}
    before = _snapshot(sd1)
    patcher, network = _apply(sd1, _save(tmp_path, "ldm", sd))
    assert len(network.patches) == len(SD1_ORIGINAL) and not network.unmatched
    for name, shape in shapes.items():
        module = sd1.unet.get_submodule(where[name])
        expected = before[f"unet.{where[name]}.weight"] + _expected_delta(sd, "lora_unet_" + name.replace(".", "_"), shape)
        torch.testing.assert_close(module.weight, expected, rtol=0, atol=1e-6)
    patcher.restore()
    _assert_unchanged(sd1, before)


def _witness(sd, unet_config):
    """Module path → expected ΔW (scale 1) from diffusers' own kohya conversion."""
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)

    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(sd), unet_config)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(mapped)
    out = {}
    for key, down in converted.items():
        if not key.endswith("down.weight"):
            continue
        up = converted[key.removesuffix("down.weight") + "up.weight"]
        path = key.removesuffix(".down.weight")
        for old, new in ((".lora_linear_layer", ""), (".lora", ""), (".processor", "")):
            path = path.replace(old, new)
        head, _, last = path.rpartition(".")
        if last.endswith("_lora"):  # attention LoRA: diffusers' processor names in the UNet and text encoders
            names = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"} \
                if path.startswith("text_encoder") else {"to_out": "to_out.0"}
            last = last.removesuffix("_lora")
            path = f"{head}.{names.get(last, last)}"
        alpha = alphas.get(key + ".alpha", alphas.get(path + ".alpha"))  # its two spellings of alpha keys
        assert alpha is not None, key
        scale = alpha / down.shape[0]
        out[path] = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * scale
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_names_agree_with_diffusers_converter(tmp_path, family, request):
    """Both kohya spellings land on the modules diffusers' own converter names, with the same ΔW."""
    model = request.getfixturevalue(family)
    index = ModuleIndex(model)
    targets = {t.path: t for t in index.targets("unet")}
    paths = [p for p in targets if ("attentions" in p and p.endswith(("to_q", "to_out.0", "proj_in", "ff.net.2")))
             or p.endswith(("resnets.0.conv1", "resnets.1.conv_shortcut", "downsamplers.0.conv"))]
    assert len(paths) > 10
    te_prefixes = ("lora_te_",) if family == "sd1" else ("lora_te1_", "lora_te2_")
    entries = {}
    for prefix, te in zip(te_prefixes, model.text_encoders):
        for path, module in te.named_modules():
            if path.endswith(("layers.0.self_attn.q_proj", "layers.1.mlp.fc1", "layers.1.self_attn.out_proj")):
                entries[prefix + ("text_model." + path.removeprefix("text_model.")).replace(".", "_")] = \
                    tuple(module.weight.shape)
    for path in paths:
        entries["lora_unet_" + path.replace(".", "_")] = tuple(targets[path].module.weight.shape)
    sd = _kohya(entries, seed=3)
    expected = _witness(sd, model.unet.config)
    before = _snapshot(model)
    patcher, network = _apply(model, _save(tmp_path, "lora", sd), LoraRequest("lora", te=1.0, unet=1.0))
    assert len(network.patches) == len(entries) and not network.unmatched
    te_names = ("text_encoder", "text_encoder_2")
    checked = 0
    for path, delta in expected.items():
        part, _, module_path = path.partition(".")
        if part == "unet":
            module, key = model.unet.get_submodule(module_path), f"unet.{module_path}.weight"
        else:
            te_index = te_names.index(part)
            encoder = model.text_encoders[te_index]
            inner = module_path if hasattr(encoder, "text_model") else module_path.removeprefix("text_model.")
            module, key = encoder.get_submodule(inner), f"te{te_index}.{inner}.weight"
        torch.testing.assert_close(module.weight, before[key] + delta.reshape(module.weight.shape), rtol=0, atol=1e-6)
        checked += 1
    assert checked == len(entries)
    patcher.restore()
    _assert_unchanged(model, before)


def test_sdxl_original_names_equal_diffusers_names(tmp_path, sdxl):
    """An SDXL LoRA written with LDM names (as kohya's SDXL trainer does) merges like its diffusers twin."""
    picked = {ldm: path for ldm, path in _original_names(sdxl).items()
              if "attn2.to_k" in ldm or ldm.endswith(("proj_out", "out_layers.3", ".op", "label_emb.0.0"))}
    assert len(picked) > 8
    gen = torch.Generator().manual_seed(5)
    by_diffusers, by_ldm = {}, {}
    for ldm, path in picked.items():
        down, up = _pair(sdxl.unet.get_submodule(path).weight.shape, gen)
        for sd, name in ((by_diffusers, path), (by_ldm, ldm)):
            key = "lora_unet_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"] = down, up
            sd[f"{key}.alpha"] = torch.tensor(ALPHA)
    before = _snapshot(sdxl)
    merged = []
    for label, sd in (("diffusers", by_diffusers), ("ldm", by_ldm)):
        patcher, network = _apply(sdxl, _save(tmp_path, label, sd))
        assert len(network.patches) == len(picked) and not network.unmatched
        merged.append(_snapshot(sdxl))
        patcher.restore()
    for ldm, path in picked.items():
        key = f"unet.{path}.weight"
        assert torch.equal(merged[0][key], merged[1][key])
        expected = before[key] + _expected_delta(by_ldm, "lora_unet_" + ldm.replace(".", "_"), before[key].shape)
        torch.testing.assert_close(merged[1][key], expected, rtol=0, atol=1e-6)
    _assert_unchanged(sdxl, before)


def _original_names(model) -> dict[str, str]:
    """Original LDM module name → diffusers path, from the checkpoint's own tensor names via the loader's converter."""
    header = read_header(model.path)
    prefix = PREFIX
    originals = sorted({k[len(prefix):].rsplit(".", 1)[0] for k in header.tensors
                        if k.startswith(prefix) and k.endswith(".weight") and len(header.shape(k)) in (2, 4)})
    renamed = convert.unet_to_diffusers({f"{n}.weight": torch.zeros(1) for n in originals}, configs.unet_layout(header))
    return {n: d.removesuffix(".weight") for n, d in zip(originals, renamed)}


# --- multipliers, several networks, other layouts ------------------------------------------------------------


def test_multipliers_several_networks_and_dyn(tmp_path, sd1):
    q_path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    q, fc1 = q_path.replace(".", "_"), "text_model_encoder_layers_0_mlp_fc1"
    module_q = sd1.unet.get_submodule(q_path)
    module_fc1 = sd1.text_encoders[0].get_submodule("encoder.layers.0.mlp.fc1")
    a = _kohya({f"lora_unet_{q}": tuple(module_q.weight.shape), f"lora_te_{fc1}": tuple(module_fc1.weight.shape)}, 1)
    b = _kohya({f"lora_unet_{q}": tuple(module_q.weight.shape)}, 2)
    path_a, path_b = _save(tmp_path, "a", a), _save(tmp_path, "b", b)
    index = ModuleIndex(sd1)
    w_q, w_fc1 = module_q.weight.detach().clone(), module_fc1.weight.detach().clone()
    patcher = LoraPatcher()
    request_a = LoraRequest.from_args("a", ("0.5", "2"))
    request_b = LoraRequest.parse("b:unet=-1:dyn=1")
    assert (request_a.te, request_a.unet, request_b.te, request_b.unet, request_b.dyn) == (0.5, 2.0, 1.0, -1.0, 1)
    patcher.apply([(load_lora(path_a, index), request_a), (load_lora(path_b, index), request_b)])
    down_b, up_b = b[f"lora_unet_{q}.lora_down.weight"], b[f"lora_unet_{q}.lora_up.weight"]
    dyn_delta = up_b[:, :1] @ down_b[:1] * ALPHA / RANK  # dyn keeps rank 1; alpha still divides by the full rank
    expected_q = w_q + 2 * _expected_delta(a, f"lora_unet_{q}", w_q.shape) - dyn_delta
    torch.testing.assert_close(module_q.weight, expected_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(module_fc1.weight, w_fc1 + 0.5 * _expected_delta(a, f"lora_te_{fc1}", w_fc1.shape),
                               rtol=0, atol=1e-6)
    patcher.restore()
    assert torch.equal(module_q.weight, w_q) and torch.equal(module_fc1.weight, w_fc1)


def test_peft_names_merge_like_kohya(tmp_path, sd1):
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    out = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    fc2 = "text_model.encoder.layers.1.mlp.fc2"
    shapes = {q: sd1.unet.get_submodule(q).weight.shape, out: sd1.unet.get_submodule(out).weight.shape,
              fc2: sd1.text_encoders[0].get_submodule(fc2.removeprefix("text_model.")).weight.shape}
    kohya = _kohya({("lora_te_" if p.startswith("text") else "lora_unet_") + p.replace(".", "_"): tuple(s)
                    for p, s in shapes.items()}, seed=7)
    peft, old = {}, {}
    for p in shapes:
        name = ("lora_te_" if p.startswith("text") else "lora_unet_") + p.replace(".", "_")
        head = "text_encoder" if p.startswith("text") else "unet"
        down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
        peft[f"{head}.{p}.lora_A.weight"], peft[f"{head}.{p}.lora_B.weight"] = down, up
        peft[f"{head}.{p}.alpha"] = kohya[f"{name}.alpha"]
        if head == "unet":  # the attention-processor layout of older diffusers files
            parent, last = p.rsplit(".", 1) if not p.endswith("to_out.0") else (p[:-len(".to_out.0")], "to_out")
            old[f"unet.{parent}.processor.{last}_lora.down.weight"] = down
            old[f"unet.{parent}.processor.{last}_lora.up.weight"] = up
            old[f"unet.{parent}.processor.{last}_lora.alpha"] = kohya[f"{name}.alpha"]
    before = _snapshot(sd1)
    results = []
    for label, sd in (("kohya", kohya), ("peft", peft), ("old", old)):
        patcher, network = _apply(sd1, _save(tmp_path, label, sd))
        assert not network.unmatched, network.unmatched
        results.append(_snapshot(sd1))
        patcher.restore()
    for other in results[1:]:
        for key in ("unet." + q + ".weight", "unet." + out + ".weight"):
            assert torch.equal(other[key], results[0][key])
    assert torch.equal(results[1]["te0.encoder.layers.1.mlp.fc2.weight"], results[0]["te0.encoder.layers.1.mlp.fc2.weight"])
    _assert_unchanged(sd1, before)


def _loha(shape, gen, *, rank=2, tucker=False):
    out_ch, in_ch = shape[0], shape[1]
    k = shape[2:] if len(shape) == 4 else ()
    w = {}
    for i in (1, 2):
        if tucker:
            w[f"hada_t{i}"] = torch.randn(rank, rank, *k, generator=gen) * 0.5
            w[f"hada_w{i}_a"] = torch.randn(rank, out_ch, generator=gen) * 0.5
            w[f"hada_w{i}_b"] = torch.randn(rank, in_ch, generator=gen) * 0.5
        else:
            w[f"hada_w{i}_a"] = torch.randn(out_ch, rank, generator=gen) * 0.5
            w[f"hada_w{i}_b"] = torch.randn(rank, in_ch * (k[0] * k[1] if k else 1), generator=gen) * 0.5
    return w


def _loha_by_hand(w, shape, tucker):
    if tucker:  # W_i[o, c, h, v] = Σ_ab t_i[a, b, h, v] · w_ia[a, o] · w_ib[b, c]
        parts = [torch.einsum("abhv,ao,bc->ochv", w[f"hada_t{i}"], w[f"hada_w{i}_a"], w[f"hada_w{i}_b"])
                 for i in (1, 2)]
    else:
        parts = [(w[f"hada_w{i}_a"] @ w[f"hada_w{i}_b"]).reshape(shape) for i in (1, 2)]
    return parts[0] * parts[1]


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_linear_and_conv(tmp_path, sd1, tucker):
    gen = torch.Generator().manual_seed(11)
    paths = ["down_blocks.0.resnets.0.conv1"] + ([] if tucker else ["down_blocks.0.attentions.0.proj_in",
                                                                  "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj"])
    sd, expected = {}, {}
    for p in paths:
        shape = sd1.unet.get_submodule(p).weight.shape
        w = _loha(shape, gen, tucker=tucker)
        name = "lora_unet_" + p.replace(".", "_")
        sd.update({f"{name}.{k}": v for k, v in w.items()})
        sd[f"{name}.alpha"] = torch.tensor(1.0)
        expected[p] = _loha_by_hand(w, shape, tucker).reshape(shape) * 1.0 / 2
    before = _snapshot(sd1)
    patcher, network = _apply(sd1, _save(tmp_path, "loha", sd), LoraRequest("loha", unet=0.7))
    assert {p.kind for p in network.patches} == {"loha"}
    for p, delta in expected.items():
        torch.testing.assert_close(sd1.unet.get_submodule(p).weight, before[f"unet.{p}.weight"] + 0.7 * delta,
                                   rtol=0, atol=1e-5)
    patcher.restore()
    _assert_unchanged(sd1, before)


def test_lokr_full_and_factored(tmp_path, sd1):
    gen = torch.Generator().manual_seed(12)
    linear = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"  # 32x32
    conv = "down_blocks.0.resnets.1.conv2"  # 32x32x3x3
    w1 = torch.randn(4, 4, generator=gen)
    w2a, w2b = torch.randn(8, 2, generator=gen), torch.randn(2, 8, generator=gen)
    c1, c2 = torch.randn(2, 4, generator=gen), torch.randn(16, 8, 3, 3, generator=gen)
    sd = {f"lora_unet_{linear.replace('.', '_')}.lokr_w1": w1, f"lora_unet_{linear.replace('.', '_')}.lokr_w2_a": w2a,
          f"lora_unet_{linear.replace('.', '_')}.lokr_w2_b": w2b, f"lora_unet_{linear.replace('.', '_')}.alpha": torch.tensor(4.0),
          f"lora_unet_{conv.replace('.', '_')}.lokr_w1": c1, f"lora_unet_{conv.replace('.', '_')}.lokr_w2": c2}
    before = _snapshot(sd1)
    patcher, network = _apply(sd1, _save(tmp_path, "lokr", sd))
    # Kronecker product written out: block (i, j) of ΔW is w1[i, j] · w2.
    w2 = w2a @ w2b
    by_hand = torch.cat([torch.cat([w1[i, j] * w2 for j in range(4)], dim=1) for i in range(4)], dim=0)
    torch.testing.assert_close(sd1.unet.get_submodule(linear).weight, before[f"unet.{linear}.weight"] + by_hand * 4.0 / 2,
                               rtol=0, atol=1e-5)
    conv_hand = torch.cat([torch.cat([c1[i, j] * c2 for j in range(4)], dim=1) for i in range(2)], dim=0)
    torch.testing.assert_close(sd1.unet.get_submodule(conv).weight, before[f"unet.{conv}.weight"] + conv_hand,
                               rtol=0, atol=1e-5)  # no alpha: scale 1
    patcher.restore()
    _assert_unchanged(sd1, before)


def test_dora_and_full_difference(tmp_path, sd1):
    q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
    proj = "mid_block.attentions.0.proj_out"
    module, proj_module = sd1.unet.get_submodule(q), sd1.unet.get_submodule(proj)
    sd = _kohya({"lora_unet_" + q.replace(".", "_"): tuple(module.weight.shape)}, seed=4)
    magnitude = torch.rand(1, module.weight.shape[1]) + 0.5
    sd["lora_unet_" + q.replace(".", "_") + ".dora_scale"] = magnitude
    diff = torch.randn(proj_module.weight.shape) * 0.01
    diff_b = torch.randn(proj_module.bias.shape) * 0.01
    sd["lora_unet_" + proj.replace(".", "_") + ".diff"] = diff
    sd["lora_unet_" + proj.replace(".", "_") + ".diff_b"] = diff_b
    w, w_proj, b_proj = module.weight.detach().clone(), proj_module.weight.detach().clone(), proj_module.bias.detach().clone()
    patcher, _ = _apply(sd1, _save(tmp_path, "dora", sd), LoraRequest("dora", unet=0.5))
    merged = w + _expected_delta(sd, "lora_unet_" + q.replace(".", "_"), w.shape)
    column_norms = merged.norm(dim=0, keepdim=True)  # over the output rows: one norm per input column
    expected = w + 0.5 * (merged * magnitude / column_norms - w)
    torch.testing.assert_close(module.weight, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(proj_module.weight, w_proj + 0.5 * diff.reshape(w_proj.shape), rtol=0, atol=1e-7)
    torch.testing.assert_close(proj_module.bias, b_proj + 0.5 * diff_b, rtol=0, atol=1e-7)
    patcher.restore()
    assert torch.equal(module.weight, w) and torch.equal(proj_module.bias, b_proj)


@pytest.fixture(scope="module")
def lycoris():
    """LyCORIS' functional OFT and BOFT and its IA3 arithmetic (the library that trains them)."""
    pytest.importorskip("lycoris")
    import lycoris.functional.boft as boft
    import lycoris.functional.diag_oft as diag_oft
    from lycoris.modules import ia3

    return diag_oft, boft, ia3


def test_oft_boft_and_ia3_merge_as_lycoris_computes_them(tmp_path, sd1, lycoris):
    """OFT blocks (Cayley-made rotations, the norm clamped to alpha × outputs when alpha is set), with a
    rescale; a three-stage butterfly (BOFT); an older file's rotations as stored (``oft_diag``); IA³ on a
    layer's outputs and on a convolution's inputs: each ΔW as LyCORIS makes it, times the multiplier (an
    OFT's alpha is no scale), undone exactly."""
    diag_oft, boft, ia3 = lycoris
    gen = torch.Generator().manual_seed(13)
    names = {"oft": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k",  # 32x32
             "oft_conv": "down_blocks.0.resnets.1.conv2",  # 32x32x3x3
             "boft": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v",
             "diag": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "ia3": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",  # 32x32
             "ia3_conv": "down_blocks.0.resnets.0.conv1"}
    w = {key: sd1.unet.get_submodule(path).weight.detach().clone() for key, path in names.items()}
    kohya = {key: "lora_unet_" + path.replace(".", "_") for key, path in names.items()}
    blocks = torch.randn(4, 8, 8, generator=gen) * 0.3
    conv_blocks, rescale = torch.randn(2, 16, 16, generator=gen) * 0.05, 1 + torch.randn(32, 1, 1, 1, generator=gen) * 0.1
    butterfly = torch.randn(3, 4, 8, 8, generator=gen) * 0.1
    rotation = torch.linalg.qr(torch.randn(4, 8, 8, generator=gen)).Q
    outputs, inputs = torch.randn(32, generator=gen) * 0.2, torch.randn(1, 32, 1, 1, generator=gen) * 0.2
    sd = {f"{kohya['oft']}.oft_blocks": blocks, f"{kohya['oft']}.alpha": torch.tensor(0.01),  # clamped
          f"{kohya['oft_conv']}.oft_blocks": conv_blocks, f"{kohya['oft_conv']}.rescale": rescale,
          f"{kohya['boft']}.oft_blocks": butterfly, f"{kohya['boft']}.alpha": torch.tensor(0.0),
          f"{kohya['diag']}.oft_diag": rotation,
          f"{kohya['ia3']}.weight": outputs, f"{kohya['ia3']}.on_input": torch.tensor(0),
          f"{kohya['ia3_conv']}.weight": inputs, f"{kohya['ia3_conv']}.on_input": torch.tensor(1)}
    expected = {
        "oft": diag_oft.diff_weight(w["oft"], blocks, None, constraint=0.01 * 32, backend="torch"),
        "oft_conv": diag_oft.diff_weight(w["oft_conv"], conv_blocks, rescale, constraint=0, backend="torch"),
        "boft": boft.diff_weight(w["boft"], butterfly, None, constraint=0, backend="torch"),
        "diag": torch.einsum("knm,kn...->km...", rotation, w["diag"].reshape(4, 8, -1)).reshape(32, -1) - w["diag"],
        "ia3": ia3._ia3_weight(w["ia3"], outputs, False, 1.0, True),
        "ia3_conv": ia3._ia3_weight(w["ia3_conv"], inputs, True, 1.0, True)}
    q = blocks - blocks.transpose(1, 2)
    assert torch.linalg.vector_norm(q) > 0.32  # the constraint does clamp this one
    before = _snapshot(sd1)
    patcher, network = _apply(sd1, _save(tmp_path, "oft", sd), LoraRequest("oft", unet=0.6))
    assert sorted(p.kind for p in network.patches) == ["ia3", "ia3", "oft", "oft", "oft", "oft"]
    assert not network.unsupported
    for key, path in names.items():
        torch.testing.assert_close(sd1.unet.get_submodule(path).weight, w[key] + 0.6 * expected[key].reshape(w[key].shape),
                                   rtol=0, atol=2e-6, msg=key)
    patcher.restore()
    _assert_unchanged(sd1, before)


def test_norm_networks_add_to_the_norm_layers(tmp_path, sd1):
    """LyCORIS' norm networks (``w_norm``, ``b_norm``, its "train norm" option): a norm layer's weight and
    bias plus the stored differences times the multiplier (the UNet's group norms and the text encoder's
    layer norms, kohya and LDM names), as A1111 and LyCORIS add them; undone exactly."""
    gen = torch.Generator().manual_seed(14)
    encoder = sd1.text_encoders[0]
    inner = "encoder.layers.0.layer_norm1"
    modules = {"unet": sd1.unet.get_submodule("down_blocks.0.resnets.0.norm1"),
               "te0": encoder.get_submodule(inner if hasattr(encoder, "encoder") else "text_model." + inner)}
    names = {"unet": "lora_unet_input_blocks_1_0_in_layers_0",  # the LDM name of down_blocks.0.resnets.0.norm1
             "te0": "lora_te_text_model_" + inner.replace(".", "_")}
    sd, want = {}, {}
    for key, module in modules.items():
        w, b = torch.randn(module.weight.shape, generator=gen) * 0.1, torch.randn(module.bias.shape, generator=gen) * 0.1
        sd[f"{names[key]}.w_norm"], sd[f"{names[key]}.b_norm"] = w, b
        want[key] = (module.weight.detach() + 0.5 * w, module.bias.detach() + 0.5 * b)
    before = _snapshot(sd1)
    patcher, network = _apply(sd1, _save(tmp_path, "norms", sd), LoraRequest("norms", te=0.5, unet=0.5))
    assert [p.kind for p in network.patches] == ["norm", "norm"] and not network.unmatched
    for key, module in modules.items():
        torch.testing.assert_close(module.weight, want[key][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(module.bias, want[key][1], rtol=0, atol=1e-6)
    patcher.restore()
    _assert_unchanged(sd1, before)


def test_rotations_that_do_not_fit_are_skipped(tmp_path, sd1):
    to_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"  # 32 outputs
    before = _snapshot(sd1)
    with pytest.warns(LoraWarning, match="do not fit"):
        patcher, _ = _apply(sd1, _save(tmp_path, "bad", {f"{to_k}.oft_blocks": torch.zeros(5, 6, 6)}))
    _assert_unchanged(sd1, before)


# --- what goes wrong, and how it is reported -------------------------------------------------------------------


def test_unmatched_keys_warn_and_the_rest_applies(tmp_path, sd1):
    q = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd = _kohya({f"lora_unet_{q}": (32, 32), "lora_unet_no_such_block_0_to_q": (8, 8),
                 "lora_te2_text_model_encoder_layers_0_mlp_fc1": (8, 8)})
    with pytest.warns(LoraWarning, match=r"match no module.*no_such_block"):
        network = load_lora(_save(tmp_path, "partial", sd), ModuleIndex(sd1))
    assert len(network.patches) == 1 and len(network.unmatched) == 6


def test_wrong_shapes_warn_and_are_skipped(tmp_path, sd1):
    q = "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    sd = _kohya({f"lora_unet_{q}": (7, 5)})
    before = _snapshot(sd1)
    with pytest.warns(LoraWarning, match="do not fit"):
        patcher, _ = _apply(sd1, _save(tmp_path, "wrong", sd))
    _assert_unchanged(sd1, before)
    assert not patcher.active


def test_not_a_lora(tmp_path, sd1, sd1_file):
    with pytest.raises(ModelError, match="not a LoRA file"):
        load_lora(sd1_file, ModuleIndex(sd1))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ModelError, match="junk.safetensors"):
        load_lora(junk, ModuleIndex(sd1))


def test_glora_merges_as_lycoris_computes_it(tmp_path, sd1):
    """GLoRA (W·A + B) in LyCORIS' current layout on a linear layer and on a 3x3 convolution, each ΔW as
    LyCORIS' own GLoRA module computes it (alpha / rank included), times the multiplier; the first layout's
    files (A = a2·a1, B = b2·b1, as A1111 and ComfyUI read them) on another layer; all undone exactly."""
    import copy

    pytest.importorskip("lycoris")
    from lycoris.modules.glora import GLoRAModule

    gen = torch.Generator().manual_seed(15)
    names = {"linear": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",  # 32x32
             "conv": "down_blocks.0.resnets.1.conv2",  # 32x32x3x3
             "old": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"}
    kohya = {key: "lora_unet_" + path.replace(".", "_") for key, path in names.items()}
    w = {key: sd1.unet.get_submodule(path).weight.detach().clone() for key, path in names.items()}
    sd, expected = {}, {}
    for key, alpha in (("linear", 2.0), ("conv", 8.0)):
        module = GLoRAModule(key, copy.deepcopy(sd1.unet.get_submodule(names[key])), lora_dim=4, alpha=alpha)
        with torch.no_grad():
            for part in (module.a1, module.a2, module.b1, module.b2):
                part.weight.copy_(torch.randn(part.weight.shape, generator=gen) * 0.2)
        expected[key] = module.get_diff_weight(multiplier=1.0)[0]
        sd.update({f"{kohya[key]}.{name}": value for name, value in module.state_dict().items()})
    a1, a2, b1, b2 = (torch.randn(shape, generator=gen) * 0.2 for shape in ((4, 32), (32, 4), (4, 32), (32, 4)))
    sd.update({f"{kohya['old']}.a1.weight": a1, f"{kohya['old']}.a2.weight": a2, f"{kohya['old']}.b1.weight": b1,
               f"{kohya['old']}.b2.weight": b2, f"{kohya['old']}.alpha": torch.tensor(4.0)})
    expected["old"] = b2 @ b1 + w["old"] @ a2 @ a1
    assert sd[f"{kohya['conv']}.b2.weight"].shape == (4, 32, 3, 3)  # LyCORIS' layout: B's first factor has the kernel

    before = _snapshot(sd1)
    patcher, network = _apply(sd1, _save(tmp_path, "glora", sd), LoraRequest("glora", unet=0.7))
    assert [p.kind for p in network.patches] == ["glora"] * 3 and not network.unsupported
    for key, path in names.items():
        torch.testing.assert_close(sd1.unet.get_submodule(path).weight, w[key] + 0.7 * expected[key],
                                   rtol=0, atol=2e-6, msg=key)
    patcher.restore()
    _assert_unchanged(sd1, before)


def test_unsupported_kind_warns(tmp_path, sd1):
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1": torch.zeros(4, 4)}  # a LoKr without its w2
    with pytest.warns(LoraWarning, match="does not merge"):
        network = load_lora(_save(tmp_path, "glora", sd), ModuleIndex(sd1))
    assert not network.patches


def test_names_folders_and_hashes(tmp_path):
    (tmp_path / "loras" / "styles").mkdir(parents=True)
    sd = {"lora_unet_x.lora_down.weight": torch.zeros(1, 2), "lora_unet_x.lora_up.weight": torch.ones(2, 1)}
    a = _save(tmp_path / "loras", "film grain", sd, {"ss_output_name": "filmGrainV2"})
    b = _save(tmp_path / "loras" / "styles", "ink", sd, {"sshs_model_hash": "0123456789abcdef" * 4})
    torch.save({"lora_unet_y.lora_down.weight": torch.zeros(1, 2)}, tmp_path / "loras" / "old.pt")
    folders = [tmp_path / "loras"]
    assert [e.name for e in list_loras(folders)] == ["film grain", "old", "ink"]
    assert resolve_lora("film grain", folders) == a
    assert resolve_lora("styles/ink", folders) == b == resolve_lora("ink", folders)
    assert resolve_lora("filmGrainV2", folders) == a  # the alias the trainer stored
    with pytest.raises(UnknownName) as err:
        resolve_lora("film grian", folders)
    assert "film grain" in str(err.value) and err.value.field == "lora"
    # addnet hash: sha256 of the bytes after the header, so metadata edits do not change it.
    import hashlib

    body = a.read_bytes()[8 + int.from_bytes(a.read_bytes()[:8], "little"):]
    assert lora_short_hash(a) == hashlib.sha256(body).hexdigest()[:12]
    assert lora_short_hash(b) == "0123456789ab"  # the trainer's sshs_model_hash wins, as in A1111
    pt = tmp_path / "loras" / "old.pt"
    assert lora_short_hash(pt) == hashlib.sha256(pt.read_bytes()).hexdigest()[:12]


@pytest.mark.parametrize("text, message", [("", "NAME"), ("x:abc", "number"), ("x:1:1:0", "whole number")])
def test_bad_requests(text, message):
    from underpaint.errors import InvalidParameter

    with pytest.raises(InvalidParameter, match=message):
        LoraRequest.parse(text)


def test_request_tags_round_trip():
    for text in ("a", "a:0.5", "a:0.5:1", "a:1:1:4"):
        request = LoraRequest.parse(text)
        assert LoraRequest.parse(request.tag()[len("<lora:"):-1]) == request


def test_inpainting_conv_in_gets_padded_update(tmp_path):
    """A LoRA trained on a 4-channel conv_in applies to a 9-channel inpainting model, zero-padded (A1111)."""
    path = tm.write_sd1(tmp_path / "inpaint.safetensors", inpaint=True)
    model = load_model(path)
    sd = _kohya({"lora_unet_conv_in": (32, 4, 3, 3)})
    w = model.unet.conv_in.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patcher, _ = _apply(model, _save(tmp_path, "conv", sd))
    delta = _expected_delta(sd, "lora_unet_conv_in", (32, 4, 3, 3))
    torch.testing.assert_close(model.unet.conv_in.weight[:, :4], w[:, :4] + delta, rtol=0, atol=1e-6)
    assert torch.equal(model.unet.conv_in.weight[:, 4:], w[:, 4:])
    patcher.restore()
    assert torch.equal(model.unet.conv_in.weight, w)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_same_weights_as_diffusers_load_lora_weights(tmp_path, family, request):
    """diffusers' ``load_lora_weights`` + ``fuse_lora`` on a pipeline of the same modules gives the same
    weights (needs the optional ``peft`` package, which diffusers uses for LoRA)."""
    pytest.importorskip("peft")
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    path = request.getfixturevalue(f"{family}_file")
    ours, theirs = load_model(path), load_model(path)
    gen = torch.Generator().manual_seed(21)
    entries = {"lora_unet_" + p.replace(".", "_"): tuple(m.weight.shape) for p, m in ours.unet.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ("attentions" in p or "resnets" in p)}
    prefixes = ("lora_te_",) if family == "sd1" else ("lora_te1_", "lora_te2_")
    for prefix, encoder in zip(prefixes, ours.text_encoders):
        entries.update({prefix + "text_model_" + p.removeprefix("text_model.").replace(".", "_"): tuple(m.weight.shape)
                        for p, m in encoder.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in p})
    lora = _save(tmp_path, "all", _kohya(entries, seed=int(torch.randint(0, 100, (1,), generator=gen))))
    network = load_lora(lora, ModuleIndex(ours))
    assert len(network.patches) == len(entries)
    LoraPatcher().apply([(network, LoraRequest("all", te=0.7, unet=0.7))])
    parts = dict(vae=theirs.vae, text_encoder=theirs.text_encoders[0], tokenizer=theirs.tokenizers[0],
                 unet=theirs.unet, scheduler=EulerDiscreteScheduler())
    if family == "sd1":
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=theirs.text_encoders[1],
                                         tokenizer_2=theirs.tokenizers[1])
    pipe.load_lora_weights(str(lora), adapter_name="all")
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()
    mine, reference = _snapshot(ours), _snapshot(theirs)
    assert mine.keys() == reference.keys()
    for key, value in mine.items():  # the same products, scaled in another order: float32 rounding only
        torch.testing.assert_close(value, reference[key], rtol=0, atol=2e-7, msg=key)


def test_sd2_last_text_layer_is_skipped_quietly(tmp_path, sd2v_file):
    """SD2 conditions on OpenCLIP's penultimate layer, so the model has no last layer; a LoRA for it
    (kohya trains all of them) changes nothing and needs no warning."""
    model = load_model(sd2v_file)
    layers = model.text_encoders[0].config.num_hidden_layers
    hidden = model.text_encoders[0].config.hidden_size
    sd = _kohya({f"lora_te_text_model_encoder_layers_{i}_mlp_fc1": (4 * hidden, hidden) for i in range(layers + 1)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        network = load_lora(_save(tmp_path, "sd2", sd), ModuleIndex(model))
    assert len(network.patches) == layers and not network.unmatched


def test_doctests():
    import doctest

    import underpaint.models.lora as lora

    assert doctest.testmod(lora).failed == 0


def test_suspended_shows_the_original_weights_and_puts_the_merged_ones_back(tmp_path, sd1, sd1_file):
    header = read_header(sd1_file)
    name = SD1_ORIGINAL[0]
    sd = _kohya({"lora_unet_" + name.replace(".", "_"): header.shape(f"{PREFIX}{name}.weight")})
    before = _snapshot(sd1)
    patcher, _ = _apply(sd1, _save(tmp_path, "one", sd))
    merged = _snapshot(sd1)
    assert any(not torch.equal(merged[k], before[k]) for k in before)
    with patcher.suspended():
        _assert_unchanged(sd1, before)
    assert all(torch.equal(_snapshot(sd1)[k], merged[k]) for k in merged)
    patcher.restore()
    _assert_unchanged(sd1, before)
    with patcher.suspended():  # nothing merged: nothing to do
        _assert_unchanged(sd1, before)
