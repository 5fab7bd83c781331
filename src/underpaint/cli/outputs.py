"""Where the CLI writes: ``-o`` as a file (several images get -1, -2, ...) or a folder."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ..errors import InvalidParameter, OutputExists

_NUMBERED = re.compile(r"^(\d{5})-")


def plan_outputs(output: str | None, command: str, count: int, *, overwrite: bool, source: Path | None,
                 seeds: Sequence[int] | None = None) -> list[Path]:
    """Output paths for ``count`` images; raises OutputExists early for a file target that exists.

    A folder target (no ``-o``, an existing folder, a path ending in ``/``, or a folder of inputs)
    gets A1111-style names ``00042-<seed>.png`` continuing the folder's numbering, or the input's
    own name when processing a folder of inputs. Folder names are never reused, so only file
    targets can collide.
    """
    if source is not None and output and not output.endswith(("/", "\\")) and not Path(output).is_dir() \
            and Path(output).suffix:
        raise InvalidParameter("output", output, "a folder for a folder of inputs (each result is named after its "
                                                 "input), e.g. -o results/")
    if output is None or output.endswith(("/", "\\")) or Path(output).is_dir() or source is not None:
        folder = Path(output or Path("outputs") / command).expanduser()
        _check_folder(folder, output)
        return _in_folder(folder, count, source, seeds)
    from ..imageio.metadata import output_format

    target = Path(output).expanduser()
    suffix = target.suffix or ".png"
    output_format(target.with_suffix(suffix))  # an unknown extension is refused before any work, not after
    _check_folder(target.parent, output)
    if count == 1:
        paths = [target.with_suffix(suffix)]
    else:
        paths = [target.with_name(f"{target.stem}-{i}{suffix}") for i in range(1, count + 1)]
    if not overwrite:
        for path in paths:
            if path.exists():
                raise OutputExists(f"{path} already exists (use --overwrite to replace it, or choose another -o)")
    return paths


def _check_folder(folder: Path, output: str | None) -> None:
    """Refuse a folder that cannot be made because a file stands where it or a folder above it
    would be: found now, before the pictures are made, rather than when they are saved."""
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise InvalidParameter("output", output, f"a file or folder that can be created ({path} is a file)")
            return


def _in_folder(folder: Path, count: int, source: Path | None, seeds: Sequence[int] | None) -> list[Path]:
    if source is not None:
        if count == 1:
            return [_free(folder / f"{source.stem}.png")]
        return [_free(folder / f"{source.stem}-{i}.png") for i in range(1, count + 1)]
    start = _next_number(folder)
    seeds = list(seeds or ())
    seeds += [0] * (count - len(seeds))
    return [folder / f"{start + i:05d}-{seeds[i]}.png" for i in range(count)]


def _next_number(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1


def _free(path: Path) -> Path:
    """The path, or ``name (2).png``-style variants if it is taken: a folder run never overwrites."""
    if not path.exists():
        return path
    n = 2
    while (candidate := path.with_name(f"{path.stem} ({n}){path.suffix}")).exists():
        n += 1
    return candidate
