"""The browser UI: static files served at ``/`` that talk to the ``/sdapi/v1`` API only.

There is no build step: the files under ``static/`` are plain HTML, CSS and ES modules, so
the UI works offline and anything it does a script can do through the same HTTP API.
"""

from __future__ import annotations

from pathlib import Path


def static_dir() -> Path:
    """The folder to mount at ``/`` (``StaticFiles(directory=static_dir(), html=True)``)."""
    return Path(__file__).resolve().parent / "static"
