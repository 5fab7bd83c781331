"""schemathesis against /openapi.json: whatever a client sends, within the schema or not, no 5xx comes back.

Cases are drawn from each operation's schemathesis strategy inside a plain test (the pytest
integration of schemathesis does not follow pytest 9's node API), valid ones and invalid ones.
"""

from __future__ import annotations

import time

import pytest

TIMES = {}

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from test_server_support import FakeBackend, make_models_dir  # noqa: E402
from underpaint.server.app import create_app  # noqa: E402
from underpaint.server.config import Limits, ServerConfig  # noqa: E402

# Small limits keep the fake engine's pictures small whatever sizes are generated.
LIMITS = Limits(max_body_bytes=1 << 20, max_image_pixels=256 * 256, max_steps=8, max_width=256, max_height=256,
                max_batch_size=2, max_images=4)
EXAMPLES = 8


def _check(case) -> None:
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert body["error"] and body["detail"], body


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_generated_request_gives_a_5xx(tmp_path, mode):
    config = ServerConfig(models_dir=make_models_dir(tmp_path), preload=False, limits=LIMITS, allowed_hosts=("*",),
                          queue_size=4)
    app = create_app(config, loader=FakeBackend(scripted=False))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    generation = schemathesis.GenerationMode(mode)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 40
    for operation in operations:
        if generation is schemathesis.GenerationMode.NEGATIVE and not list(operation.iter_parameters()) \
                and operation.method.upper() == "GET":
            continue  # nothing to make invalid

        @given(case=operation.as_strategy(generation_mode=generation))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def run(case):
            _check(case)

        started = time.monotonic()
        try:
            run()
        except Unsatisfiable:  # e.g. only a boolean query parameter: no invalid value to send
            assert generation is schemathesis.GenerationMode.NEGATIVE
        TIMES[(mode, operation.label)] = time.monotonic() - started
