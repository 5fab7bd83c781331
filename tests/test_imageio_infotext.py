"""Infotext writing and parsing against A1111 1.10's layout and reader rules."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from underpaint.errors import InvalidParameter
from underpaint.imageio.infotext import (
    STANDARD_KEY_ORDER,
    ParsedInfotext,
    apply_defaults,
    format_infotext,
    format_value,
    join_size_params,
    order_params,
    parse_infotext,
    parse_version,
    quote,
)

BASIC = {
    "Steps": 20,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 7.0,
    "Seed": 1234567890,
    "Size": "512x768",
    "Model hash": "6ce0161689",
    "Model": "v1-5-pruned-emaonly",
    "Denoising strength": 0.75,
    "Version": "v1.10.1",
}


# --------------------------------------------------------------------------- writing


def test_layout_is_byte_for_byte_a1111():
    text = format_infotext("a castle on a hill, golden hour", "blurry, lowres", BASIC)
    assert text == (
        "a castle on a hill, golden hour\n"
        "Negative prompt: blurry, lowres\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234567890, "
        "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
        "Denoising strength: 0.75, Version: v1.10.1"
    )


def test_negative_line_omitted_when_empty_and_none_values_dropped():
    text = format_infotext("a cat", "", {"Steps": 20, "Seed": 5, "Clip skip": None, "CFG scale": 7.5})
    assert text == "a cat\nSteps: 20, Seed: 5, CFG scale: 7.5"


def test_empty_prompt_is_stripped_like_a1111():
    assert format_infotext("", "bad", {"Steps": 4}) == "Negative prompt: bad\nSteps: 4"
    assert format_infotext("  a cat \n", "", {"Steps": 4}) == "a cat \n\nSteps: 4"


def test_value_equal_to_key_is_written_bare():
    assert format_infotext("p", "", {"Steps": 1, "Tiling": "Tiling", "Seed": 2}) == "p\nSteps: 1, Tiling, Seed: 2"


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (7.0, "7"),
        (7.5, "7.5"),
        (0.65, "0.65"),
        (0.1 + 0.2, "0.30000000000000004"),  # Python's repr, as A1111 prints a float
        (np.float32(0.65), "0.65"),
        (np.float64(3.0), "3"),
        (np.int64(42), "42"),
        (20, "20"),
        (True, "True"),
        (1e-5, "1e-05"),
        ("DPM++ 2M", "DPM++ 2M"),
    ],
)
def test_format_value(value, written):
    assert format_value(value) == written


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("plain", "plain"),
        ("a, b", '"a, b"'),
        ("name: hash", '"name: hash"'),
        ("two\nlines", '"two\\nlines"'),
        ('say "hi", ok', '"say \\"hi\\", ok"'),
        ("日本, 語", '"日本, 語"'),  # ensure_ascii=False: unicode stays readable
        ('"quoted" alone', '"quoted" alone'),  # no separator: written as is
    ],
)
def test_quote_matches_a1111(value, written):
    assert quote(value) == written


def test_quoted_values_in_the_line():
    text = format_infotext(
        "p", "", {"Steps": 20, "Seed": 1, "Lora hashes": "detail: 0123456789ab, style: ba9876543210"}
    )
    assert text.endswith('Lora hashes: "detail: 0123456789ab, style: ba9876543210"')


@pytest.mark.parametrize("key", ["a,b", "a:b", "a\nb"])
def test_keys_that_would_break_the_line_are_refused(key):
    with pytest.raises(InvalidParameter, match="infotext key"):
        format_infotext("p", "", {key: 1})


def test_standard_order_contains_the_documented_keys_in_order():
    documented = [
        "Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed",
        "Face restoration", "Size", "Model hash", "Model", "VAE hash", "VAE", "Variation seed",
        "Variation seed strength", "Seed resize from", "Denoising strength",
        "Conditional mask weight", "Clip skip", "ENSD", "RNG",
    ]
    positions = [STANDARD_KEY_ORDER.index(key) for key in documented]
    assert positions == sorted(positions)
    assert "Version" not in STANDARD_KEY_ORDER


def test_order_params_sorts_known_keys_and_keeps_extras_in_insertion_order():
    params = {
        "Version": "v1.10.1",
        "Mask blur": 4,
        "Seed": 3,
        "Lora hashes": "x: 1",
        "Steps": 20,
        "Denoising strength": 0.5,
        "Sampler": "Euler a",
        "Masked content": "original",
        "Size": "512x512",
    }
    assert list(order_params(params)) == [
        "Steps", "Sampler", "Seed", "Size", "Denoising strength",
        "Mask blur", "Lora hashes", "Masked content", "Version",
    ]
    assert order_params(params)["Seed"] == 3


# --------------------------------------------------------------------------- parsing literal texts


def test_parse_typical_img2img_infotext():
    text = (
        "portrait of a knight, (detailed armor:1.2), <lora:detail:0.6>\n"
        "Negative prompt: lowres, bad hands\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3581298176, "
        "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.55, "
        "Clip skip: 2, Mask blur: 4, Lora hashes: \"detail: 0123456789ab\", Version: v1.10.1"
    )
    parsed = parse_infotext(text)
    assert parsed.prompt == "portrait of a knight, (detailed armor:1.2), <lora:detail:0.6>"
    assert parsed.negative_prompt == "lowres, bad hands"
    assert parsed.params == {
        "Steps": "30",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "6.5",
        "Seed": "3581298176",
        "Size-1": "512",
        "Size-2": "768",
        "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly",
        "Denoising strength": "0.55",
        "Clip skip": "2",
        "Mask blur": "4",
        "Lora hashes": "detail: 0123456789ab",
        "Version": "v1.10.1",
    }
    assert list(parsed.params)[:3] == ["Steps", "Sampler", "Schedule type"]


def test_parse_multiline_prompt_and_negative():
    text = (
        "first line, a\n"
        "second line: b\n"
        "\n"
        "fourth\n"
        "Negative prompt: neg one\n"
        "neg two\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"
    )
    parsed = parse_infotext(text)
    assert parsed.prompt == "first line, a\nsecond line: b\n\nfourth"
    assert parsed.negative_prompt == "neg one\nneg two"
    assert parsed.params["Sampler"] == "Euler a"


def test_last_line_with_fewer_than_three_pairs_belongs_to_the_prompt():
    parsed = parse_infotext("a photo\nstyle: noir, mood: dark")
    assert parsed.prompt == "a photo\nstyle: noir, mood: dark"
    assert parsed.params == {}
    three = parse_infotext("a photo\nstyle: noir, mood: dark, era: 1940s")
    assert three.prompt == "a photo"
    assert three.params == {"style": "noir", "mood": "dark", "era": "1940s"}


def test_prompt_only_and_negative_only():
    assert parse_infotext("just a prompt") == ParsedInfotext("just a prompt", "", {})
    parsed = parse_infotext("Negative prompt: ugly\nSteps: 20, Seed: 1, CFG scale: 7")
    assert parsed.prompt == ""
    assert parsed.negative_prompt == "ugly"


def test_lines_are_stripped_and_crlf_accepted():
    text = "  a cat  \r\nNegative prompt:   dog \r\nSteps: 20, Seed: 7, CFG scale: 7\r\n"
    parsed = parse_infotext(text)
    assert parsed.prompt == "a cat"
    assert parsed.negative_prompt == "dog"
    assert parsed.params == {"Steps": "20", "Seed": "7", "CFG scale": "7"}


def test_every_wxh_value_is_split_and_unknown_keys_kept():
    text = (
        "p\nSteps: 20, Size: 1024x576, Seed resize from: 768x432, Hires resize: 2048x1152, "
        "ADetailer model: face_yolov8n.pt"
    )
    params = parse_infotext(text).params
    assert params == {
        "Steps": "20",
        "Size-1": "1024", "Size-2": "576",
        "Seed resize from-1": "768", "Seed resize from-2": "432",
        "Hires resize-1": "2048", "Hires resize-2": "1152",
        "ADetailer model": "face_yolov8n.pt",
    }


def test_quoted_values_are_unquoted_and_broken_quotes_kept():
    text = 'p\nSteps: 20, Seed: 1, Note: "a \\"b\\", c", TI hashes: "emb: abc, emb2: def", Odd: "x'
    params = parse_infotext(text).params
    assert params["Note"] == 'a "b", c'
    assert params["TI hashes"] == "emb: abc, emb2: def"
    assert params["Odd"] == '"x'


def test_empty_values_are_dropped_like_a1111():
    params = parse_infotext("p\nSteps: 20, Empty: , Seed: 1, CFG scale: 7").params
    assert "Empty" not in params
    assert params["Seed"] == "1"


def test_quoted_newline_value():
    text = format_infotext("p", "", {"Steps": 1, "Seed": 2, "Hires prompt": "line one\nline two, more"})
    assert parse_infotext(text).params["Hires prompt"] == "line one\nline two, more"


def test_join_size_params_restores_position():
    params = {"Steps": "20", "Size-1": "512", "Size-2": "768", "Seed": "1", "Module-1": "x"}
    assert join_size_params(params) == {"Steps": "20", "Size": "512x768", "Seed": "1", "Module-1": "x"}


# --------------------------------------------------------------------------- defaults


def test_defaults_for_missing_keys():
    filled = apply_defaults({"Steps": "20"})
    assert filled["Steps"] == "20"
    assert filled["Clip skip"] == "1"
    assert filled["Schedule type"] == "Automatic"
    assert filled["RNG"] == "GPU"
    assert filled["Hires resize-1"] == filled["Hires resize-2"] == "0"
    assert filled["Hires sampler"] == "Use same sampler"
    assert filled["Hires schedule type"] == "Use same scheduler"
    assert filled["Hires checkpoint"] == "Use same checkpoint"
    assert filled["Hires prompt"] == filled["Hires negative prompt"] == ""
    assert filled["Mask mode"] == "Inpaint masked"
    assert filled["Masked content"] == "original"
    assert filled["Inpaint area"] == "Whole picture"
    assert filled["Masked area padding"] == "32"
    assert filled["Schedule max sigma"] == filled["Schedule min sigma"] == filled["Schedule rho"] == "0"
    assert filled["VAE Encoder"] == filled["VAE Decoder"] == "Full"
    assert filled["FP8 weight"] == "Disable"
    assert "Cache FP16 weight for LoRA" not in filled
    assert "Emphasis" not in filled
    assert filled["Refiner switch by sampling steps"] == "False"


def test_defaults_never_override_written_values():
    written = {"Clip skip": "2", "RNG": "CPU", "Schedule type": "Karras", "FP8 weight": "Enable for SDXL"}
    filled = apply_defaults(written)
    assert {key: filled[key] for key in written} == written
    assert filled["Cache FP16 weight for LoRA"] == "False"
    assert written == {"Clip skip": "2", "RNG": "CPU", "Schedule type": "Karras", "FP8 weight": "Enable for SDXL"}


def test_emphasis_default_only_when_the_prompt_uses_it():
    assert apply_defaults({}, uses_emphasis=True)["Emphasis"] == "Original"
    assert apply_defaults({"Emphasis": "No norm"}, uses_emphasis=True)["Emphasis"] == "No norm"


def test_old_first_pass_size_is_rewritten():
    filled = apply_defaults({"Size-1": "1024", "Size-2": "1024", "First pass size-1": "0", "First pass size-2": "0"})
    # 0x0 meant: about 512*512 pixels in steps of 64 -> 512x512 first, 1024x1024 hires.
    assert (filled["Size-1"], filled["Size-2"]) == ("512", "512")
    assert (filled["Hires resize-1"], filled["Hires resize-2"]) == ("1024", "1024")
    explicit = apply_defaults(
        {"Size-1": "1024", "Size-2": "768", "First pass size-1": "640", "First pass size-2": "448"}
    )
    assert (explicit["Size-1"], explicit["Size-2"]) == ("640", "448")
    assert (explicit["Hires resize-1"], explicit["Hires resize-2"]) == ("1024", "768")


def test_version_backcompat_flags():
    old = apply_defaults({"Version": "v1.5.2", "Sampler": "DDIM"}, prompt="a [cat:dog:0.5]")
    assert old["Old prompt editing timelines"] == "True"
    assert old["Pad conds v0"] == "True"
    assert old["Downcast alphas_cumprod"] == "True"
    mid = apply_defaults({"Version": "v1.7.0-224-gabcdef12", "Refiner": "sdxl_refiner"})
    assert mid["Downcast alphas_cumprod"] == "True"
    assert mid["Refiner switch by sampling steps"] == "True"
    assert "Old prompt editing timelines" not in mid
    new = apply_defaults({"Version": "v1.7.0-225-gabcdef12"})
    assert "Downcast alphas_cumprod" not in new
    assert "Downcast alphas_cumprod" not in apply_defaults({})
    assert "Downcast alphas_cumprod" not in apply_defaults({"Version": "f2.0.1v1.10.1-previous-669-gdfdcbab6"})


@pytest.mark.parametrize(
    ("older", "newer"),
    [
        ("1.5.2", "v1.6.0"),
        ("v1.6.0-RC-28-gabc", "1.6.0"),
        ("v1.7.0", "v1.7.0-225"),
        ("v1.9.4", "v1.10.0"),
        ("1.8", "1.8.0.1"),
    ],
)
def test_version_ordering(older, newer):
    assert parse_version(older) < parse_version(newer)
    assert parse_version("1.8") == parse_version("1.8.0")


# --------------------------------------------------------------------------- round trips

REALISTIC = [
    BASIC,
    {"Steps": 50, "Sampler": "Euler", "CFG scale": 7, "Seed": 0, "Size": "512x512", "Denoising strength": 0.75},
    {
        "Steps": 25, "Sampler": "DPM++ 2M SDE", "Schedule type": "Exponential", "CFG scale": 4.5,
        "Image CFG scale": 1.5, "Seed": 4294967293, "Size": "1024x1024", "Model hash": "31e35c80fc",
        "Model": "sd_xl_base_1.0", "VAE hash": "235745af8d", "VAE": "sdxl_vae.safetensors",
        "Variation seed": 99, "Variation seed strength": 0.3, "Seed resize from": "768x768",
        "Denoising strength": 0.4, "Conditional mask weight": 1.0, "Clip skip": 2, "ENSD": 31337,
        "RNG": "CPU", "Mask blur": 4, "Mask mode": "Inpaint not masked", "Masked content": "latent noise",
        "Inpaint area": "Only masked", "Masked area padding": 32,
        "Lora hashes": "add_detail: 7c6bad76eb54, style: 0123456789ab",
        "TI hashes": "easynegative: c74b4e810b03", "Emphasis": "No norm", "Version": "v1.10.1",
    },
    {"Steps": 8, "Sampler": "LCM", "Schedule type": "SGM Uniform", "CFG scale": 1.5, "Seed": 12,
     "Size": "768x512", "Hires prompt": "sharp, detailed\nsecond line", "Version": "v1.10.1"},
]


@pytest.mark.parametrize("params", REALISTIC)
@pytest.mark.parametrize(
    ("prompt", "negative"),
    [
        ("a cat", ""),
        ("masterpiece, (best quality:1.2), [dog:cat:0.5]\nBREAK\nsunset", "lowres, text: watermark"),
        ("", "only negative"),
        ('quote "this", and: that — ünïcödé 猫', "a\n\nb"),
    ],
)
def test_realistic_round_trip(prompt, negative, params):
    text = format_infotext(prompt, negative, params)
    parsed = parse_infotext(text)
    assert parsed.prompt == prompt
    assert parsed.negative_prompt == negative
    assert parsed.to_infotext() == text
    for key, value in params.items():
        if key not in ("Size", "Seed resize from"):
            assert parsed.params[key] == format_value(value)


def _clean_lines(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines if not line.strip().startswith("Negative prompt:")]


SPECIALS = ",:\"'\\()[]<>{}|=-_ é猫😀"
line_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\n") | st.sampled_from(SPECIALS),
    max_size=30,
)
prompts = st.lists(line_text, max_size=4).map(_clean_lines).map("\n".join)
# A reader keeps a negative prompt's inner blank lines but not a blank first line.
negatives = st.lists(line_text, max_size=4).map(_clean_lines).filter(lambda ls: not ls or ls[0]).map("\n".join)
values = st.text(
    # No decimal digits: a value reading "WxH" is split like Size (tested separately).
    alphabet=st.characters(blacklist_categories=("Cs", "Nd")) | st.sampled_from(SPECIALS + "\n"),
    min_size=1,
    max_size=30,
).filter(
    # Values A1111's own reader cannot give back: an unquoted value with outer spaces (the
    # reader strips them) or starting with a quote (the reader unquotes it).
    lambda v: quote(v) != v or (v == v.strip() and not v.startswith('"'))
)


@settings(max_examples=300, deadline=None)
@given(prompt=prompts, negative=negatives, note=values, extra=values)
def test_hypothesis_round_trip(prompt, negative, note, extra):
    assume(note != "Note" and extra != "Extra info")  # a value equal to its key is written bare
    params = {
        "Steps": 20, "Sampler": "Euler a", "CFG scale": 7.5, "Seed": 42,
        "Note": note, "Size": "512x512", "Extra info": extra,
    }
    text = format_infotext(prompt, negative, params)
    parsed = parse_infotext(text)
    assert format_infotext(parsed.prompt, parsed.negative_prompt, join_size_params(parsed.params)) == text
    assert parsed.prompt == prompt.lstrip("\n")  # leading blank lines go with the outer strip
    assert parsed.negative_prompt == negative
    assert parsed.params["Note"] == note
    assert parsed.params["Extra info"] == extra


def test_json_quoting_survives_every_escape():
    value = 'tab\there, "q", back\\slash, ctrl\x01, nl\nend'
    text = format_infotext("p", "", {"Steps": 1, "Seed": 1, "Val": value})
    assert json.loads(text.split("Val: ", 1)[1]) == value
    assert parse_infotext(text).params["Val"] == value


def test_keys_need_two_characters_to_be_read():
    # A1111's reader takes a key as a word character followed by at least one more.
    params = parse_infotext("p\nSteps: 1, Seed: 2, X: 3, CFG scale: 7").params
    assert params == {"Steps": "1", "Seed": "2", "CFG scale": "7"}


# A1111's reader's expression for the parameter line's pairs, the reference for the one-pass reader.
_A1111_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def test_the_parameter_line_is_read_as_a1111s_expression_reads_it():
    """The one-pass reader finds the pairs A1111's regular expression finds, on real lines and on random
    lines made of the characters that matter (quotes, escapes, colons, commas, spaces, dashes)."""
    import random

    from underpaint.imageio.infotext import _param_pairs

    lines = ['Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model hash: abc',
             'Lora hashes: "a: 1, b: 2", TI hashes: "x: 3", Hires prompt: "say \\"hi\\", ok", Version: v1.10.0',
             'ADetailer prompt: "a, b", ADetailer model: face_yolov8n.pt, Template: "x"y, Size-1: 3',
             'a: b, : c, x:, -k: 1, k-/ x: "", q: "unterminated, r: 2\n', '"a": 1, é-ü: ü, _x: 2']
    rng = random.Random(0)
    alphabet = 'ab_1é :,"\\-/\n\t'
    lines += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    for line in lines:
        assert _param_pairs(line) == _A1111_PAIR.findall(line), repr(line)


def test_a_long_line_without_colons_is_read_in_one_pass():
    """A1111's expression needs minutes for this line (its time grows with the square of the length)."""
    from underpaint.imageio.infotext import _param_pairs, parse_infotext

    assert _param_pairs("A" * 2_000_000) == []
    assert parse_infotext("a cat\n" + "x y" * 300_000).params == {}
