"""natgrad.atomic: a write either replaces the file completely or leaves it as it was."""

import json
import os
import stat

import pytest

from natgrad.atomic import atomic_path, write_bytes_atomic, write_json_atomic


def test_success_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.json"  # missing parent is created
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert os.listdir(path.parent) == ["out.json"]


def test_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "out.bin"
    write_bytes_atomic(path, b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    with pytest.raises(ValueError):  # NaN is not JSON: refused before anything is replaced
        write_json_atomic(path, {"x": float("nan")})
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_mode_follows_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_bytes_atomic(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # not mkstemp's 0600
