"""ControlNet annotators ("preprocessors"): pictures to control maps (edges, depth, pose, lines...).

:func:`run_preprocessor` runs one by name; :data:`PREPROCESSORS` lists them with their defaults.
"""

from .registry import PREPROCESSORS, Preprocessor, get_preprocessor, preprocessor_names, run_preprocessor

__all__ = ["PREPROCESSORS", "Preprocessor", "get_preprocessor", "preprocessor_names", "run_preprocessor"]
