"""PromptEncoder on tiny real-format CLIP encoders, against diffusers and hand computations.

diffusers has no prompt weights or chunking, so plain prompts (one chunk, weights 1) must match
its ``encode_prompt`` exactly; weights, chunk joins and A1111's options are checked against the
same arithmetic written out by hand on the raw text encoder.

Note on clip skip: A1111's ``clip_skip=n`` is diffusers' ``clip_skip=n-1`` (diffusers takes
``hidden_states[-(clip_skip + 1)]``, A1111 ``hidden_states[-clip_skip]``, both then the final
layer norm). diffusers 0.42's own clip-skip branch reads ``text_encoder.text_model``, which
transformers 5's ``CLIPTextModel`` no longer has, so that reference is computed here as
diffusers documents it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from underpaint.errors import InvalidParameter, UnknownName
from underpaint.prompts.encoder import Conditioning, Embedding, PromptEncoder, pad_to_match

BOS, EOS = 49406, 49407
WIDTH = 32


def _config(**overrides):
    from transformers import CLIPTextConfig

    settings = dict(vocab_size=49408, hidden_size=WIDTH, intermediate_size=37, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=77, projection_dim=16,
                    bos_token_id=BOS, eos_token_id=EOS, pad_token_id=1)
    settings.update(overrides)
    return CLIPTextConfig(**settings)


def _realistic_norms(model):
    """Random LayerNorm scales and shifts: fresh ones (1, 0) make the output's mean exactly 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.3)
            torch.nn.init.normal_(module.bias, 0.2, 0.3)
    return model.eval()


def _clip(seed, **overrides):
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return _realistic_norms(CLIPTextModel(_config(**overrides)))


def _clip_projection(seed, **overrides):
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return _realistic_norms(CLIPTextModelWithProjection(_config(hidden_act="gelu", **overrides)))


@pytest.fixture(scope="module")
def tok_l():
    from underpaint.models.tokenizer import clip_tokenizer

    return clip_tokenizer("<|endoftext|>")


@pytest.fixture(scope="module")
def tok_g():
    from underpaint.models.tokenizer import clip_tokenizer

    return clip_tokenizer("!")


@pytest.fixture(scope="module")
def sd1(tok_l):
    return _clip(0), tok_l


@pytest.fixture(scope="module")
def sdxl(tok_l, tok_g):
    return (_clip(1), _clip_projection(2, hidden_size=48, intermediate_size=50)), (tok_l, tok_g)


def _sd_pipeline(text_encoder, tokenizer):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=tokenizer, unet=None,
                                   scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _ids(tokenizer, text, pad=EOS):
    tokens = tokenizer([text], add_special_tokens=False)["input_ids"][0]
    assert len(tokens) <= 75
    return torch.tensor([[BOS, *tokens, EOS] + [pad] * (75 - len(tokens))])


# -- references: diffusers ------------------------------------------------------------------------

@torch.no_grad()
def test_sd1_plain_prompt_equals_diffusers(sd1):
    model, tok = sd1
    pipe = _sd_pipeline(model, tok)
    ref_cond, ref_uncond = pipe.encode_prompt("a photo of a cat, highly detailed", torch.device("cpu"), 1, True,
                                              "blurry, low quality")
    cond, uncond = PromptEncoder((model,), (tok,), family="sd1").encode_pair(
        ["a photo of a cat, highly detailed"], ["blurry, low quality"])
    assert cond.pooled is None and cond.cross_attn.shape == (1, 77, WIDTH)
    assert torch.equal(cond.cross_attn, ref_cond)
    assert torch.equal(uncond.cross_attn, ref_uncond)


@torch.no_grad()
def test_sd2_plain_prompt_equals_diffusers(tok_g):
    # underpaint.models builds SD2's OpenCLIP-H without its last block, as diffusers does
    model = _clip(3, hidden_act="gelu")
    ref, ref_neg = _sd_pipeline(model, tok_g).encode_prompt("a red fox", torch.device("cpu"), 1, True, "")
    cond, uncond = PromptEncoder((model,), (tok_g,), family="sd2", clip_skip=2).encode_pair(["a red fox"], [""])
    assert torch.equal(cond.cross_attn, ref)  # clip skip is ignored for SD2, as in A1111
    assert torch.equal(uncond.cross_attn, ref_neg)  # an empty SD2 negative is encoded, not zeroed


@torch.no_grad()
def test_sdxl_plain_prompt_equals_diffusers(sdxl):
    from diffusers import StableDiffusionXLPipeline

    (l, g), (tok_l, tok_g) = sdxl
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=l, text_encoder_2=g, tokenizer=tok_l,
                                     tokenizer_2=tok_g, unet=None, scheduler=None)
    encoder = PromptEncoder((l, g), (tok_l, tok_g), family="sdxl")
    device = torch.device("cpu")
    cond_ref, neg_ref, pooled_ref, neg_pooled_ref = pipe.encode_prompt(
        "a cat in a hat", device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
        negative_prompt="ugly, blurry")
    cond, uncond = encoder.encode_pair(["a cat in a hat"], ["ugly, blurry"])
    assert cond.cross_attn.shape == (1, 77, WIDTH + 48) and cond.pooled.shape == (1, 16)
    assert torch.equal(cond.cross_attn, cond_ref) and torch.equal(cond.pooled, pooled_ref)
    assert torch.equal(uncond.cross_attn, neg_ref) and torch.equal(uncond.pooled, neg_pooled_ref)

    # an empty negative prompt: zeros, like diffusers' force_zeros_for_empty_prompt
    _, zero_ref, _, zero_pooled_ref = pipe.encode_prompt(
        "a cat in a hat", device=device, num_images_per_prompt=1, do_classifier_free_guidance=True)
    empty_negative = encoder.encode([""], negative=True)
    assert torch.equal(empty_negative.cross_attn, zero_ref) and not zero_ref.any()
    assert torch.equal(empty_negative.pooled, zero_pooled_ref)
    assert encoder.encode([""]).cross_attn.abs().sum() > 0  # an empty *positive* prompt is encoded


@torch.no_grad()
def test_sdxl_clip_skip_ignored_unless_asked(sdxl):
    (l, g), toks = sdxl
    plain = PromptEncoder((l, g), toks, family="sdxl").encode(["a cat"])
    skip2 = PromptEncoder((l, g), toks, family="sdxl", clip_skip=2).encode(["a cat"])
    assert torch.equal(plain.cross_attn, skip2.cross_attn)
    last = PromptEncoder((l, g), toks, family="sdxl", sdxl_clip_l_skip=True).encode(["a cat"])
    ids = _ids(toks[0], "a cat")
    expected_l = l(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(last.cross_attn[..., :WIDTH], expected_l)
    assert torch.equal(last.cross_attn[..., WIDTH:], plain.cross_attn[..., WIDTH:])


@torch.no_grad()
@pytest.mark.parametrize("a1111_clip_skip", [1, 2])
def test_sd1_clip_skip_maps_to_diffusers_minus_one(sd1, a1111_clip_skip):
    model, tok = sd1
    out = model(input_ids=_ids(tok, "a castle on a hill"), output_hidden_states=True)
    diffusers_clip_skip = None if a1111_clip_skip == 1 else a1111_clip_skip - 1
    if diffusers_clip_skip is None:
        expected = out.last_hidden_state
    else:
        expected = model.final_layer_norm(out.hidden_states[-(diffusers_clip_skip + 1)])
    got = PromptEncoder((model,), (tok,), family="sd1", clip_skip=a1111_clip_skip).encode(["a castle on a hill"])
    assert torch.equal(got.cross_attn, expected)


@torch.no_grad()
def test_textual_inversion_equals_diffusers_added_tokens(sd1):
    model, tok = sd1
    torch.manual_seed(5)
    vectors = torch.randn(2, WIDTH)
    pipe = _sd_pipeline(copy.deepcopy(model), copy.deepcopy(tok))
    pipe.load_textual_inversion({"zqstyle": vectors}, token="zqstyle")
    reference, _ = pipe.encode_prompt("a zqstyle photo", torch.device("cpu"), 1, False)
    encoder = PromptEncoder((model,), (tok,), family="sd1", embeddings={"zqstyle": Embedding("zqstyle", (vectors,))})
    assert torch.equal(encoder.encode(["a zqstyle photo"]).cross_attn, reference)


@torch.no_grad()
def test_sdxl_textual_inversion_uses_each_encoders_vectors(sdxl):
    from diffusers import StableDiffusionXLPipeline

    (l, g), (tok_l, tok_g) = sdxl
    torch.manual_seed(6)
    clip_l, clip_g = torch.randn(3, WIDTH), torch.randn(3, 48)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=copy.deepcopy(l), text_encoder_2=copy.deepcopy(g),
                                     tokenizer=copy.deepcopy(tok_l), tokenizer_2=copy.deepcopy(tok_g),
                                     unet=None, scheduler=None)
    pipe.load_textual_inversion(clip_l, token="qqneg", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(clip_g, token="qqneg", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    cond_ref, _, pooled_ref, _ = pipe.encode_prompt("photo, qqneg", device=torch.device("cpu"),
                                                    num_images_per_prompt=1, do_classifier_free_guidance=False)
    embeddings = {"qqneg": Embedding("qqneg", (clip_l, clip_g)), "sd1only": Embedding("sd1only", (clip_l,))}
    encoder = PromptEncoder((l, g), (tok_l, tok_g), family="sdxl", embeddings=embeddings)
    assert list(encoder.embeddings) == ["qqneg"]  # the SD1-shaped one is skipped, as A1111 does
    got = encoder.encode(["photo, qqneg"])
    assert torch.equal(got.cross_attn, cond_ref) and torch.equal(got.pooled, pooled_ref)


# -- weights: hand computation --------------------------------------------------------------------

@torch.no_grad()
def test_original_emphasis_scales_tokens_and_restores_batch_mean(sd1):
    model, tok = sd1
    texts = ["a (cat:1.5) on [grass]", "a dog"]
    got = PromptEncoder((model,), (tok,), family="sd1").encode(texts).cross_attn

    ids = torch.cat([_ids(tok, "a cat on grass"), _ids(tok, "a dog")])
    z = model(input_ids=ids).last_hidden_state
    weights = torch.ones(2, 77)
    weights[0, 2] = 1.5          # BOS, a, cat, on, grass
    weights[0, 4] = 1 / 1.1
    weighted = z * weights[..., None]
    expected = weighted * (z.mean() / weighted.mean())  # one mean over the whole batch
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got[1], z[1])  # the second row is rescaled by the first's weights


@torch.no_grad()
def test_emphasis_modes(sd1):
    model, tok = sd1
    text = "a (cat:1.5) photo"
    z = model(input_ids=_ids(tok, "a cat photo")).last_hidden_state
    weights = torch.ones(1, 77, 1)
    weights[0, 2] = 1.5

    no_norm = PromptEncoder((model,), (tok,), family="sd1", emphasis="No norm").encode([text]).cross_attn
    torch.testing.assert_close(no_norm, z * weights)
    ignore = PromptEncoder((model,), (tok,), family="sd1", emphasis="Ignore").encode([text]).cross_attn
    assert torch.equal(ignore, z)
    literal = PromptEncoder((model,), (tok,), family="sd1", emphasis="None").encode([text]).cross_attn
    assert torch.equal(literal, model(input_ids=_ids(tok, text)).last_hidden_state)
    with pytest.raises(UnknownName):
        PromptEncoder((model,), (tok,), family="sd1", emphasis="original")


@torch.no_grad()
def test_break_is_a_word_with_emphasis_none(sd1):
    model, tok = sd1
    split = PromptEncoder((model,), (tok,), family="sd1").encode(["a cat BREAK a dog"])
    literal = PromptEncoder((model,), (tok,), family="sd1", emphasis="None").encode(["a cat BREAK a dog"])
    assert split.tokens == 154 and literal.tokens == 77


# -- chunks ----------------------------------------------------------------------------------------

@torch.no_grad()
def test_long_prompt_chunks_are_encoded_separately_and_joined(sd1):
    model, tok = sd1
    encoder = PromptEncoder((model,), (tok,), family="sd1")
    text = "cat " * 59 + "cat, " + "dog " * 39
    got = encoder.encode([text])
    assert got.tokens == 154 and encoder.count_tokens(text) == 114
    first, second = encoder.chunks(text)
    expected = torch.cat([model(input_ids=torch.tensor([c.tokens])).last_hidden_state for c in (first, second)], 1)
    assert torch.equal(got.cross_attn, expected)


@torch.no_grad()
def test_rows_are_padded_with_empty_prompt_chunks(sd1):
    model, tok = sd1
    encoder = PromptEncoder((model,), (tok,), family="sd1")
    both = encoder.encode(["a cat", "cat " * 100])
    assert both.cross_attn.shape == (2, 154, WIDTH)
    assert torch.equal(both.cross_attn[0, 77:], encoder.empty().cross_attn[0])
    assert torch.equal(both.cross_attn[0, :77], encoder.encode(["a cat"]).cross_attn[0])


@torch.no_grad()
def test_openclip_padding_after_first_eos(sdxl):
    (l, g), (tok_l, tok_g) = sdxl
    got = PromptEncoder((l, g), (tok_l, tok_g), family="sdxl").encode(["a cat"])
    ids = _ids(tok_g, "a cat", pad=0)
    out = g(input_ids=ids, output_hidden_states=True)
    assert torch.equal(got.cross_attn[..., WIDTH:], out.hidden_states[-2])
    assert torch.equal(got.pooled, out.text_embeds)


@torch.no_grad()
def test_sdxl_pooled_comes_from_the_first_chunk(sdxl):
    (l, g), toks = sdxl
    encoder = PromptEncoder((l, g), toks, family="sdxl")
    long = encoder.encode(["cat " * 100])
    assert long.tokens == 154
    assert torch.equal(long.pooled, encoder.encode(["cat " * 75]).pooled)


@torch.no_grad()
def test_schedule_is_encoded_as_one_batch(sd1):
    from underpaint.prompts.parser import prompt_schedule

    model, tok = sd1
    encoder = PromptEncoder((model,), (tok,), family="sd1")
    schedule = prompt_schedule("a [(cat:1.4):dog " + "dog " * 80 + ":0.5]", 10)
    entries = encoder.encode_schedule(schedule)
    batch = encoder.encode([text for _, text in schedule])
    assert [end for end, _ in entries] == [5, 10]
    assert all(c.tokens == 154 for _, c in entries)  # equal chunk counts across the schedule
    for i, (_, cond) in enumerate(entries):
        assert torch.equal(cond.cross_attn, batch.cross_attn[i:i + 1])


# -- conditioning records --------------------------------------------------------------------------

def test_conditioning_cat_and_padding():
    a = Conditioning(torch.randn(1, 77, 4), torch.randn(1, 3))
    b = Conditioning(torch.randn(2, 154, 4), torch.randn(2, 3))
    with pytest.raises(ValueError, match="token lengths"):
        Conditioning.cat([a, b])
    stacked = Conditioning.cat([a, a])
    assert stacked.cross_attn.shape == (2, 77, 4) and stacked.pooled.shape == (2, 3) and len(stacked) == 2
    padded = Conditioning.cat_padded([a, b])
    assert padded.cross_attn.shape == (3, 154, 4)
    assert torch.equal(padded.cross_attn[0, 77:], a.cross_attn[0, -1:].expand(77, 4))
    assert torch.equal(padded.row(2).cross_attn, b.cross_attn[1:])


def test_pad_to_match_appends_empty_chunks():
    empty = Conditioning(torch.full((1, 77, 4), 7.0))
    cond = Conditioning(torch.randn(1, 231, 4))
    uncond = Conditioning(torch.randn(1, 77, 4))
    c, u = pad_to_match(cond, uncond, empty)
    assert c is cond and u.tokens == 231
    assert torch.equal(u.cross_attn[:, :77], uncond.cross_attn) and (u.cross_attn[:, 77:] == 7.0).all()
    u2, c2 = pad_to_match(uncond, cond, empty)
    assert u2.tokens == c2.tokens == 231


@torch.no_grad()
def test_encode_pair_lengths(sd1):
    model, tok = sd1
    encoder = PromptEncoder((model,), (tok,), family="sd1")
    cond, uncond = encoder.encode_pair(["cat " * 100], ["blurry"])
    assert (cond.tokens, uncond.tokens) == (154, 77)  # A1111's default: not padded
    cond, uncond = encoder.encode_pair(["cat " * 100], ["blurry"], pad=True)
    assert uncond.tokens == 154
    assert torch.equal(uncond.cross_attn[:, 77:], encoder.empty().cross_attn)


# -- validation ------------------------------------------------------------------------------------

def test_constructor_validation(sd1, sdxl):
    model, tok = sd1
    with pytest.raises(UnknownName):
        PromptEncoder((model,), (tok,), family="sd3")
    with pytest.raises(InvalidParameter, match="clip_skip"):
        PromptEncoder((model,), (tok,), family="sd1", clip_skip=3)
    with pytest.raises(InvalidParameter, match="clip_skip"):
        PromptEncoder((model,), (tok,), family="sd1", clip_skip=0)
    with pytest.raises(InvalidParameter, match="text_encoders"):
        PromptEncoder((model,), (tok,), family="sdxl")
    encoder = PromptEncoder((model,), (tok,), family="sd1")
    with pytest.raises(InvalidParameter, match="texts"):
        encoder.encode("a cat")
    with pytest.raises(InvalidParameter, match="texts"):
        encoder.encode([])


@torch.no_grad()
def test_encoding_never_reads_a_tensor_back_to_the_host(sd1, monkeypatch):
    """Whether weights apply is decided from the prompt's own numbers: on a GPU, reading a tensor
    back (bool, item, tolist) would make the host wait for the text encoder to finish."""
    model, tok = sd1
    texts = ["a (cat:1.5) on [grass]", "a dog"]
    expected = [PromptEncoder((model,), (tok,), family="sd1").encode([t]).cross_attn for t in texts]

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host while encoding")

    for name in ("__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    got = [PromptEncoder((model,), (tok,), family="sd1").encode([t]).cross_attn for t in texts]
    monkeypatch.undo()
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
