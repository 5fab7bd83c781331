"""Reading checkpoint headers and state dicts: safetensors by hand, torch files only with weights_only."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from underpaint.errors import ModelError, UnsafeModelFile
from underpaint.models.header import TensorInfo, load_state_dict, read_header, safetensors_body_offset


def _raw_safetensors(header: dict, body: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + body


def test_header_matches_safetensors_own_reader(sd1_file):
    header = read_header(sd1_file)
    tensors = load_file(str(sd1_file))
    assert header.format == "safetensors"
    assert set(header.tensors) == set(tensors)
    for name, t in tensors.items():
        assert header.tensors[name].shape == tuple(t.shape)
    assert header.tensors["alphas_cumprod"] == TensorInfo("F32", (1000,))
    ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert header.tensors[ids].dtype == "I64"


def test_header_reads_metadata_only(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(2, 3, dtype=torch.float16)}, str(path), metadata={"modelspec.prediction_type": "v"})
    header = read_header(path)
    assert header.tensors == {"a": TensorInfo("F16", (2, 3))}
    assert header.metadata == {"modelspec.prediction_type": "v"}
    assert safetensors_body_offset(path) == path.stat().st_size - 12


@pytest.mark.parametrize(("content", "fragment"), [
    (b"", "empty"),
    (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"", "claims 16 bytes"),
    (struct.pack("<Q", 8) + b"{not json", "not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "unrecognised"),  # JSON, but not starting with '{'
    (_raw_safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "truncated"),
    (_raw_safetensors({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, b"\0" * 16), "expected 16"),
    (_raw_safetensors({"w": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}, b"\0" * 4), "invalid shape"),
    (_raw_safetensors({"w": {"shape": [1]}}, b"\0" * 4), "lacks"),
    (b"GARBAGE!" * 100, "not a safetensors or torch checkpoint"),
])
def test_damaged_files_raise_model_error_naming_the_file(tmp_path, content, fragment):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelError) as err:
        read_header(path)
    assert str(path) in str(err.value)
    assert fragment in str(err.value)
    with pytest.raises(ModelError):
        load_state_dict(path)


def test_truncated_real_file(sd1_file, tmp_path):
    data = sd1_file.read_bytes()
    for cut in (4, 5000, len(data) - 100):
        path = tmp_path / f"cut{cut}.safetensors"
        path.write_bytes(data[:cut])
        with pytest.raises(ModelError, match="truncated|claims|unrecognised"):
            read_header(path)


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(ModelError, match="is a directory"):
        read_header(tmp_path)
    with pytest.raises(ModelError, match="no such file"):
        read_header(tmp_path / "nope.safetensors")


def test_format_is_decided_by_content_not_extension(tmp_path, sd1_file):
    renamed = tmp_path / "model.ckpt"
    renamed.write_bytes(sd1_file.read_bytes())
    assert read_header(renamed).format == "safetensors"
    as_torch = tmp_path / "model.safetensors"
    torch.save({"state_dict": {"x": torch.ones(2)}}, as_torch)
    assert read_header(as_torch).format == "torch"


@pytest.mark.parametrize("zipfile", [True, False])
def test_plain_torch_checkpoint_loads(tmp_path, zipfile):
    path = tmp_path / "m.ckpt"
    sd = {"a.weight": torch.randn(3, 4), "b": torch.arange(5)}
    torch.save({"state_dict": sd, "global_step": 7, "epoch": 1}, path, _use_new_zipfile_serialization=zipfile)
    header = read_header(path)
    assert header.format == "torch"
    assert header.tensors == {"a.weight": TensorInfo("F32", (3, 4)), "b": TensorInfo("I64", (5,))}
    loaded = load_state_dict(path)
    assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)


class _Payload:
    """Unpickling this would call open(marker, 'w'), creating the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickle_with_code_is_refused_and_never_runs(tmp_path, zipfile):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "payload": _Payload(marker)}, path,
               _use_new_zipfile_serialization=zipfile)
    assert not marker.exists()
    for reader in (read_header, load_state_dict):
        with pytest.raises(UnsafeModelFile, match="refused") as err:
            reader(path)
        assert str(path) in str(err.value)
        assert "\n" not in str(err.value)
    assert not marker.exists()


def test_torch_file_without_tensors(tmp_path):
    path = tmp_path / "empty.pt"
    torch.save({"global_step": 3}, path)
    with pytest.raises(ModelError, match="no tensors"):
        read_header(path)
