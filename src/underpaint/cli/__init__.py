"""The `underpaint` command line: arguments to GenerationParams to the engine."""
