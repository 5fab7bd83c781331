"""Image loading with limits, A1111 resize modes, base64, masks, infotext.

Modules (imported directly; nothing is loaded here):

- ``load``: files, bytes and base64 to upright RGB/RGBA pictures, with pixel limits.
- ``resize``: A1111's four img2img resize modes and the default output size.
- ``convert``: pictures to [-1, 1] tensors and back with A1111's truncation.
- ``infotext``: A1111's generation-parameters text, written and parsed.
- ``metadata``: atomic saving with the infotext (PNG chunk, EXIF) and reading it back.
- ``mask``: inpainting masks (alpha or greyscale, blur, fitting to the picture).
- ``pil_open``: the restricted, bomb-checked ``Image.open`` the readers share.
"""
