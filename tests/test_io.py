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
    with pytest.raises(ValueError, match=r"r.jsonl, line 2: malformed JSON .*--force"):
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
    with pytest.raises(ValueError, match=r"bad.json, line 1: malformed JSON .*--force"):
        tio.read_json(tmp_path / "bad.json")


def test_an_append_after_a_torn_line_keeps_every_record_and_the_fragment(tmp_path):
    path = tmp_path / "results.jsonl"
    for i in range(3):
        tio.append_jsonl(path, {"a": i})
    path.write_bytes(path.read_bytes()[:-6])  # a crash mid-append: '{"a": 2}\n' loses its last 6 bytes
    tio.append_jsonl(path, {"a": 3})
    tio.append_jsonl(path, {"a": 4})
    assert tio.read_jsonl(path) == [{"a": 0}, {"a": 1}, {"a": 3}, {"a": 4}]
    [aside] = tmp_path.glob("results.torn-*.jsonl")
    assert aside.read_bytes() == b'{"a'  # the fragment is kept, never silently dropped


def test_a_last_line_missing_only_its_newline_is_completed(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}')
    tio.append_jsonl(path, {"a": 3})
    assert tio.read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 3}] and not list(tmp_path.glob("*.torn-*"))


def test_nan_is_never_appended(tmp_path):
    path = tmp_path / "r.jsonl"
    with pytest.raises(ValueError, match="not JSON compliant"):
        tio.append_jsonl(path, {"coef": float("nan")})
    assert tio.read_jsonl(path) == []


def test_written_files_get_the_usual_permissions(tmp_path):
    import os

    tio.write_json(tmp_path / "a.json", {})
    tio.append_jsonl(tmp_path / "b.jsonl", {})
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"a.json": 0o666 & ~tio._UMASK, "b.jsonl": 0o666 & ~tio._UMASK} and os.umask(tio._UMASK) == tio._UMASK


def test_unique_siblings_never_collide(tmp_path):
    path = tmp_path / "results.jsonl"
    names = {tio.unique_sibling(path, "stale") for _ in range(50)}
    assert len(names) == 50 and all(n.name.startswith("results.stale-") and n.suffix == ".jsonl" for n in names)


def test_the_json_readers_name_file_line_and_key(tmp_path):
    from tracelens.errors import TraitDataError

    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2, "b": 3}\n')
    rows = tio.read_json_lines(path, TraitDataError, hint="")
    assert rows == [(f"{path}, line 1", {"a": 1}), (f"{path}, line 3", {"a": 2, "b": 3})]
    with pytest.raises(TraitDataError, match=r"rows.jsonl, line 3: unknown keys \['b'\]; allowed keys are \['a'\]"):
        tio.json_object(rows[1][1], rows[1][0], ("a",), error=TraitDataError)
    with pytest.raises(TraitDataError, match=r"line 1: missing 'c' \(got keys \['a'\]\)"):
        tio.json_object(rows[0][1], rows[0][0], None, ("c",), error=TraitDataError)
    with pytest.raises(TraitDataError, match=r"here: expected a JSON object like \{\}; got list"):
        tio.json_object([], "here", None, example="{}", error=TraitDataError)
    path.write_text('{"a": 1}\n{"a": ')
    with pytest.raises(TraitDataError, match=r"rows.jsonl, line 2: malformed JSON \(.* at column 7\): '\{\"a\": '$"):
        tio.read_json_lines(path, TraitDataError, hint="")
    assert tio.read_json_lines(path, torn_tail=True) == [(f"{path}, line 1", {"a": 1})]
    (tmp_path / "latin.json").write_bytes(b'"caf\xe9"')
    with pytest.raises(TraitDataError, match="latin.json is not valid UTF-8"):
        tio.read_json(tmp_path / "latin.json", TraitDataError)
