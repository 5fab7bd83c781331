"""Pictures to tensors and back, with A1111's arithmetic.

In: ``uint8 / 255`` in float32, then ``2x - 1`` (A1111's img2img init and diffusers'
``VaeImageProcessor`` agree). Out: ``clamp((x + 1) / 2, 0, 1)`` in float32, times 255, then
*truncated* to uint8 (A1111's ``(255. * x).astype(np.uint8)``); diffusers rounds instead, so
its pictures differ from A1111's by one level in about half the pixels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import ImageError
from ..models.device import to_device


def images_to_tensor(
    images: Sequence[Image.Image],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Stack RGB pictures of one size into a ``[B, 3, H, W]`` tensor in [-1, 1]."""
    if not images:
        raise ImageError("images: got an empty list, expected at least one picture", field="images")
    size = images[0].size
    arrays = []
    for index, image in enumerate(images):
        if image.mode != "RGB":
            raise ImageError(
                f"images[{index}]: got mode {image.mode}, expected an RGB picture", field="images"
            )
        if image.size != size:
            raise ImageError(
                f"images[{index}]: got {image.width}x{image.height}, expected {size[0]}x{size[1]} "
                "like the first picture",
                field="images",
            )
        arrays.append(np.asarray(image, dtype=np.uint8))
    batch = np.stack(arrays).astype(np.float32) / 255.0
    batch = 2.0 * batch - 1.0
    tensor = torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2)))
    return to_device(tensor, device, dtype or torch.float32)


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` (or ``[3, H, W]``) in [-1, 1] to RGB pictures, truncating like A1111."""
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[1] != 3:
        raise ImageError(
            f"decoded tensor: got shape {tuple(x.shape)}, expected [batch, 3, height, width]",
            field="images",
        )
    x = x.detach().to(torch.float32)
    if torch.isnan(x).any():
        raise ImageError(
            "decoded tensor: contains NaN values, expected finite pixels "
            "(a half-precision VAE overflowed; run the VAE in float32)",
            field="images",
        )
    # On the tensor's device, so only bytes travel to the host: the same float32 operations in the
    # same order as on the CPU, and the cast to uint8 truncates as numpy's does.
    x = torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0).mul_(255.0).to(torch.uint8)
    pixels = x.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(array) for array in pixels]
