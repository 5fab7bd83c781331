"""Textual-inversion files in the layouts people share, written here the way their tools write them."""

from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import save_file

from underpaint.errors import ModelError, ModelNotFound, UnsafeModelFile
from underpaint.prompts.embeddings import Embedding, load_embedding


def test_a1111_pt(tmp_path):
    vec = torch.randn(3, 8)
    path = tmp_path / "my-style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vec)},
                "name": "ignored", "step": 1200, "sd_checkpoint": "abc", "sd_checkpoint_name": "x"}, path)
    emb = load_embedding(path)
    assert emb.name == "my-style" and emb.count == 3
    assert len(emb.vectors) == 1 and torch.equal(emb.vectors[0], vec)
    assert emb.vectors[0].dtype == torch.float32 and not emb.vectors[0].requires_grad


def test_safetensors_emb_params_half_precision(tmp_path):
    vec = torch.randn(2, 8).half()
    save_file({"emb_params": vec}, tmp_path / "neg.safetensors")
    emb = load_embedding(tmp_path / "neg.safetensors")
    assert emb.vectors[0].dtype == torch.float32 and torch.equal(emb.vectors[0], vec.float())


def test_sdxl_safetensors(tmp_path):
    clip_l, clip_g = torch.randn(4, 8), torch.randn(4, 12)
    save_file({"clip_g": clip_g, "clip_l": clip_l}, tmp_path / "xl.safetensors")
    emb = load_embedding(tmp_path / "xl.safetensors")
    assert torch.equal(emb.vectors[0], clip_l) and torch.equal(emb.vectors[1], clip_g)
    assert emb.fits((8, 12)) and not emb.fits((8,)) and not emb.fits((12, 8))


def test_diffusers_bin_single_vector(tmp_path):
    vec = torch.randn(8)
    torch.save({"<cat-toy>": vec}, tmp_path / "learned_embeds.bin")
    emb = load_embedding(tmp_path / "learned_embeds.bin")
    assert emb.name == "learned_embeds" and emb.vectors[0].shape == (1, 8)


def test_pickle_needing_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 8)}, "extra": argparse.Namespace(a=1)}, path)
    with pytest.raises(UnsafeModelFile, match="evil.pt"):
        load_embedding(path)


@pytest.mark.parametrize("content", [b"", b"not a pickle at all", b"PK\x03\x04broken zip"])
def test_damaged_pickle(tmp_path, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(ModelError, match="broken.pt"):
        load_embedding(path)


def test_damaged_safetensors(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(ModelError, match="broken.safetensors"):
        load_embedding(path)


def test_layout_errors(tmp_path):
    save_file({"a": torch.zeros(1, 8), "b": torch.zeros(1, 8)}, tmp_path / "two.safetensors")
    with pytest.raises(ModelError, match="one tensor"):
        load_embedding(tmp_path / "two.safetensors")
    torch.save({"string_to_param": {"*": torch.zeros(1, 8), "x": torch.zeros(1, 8)}}, tmp_path / "multi.pt")
    with pytest.raises(ModelError, match="exactly one"):
        load_embedding(tmp_path / "multi.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ModelError, match="dict"):
        load_embedding(tmp_path / "list.pt")
    torch.save({"x": torch.zeros(2, 2, 2)}, tmp_path / "cube.pt")
    with pytest.raises(ModelError, match="2-D"):
        load_embedding(tmp_path / "cube.pt")


def test_missing_and_unknown_suffix(tmp_path):
    with pytest.raises(ModelNotFound):
        load_embedding(tmp_path / "nope.pt")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ModelError, match="not an embedding"):
        load_embedding(tmp_path / "x.txt")


def test_embedding_record_is_frozen():
    emb = Embedding("a", (torch.zeros(1, 4),))
    with pytest.raises(AttributeError):
        emb.name = "b"
