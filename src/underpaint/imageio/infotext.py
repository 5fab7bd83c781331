"""A1111 infotext: the generation parameters stored with an image, written and parsed.

The layout is the one AUTOMATIC1111 1.10 writes (``processing.create_infotext``) and that its
PNG Info tab, Civitai and other readers split apart again::

    a castle on a hill, golden hour
    Negative prompt: blurry, lowres
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x512

The negative prompt line is left out when it is empty. The last line holds ``key: value`` pairs
joined by ``", "``; a value containing ``,``, ``:`` or a newline is written as a JSON string so
that readers can find where it ends.

>>> text = format_infotext("a cat", "", {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7.0, "Seed": 1})
>>> text
'a cat\\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1'
>>> parse_infotext(text).params["CFG scale"]
'7'
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..errors import InvalidParameter

#: A1111 1.10's own parameters, in the order ``create_infotext`` writes them. Extension and
#: img2img parameters (Mask blur, Lora hashes, ...) follow in the order they were added.
STANDARD_KEY_ORDER: tuple[str, ...] = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Distilled CFG Scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "Tiling",
)

#: Keys A1111 writes after every extra parameter.
TRAILING_KEYS: tuple[str, ...] = ("Version", "User")

NEGATIVE_PROMPT_PREFIX = "Negative prompt:"

# The parameter line is read as A1111's reader reads it: pairs ``key: value``, a key starting with a
# word character and having at least two characters of words, spaces, dashes and slashes, a value
# either a JSON string (escapes allowed) followed by a comma or the end, or everything up to the next
# comma. A1111 finds them with one regular expression; :func:`_param_pairs` finds the same pairs in
# one pass (that expression takes time growing with the square of a line without colons).
# ``WxH`` values are split into ``key-1`` / ``key-2``; ``$`` also accepts a trailing newline,
# as A1111's pattern does.
_SIZE_VALUE = re.compile(r"(\d+)x(\d+)$")
_KEY_SEPARATORS = (",", ":", "\n")


@dataclass(frozen=True)
class ParsedInfotext:
    """An infotext split the way A1111's ``parse_generation_parameters`` splits it.

    ``params`` holds the parameter line's values as written (unquoted), in their order, with
    ``WxH`` values split into ``<key>-1`` and ``<key>-2``. No defaults are filled in; see
    :func:`apply_defaults`.
    """

    prompt: str
    negative_prompt: str
    params: dict[str, str] = field(default_factory=dict)

    def to_infotext(self) -> str:
        """Write it back in A1111's layout (split sizes are joined again)."""
        return format_infotext(self.prompt, self.negative_prompt, join_size_params(self.params))


# --------------------------------------------------------------------------- writing


def quote(text: str) -> str:
    """A1111's ``quote()``: JSON-quote a value only when it holds ``,``, ``:`` or a newline."""
    if "," in text or ":" in text or "\n" in text:
        return json.dumps(text, ensure_ascii=False)
    return text


def format_value(value: object) -> str:
    """Write one value as A1111 shows it: whole floats without ``.0`` (``7``, ``7.5``, ``0.65``).

    Python floats print with their shortest round-tripping form (``repr``), which is also what
    A1111 writes for a float from its UI; numpy float32 keeps its own short form (``0.65``, not
    ``0.6499999761581421``).
    """
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        as_float = float(value)
        if math.isfinite(as_float) and as_float.is_integer() and abs(as_float) < 1e16:
            return str(int(as_float))
        return str(value)
    return str(value)


def format_params(params: Mapping[str, object]) -> str:
    """The parameter line: ``Key: value`` pairs in the caller's order, None values left out.

    As in A1111, a value equal to its key is written as the bare key.
    """
    parts = []
    for key, value in params.items():
        if value is None:
            continue
        if any(sep in key for sep in _KEY_SEPARATORS):
            raise InvalidParameter("infotext key", key, "a name without ',', ':' or line breaks")
        text = format_value(value)
        parts.append(key if text == key else f"{key}: {quote(text)}")
    return ", ".join(parts)


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """The full infotext in A1111's layout, stripped of outer whitespace as A1111 does."""
    negative = f"\n{NEGATIVE_PROMPT_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{format_params(params)}".strip()


def order_params(params: Mapping[str, object]) -> dict[str, object]:
    """Sort A1111's own keys into its order; extras keep their order after them; Version last."""
    known = {key: params[key] for key in STANDARD_KEY_ORDER if key in params}
    trailing = {key: params[key] for key in TRAILING_KEYS if key in params}
    extras = {
        key: value for key, value in params.items() if key not in known and key not in trailing
    }
    return {**known, **extras, **trailing}


# --------------------------------------------------------------------------- reading


def parse_infotext(text: str) -> ParsedInfotext:
    """Split an infotext into prompt, negative prompt and parameters, as A1111's reader does.

    The last line is the parameter line only if it holds at least three ``key: value`` pairs;
    otherwise it belongs to the prompt. Every line is stripped. Lines before the first one that
    starts with ``Negative prompt:`` form the prompt; that line (without the prefix) and the
    rest form the negative prompt.
    """
    *lines, last_line = text.strip().split("\n")
    if len(_param_pairs(last_line)) < 3:
        lines.append(last_line)
        last_line = ""
    prompt, negative_prompt = _split_prompts(lines)
    return ParsedInfotext(prompt, negative_prompt, _parse_param_line(last_line))


def _split_prompts(lines: list[str]) -> tuple[str, str]:
    """Join prompt and negative prompt lines; an empty text swallows the next line's newline."""
    prompt = negative = ""
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if line.startswith(NEGATIVE_PROMPT_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PROMPT_PREFIX):].strip()
        if in_negative:
            negative = f"{negative}\n{line}" if negative else line
        else:
            prompt = f"{prompt}\n{line}" if prompt else line
    return prompt, negative


def _parse_param_line(line: str) -> dict[str, str]:
    """``key: value`` pairs; quoted values unquoted; ``WxH`` split; empty values dropped (A1111)."""
    params: dict[str, str] = {}
    for key, value in _param_pairs(line):
        if not value:
            continue
        if value[0] == '"' and value[-1] == '"':
            value = unquote(value)
        size = _SIZE_VALUE.match(value)
        if size is not None:
            params[f"{key}-1"] = size.group(1)
            params[f"{key}-2"] = size.group(2)
        else:
            params[key] = value
    return params


def _is_key_char(c: str) -> bool:
    return c.isalnum() or c in "_ -/"


def _quoted_end(line: str, start: int) -> int | None:
    """Where a JSON-quoted value starting at ``line[start] == '"'`` ends (after its closing quote), when it
    has at least one character and a comma or the line's end follows; else None."""
    i, n = start + 1, len(line)
    while i < n and line[i] != '"':
        i += 2 if line[i] == "\\" else 1
    if i >= n or i == start + 1:
        return None
    end = i + 1
    return end if end == n or line[end] == "," or (line[end] == "\n" and end == n - 1) else None


def _param_pairs(line: str) -> list[tuple[str, str]]:
    """The ``(key, value)`` pairs of a parameter line, values as written (see the note above)."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(line)
    while i < n:
        j = i
        while j < n and line[j].isspace():
            j += 1
        if j >= n or not (line[j].isalnum() or line[j] == "_"):
            i = j + 1  # no key can start anywhere up to here
            continue
        k = j + 1
        while k < n and _is_key_char(line[k]):
            k += 1
        if k >= n or line[k] != ":" or k - j < 2:
            i = max(k, i + 1)  # every start inside this run ends at the same place
            continue
        v = k + 1
        while v < n and line[v].isspace():
            v += 1
        end = _quoted_end(line, v) if v < n and line[v] == '"' else None
        if end is None:
            end = line.find(",", v)
            end = n if end < 0 else end
        pairs.append((line[j:k], line[v:end]))
        i = end + 1 if end < n and line[end] == "," else end
    return pairs


def unquote(text: str) -> str:
    """A1111's ``unquote()``: decode a JSON string, or keep the text if it is not one."""
    if not text or text[0] != '"' or text[-1] != '"':
        return text
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, str) else text


def join_size_params(params: Mapping[str, str]) -> dict[str, str]:
    """Undo the ``WxH`` split: ``Size-1``/``Size-2`` become ``Size: WxH`` where ``Size-1`` was."""
    joined: dict[str, str] = {}
    for key, value in params.items():
        base, dash, part = key.rpartition("-")
        if dash and part in ("1", "2") and _is_split_size(params, base):
            if part == "1":
                joined[base] = f"{params[base + '-1']}x{params[base + '-2']}"
            continue
        joined[key] = value
    return joined


def _is_split_size(params: Mapping[str, str], base: str) -> bool:
    first, second = params.get(base + "-1"), params.get(base + "-2")
    return (
        isinstance(first, str)
        and isinstance(second, str)
        and first.isdigit()
        and second.isdigit()
        and base not in params
    )


# --------------------------------------------------------------------------- defaults

# What A1111 1.10's reader assumes for a key the infotext does not mention (in its order).
# Values are strings here, like everything else that comes out of an infotext.
_SIMPLE_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("Clip skip", "1"),
    ("Hires sampler", "Use same sampler"),
    ("Hires schedule type", "Use same scheduler"),
    ("Hires checkpoint", "Use same checkpoint"),
    ("Hires prompt", ""),
    ("Hires negative prompt", ""),
    ("Mask mode", "Inpaint masked"),
    ("Masked content", "original"),
    ("Inpaint area", "Whole picture"),
    ("Masked area padding", "32"),
)
_LATE_DEFAULTS: tuple[tuple[str, str], ...] = (
    ("RNG", "GPU"),
    ("Schedule type", "Automatic"),
    ("Schedule max sigma", "0"),
    ("Schedule min sigma", "0"),
    ("Schedule rho", "0"),
    ("VAE Encoder", "Full"),
    ("VAE Decoder", "Full"),
    ("FP8 weight", "Disable"),
)


def apply_defaults(
    params: Mapping[str, str], *, prompt: str = "", uses_emphasis: bool = False
) -> dict[str, str]:
    """Fill in what A1111 1.10 assumes for keys an infotext leaves out; returns a new dict.

    Reproduces ``parse_generation_parameters``: ``Clip skip`` 1, ``Hires resize`` 0x0, hires
    sampler/schedule/checkpoint "Use same ...", empty hires prompts, inpaint ``Mask mode``
    "Inpaint masked", ``Masked content`` "original", ``Inpaint area`` "Whole picture",
    ``Masked area padding`` 32, the old ``First pass size`` hires fields rewritten, ``RNG``
    GPU, ``Schedule type`` Automatic, schedule sigma/rho overrides 0, ``VAE Encoder``/
    ``VAE Decoder`` Full, ``FP8 weight`` Disable (and ``Cache FP16 weight for LoRA`` False when
    FP8 is on), ``Emphasis`` Original when the prompt uses emphasis (the caller knows, from the
    prompt parser), ``Refiner switch by sampling steps`` False; then the ``Version``-based
    backward-compatibility flags. Not reproduced: prompt styles and ``Hypernet`` (which edit
    the prompt) and the user's list of fields to skip.
    """
    result = dict(params)
    for key, value in _SIMPLE_DEFAULTS:
        result.setdefault(key, value)
    if "Hires resize-1" not in result:  # A1111 checks the first half only and sets both
        result["Hires resize-1"] = "0"
        result["Hires resize-2"] = "0"
    _restore_old_hires_fix(result)
    for key, value in _LATE_DEFAULTS:
        result.setdefault(key, value)
    if "Cache FP16 weight for LoRA" not in result and result["FP8 weight"] != "Disable":
        result["Cache FP16 weight for LoRA"] = "False"
    if uses_emphasis:
        result.setdefault("Emphasis", "Original")
    result.setdefault("Refiner switch by sampling steps", "False")
    _apply_version_backcompat(result, prompt)
    return result


def _restore_old_hires_fix(params: dict[str, str]) -> None:
    """Infotexts from before A1111 1.0's hires fix rework store ``First pass size``; rewrite it.

    The first pass size becomes ``Size`` and the old ``Size`` becomes ``Hires resize``; a first
    pass of 0x0 meant "about 512x512 pixels, in steps of 64".
    """
    first_w, first_h = params.get("First pass size-1"), params.get("First pass size-2")
    if first_w is None or first_h is None:
        return
    width, height = int(params.get("Size-1", 512)), int(params.get("Size-2", 512))
    fw, fh = int(first_w), int(first_h)
    if fw == 0 or fh == 0:
        scale = math.sqrt(512 * 512 / (width * height))
        fw = math.ceil(scale * width / 64) * 64
        fh = math.ceil(scale * height / 64) * 64
    params["Size-1"], params["Size-2"] = str(fw), str(fh)
    params["Hires resize-1"], params["Hires resize-2"] = str(width), str(height)


# Versions from which A1111 changed behaviour that an older infotext has to switch back.
_V1_6_0 = ((1, 6, 0), 1, 0, -1)
_V1_7_0_225 = ((1, 7, 0), 1, 0, 225)
_V1_8_0 = ((1, 8, 0), 1, 0, -1)


def _apply_version_backcompat(params: dict[str, str], prompt: str) -> None:
    """A1111's ``infotext_versions.backcompat``: flags an old ``Version`` implies."""
    version = parse_version(params.get("Version"))
    if version is None:
        return
    if version < _V1_6_0 and "[" in prompt:
        params["Old prompt editing timelines"] = "True"
    if version < _V1_6_0 and params.get("Sampler", "") in ("DDIM", "PLMS"):
        params["Pad conds v0"] = "True"
    if version < _V1_7_0_225:
        params["Downcast alphas_cumprod"] = "True"
    if version < _V1_8_0 and params.get("Refiner"):
        params["Refiner switch by sampling steps"] = "True"


_VERSION = re.compile(
    r"v?(?P<release>\d+(?:\.\d+)*)"
    r"(?:[-_.]?(?P<pre>a|alpha|b|beta|c|rc|pre|preview)[-_.]?(?P<pre_n>\d*))?"
    r"(?:-(?P<post>\d+))?",
    re.IGNORECASE,
)


def parse_version(text: str | None) -> tuple | None:
    """A sortable key for an A1111 ``Version`` value such as ``v1.10.1`` or ``v1.7.0-225-g5e80``.

    Like A1111, only the part before a second dash counts (``v1.7.0-225``: 225 commits after
    1.7.0, compared as a post-release); a pre-release (``1.6.0-RC``) sorts before its release.
    Unrecognised versions (forks' ``f2.0.1v1.10.1-...``) give None, so no flags are applied.
    """
    if text is None:
        return None
    head = re.match(r"([^-]+-[^-]+)-.*", text)
    match = _VERSION.fullmatch(head.group(1) if head else text)
    if match is None:
        return None
    release = tuple(int(part) for part in match["release"].split("."))
    release = release + (0,) * max(0, 3 - len(release))
    while len(release) > 3 and release[-1] == 0:
        release = release[:-1]
    pre_rank, pre_n = (0, int(match["pre_n"] or 0)) if match["pre"] else (1, 0)
    post = int(match["post"]) if match["post"] else -1
    return release, pre_rank, pre_n, post
