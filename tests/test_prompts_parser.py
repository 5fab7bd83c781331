"""The A1111 prompt language: prompt editing, alternation, emphasis, AND, extra networks.

Expected values are A1111 1.10's outputs for the same input (its grammar's documented
examples plus edge cases checked against it). The grammar's own examples live as doctests in
``underpaint/prompts/parser.py``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from underpaint.errors import InvalidParameter, UnderpaintError
from underpaint.prompts.parser import (
    MAX_NESTING,
    ExtraNetwork,
    extract_extra_networks,
    parse_attention,
    prompt_schedule,
    split_and,
)


def test_parser_and_chunker_do_not_import_torch():
    code = ("import sys; import underpaint.prompts.parser, underpaint.prompts.chunks; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# -- prompt editing ------------------------------------------------------------------------------

def test_documented_a1111_example():
    prompt = ("fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
              "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]")
    assert prompt_schedule(prompt, 100) == [
        (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
        (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
        (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
        (75, "fantasy landscape with a lake and an oak in background masterful"),
        (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
    ]


@pytest.mark.parametrize("when, steps, expected", [
    ("0.5", 20, 10),      # fraction: int(0.5 * 20)
    ("0.3", 20, 6),       # 0.3 * 20 = 6.000000000000001
    ("0.29", 100, 28),    # 0.29 * 100 = 28.999999999999996, truncated
    (".5", 7, 3),
    ("5.", 10, 10),       # decimal point: 5 * 10 steps, capped at the run
    ("3", 20, 3),         # absolute step
    ("1e1", 20, 10),      # no decimal point: absolute
    ("2.5e-1", 20, 5),    # decimal point: fraction
    ("25", 20, 20),       # capped at steps
])
def test_when_arithmetic(when, steps, expected):
    schedule = prompt_schedule(f"[a:b:{when}]", steps)
    assert schedule[0] == (expected, "a")
    assert schedule[-1] == (steps, "b" if expected < steps else "a")


@pytest.mark.parametrize("when", ["0", "-3", "0.01", "-1e999"])
def test_when_below_one_switches_immediately(when):
    assert prompt_schedule(f"x [a:b:{when}]", 10) == [(10, "x b")]


def test_huge_when_does_not_overflow():
    assert prompt_schedule("[a:b:1e999]", 10) == [(10, "a")]
    assert prompt_schedule("[a:b:1.5e999]", 10) == [(10, "a")]


def test_old_scheduling_treats_below_one_as_fraction():
    assert prompt_schedule("[a:b:0.5]", 10, use_old_scheduling=True) == [(5, "a"), (10, "b")]
    assert prompt_schedule("[a:b:1.0]", 10, use_old_scheduling=True) == [(1, "a"), (10, "b")]
    assert prompt_schedule("[a:b:1.0]", 10) == [(10, "a")]


def test_hires_pass_counts_past_first_pass():
    assert prompt_schedule("[a:b:15]", 10, hires_steps=20) == [(5, "a"), (20, "b")]
    assert prompt_schedule("[a:b:1.25]", 10, hires_steps=20) == [(5, "a"), (20, "b")]
    assert prompt_schedule("[a:b:5]", 10, hires_steps=20) == [(20, "b")]


def test_nested_and_both_branches_contribute_steps():
    assert prompt_schedule("[[a:b:2]:[c:d:6]:4]", 10) == [
        (2, "a"), (4, "b"), (6, "c"), (10, "d")]


def test_alternation_every_step():
    assert prompt_schedule("[fe|||]male", 6) == [
        (1, "female"), (2, "male"), (3, "male"), (4, "male"), (5, "female"), (6, "male")]
    # a nested alternation also counts the global step, so here it only ever shows "d"
    assert prompt_schedule("a [b|[c|d]] e", 4) == [
        (1, "a b e"), (2, "a d e"), (3, "a b e"), (4, "a d e")]


def test_emphasis_and_escapes_survive_scheduling():
    assert prompt_schedule(r"(a:1.2) \[b\] [c:(d:1.1):2]", 4) == [
        (2, r"(a:1.2) \[b\] c"), (4, r"(a:1.2) \[b\] (d:1.1)")]


@pytest.mark.parametrize("text", [
    "a | b", "(a|b)", "a [b|c", "trailing backslash \\", "[a:b:c]", "[a:b]", "[a:1:2:3]",
    "a [{b|d{:.5] c",  # A1111's own doctest expects otherwise; its grammar rejects the '|'
    "back\\\nslash newline",
])
def test_unparseable_or_plain_text_is_kept(text):
    assert prompt_schedule(text, 10) == [(10, text)]


def test_whitespace_around_when():
    assert prompt_schedule("[a:b:\t2 \n]", 5) == [(2, "a"), (5, "b")]


def test_nesting_limit_is_a_typed_error():
    deep = "[" * (MAX_NESTING + 5) + "x"
    with pytest.raises(InvalidParameter, match="nested"):
        prompt_schedule(deep, 10)
    ok = "[" * 40 + "x:5" + "]" * 40
    assert prompt_schedule(ok, 10)[-1][0] == 10


@pytest.mark.parametrize("steps", [0, -1, 1.5, True, "10"])
def test_bad_steps(steps):
    with pytest.raises(InvalidParameter, match="steps"):
        prompt_schedule("a", steps)


def test_unclosed_brackets_stay_literal_and_fast():
    text = "[a (b " * 45  # each failed construct is re-read from every later position without memoising
    assert prompt_schedule(text, 10) == [(10, text)]
    text = "[a " * 30 + "]" * 2
    assert prompt_schedule(text, 10) == [(10, text)]
    with pytest.raises(InvalidParameter):
        prompt_schedule("(" * 5000, 10)


# -- attention -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("(a) (b)", [("a", 1.1), (" ", 1.0), ("b", 1.1)]),
    ("(a:0)", [("a", 0.0)]),
    ("(a: -0.5 )", [("a", -0.5)]),
    ("[a:1.5)", [("a:1.5)", 1 / 1.1)]),  # no "(" is open: ":1.5)" is text; "[" closes at the end
    ("((a)", [("a", 1.2100000000000002)]),
    ("([a)", [("a", 1.1 * (1 / 1.1))]),
    ("a\\b", [("ab", 1.0)]),
    ("BREAK", [("", 1.0), ("BREAK", -1.0), ("", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
    ("(BREAK)", [("", 1.1), ("BREAK", -1.1), ("", 1.1)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
])
def test_attention_edge_cases(text, expected):
    assert parse_attention(text) == expected


def test_emphasis_keeps_at_most_max_nesting_brackets_open():
    """Each bracket rescales the runs since it opened, so brackets that never close ("(a]" over and
    over) made a long prompt quadratic; prompt editing lets them through as literal text."""
    text = "(a]" * MAX_NESTING
    runs = parse_attention(text)
    assert len(runs) == MAX_NESTING and runs[0] == ("a]", 1.1)
    assert runs[-1][1] == pytest.approx(1.1 ** MAX_NESTING)
    for too_many in (text + "(a]", "|" + "(" * (MAX_NESTING + 1) + "a"):
        assert prompt_schedule(too_many, 10) == [(10, too_many)]
        with pytest.raises(InvalidParameter, match="open at once"):
            parse_attention(too_many)
    # Brackets that close do not add up: many in a row are fine.
    assert parse_attention("(a)" * (MAX_NESTING * 3)) == [("a" * MAX_NESTING * 3, 1.1)]


def test_bad_explicit_weight_is_a_typed_error():
    with pytest.raises(InvalidParameter, match="number"):
        parse_attention("(a:1.2.3)")
    assert parse_attention("a:1.2.3)") == [("a:1.2.3)", 1.0)]


# -- AND -------------------------------------------------------------------------------------------

def test_split_and_keeps_leading_space_and_reads_weights():
    assert split_and("a cat AND a dog :1.2 AND  bird:.5  ") == [
        ("a cat", 1.0), (" a dog", 1.2), ("  bird", 0.5)]
    assert split_and("x:y AND z : -2") == [("x:y", 1.0), (" z", -2.0)]
    assert split_and("a_AND_b") == [("a_AND_b", 1.0)]
    assert split_and("(AND)") == [("(", 1.0), (")", 1.0)]


# -- extra networks ----------------------------------------------------------------------------

def test_extra_networks():
    text, nets = extract_extra_networks("<lora:a b:0.8:0.5> cat <lyco:x:1:dyn=4> <lora:y:te=0.2>")
    assert text == " cat  "
    assert nets == [ExtraNetwork("lora", "a b", ("0.8", "0.5")), ExtraNetwork("lyco", "x", ("1", "dyn=4")),
                    ExtraNetwork("lora", "y", ("te=0.2",))]
    assert nets[1].positional == ("1",) and nets[1].named == {"dyn": "4"}
    assert nets[2].positional == () and nets[2].named == {"te": "0.2"}


def test_extra_network_without_arguments_and_odd_bodies():
    assert extract_extra_networks("<hypernet:only>") == ("", [ExtraNetwork("hypernet", "only", ())])
    assert extract_extra_networks("<a-b:c>") == ("<a-b:c>", [])
    assert extract_extra_networks("<lora:<x:1>")[1] == [ExtraNetwork("lora", "<x", ("1",))]


def test_non_string_is_a_typed_error():
    for call in (parse_attention, split_and, extract_extra_networks):
        with pytest.raises(InvalidParameter):
            call(None)


# -- never crash -----------------------------------------------------------------------------

_PIECES = st.sampled_from(list("[]()|:\\<>, ab.0123-+eE\n\t") + ["BREAK", "AND", ":1.5", "[a:b:", "<lora:x:"])
_TEXT = st.lists(_PIECES, max_size=60).map("".join) | st.text(max_size=80)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_TEXT, st.integers(1, 150))
def test_any_text_any_steps_gives_a_result_or_a_typed_error(text, steps):
    try:
        plain, _ = extract_extra_networks(text)
        for sub, weight in split_and(plain):
            assert isinstance(weight, float)
            schedule = prompt_schedule(sub, steps)
            ends = [end for end, _ in schedule]
            assert ends == sorted(set(ends)) and ends[-1] == steps and ends[0] >= 1
            for _, scheduled in schedule:
                runs = parse_attention(scheduled)
                assert runs and all(isinstance(t, str) and isinstance(w, float) for t, w in runs)
    except UnderpaintError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="[|"), max_size=60), st.integers(1, 150))
def test_text_without_square_brackets_is_never_scheduled(text, steps):
    try:
        assert prompt_schedule(text, steps) == [(steps, text)]
    except InvalidParameter:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\\()[]:"), min_size=1, max_size=60))
def test_text_without_syntax_has_weight_one(text):
    if "BREAK" not in text:
        assert parse_attention(text) == [(text, 1.0)]


def test_extra_network_tags_are_found_as_a1111s_expression_finds_them():
    """The one-pass tag reader takes out what A1111's ``<(\\w+):([^>]+)>`` substitution takes out, on random
    prompts of the characters that matter; a long prompt of open tags is read in one pass."""
    import random
    import re

    from underpaint.prompts.parser import extract_extra_networks

    a1111 = re.compile(r"<(\w+):([^>]+)>")
    rng = random.Random(1)
    alphabet = "<>:a_é1 \n,="
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        rest, found = extract_extra_networks(text)
        assert rest == a1111.sub("", text), repr(text)
        assert [(t.kind, ":".join((t.name, *t.args))) for t in found] == a1111.findall(text), repr(text)
    assert extract_extra_networks("<a:" * 30000) == ("<a:" * 30000, [])


def test_and_weights_and_break_are_read_as_a1111s_expressions_read_them():
    """``split_and`` and the ``BREAK`` / ``[SEP]`` splits give what A1111's expressions with ``\\s*`` around
    them give, on random prompts; long runs of spaces are read in one pass (those expressions backtrack)."""
    import random
    import re

    from underpaint.prompts.parser import split_and, split_trimmed

    weight = re.compile(r"\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+))\s*\Z")

    def a1111_and(prompt):
        out = []
        for part in re.split(r"\bAND\b", prompt):
            found = weight.search(part)
            out.append((re.sub(r"\s+\Z", "", part), 1.0) if found is None else (part[:found.start()],
                                                                                 float(found.group(1))))
        return out

    rng = random.Random(2)
    alphabet = ["AND", "BREAK", "[SEP]", " ", "\n", ":", "1", ".", "-", "a", "x "]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        assert split_and(text) == a1111_and(text), repr(text)
        assert split_trimmed(text, re.compile(r"\bBREAK\b")) == re.split(r"\s*\bBREAK\b\s*", text), repr(text)
        assert split_trimmed(text, "[SEP]") == re.split(r"\s*\[SEP\]\s*", text), repr(text)
    spaces = " " * 200_000 + "x"
    assert split_and(spaces) == [(spaces, 1.0)]
    assert split_trimmed(spaces, re.compile(r"\bBREAK\b")) == [spaces]
