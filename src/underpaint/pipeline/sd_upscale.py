"""A1111's img2img script "SD upscale": enlarge a picture, then repaint it tile by tile.

The init picture is enlarged by the scale with a picture upscaler (pipeline/upscale.py: "None"
keeps it, "Lanczos", or an upscaling model such as 4x-UltraSharp), cut into tiles of the
request's width x height that overlap by ``overlap`` pixels, and each tile goes through img2img
with the request's prompt, strength and sampler; the repainted tiles are blended back into one
picture of the enlarged size. So a picture far larger than the model's native size gains detail
the model can paint at its own size. As in A1111 1.10:

- tiles: ``ceil((W - overlap) / (tile - overlap))`` columns (rows alike), spread evenly from the
  left edge to the right one (column k at ``int(k * (W - tile) / (columns - 1))``, the last one
  flush with the edge), so neighbours overlap by at least ``overlap`` pixels;
- blending: each row is laid left to right, the first ``overlap`` columns of a tile faded in over
  its left neighbour with a linear ramp (``int(c * 255 / overlap)`` of 255 at column c), the rest
  pasted over; the rows are then laid top to bottom the same way;
- batches: the tiles go through img2img ``batch_size`` at a time; the k-th batch of tiles starts at
  seed + k (its tiles take that seed + 0, 1, ... as any batch does), and the request's ``n_iter``
  makes that many whole upscales, the n-th from seed + n;
- the infotext is the first tile's (its Size is the tile size) with "SD upscale overlap" and
  "SD upscale upscaler" added.

Where A1111's arithmetic would go wrong, underpaint differs: a picture smaller than a tile (on a
side) is repainted as one tile of the picture's size on that side (rounded down to a multiple of
8), where A1111 pads it with black; and an overlap of 0 simply lays the tiles side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import InvalidParameter
from .records import Progress, Result

if TYPE_CHECKING:
    from PIL.Image import Image

    from ..params import GenerationParams


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one picture lie: their left and top edges, and their size."""

    width: int
    height: int
    tile_width: int
    tile_height: int
    overlap: int
    xs: tuple[int, ...]
    ys: tuple[int, ...]


def _starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    count = math.ceil((length - overlap) / (tile - overlap))
    step = (length - tile) / (count - 1) if count > 1 else 0
    return tuple(min(int(k * step), length - tile) for k in range(count))


def tile_grid(width: int, height: int, tile_width: int, tile_height: int, overlap: int) -> TileGrid:
    """The tiles for a ``width`` x ``height`` picture (a tile side larger than the picture's is cut to
    it, in whole multiples of 8)."""
    if width < 64 or height < 64:
        raise InvalidParameter("sd_upscale_scale", f"{width}x{height} picture",
                               "an enlarged picture of at least 64x64 pixels (the smallest tile)")
    tile_width = min(tile_width, max(8, width // 8 * 8))
    tile_height = min(tile_height, max(8, height // 8 * 8))
    if overlap >= min(tile_width, tile_height):
        raise InvalidParameter("sd_upscale_overlap", overlap,
                               f"less than the tile size ({tile_width}x{tile_height}: the request's width and height)")
    return TileGrid(width, height, tile_width, tile_height, overlap,
                    _starts(width, tile_width, overlap), _starts(height, tile_height, overlap))


def split(image: "Image", grid: TileGrid) -> list["Image"]:
    """The tiles, row by row."""
    return [image.crop((x, y, x + grid.tile_width, y + grid.tile_height)) for y in grid.ys for x in grid.xs]


def _ramp(width: int, height: int, horizontal: bool, overlap: int) -> "Image":
    """A mask fading in over ``overlap`` columns (or rows): ``int(c * 255 / overlap)`` at column c."""
    import numpy as np
    from PIL import Image

    ramp = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)
    values = np.broadcast_to(ramp[None, :], (height, overlap)) if horizontal else \
        np.broadcast_to(ramp[:, None], (overlap, width))
    return Image.fromarray(np.ascontiguousarray(values), "L")


def combine(tiles: list["Image"], grid: TileGrid) -> "Image":
    """The tiles (row by row, each ``tile_width`` x ``tile_height``) blended into one picture."""
    from PIL import Image

    o, tw, th = grid.overlap, grid.tile_width, grid.tile_height
    out = Image.new("RGB", (grid.width, grid.height))
    row_mask = _ramp(0, th, True, o) if o else None
    col_mask = _ramp(grid.width, 0, False, o) if o else None
    for r, y in enumerate(grid.ys):
        row = Image.new("RGB", (grid.width, th))
        for c, x in enumerate(grid.xs):
            tile = tiles[r * len(grid.xs) + c].convert("RGB")
            if c == 0 or not o:
                row.paste(tile, (x, 0))
                continue
            row.paste(tile.crop((0, 0, o, th)), (x, 0), mask=row_mask)
            row.paste(tile.crop((o, 0, tw, th)), (x + o, 0))
        if r == 0 or not o:
            out.paste(row, (0, y))
            continue
        out.paste(row.crop((0, 0, grid.width, o)), (0, y), mask=col_mask)
        out.paste(row.crop((0, o, grid.width, th)), (0, y + o))
    return out


def run(params: "GenerationParams", img2img: Callable[["GenerationParams", Callable], Result], *,
        info, folder=None, device: str = "cpu", progress: Callable[[Progress], None] | None = None,
        cancel=None) -> Result:
    """The SD upscale request ``params`` (seeds fixed): ``img2img(tile_params, progress)`` repaints
    one batch of tiles; ``folder`` holds the upscaling models the upscaler may name."""
    from . import upscale

    opts = params.sd_upscale
    assert opts is not None and params.seed >= 0
    if not params.init_images:
        raise InvalidParameter("sd_upscale", "without init_images", "an img2img request (SD upscale enlarges its "
                                                                     "init picture)")
    if params.width is None or params.height is None:
        raise InvalidParameter("width", params.width, "the tile width and height (SD upscale cuts the enlarged "
                                                      "picture into tiles of the request's size)")
    upscaler = upscale.resolve(folder, opts.upscaler, "sd_upscale_upscaler")
    source = params.init_images[0].convert("RGB")  # A1111 flattens a transparent picture first
    if upscaler == "None":
        enlarged = source
    else:
        enlarged = upscale.upscale_by(source, opts.scale, upscale.picture_pass(upscaler, device=device))
    grid = tile_grid(enlarged.width, enlarged.height, params.width, params.height, opts.overlap)
    work = split(enlarged, grid)
    size = params.batch_size
    batches = [work[i:i + size] for i in range(0, len(work), size)]
    jobs = len(batches) * params.n_iter
    extra = (*params.extra_infotext, ("SD upscale overlap", str(opts.overlap)),
             ("SD upscale upscaler", upscaler if isinstance(upscaler, str) else upscaler.name))
    images, first, unfinished = [], None, []
    for n in range(params.n_iter):
        repainted: list[Image] = []
        stopped = False
        for k, batch in enumerate(batches):
            if cancel is not None and cancel.interrupted:
                stopped = True  # the tiles not repainted keep the enlarged picture
                repainted += batch
                continue
            report = Progress.relay(progress, n * len(batches) + k, jobs)
            tile_params = params.replace(
                init_images=tuple(batch), batch_size=len(batch), n_iter=1, seed=params.seed + n + k,
                width=grid.tile_width, height=grid.tile_height, resize_mode=0, sd_upscale=None, extra_infotext=extra)
            result = img2img(tile_params, report)
            if first is None:
                first = result
            stopped = stopped or bool(result.unfinished) or result.interrupted
            repainted += list(result.images[:len(batch)])
        images.append(combine(repainted, grid))
        if stopped:
            unfinished.append(n)
    infotext = first.infotexts[0] if first is not None else ""  # "": interrupted before any tile
    count = params.n_iter
    return Result(tuple(images), (infotext,) * count, tuple(params.seed + n for n in range(count)),
                  (params.subseed,) * count, params, info, interrupted=bool(cancel and cancel.interrupted),
                  prompts=(params.prompt,) * count, negative_prompts=(params.negative_prompt,) * count,
                  unfinished=tuple(unfinished))
