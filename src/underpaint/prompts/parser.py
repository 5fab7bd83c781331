"""The AUTOMATIC1111 prompt language (as of A1111 1.10), parsed in pure Python.

Four independent passes, applied by the pipeline in this order:

1. :func:`extract_extra_networks` takes ``<lora:name:0.8>`` and friends out of the text.
2. :func:`split_and` splits composable-diffusion sub-prompts (``a AND b :1.2``).
3. :func:`prompt_schedule` resolves prompt editing (``[from:to:when]``) and alternation
   (``[a|b]``) into the text used up to each step.
4. :func:`parse_attention` turns one scheduled text into (text, weight) runs for the encoder.

No pass ever raises anything but :class:`underpaint.errors.UnderpaintError` subclasses:
text the grammar cannot read is kept literally, as A1111 does.

Prompt editing, with 10 steps (a fraction of the steps when written with a decimal point,
an absolute step otherwise):

>>> prompt_schedule("a [cat:dog:0.5] in the snow", 10)
[(5, 'a cat in the snow'), (10, 'a dog in the snow')]
>>> prompt_schedule("a [dog:3]", 10)
[(3, 'a '), (10, 'a dog')]
>>> prompt_schedule("a [dog: 3]", 10)
[(3, 'a '), (10, 'a dog')]
>>> prompt_schedule("[hat::4] man", 10)
[(4, 'hat man'), (10, ' man')]
>>> prompt_schedule("a [b : c : 1] d", 10)
[(1, 'a b  d'), (10, 'a  c  d')]
>>> prompt_schedule("a[b:[c:d:2]:1]e", 10)
[(1, 'abe'), (2, 'ace'), (10, 'ade')]
>>> prompt_schedule("a [[[b]]:2]", 10)
[(2, 'a '), (10, 'a [[b]]')]
>>> prompt_schedule("[(a:2):3]", 10)
[(3, ''), (10, '(a:2)')]
>>> prompt_schedule("a [b:.5] c", 10)
[(5, 'a  c'), (10, 'a b c')]

``1.0`` has a decimal point, so it is a fraction (the whole run); ``1`` is step 1:

>>> prompt_schedule("[a:b:1.0]", 10)
[(10, 'a')]
>>> prompt_schedule("[a:b:1]", 10)
[(1, 'a'), (10, 'b')]

Fractions truncate toward zero, with Python's float arithmetic (0.29 * 100 is 28.999...):

>>> prompt_schedule("[a:b:0.29]", 100)
[(28, 'a'), (100, 'b')]

Unbalanced or unreadable syntax is left as written:

>>> prompt_schedule("a [unbalanced", 10)
[(10, 'a [unbalanced')]
>>> prompt_schedule("((a][:b:c [d:3]", 10)
[(3, '((a][:b:c '), (10, '((a][:b:c d')]
>>> prompt_schedule("a | b", 10)
[(10, 'a | b')]

Alternation switches every step (so the schedule has one entry per step):

>>> prompt_schedule("[cat|dog]", 4)
[(1, 'cat'), (2, 'dog'), (3, 'cat'), (4, 'dog')]
>>> prompt_schedule("[fe|]male", 4)
[(1, 'female'), (2, 'male'), (3, 'female'), (4, 'male')]
>>> prompt_schedule("[a|(b:1.1)]", 3)
[(1, 'a'), (2, '(b:1.1)'), (3, 'a')]

During a hires-fix pass A1111 counts the second pass's steps: integers past the first pass's
steps, fractions past 1.0:

>>> prompt_schedule("a [b:1.5] c", 10, hires_steps=10)
[(5, 'a  c'), (10, 'a b c')]
>>> prompt_schedule("a [b:.5] c", 10, hires_steps=10)
[(10, 'a b c')]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import InvalidParameter

__all__ = [
    "ExtraNetwork",
    "extract_extra_networks",
    "split_and",
    "prompt_schedule",
    "parse_attention",
    "MAX_NESTING",
]

#: Deepest nesting of ``[...]``/``(...)`` that prompt editing reads, and the most brackets
#: emphasis keeps open at once; deeper text is refused.
MAX_NESTING = 100


# ---------------------------------------------------------------------------------------------
# Extra networks: <kind:name:arg:...>
# ---------------------------------------------------------------------------------------------

# A1111 finds tags with ``<(\w+):([^>]+)>``; :func:`_tag_spans` finds the same ones in one pass (that
# expression's time grows with the square of a prompt full of ``<a:`` and no ``>``).
#: Extra-network tag kinds that name a LoRA (A1111's ``lyco`` is the LyCORIS extension's spelling).
LORA_KINDS = ("lora", "lyco")


@dataclass(frozen=True)
class ExtraNetwork:
    """One ``<kind:name:args...>`` tag, e.g. ``<lora:film grain:0.8:0.5>``.

    ``args`` are the colon-separated fields after the name, as written.
    """

    kind: str
    name: str
    args: tuple[str, ...] = ()

    @property
    def is_lora(self) -> bool:
        return self.kind in LORA_KINDS

    @property
    def positional(self) -> tuple[str, ...]:
        """Arguments without ``key=``: for a LoRA, the text-encoder and then the UNet multiplier."""
        return tuple(a for a in self.args if len(a.split("=", 2)) != 2)

    @property
    def named(self) -> dict[str, str]:
        """``key=value`` arguments (A1111 LoRA reads ``te=``, ``unet=``, ``dyn=``)."""
        pairs = (a.split("=", 2) for a in self.args)
        return {p[0]: p[1] for p in pairs if len(p) == 2}


def extract_extra_networks(prompt: str) -> tuple[str, list[ExtraNetwork]]:
    """Remove every ``<kind:name:...>`` tag from the prompt and return them in order.

    A1111 replaces each tag with nothing (the surrounding spaces stay) and splits its body at
    every colon; the first field is the network's name.

    >>> extract_extra_networks("a cat <lora:film:0.8>, <hypernet:anime:1>")
    ('a cat , ', [ExtraNetwork(kind='lora', name='film', args=('0.8',)), ExtraNetwork(kind='hypernet', name='anime', args=('1',))])
    >>> extract_extra_networks("<lora:style:0.8:0.5>")[1][0].positional
    ('0.8', '0.5')
    >>> extract_extra_networks("<lora:style:unet=0.4>")[1][0].named
    {'unet': '0.4'}
    >>> extract_extra_networks("no tags <here> or <:here>")
    ('no tags <here> or <:here>', [])
    """
    _check_text("prompt", prompt)
    found: list[ExtraNetwork] = []
    kept: list[str] = []
    last = 0
    for start, colon, end in _tag_spans(prompt):
        name, *args = prompt[colon + 1:end - 1].split(":")
        found.append(ExtraNetwork(prompt[start + 1:colon], name, tuple(args)))
        kept.append(prompt[last:start])
        last = end
    kept.append(prompt[last:])
    return "".join(kept), found


def _tag_spans(text: str) -> list[tuple[int, int, int]]:
    """``(start, colon, end)`` of each ``<kind:body>`` tag, left to right: ``<``, a run of word characters,
    ``:``, at least one character that is not ``>``, then the first ``>``."""
    spans: list[tuple[int, int, int]] = []
    pos, close = 0, -1
    while (start := text.find("<", pos)) >= 0:
        colon = start + 1
        while colon < len(text) and (text[colon].isalnum() or text[colon] == "_"):
            colon += 1
        if colon == start + 1 or colon >= len(text) or text[colon] != ":":
            pos = start + 1
            continue
        if close <= colon:
            close = text.find(">", colon + 1)
            if close < 0:
                break  # no tag can close after here
        if close == colon + 1:
            pos = start + 1
            continue
        spans.append((start, colon, close + 1))
        pos = close + 1
    return spans


# ---------------------------------------------------------------------------------------------
# Composable diffusion: a AND b :1.2
# ---------------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_AND_NUMBER = re.compile(r"[-+]?(?:\d+\.?|\d*\.\d+)")


def split_and(prompt: str) -> list[tuple[str, float]]:
    """Split at the word ``AND`` into (sub-prompt, weight) pairs, for Composable Diffusion.

    Liu et al. 2022, "Compositional Visual Generation with Composable Diffusion Models". As
    A1111 does, a trailing ``:number`` is the sub-prompt's weight (default 1), trailing space is
    dropped and leading space kept. Negative prompts are not split.

    >>> split_and("a cat AND a dog :1.2")
    [('a cat', 1.0), (' a dog', 1.2)]
    >>> split_and("forest AND rain:-0.5 AND ANDROID")
    [('forest', 1.0), (' rain', -0.5), (' ANDROID', 1.0)]
    >>> split_and("")
    [('', 1.0)]
    """
    _check_text("prompt", prompt)
    pairs = []
    for part in _AND.split(prompt):
        # A1111's ``\s*:\s*(number)\s*$``, read from the end (that expression backtracks over spaces)
        part = part.rstrip()
        head, colon, number = part.rpartition(":")
        if colon and _AND_NUMBER.fullmatch(number.lstrip()):
            pairs.append((head.rstrip(), float(number)))
        else:
            pairs.append((part, 1.0))
    return pairs


def split_trimmed(text: str, separator: "re.Pattern | str") -> list[str]:
    """``text`` split at ``separator`` (a pattern or a plain string) with the white space on both sides of
    each separator dropped: what splitting at ``\s*separator\s*`` gives, without that expression's
    backtracking over long runs of spaces."""
    parts = separator.split(text) if isinstance(separator, re.Pattern) else text.split(separator)
    trimmed = []
    for i, part in enumerate(parts):
        if i > 0:
            part = part.lstrip()
        if i < len(parts) - 1:
            part = part.rstrip()
        trimmed.append(part)
    return trimmed


# ---------------------------------------------------------------------------------------------
# Prompt editing and alternation
# ---------------------------------------------------------------------------------------------

_STEP_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.[0-9]*|\.[0-9]+|[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SPACE = re.compile(r"\s*")
#: Characters that end a run of plain text inside the editing grammar.
_SYNTAX = frozenset("\\[]():|")
#: Characters the grammar tolerates as literals outside any bracket construct.
_STRAY = frozenset("[]():")


@dataclass(frozen=True)
class _Edit:
    """``[before:after:when]``: ``before`` up to step ``when`` inclusive, ``after`` from then on."""

    before: tuple
    after: tuple
    when: str


@dataclass(frozen=True)
class _Alternate:
    """``[a|b|c]``: option ``(step - 1) % n`` at each step."""

    options: tuple


class _TooDeep(Exception):
    """Internal: nesting beyond MAX_NESTING."""


class _EditParser:
    """Recursive descent over A1111's prompt-editing grammar.

    Inside brackets every ``[``/``(`` must open a well-formed construct; at the top level a
    construct that does not close is kept as literal characters. Results per position are
    memoised, so nested unclosed brackets cost linear time.
    """

    def __init__(self, text: str):
        self.text = text
        self.memo: dict[int, tuple[tuple, int] | None] = {}

    def document(self) -> tuple | None:
        """The whole prompt as a node sequence, or None when A1111's grammar rejects it."""
        text, nodes, pos = self.text, [], 0
        while pos < len(text):
            char = text[pos]
            built = self.construct(pos, 0) if char in "[(" else None
            if built is not None:
                nodes.extend(built[0])
                pos = built[1]
            elif char in _STRAY:
                nodes.append(char)
                pos += 1
            else:
                end = self.plain(pos)
                if end == pos:  # '|' outside brackets, or a backslash escaping nothing
                    return None
                nodes.append(text[pos:end])
                pos = end
        return tuple(nodes)

    def plain(self, pos: int) -> int:
        """End of the run of ordinary characters and backslash escapes starting at ``pos``."""
        text = self.text
        while pos < len(text):
            if text[pos] == "\\":
                if pos + 1 >= len(text) or text[pos + 1] == "\n":
                    break
                pos += 2
            elif text[pos] in _SYNTAX:
                break
            else:
                pos += 1
        return pos

    def sequence(self, pos: int, depth: int) -> tuple[tuple, int]:
        """The longest run of plain text and constructs from ``pos`` (possibly empty)."""
        nodes = []
        while pos < len(self.text):
            if self.text[pos] in "[(":
                built = self.construct(pos, depth)
                if built is None:
                    break
                nodes.extend(built[0])
                pos = built[1]
            else:
                end = self.plain(pos)
                if end == pos:
                    break
                nodes.append(self.text[pos:end])
                pos = end
        return tuple(nodes), pos

    def construct(self, pos: int, depth: int) -> tuple[tuple, int] | None:
        if depth >= MAX_NESTING:
            raise _TooDeep
        if pos not in self.memo:
            parse = self.round if self.text[pos] == "(" else self.square
            self.memo[pos] = parse(pos, depth + 1)
        return self.memo[pos]

    def round(self, pos: int, depth: int) -> tuple[tuple, int] | None:
        """``(x)`` or ``(x:y)``: emphasis, kept verbatim for :func:`parse_attention`."""
        first, end = self.sequence(pos + 1, depth)
        if self.at(end) == ")":
            return ("(", *first, ")"), end + 1
        if self.at(end) == ":":
            second, close = self.sequence(end + 1, depth)
            if self.at(close) == ")":
                return ("(", *first, ":", *second, ")"), close + 1
        return None

    def square(self, pos: int, depth: int) -> tuple[tuple, int] | None:
        """``[x]`` (de-emphasis, kept verbatim), ``[x|y...]``, ``[to:when]`` or ``[from:to:when]``."""
        first, end = self.sequence(pos + 1, depth)
        after = self.at(end)
        if after == "]":
            return ("[", *first, "]"), end + 1
        if after == "|":
            return self.alternation(first, end, depth)
        if after == ":":
            when = self.when(end + 1)
            if when is not None:
                return (_Edit((), first, when[0]),), when[1]
            second, colon = self.sequence(end + 1, depth)
            if self.at(colon) == ":":
                when = self.when(colon + 1)
                if when is not None:
                    return (_Edit(first, second, when[0]),), when[1]
        return None

    def alternation(self, first: tuple, pos: int, depth: int) -> tuple[tuple, int] | None:
        options = [first]
        while self.at(pos) == "|":
            option, pos = self.sequence(pos + 1, depth)
            options.append(option)
        if self.at(pos) != "]":
            return None
        return (_Alternate(tuple(options)),), pos + 1

    def when(self, pos: int) -> tuple[str, int] | None:
        """``number]`` with optional whitespace around the number: (number as written, end)."""
        pos = _SPACE.match(self.text, pos).end()
        number = _STEP_NUMBER.match(self.text, pos)
        if number is None:
            return None
        close = _SPACE.match(self.text, number.end()).end()
        if self.at(close) != "]":
            return None
        return number.group(0), close + 1

    def at(self, pos: int) -> str:
        return self.text[pos] if pos < len(self.text) else ""


@dataclass(frozen=True)
class _Clock:
    """Turns a written ``when`` into a step number with A1111 1.10's arithmetic.

    New scheduling (the default): a number with a decimal point is a fraction of the steps,
    any other number an absolute step; in a hires pass both are counted past the first pass
    (fractions past 1.0, steps past ``base_steps``). Old scheduling: below 1 is a fraction.
    The result is truncated toward zero and capped at ``steps``.
    """

    steps: int
    int_offset: int
    float_offset: float
    old: bool

    def step(self, written: str) -> int:
        value = float(written)
        if self.old:
            value = value * self.steps if value < 1 else value
        elif "." in written:
            value = (value - self.float_offset) * self.steps
        else:
            value = value - self.int_offset
        if math.isinf(value):  # '1e999': A1111 overflows here; treat it as "never" / "always"
            return self.steps if value > 0 else -1
        return min(self.steps, int(value))


def _switch_steps(nodes: tuple, clock: _Clock, found: set[int]) -> None:
    """Every step where some part of the prompt changes (all of them once there is alternation)."""
    for node in nodes:
        if isinstance(node, _Edit):
            when = clock.step(node.when)
            if when >= 1:
                found.add(when)
            _switch_steps(node.before, clock, found)
            _switch_steps(node.after, clock, found)
        elif isinstance(node, _Alternate):
            found.update(range(1, clock.steps + 1))
            for option in node.options:
                _switch_steps(option, clock, found)


def _render(nodes: tuple, step: int, clock: _Clock) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Edit):
            parts.append(_render(node.before if step <= clock.step(node.when) else node.after, step, clock))
        else:
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, clock))
    return "".join(parts)


def prompt_schedule(prompt: str, steps: int, *, hires_steps: int | None = None,
                    use_old_scheduling: bool = False) -> list[tuple[int, str]]:
    """The prompt's text at each step: ``(last_step, text)`` pairs, ascending, the last at ``steps``.

    A1111 1.10 prompt editing ``[from:to:when]``, ``[to:when]``, ``[from::when]`` (nestable) and
    alternation ``[a|b|c]``. The text for sampling step ``s`` (1-based) is the first entry whose
    ``last_step >= s``. With ``hires_steps`` the schedule is for the hires pass (of that many
    steps) that follows a first pass of ``steps``; ``use_old_scheduling`` is A1111's
    compatibility option (any ``when`` below 1 is a fraction, no hires offsets).
    Emphasis brackets are kept for :func:`parse_attention`.
    """
    _check_text("prompt", prompt)
    _check_steps("steps", steps)
    if hires_steps is not None:
        _check_steps("hires_steps", hires_steps)
    if hires_steps is None or use_old_scheduling:
        clock = _Clock(steps, 0, 0.0, use_old_scheduling)
    else:
        clock = _Clock(hires_steps, steps, 1.0, False)
    try:
        tree = _EditParser(prompt).document()
    except _TooDeep:
        raise InvalidParameter("prompt", _excerpt(prompt),
                               f"at most {MAX_NESTING} nested brackets") from None
    if tree is None:
        return [(clock.steps, prompt)]
    found = {clock.steps}
    _switch_steps(tree, clock, found)
    return [(step, _render(tree, step, clock)) for step in sorted(found)]


# ---------------------------------------------------------------------------------------------
# Attention: (word), ((word)), [word], (word:1.5), BREAK
# ---------------------------------------------------------------------------------------------

_ATTENTION = re.compile(r"""
      \\(?P<escaped>[()\[\]\\])       # \( \) \[ \] \\ : the character itself
    | (?P<backslash>\\)               # any other backslash vanishes
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)   # (text:1.5) closing with an explicit weight
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+|:)
""", re.VERBOSE)
_BREAK = re.compile(r"\bBREAK\b")  # white space around it goes too (split_trimmed)
_ROUND = 1.1
_SQUARE = 1 / 1.1
#: Weight of the marker that :func:`parse_attention` emits for ``BREAK``.
BREAK_WEIGHT = -1.0


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split one (already scheduled) prompt into runs of text with their attention weight.

    A1111's emphasis syntax: ``(x)`` multiplies by 1.1, ``[x]`` divides by 1.1, ``(x:w)``
    multiplies by ``w``; brackets nest multiplicatively and brackets left open at the end
    apply to the rest of the text. ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are literal
    characters; a closing bracket with nothing open is literal text. Adjacent runs with equal
    weights are merged. The word ``BREAK`` becomes the marker ``("BREAK", -1.0)``, which starts
    a new 75-token chunk.

    At most :data:`MAX_NESTING` brackets may be open at once (a typed error otherwise): closing a
    bracket rescales every run since it opened, so unbounded open brackets (``(a]`` repeated, which
    never close) would make this quadratic in the prompt's length.

    >>> parse_attention("normal text")
    [('normal text', 1.0)]
    >>> parse_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    >>> parse_attention("((word))")
    [('word', 1.2100000000000002)]
    >>> parse_attention("[word]")
    [('word', 0.9090909090909091)]
    >>> parse_attention("(word:1.5) and [[word]]")
    [('word', 1.5), (' and ', 1.0), ('word', 0.8264462809917354)]
    >>> parse_attention("(unbalanced")
    [('unbalanced', 1.1)]
    >>> parse_attention("unbalanced) too]")
    [('unbalanced) too]', 1.0)]
    >>> parse_attention(r"\\(literal\\] and \\\\ backslash")
    [('(literal] and \\\\ backslash', 1.0)]
    >>> parse_attention("(unnecessary)(parens)")
    [('unnecessaryparens', 1.1)]
    >>> parse_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).")  # doctest: +NORMALIZE_WHITESPACE
    [('a ', 1.0), ('house', 1.5730000000000004), (' ', 1.1), ('on', 1.0), (' a ', 1.1),
     ('hill', 0.55), (', sun, ', 1.1), ('sky', 1.4641000000000006), ('.', 1.1)]
    >>> parse_attention("a cat BREAK a dog")
    [('a cat', 1.0), ('BREAK', -1.0), ('a dog', 1.0)]
    >>> parse_attention("time:1.5) and a: colon")
    [('time:1.5) and a: colon', 1.0)]
    >>> parse_attention("")
    [('', 1.0)]
    """
    _check_text("prompt", text)
    runs: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []
    for match in _ATTENTION.finditer(text):
        kind = match.lastgroup
        if kind == "escaped":
            runs.append([match.group("escaped"), 1.0])
        elif kind == "backslash":
            runs.append(["", 1.0])
        elif kind == "open":
            if len(open_round) + len(open_square) >= MAX_NESTING:
                raise InvalidParameter("prompt", _excerpt(text),
                                       f"at most {MAX_NESTING} brackets open at once")
            (open_round if match.group("open") == "(" else open_square).append(len(runs))
        elif kind == "weight" and open_round:
            _scale(runs, open_round.pop(), _weight_value(match))
        elif kind == "close" and match.group("close") == ")" and open_round:
            _scale(runs, open_round.pop(), _ROUND)
        elif kind == "close" and match.group("close") == "]" and open_square:
            _scale(runs, open_square.pop(), _SQUARE)
        else:
            _add_text(runs, match.group(0))
    for start in open_round:
        _scale(runs, start, _ROUND)
    for start in open_square:
        _scale(runs, start, _SQUARE)
    return _merge_equal(runs) if runs else [("", 1.0)]


def _scale(runs: list[list], start: int, factor: float) -> None:
    for run in runs[start:]:
        run[1] *= factor


def _weight_value(match: re.Match) -> float:
    try:
        return float(match.group("weight"))
    except ValueError:
        raise InvalidParameter("prompt", match.group(0), "a number after ':' in an emphasis like (word:1.2)") from None


def _add_text(runs: list[list], text: str) -> None:
    for i, part in enumerate(split_trimmed(text, _BREAK)):
        if i:
            runs.append(["BREAK", BREAK_WEIGHT])
        runs.append([part, 1.0])


def _merge_equal(runs: list[list]) -> list[tuple[str, float]]:
    merged: list[tuple[str, float]] = []
    for text, weight in runs:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text, weight)
        else:
            merged.append((text, weight))
    return merged


# ---------------------------------------------------------------------------------------------


def _check_text(field: str, value: object) -> None:
    if not isinstance(value, str):
        raise InvalidParameter(field, value, "a string")


def _check_steps(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidParameter(field, value, "a whole number of steps, 1 or more")


def _excerpt(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
