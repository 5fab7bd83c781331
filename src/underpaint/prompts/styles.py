"""Prompt styles: A1111's ``styles.csv``, read safely, and styles applied to prompts as A1111 1.10 does.

A style is a name with a prompt text and a negative prompt text. Applying one to a prompt:

- when the style's text contains ``{prompt}``, every ``{prompt}`` in it is replaced by the prompt
  as it stands (even an empty one);
- otherwise the prompt and the style's text, each stripped of surrounding white space, are joined
  with ``", "``, an empty one left out (so an empty style text still strips the prompt).

Several styles apply in the order given, each to the result of the one before; the negative
prompt takes the styles' negative texts by the same rule. The results are the prompts the model
sees and the infotext records; A1111 writes no key naming the styles (its "Styles array" is
inferred when an infotext is read back), and neither does underpaint.

The file is A1111's: UTF-8 (a byte-order mark is fine), a header row naming the columns ``name``,
``prompt`` (or the older ``text``) and, optionally, ``negative_prompt``. Rows whose name is empty
or starts with ``#`` are skipped, and a later row of the same name replaces an earlier one, as in
A1111. Unlike A1111, which quietly drops a style name it does not know, an unknown name is an
error that names it and lists the known ones. The file is read with :mod:`csv`, at most
:data:`MAX_STYLES_FILE_BYTES` of it, and never executed or evaluated.
"""

from __future__ import annotations

import csv
import io
import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidParameter

#: A styles file larger than this is refused (A1111's own files are a few hundred kilobytes at most).
MAX_STYLES_FILE_BYTES = 8 * 1024 * 1024
#: At most this many names are listed in an "unknown style" error.
MAX_LISTED_NAMES = 100
PROMPT_MARK = "{prompt}"


@dataclass(frozen=True)
class PromptStyle:
    """One row of ``styles.csv``."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""


def merge_style(style_text: str, prompt: str) -> str:
    """One style's text applied to a prompt (A1111's rule; see the module docstring)."""
    if PROMPT_MARK in style_text:
        return style_text.replace(PROMPT_MARK, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_style_texts(prompt: str, texts: Iterable[str], *, max_chars: int | None = None,
                      field: str = "styles") -> str:
    """Style texts applied in order, each to the result of the one before.

    ``max_chars``: the longest result allowed, checked after each style, so that styles which grow
    the prompt (a text with ``{prompt}`` twice doubles it each time) are refused, naming ``field``,
    before they take the memory.
    """
    for text in texts:
        prompt = merge_style(text, prompt)
        if max_chars is not None and len(prompt) > max_chars:
            raise InvalidParameter(field, f"a prompt of {len(prompt)} characters",
                                   f"styles that keep the prompt within {max_chars} characters (this server's limit)")
    return prompt


@dataclass(frozen=True)
class StyleBook:
    """The styles of one file, in file order; ``source`` names the file in messages."""

    styles: Mapping[str, PromptStyle]
    source: str = "styles.csv"
    missing: bool = False  # the file does not exist (no styles)

    @property
    def names(self) -> list[str]:
        return list(self.styles)

    def find(self, names: Sequence[str], *, field: str) -> list[PromptStyle]:
        """The styles of these names, in the order given; an unknown name is an error naming ``field``."""
        found = []
        for name in names:
            style = self.styles.get(name)
            if style is None:
                raise InvalidParameter(field, name, self._expected())
            found.append(style)
        return found

    def apply(self, names: Sequence[str], prompt: str, negative_prompt: str, *, field: str,
              max_chars: int | None = None) -> tuple[str, str]:
        """The prompt and negative prompt with the named styles applied in order (each result at
        most ``max_chars`` long, see :func:`apply_style_texts`)."""
        chosen = self.find(names, field=field)
        return (apply_style_texts(prompt, (s.prompt for s in chosen), max_chars=max_chars, field=field),
                apply_style_texts(negative_prompt, (s.negative_prompt for s in chosen), max_chars=max_chars,
                                  field=field))

    def styler(self, names: Sequence[str], *, field: str, max_chars: int | None = None):
        """The named styles as a function ``(prompt, negative_prompt) -> (prompt, negative_prompt)``, for
        prompts made later (a script's); every name is checked now, naming ``field``."""
        from functools import partial

        self.find(names, field=field)
        return partial(self.apply, tuple(names), field=field, max_chars=max_chars)

    def _expected(self) -> str:
        if self.missing:
            return f"a style from {self.source}, which does not exist"
        if not self.styles:
            return f"a style from {self.source}, which has none"
        names = self.names
        shown = ", ".join(repr(n) for n in names[:MAX_LISTED_NAMES])
        more = f" and {len(names) - MAX_LISTED_NAMES} more" if len(names) > MAX_LISTED_NAMES else ""
        return f"one of the styles in {self.source}: {shown}{more}"


def parse_styles(text: str, *, source: str = "styles.csv") -> StyleBook:
    """Styles from the text of a styles file; a file without a ``name`` or prompt column is an error."""
    bad = "a CSV file whose header row names the columns name, prompt and negative_prompt"
    reader = csv.DictReader(io.StringIO(text, newline=""), skipinitialspace=True)
    styles: dict[str, PromptStyle] = {}
    try:
        columns = reader.fieldnames or []
        if not columns:  # an empty file: no styles
            return StyleBook({}, source)
        prompt_column = "prompt" if "prompt" in columns else "text" if "text" in columns else None
        if "name" not in columns or prompt_column is None:
            raise InvalidParameter("styles_file", source, f"{bad} (its header is {', '.join(map(str, columns))})")
        for row in reader:
            name = row.get("name") or ""
            if not name or name.startswith("#"):
                continue
            styles[name] = PromptStyle(name, row.get(prompt_column) or "", row.get("negative_prompt") or "")
    except csv.Error as exc:
        raise InvalidParameter("styles_file", source, f"{bad} (line {reader.line_num}: {exc})") from None
    return StyleBook(styles, source)


def read_styles(path: Path, *, source: str | None = None) -> StyleBook:
    """The styles in ``path``; a file that does not exist has none."""
    source = source or str(path)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_STYLES_FILE_BYTES + 1)
    except FileNotFoundError:
        return StyleBook({}, source, missing=True)
    except OSError as exc:
        raise InvalidParameter("styles_file", source, f"a readable file ({exc.strerror or exc})") from None
    if len(data) > MAX_STYLES_FILE_BYTES:
        raise InvalidParameter("styles_file", source, f"a file of at most {MAX_STYLES_FILE_BYTES // 2**20} MiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidParameter("styles_file", source, f"UTF-8 text (byte {exc.start} is not)") from None
    return parse_styles(text, source=source)


class StylesFile:
    """A styles file read again whenever it changes on disk (a stat per use), safe across threads."""

    def __init__(self, path: Path, *, source: str | None = None):
        self.path = Path(path)
        self.source = source or str(self.path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._book: StyleBook | None = None

    def book(self) -> StyleBook:
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except OSError:
            stamp = None
        with self._lock:
            if self._book is None or stamp != self._stamp or stamp is None:
                self._book = read_styles(self.path, source=self.source)
                self._stamp = stamp
            return self._book

    # -- writing (the browser UI's "Save prompts as style" and "Delete") ----------------------------

    def save(self, style: PromptStyle) -> None:
        """Add ``style`` at the end of the file, or put it in place of the row of that name (a later row
        of the same name is dropped: it would replace this one). The other rows, comments and columns
        stay as they are; the file before the change is kept as ``styles.csv.bak``, as A1111 keeps it."""
        _check_style(style)

        def change(rows: list[list[str]], columns: list[str]) -> list[list[str]]:
            index = columns.index("name")
            row = [""] * len(columns)
            row[index] = style.name
            row[columns.index("prompt") if "prompt" in columns else columns.index("text")] = style.prompt
            row[columns.index("negative_prompt")] = style.negative_prompt
            kept, placed = [], False
            for old in rows:
                if old[index] != style.name:
                    kept.append(old)
                elif not placed:  # the first row of that name is replaced, later ones dropped
                    kept.append(row)
                    placed = True
            return kept if placed else kept + [row]

        self._rewrite(change)

    def delete(self, name: str) -> bool:
        """Take out the rows named ``name``; False when there were none (the file is left alone)."""

        def change(rows: list[list[str]], columns: list[str]) -> list[list[str]] | None:
            index = columns.index("name")
            kept = [row for row in rows if row[index] != name]
            return kept if len(kept) != len(rows) else None

        return self._rewrite(change)

    def _rewrite(self, change) -> bool:
        """Write the file's rows as ``change(rows, columns)`` returns them (None: leave it); True if written."""
        from ..imageio.metadata import write_atomic

        with self._lock:
            try:
                raw = self.path.read_bytes()
                text = raw.decode("utf-8-sig")
            except FileNotFoundError:
                raw, text = None, ""
            except (OSError, UnicodeDecodeError) as exc:
                raise InvalidParameter("styles_file", self.source, f"a readable UTF-8 file ({exc})") from None
            parse_styles(text, source=self.source)  # a file that does not parse is not written over
            rows = list(csv.reader(io.StringIO(text, newline="")))
            header = [c.strip() for c in rows[0]] if rows else []
            if "negative_prompt" not in header and header:
                header.append("negative_prompt")
            columns = header or ["name", "prompt", "negative_prompt"]
            body = [row + [""] * (len(columns) - len(row)) for row in rows[1:] if row]
            new_body = change(body, columns)
            if new_body is None:
                return False
            out = io.StringIO(newline="")
            csv.writer(out, lineterminator="\n").writerows([columns, *new_body])
            data = out.getvalue().encode("utf-8")
            if len(data) > MAX_STYLES_FILE_BYTES:
                raise InvalidParameter("styles", f"{len(data)} bytes of styles",
                                       f"at most {MAX_STYLES_FILE_BYTES // 2**20} MiB in {self.source}")
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if raw is not None:
                write_atomic(self.path.with_name(self.path.name + ".bak"), raw, overwrite=True)
            write_atomic(self.path, data, overwrite=True)
            self._book = None
            return True


#: The longest style name taken.
MAX_STYLE_NAME = 200


def _check_style(style: PromptStyle) -> None:
    name = style.name
    if not isinstance(name, str) or not name.strip() or name != name.strip() or len(name) > MAX_STYLE_NAME \
            or name.startswith("#") or any(ord(c) < 32 for c in name):
        raise InvalidParameter("name", name, f"a style name of 1 to {MAX_STYLE_NAME} characters, without line breaks "
                                             "or spaces around it, not starting with #")
    for field, text in (("prompt", style.prompt), ("negative_prompt", style.negative_prompt)):
        if not isinstance(text, str):
            raise InvalidParameter(field, text, "text")
