"""Where files that belong beside the models folder live by default: ``styles.csv`` and ``outputs/``.

An AUTOMATIC1111 install keeps ``models/``, ``outputs/`` and ``styles.csv`` side by side in its
root; underpaint keeps the same arrangement around its models folder. So with the default
models folder (``~/.local/share/underpaint/models``) saved pictures go to
``~/.local/share/underpaint/outputs/`` and styles are read from
``~/.local/share/underpaint/styles.csv``; pointed at an A1111 install (its root or its
``models/``), the install's own ``outputs/`` and ``styles.csv`` are used.
"""

from __future__ import annotations

from pathlib import Path

STYLES_FILE_NAME = "styles.csv"
OUTPUTS_FOLDER_NAME = "outputs"


def models_home(models_dir: Path | None) -> Path:
    """The folder that holds the models folder: an A1111 install's root, else the models folder's parent."""
    from .models.registry import default_models_dir

    root = Path(models_dir).expanduser() if models_dir is not None else default_models_dir()
    root = Path(root.absolute())
    if (root / "models" / "Stable-diffusion").is_dir():  # an A1111 root given as the models folder
        return root
    return root.parent


def default_styles_file(models_dir: Path | None) -> Path:
    """``styles.csv`` beside the models folder (in an A1111 install: the install's own)."""
    return models_home(models_dir) / STYLES_FILE_NAME


def default_outdir(models_dir: Path | None) -> Path:
    """``outputs/`` beside the models folder (in an A1111 install: the install's own)."""
    return models_home(models_dir) / OUTPUTS_FOLDER_NAME
