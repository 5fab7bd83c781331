"""underpaint: Stable Diffusion image-to-image with the controls AUTOMATIC1111 users know."""

__version__ = "0.1.0"

__all__ = ["Engine", "GenerationParams", "__version__"]


def __getattr__(name: str):
    # Lazy so that `import underpaint` stays cheap and does no work (no torch import).
    if name == "Engine":
        from .pipeline.engine import Engine

        return Engine
    if name == "GenerationParams":
        from .params import GenerationParams

        return GenerationParams
    raise AttributeError(name)
