"""``underpaint serve``: an AUTOMATIC1111-compatible HTTP API over one engine, with a FIFO job queue.

>>> from underpaint.server.app import create_app          # doctest: +SKIP
>>> from underpaint.server.config import ServerConfig      # doctest: +SKIP
>>> app = create_app(ServerConfig(model="v1-5-pruned-emaonly.safetensors"))  # doctest: +SKIP
"""
