"""The job queue under a real uvicorn: FIFO order, bounded depth, interrupt, skip, cancel, failures."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from test_server_support import FakeBackend, live_server, make_models_dir
from underpaint.server.app import create_app
from underpaint.server.config import ServerConfig
from underpaint.server.jobs import JobQueue, QueueFull

SMALL = {"width": 64, "height": 64}


def _serve(tmp_path, backend, **config):
    app = create_app(ServerConfig(models_dir=make_models_dir(tmp_path), preload=False, **config), loader=backend)
    return app, live_server(app)


def _spy_submissions(app) -> list[str]:
    """Record the order in which the server queued jobs (by id)."""
    queue = app.state.underpaint.queue
    order: list[str] = []
    real = queue.submit

    def submit(kind, work, **kw):
        job = real(kind, work, **kw)
        order.append(job.id)
        return job

    queue.submit = submit
    return order


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


# One client for every request: making an httpx client (and its TLS context) costs more than a fake job.
HTTP = httpx.Client(timeout=60.0, limits=httpx.Limits(max_connections=64))


def _post(base, path, payload):
    return HTTP.post(base + path, json=payload)


def test_jobs_run_in_arrival_order(tmp_path):
    backend = FakeBackend(gate=threading.Event())
    app, server = _serve(tmp_path, backend, queue_size=32)
    with server as base, ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(_post, base, "/sdapi/v1/txt2img", {"prompt": "job-0", "steps": 1, **SMALL})]
        _wait_for(backend.started.is_set)
        for i in range(1, 12):
            futures.append(pool.submit(_post, base, "/sdapi/v1/txt2img", {"prompt": f"job-{i}", "steps": 1, **SMALL}))
            _wait_for(lambda: len(app.state.underpaint.queue.waiting()) == i)
        queue = HTTP.get(base + "/underpaint/v1/queue").json()
        assert queue["running"]["state"] == "running"
        assert [j["position"] for j in queue["waiting"]] == list(range(1, 12))
        backend.gate.set()
        responses = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in responses)
    assert backend.calls == [f"job-{i}" for i in range(12)]
    assert [json.loads(r.json()["info"])["prompt"] for r in responses] == backend.calls


def test_twenty_simultaneous_requests_all_complete_in_fifo_order(tmp_path):
    backend = FakeBackend(step_delay=0.002)
    app, server = _serve(tmp_path, backend, queue_size=32)
    order = _spy_submissions(app)
    with server as base, ThreadPoolExecutor(20) as pool:
        payloads = [{"prompt": f"p{i}", "force_task_id": f"p{i}", "steps": 3, **SMALL} for i in range(20)]
        responses = list(pool.map(lambda p: _post(base, "/sdapi/v1/txt2img", p), payloads))
    assert [r.status_code for r in responses] == [200] * 20
    assert backend.calls == order  # executed exactly in the order they were queued
    for payload, r in zip(payloads, responses):
        assert r.headers["X-Underpaint-Job"] == payload["force_task_id"]
        assert json.loads(r.json()["info"])["prompt"] == payload["prompt"]


def test_full_queue_answers_503_with_retry_after(tmp_path):
    backend = FakeBackend(gate=threading.Event())
    app, server = _serve(tmp_path, backend, queue_size=4)
    order = _spy_submissions(app)
    with server as base, ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(_post, base, "/sdapi/v1/txt2img", {"prompt": f"p{i}", "force_task_id": f"p{i}",
                                                                  "steps": 1, **SMALL}) for i in range(20)]
        _wait_for(lambda: sum(f.done() for f in futures) >= 15)
        backend.gate.set()
        responses = [f.result() for f in futures]
    accepted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 503]
    assert len(accepted) + len(refused) == 20
    assert 4 <= len(accepted) <= 5 and len(refused) >= 15
    for r in refused:
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"] == "queue_full"
    assert backend.calls == order  # the accepted ones, first in first out


def test_a_full_queue_refuses_before_reading_the_pictures(tmp_path, monkeypatch):
    """A request's pictures are decoded only when the queue has room for it: a full queue answers
    503 without holding them (here, without even finding that one is not a picture)."""
    from underpaint.server.a1111 import convert

    decoded = []
    real = convert.decode_image
    monkeypatch.setattr(convert, "decode_image", lambda *a, **k: decoded.append(1) or real(*a, **k))
    backend = FakeBackend(gate=threading.Event())
    app, server = _serve(tmp_path, backend, queue_size=1)
    with server as base, ThreadPoolExecutor(2) as pool:
        running = pool.submit(_post, base, "/sdapi/v1/txt2img", {"steps": 1, **SMALL})
        _wait_for(backend.started.is_set)
        waiting = pool.submit(_post, base, "/sdapi/v1/txt2img", {"steps": 1, **SMALL})
        _wait_for(lambda: len(app.state.underpaint.queue.waiting()) == 1)
        r = _post(base, "/sdapi/v1/img2img", {"init_images": ["bm90IGEgcGljdHVyZQ=="], "steps": 1, **SMALL})
        backend.gate.set()
        assert running.result().status_code == 200 and waiting.result().status_code == 200
    assert r.status_code == 503 and r.json()["error"] == "queue_full" and decoded == []


def test_interrupt_stops_within_a_step_and_returns_what_is_done(tmp_path):
    backend = FakeBackend(step_delay=0.02)
    app, server = _serve(tmp_path, backend)
    with server as base, ThreadPoolExecutor(2) as pool:
        future = pool.submit(_post, base, "/sdapi/v1/txt2img", {"steps": 25, "n_iter": 4, "seed": 10, **SMALL})
        _wait_for(lambda: HTTP.get(base + "/sdapi/v1/progress").json()["state"]["job_no"] >= 1)
        asked = time.monotonic()
        assert HTTP.post(base + "/sdapi/v1/interrupt").json() == {}
        r = future.result()
        waited = time.monotonic() - asked
    assert r.status_code == 200
    info = json.loads(r.json()["info"])
    assert len(r.json()["images"]) == 2 and info["all_seeds"] == [10, 11]  # batch 0 done, batch 1 cut short
    assert waited < 2.0  # a step is 20 ms; the rest is encoding the answer
    # The next job is not affected by the interrupt.
    with live_server(app) as base:
        r = _post(base, "/sdapi/v1/txt2img", {"steps": 2, "n_iter": 2, **SMALL})
    assert len(r.json()["images"]) == 2


def test_skip_ends_only_the_current_batch(tmp_path):
    """A1111's Skip ends the current batch at its current estimate, which is returned, and goes on."""
    backend = FakeBackend(step_delay=0.02)
    app, server = _serve(tmp_path, backend)
    with server as base, ThreadPoolExecutor(2) as pool:
        future = pool.submit(_post, base, "/sdapi/v1/txt2img", {"steps": 10, "n_iter": 2, "seed": 100, **SMALL})
        _wait_for(lambda: HTTP.get(base + "/sdapi/v1/progress").json()["state"]["sampling_step"] >= 2)
        HTTP.post(base + "/sdapi/v1/skip")
        r = future.result()
    assert json.loads(r.json()["info"])["all_seeds"] == [100, 101]
    assert len(r.json()["images"]) == 2


def test_a_failing_job_is_reported_and_the_next_one_works(tmp_path):
    backend = FakeBackend(gate=threading.Event())
    app, server = _serve(tmp_path, backend)
    with server as base, ThreadPoolExecutor(4) as pool:
        blocker = pool.submit(_post, base, "/sdapi/v1/txt2img", {"prompt": "first", "steps": 1, **SMALL})
        _wait_for(backend.started.is_set)
        failing = pool.submit(_post, base, "/sdapi/v1/txt2img", {"prompt": "raise", "steps": 1, **SMALL})
        _wait_for(lambda: len(app.state.underpaint.queue.waiting()) == 1)
        oom = pool.submit(_post, base, "/sdapi/v1/txt2img", {"prompt": "oom", "steps": 1, **SMALL})
        _wait_for(lambda: len(app.state.underpaint.queue.waiting()) == 2)
        after = pool.submit(_post, base, "/sdapi/v1/txt2img", {"prompt": "after", "steps": 1, **SMALL})
        _wait_for(lambda: len(app.state.underpaint.queue.waiting()) == 3)
        backend.gate.set()
        assert blocker.result().status_code == 200
        r = failing.result()
        assert r.status_code == 500
        assert r.json()["error"] == "generation_failed" and "told to fail" in r.json()["detail"]
        assert r.headers["X-Underpaint-Job"]
        r = oom.result()
        assert r.status_code == 507 and r.json()["error"] == "out_of_memory"
        assert after.result().status_code == 200
        assert HTTP.get(base + "/sdapi/v1/progress").json()["progress"] == 0
    assert backend.calls == ["first", "raise", "oom", "after"]


def test_choosing_a_vae_waits_for_the_running_job(tmp_path):
    """sd_vae only records the choice: the running job keeps its engine, the next one loads the VAE."""
    backend = FakeBackend(gate=threading.Event())
    models = make_models_dir(tmp_path, vaes=("kl-f8-anime2.safetensors",))
    app = create_app(ServerConfig(models_dir=models, preload=False), loader=backend)
    with live_server(app) as base, ThreadPoolExecutor(2) as pool:
        running = pool.submit(_post, base, "/sdapi/v1/txt2img", {"prompt": "first", "steps": 1, **SMALL})
        _wait_for(backend.started.is_set)
        assert _post(base, "/sdapi/v1/options", {"sd_vae": "kl-f8-anime2.safetensors"}).status_code == 200
        queued = pool.submit(_post, base, "/sdapi/v1/txt2img", {"prompt": "second", "steps": 1, **SMALL})
        _wait_for(lambda: len(app.state.underpaint.queue.waiting()) == 1)
        assert backend.vaes == [None]  # nothing is loaded under the running job
        backend.gate.set()
        first, second = running.result().json(), queued.result().json()
    assert json.loads(first["info"])["sd_vae_name"] is None
    assert json.loads(second["info"])["sd_vae_name"] == "kl-f8-anime2.safetensors"
    assert backend.vaes == [None, models / "vae" / "kl-f8-anime2.safetensors"]


def test_progress_reports_the_running_job_and_a_preview(tmp_path):
    backend = FakeBackend(step_delay=0.02)
    app, server = _serve(tmp_path, backend)
    with server as base, ThreadPoolExecutor(2) as pool:
        future = pool.submit(_post, base, "/sdapi/v1/txt2img", {"steps": 30, "n_iter": 2, **SMALL})
        _wait_for(lambda: HTTP.get(base + "/sdapi/v1/progress").json()["state"]["sampling_step"] >= 3)
        seen = []
        for _ in range(40):
            p = HTTP.get(base + "/sdapi/v1/progress").json()
            seen.append(p)
            if p["current_image"]:
                break
            time.sleep(0.02)
        skipped = HTTP.get(base + "/sdapi/v1/progress", params={"skip_current_image": True}).json()
        future.result()
        idle = HTTP.get(base + "/sdapi/v1/progress").json()
    p = seen[-1]
    assert p["current_image"], "a preview arrives within a few steps of being asked for"
    assert 0 < p["progress"] < 1 and p["eta_relative"] >= 0
    assert p["state"]["job"] == "scripts_txt2img" and p["state"]["job_count"] == 2
    assert p["state"]["sampling_steps"] == 30 and len(p["state"]["job_timestamp"]) == 14
    assert skipped["current_image"] is None
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_cancel_a_waiting_job_by_id(tmp_path):
    backend = FakeBackend(gate=threading.Event())
    app, server = _serve(tmp_path, backend)
    with server as base, ThreadPoolExecutor(2) as pool:
        first = pool.submit(_post, base, "/sdapi/v1/txt2img", {"prompt": "a", "steps": 1, **SMALL})
        _wait_for(backend.started.is_set)
        second = pool.submit(_post, base, "/sdapi/v1/txt2img", {"prompt": "b", "force_task_id": "job-b",
                                                               "steps": 1, **SMALL})
        _wait_for(lambda: len(app.state.underpaint.queue.waiting()) == 1)
        assert HTTP.get(base + "/underpaint/v1/jobs/job-b").json()["position"] == 1
        assert HTTP.post(base + "/underpaint/v1/jobs/job-b/cancel").json() == {"cancelled": True}
        r = second.result()
        backend.gate.set()
        assert first.result().status_code == 200
        job = HTTP.get(base + "/underpaint/v1/jobs/job-b").json()
        missing = HTTP.get(base + "/underpaint/v1/jobs/nope")
    assert r.status_code == 200 and r.json()["images"] == []
    assert job["state"] == "cancelled"
    assert backend.calls == ["a"]
    assert missing.status_code == 404 and missing.json()["field"] == "job_id"


def test_duplicate_task_id_is_a_conflict(tmp_path):
    backend = FakeBackend(gate=threading.Event())
    app, server = _serve(tmp_path, backend)
    with server as base, ThreadPoolExecutor(2) as pool:
        first = pool.submit(_post, base, "/sdapi/v1/txt2img", {"force_task_id": "same", "steps": 1, **SMALL})
        _wait_for(backend.started.is_set)
        r = _post(base, "/sdapi/v1/txt2img", {"force_task_id": "same", "steps": 1, **SMALL})
        bad = _post(base, "/sdapi/v1/txt2img", {"force_task_id": "../../etc", "steps": 1, **SMALL})
        backend.gate.set()
        first.result()
        ui = _post(base, "/sdapi/v1/txt2img", {"force_task_id": "task(9xk2p0a8q3)", "steps": 1, **SMALL})
        assert ui.status_code == 200 and ui.headers["X-Underpaint-Job"] == "task(9xk2p0a8q3)"  # A1111's UI's ids
    assert r.status_code == 409 and r.json()["field"] == "force_task_id"
    assert bad.status_code == 422 and bad.json()["field"] == "force_task_id"


def test_queue_unit_fifo_and_bound():
    queue = JobQueue(max_waiting=2)
    gate = threading.Event()
    ran: list[int] = []
    jobs = [queue.submit("t", lambda job: gate.wait(10) and ran.append(0))]
    _wait_for(lambda: queue.current is not None)
    jobs += [queue.submit("t", lambda job, i=i: ran.append(i)) for i in (1, 2)]
    with pytest.raises(QueueFull) as full:
        queue.submit("t", lambda job: None)
    assert full.value.http_status == 503 and "Retry-After" in full.value.headers
    gate.set()
    for job in jobs:
        job.future.result(10)
    assert ran == [0, 1, 2]
    queue.stop()


def _pictures(n: int, size: int = 64) -> list[str]:
    from PIL import Image

    from test_server_support import png_b64

    return [png_b64(Image.new("RGB", (size, size), (10 * i, 20, 30))) for i in range(n)]


def test_the_picture_budget_answers_503_and_frees_when_a_request_is_answered(tmp_path):
    """Requests hold their decoded pictures while they wait and run: past the server's picture
    budget the next one is answered 503 at once; answered (or failed) requests give theirs back."""
    from underpaint.server.config import Limits

    backend = FakeBackend(gate=threading.Event())
    app, server = _serve(tmp_path, backend, queue_size=8, limits=Limits(max_held_pixels=3 * 64 * 64))
    ledger = app.state.underpaint.pictures
    two = {"init_images": _pictures(2), "steps": 1, **SMALL}
    with server as base, ThreadPoolExecutor(4) as pool:
        running = pool.submit(_post, base, "/sdapi/v1/img2img", {**two, "prompt": "first"})
        _wait_for(backend.started.is_set)
        assert ledger.held == 2 * 64 * 64
        r = _post(base, "/sdapi/v1/img2img", two)  # 4 of 3 pictures' worth: refused now, not queued
        assert r.status_code == 503 and r.json()["error"] == "server_busy" and int(r.headers["Retry-After"]) >= 1
        waiting = pool.submit(_post, base, "/sdapi/v1/txt2img", {"prompt": "no pictures", "steps": 1, **SMALL})
        one = pool.submit(_post, base, "/sdapi/v1/img2img", {**two, "init_images": _pictures(1), "prompt": "one"})
        _wait_for(lambda: len(app.state.underpaint.queue.waiting()) == 2)
        assert ledger.held == 3 * 64 * 64
        failing = _post(base, "/sdapi/v1/img2img", {**two, "init_images": _pictures(1), "prompt": "raise"})
        assert failing.status_code == 503  # the budget is full
        backend.gate.set()
        assert [f.result().status_code for f in (running, waiting, one)] == [200, 200, 200]
        assert ledger.held == 0
        assert _post(base, "/sdapi/v1/img2img", two).status_code == 200
        assert _post(base, "/sdapi/v1/img2img", {**two, "prompt": "raise"}).status_code >= 500  # failed: given back
        assert ledger.held == 0
        # More than the whole budget could never run: a 422 naming the pictures, not a 503.
        r = _post(base, "/sdapi/v1/img2img", {**two, "init_images": _pictures(4)})
        assert r.status_code == 422 and r.json()["field"] == "init_images"
    assert backend.calls == ["first", "no pictures", "one", "", "raise"]


def test_picture_pixels_counts_every_decoded_picture_once():
    from PIL import Image

    from underpaint.params import GenerationParams
    from underpaint.pipeline.control import ControlUnit
    from underpaint.server.images import picture_pixels

    photo, mask, hint = Image.new("RGB", (64, 48)), Image.new("L", (64, 48)), Image.new("RGB", (32, 32))
    params = GenerationParams(prompt="x", init_images=(photo, photo), mask=mask,
                              control_units=(ControlUnit(image=hint, model="m"),))
    assert picture_pixels(params) == 64 * 48 * 2 + 32 * 32  # the same picture twice counts once
    assert picture_pixels(GenerationParams(prompt="x")) == 0
