"""The names of the settings that choose how a loaded model uses its device (``--vram``,
``--vae-precision``), importable without torch: the server's configuration and the CLI's argument
parser check them before any model code loads. What each name does is documented where it is
carried out, in :mod:`.offload`."""

#: ``--vram``: memory modes, from the fastest to the one that needs least GPU memory.
VRAM_MODES = ("high", "medium", "low")
#: ``--vae-precision``: the dtype every VAE call of a model runs in (``auto`` follows the VAE's config).
VAE_PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def spoken(names: tuple[str, ...]) -> str:
    """The names as a phrase, for the "expected" part of an error message.

    >>> spoken(VRAM_MODES)
    'high, medium or low'
    """
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
