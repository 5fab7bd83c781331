"""The A1111 prompt language: parser (no torch) and text encoder."""
