"""Atomic writes, torn-line tolerant JSONL, code-free tensor loading with clear errors."""

import pytest
import torch

import tracelens.io as tio


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "sub" / "a.json"
    tio.write_json(path, {"x": 1})

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tio, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        tio.save_tensors(tmp_path / "sub" / "t.safetensors", {"v": torch.ones(2)})
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]
    assert tio.read_json(path) == {"x": 1}


def test_jsonl_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "r.jsonl"
    tio.append_jsonl(path, {"a": 1})
    tio.append_jsonl(path, {"a": 2})
    with open(path, "a") as f:
        f.write('{"a": 3')  # a writer killed mid-line
    assert tio.read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n{bad\n{"a": 2}\n')
    with pytest.raises(ValueError, match="line 2 is corrupt"):
        tio.read_jsonl(path)


def test_tensors_round_trip_and_corrupt_files_say_so(tmp_path):
    tio.save_tensors(tmp_path / "t.safetensors", {"v": torch.arange(3.0)})
    assert torch.equal(tio.load_tensors(tmp_path / "t.safetensors")["v"], torch.arange(3.0))
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        tio.load_tensors(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError, match="no tensor file"):
        tio.load_tensors(tmp_path / "missing.safetensors")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="is corrupt .*--force"):
        tio.read_json(tmp_path / "bad.json")
