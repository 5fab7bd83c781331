"""A1111's prompt comments ("Enable comments", on by default since its 1.8): ``#`` hides the rest of its
line from the generation; a line that is only a comment goes with its line break. They are taken out
before anything reads the prompt (extra-network tags in a comment are not applied), and the infotext
records the prompt without them, as A1111's does.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..params import GenerationParams


def strip_comments(text: str) -> str:
    """``text`` without its comments.

    >>> strip_comments("a castle # try a tower next\\n# the old one:\\nat dusk")
    'a castle \\nat dusk'
    """
    if "#" not in text:
        return text
    kept = []
    for line in text.split("\n"):
        if line.startswith("#"):
            continue  # a comment line, with its line break
        cut = line.find("#")
        kept.append(line if cut < 0 else line[:cut])
    return "\n".join(kept)


def without_comments(params: "GenerationParams") -> "GenerationParams":
    """``params`` with the comments taken out of its prompts (the hires. fix pass's too) when its
    ``prompt_comments`` is on."""
    if not params.prompt_comments:
        return params
    changes = {name: strip_comments(getattr(params, name)) for name in ("prompt", "negative_prompt")
               if "#" in getattr(params, name)}
    hires = params.hires
    if hires is not None and ("#" in hires.prompt or "#" in hires.negative_prompt):
        changes["hires"] = replace(hires, prompt=strip_comments(hires.prompt),
                                   negative_prompt=strip_comments(hires.negative_prompt))
    return params.replace(**changes) if changes else params
