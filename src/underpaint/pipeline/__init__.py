"""generate(): the one path from request to images."""
