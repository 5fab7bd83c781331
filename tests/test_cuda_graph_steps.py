"""The sampling loop's side of ``--optimize cuda_graphs``: each UNet/transformer call begins a new
CUDA-graph step, and what the samplers keep is never the graph's output buffer. (The graphs
themselves need CUDA; these checks run the same loop on the CPU with the switch's flag set.)"""

from __future__ import annotations

import pytest
import torch

from flux_fixtures import flux_files  # noqa: F401 - a session fixture
from underpaint.models.optimize import SpeedOptions, begin_call, owned
from underpaint.params import GenerationParams


def _with_graph_flag(engine, monkeypatch) -> list[int]:
    """Mark the loaded model as running under CUDA graphs and count the steps begun."""
    steps = [0]
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.__setitem__(0, steps[0] + 1))
    monkeypatch.setattr(engine.model, "speed", SpeedOptions(cuda_graphs=True), raising=False)
    return steps


def _count_calls(module: torch.nn.Module) -> tuple[list[int], object]:
    calls = [0]
    handle = module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


def test_each_unet_call_begins_a_step_and_the_picture_is_unchanged(sd1_engine, photo, monkeypatch):
    params = GenerationParams(prompt="a red barn", init_images=(photo,), steps=6, strength=0.6, seed=3,
                              sampler="DPM++ 2M", scheduler="Karras")
    plain = sd1_engine.generate(params).images[0]
    steps = _with_graph_flag(sd1_engine, monkeypatch)
    calls, handle = _count_calls(sd1_engine.model.unet)
    try:
        flagged = sd1_engine.generate(params).images[0]
    finally:
        handle.remove()
    assert calls[0] > 0 and steps[0] == calls[0]
    assert flagged.tobytes() == plain.tobytes()


def test_each_flux_transformer_call_begins_a_step(flux_files, photo, monkeypatch):  # noqa: F811 - the fixture
    from underpaint.pipeline.engine import Engine

    engine = Engine.load(flux_files["transformer"], device="cpu", dtype="fp32", clip_l=flux_files["clip_l"],
                         t5=flux_files["t5"], vae=flux_files["ae"])
    params = GenerationParams(prompt="a red barn", init_images=(photo.resize((64, 64)),), steps=4, strength=0.75,
                              seed=3, sampler="Euler", scheduler="Simple", cfg_scale=1.0)
    steps = _with_graph_flag(engine, monkeypatch)
    calls, handle = _count_calls(engine.model.unet)
    try:
        engine.generate(params)
    finally:
        handle.remove()
    assert calls[0] > 0 and steps[0] == calls[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_kept_output_is_a_tensor_of_its_own(dtype):
    class Model:
        speed = SpeedOptions(cuda_graphs=True)

    buffer = torch.randn(2, 4, 8, 8).to(dtype)
    kept = owned(buffer, Model())
    assert kept.dtype == torch.float32 and kept.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()
    buffer.zero_()  # the next replay overwrites the buffer
    assert kept.abs().sum() > 0


def test_without_graphs_nothing_is_marked_or_copied(monkeypatch):
    class Model:
        speed = None

    marked = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marked.append(1))
    begin_call(Model())
    out = torch.ones(3)
    assert owned(out, Model()) is out and not marked
