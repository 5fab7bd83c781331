"""Checkpoint files: headers, family detection, configs from shapes, module building, the models folder."""
