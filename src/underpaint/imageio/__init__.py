"""Image loading with limits, A1111 resize modes, base64, masks, infotext."""
