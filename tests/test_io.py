"""rankscope.io: strict atomic JSON writes, and reads that never pass a damaged file off as missing."""

import json
import logging
import math

import numpy as np
import pytest

from rankscope import io as rio
from rankscope.errors import DamagedFileError, RankscopeError


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_are_written_as_null_and_the_file_is_strict_json(tmp_path):
    path = tmp_path / "out.json"
    rio.write_json_atomic(path, {"nan": math.nan, "inf": [math.inf, -math.inf, 1.5], "np": np.float32("nan"),
                                 "nested": {"deep": [{"x": float("nan")}]}})
    data = _strict(path.read_text())
    assert data == {"nan": None, "inf": [None, None, 1.5], "np": None, "nested": {"deep": [{"x": None}]}}


def test_numpy_values_become_plain_numbers_and_lists(tmp_path):
    path = tmp_path / "out.json"
    rio.write_json_atomic(path, {"i": np.int64(3), "f": np.float32(0.5), "b": np.bool_(True),
                                 "a": np.array([[1.0, np.nan], [2.0, 3.0]]), "t": (1, 2), 7: "int key"})
    assert _strict(path.read_text()) == {"i": 3, "f": 0.5, "b": True, "a": [[1.0, None], [2.0, 3.0]],
                                         "t": [1, 2], "7": "int key"}


def test_an_unserializable_value_raises_naming_its_key_and_writes_nothing(tmp_path):
    path = tmp_path / "out.json"
    with pytest.raises(TypeError, match=r"data\['runs'\]\[1\]\['path'\]: a PosixPath is not JSON serializable"):
        rio.write_json_atomic(path, {"runs": [{"path": "a"}, {"path": tmp_path}]})
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary file left either
    with pytest.raises(TypeError, match=r"data\['f'\]"):
        rio.dumps({"f": object()})


def test_a_default_hook_converts_what_it_knows_and_the_rest_still_raises(tmp_path):
    class Known:
        def as_json(self):
            return {"x": math.nan}

    def default(value):
        if isinstance(value, Known):
            return value.as_json()
        raise TypeError(f"not JSON serialisable: {type(value).__name__}")

    path = tmp_path / "out.json"
    rio.write_json_atomic(path, {"k": Known()}, default=default)
    assert _strict(path.read_text()) == {"k": {"x": None}}
    with pytest.raises(TypeError, match=r"data\['o'\]: not JSON serialisable: object"):
        rio.write_json_atomic(path, {"o": object()}, default=default)


def test_a_crash_mid_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.json"
    rio.write_json_atomic(path, {"version": 1})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    # The serializer fails (as an interrupt during the write would): the old file stays whole.
    monkeypatch.setattr(rio.json, "dumps", crash)
    with pytest.raises(KeyboardInterrupt):
        rio.write_json_atomic(path, {"version": 2})
    monkeypatch.undo()
    # ... and so does a failure after the temporary file was opened, before the rename.
    monkeypatch.setattr(rio.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        rio.write_json_atomic(path, {"version": 3})
    monkeypatch.undo()
    assert rio.read_json(path) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_temporary_names_are_unique_per_call(tmp_path, monkeypatch):
    names = []
    real_replace = rio.os.replace

    def spy(src, dst):
        names.append(src)
        real_replace(src, dst)

    monkeypatch.setattr(rio.os, "replace", spy)
    rio.write_json_atomic(tmp_path / "a.json", 1)
    rio.write_json_atomic(tmp_path / "a.json", 2)
    assert len(set(names)) == 2 and all(str(tmp_path) in str(n) for n in names)


def test_a_missing_file_gives_missing(tmp_path):
    assert rio.read_json(tmp_path / "absent.json") is None
    assert rio.read_json(tmp_path / "absent.json", missing={}) == {}


@pytest.mark.parametrize("content", [b'{"a": 1', b"\xff\xfe garbage", b"[1, 2]"])
def test_a_damaged_file_raises_one_line_naming_the_file_and_the_fix(tmp_path, content):
    path = tmp_path / "status.json"
    path.write_bytes(content)
    with pytest.raises(DamagedFileError) as info:
        rio.read_json(path, expect=dict, fix="delete it and re-run the study")
    message = str(info.value)
    assert isinstance(info.value, RankscopeError) and "\n" not in message
    assert message.startswith(f"{path} is damaged (") and message.endswith("; delete it and re-run the study")


def test_on_damage_none_returns_none_and_reports_the_damage(tmp_path, caplog):
    path = tmp_path / "outcome.json"
    path.write_text("{not json")
    notes: list[str] = []
    with caplog.at_level(logging.WARNING, logger="rankscope.io"):
        assert rio.read_json(path, on_damage="none", notes=notes, missing={}) is None  # not `missing`
    assert len(notes) == 1 and str(path) in notes[0] and "damaged" in notes[0]
    assert f"{path} is damaged" in caplog.text


def test_old_files_with_nan_tokens_still_read(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text('{"val_loss": NaN}')
    assert math.isnan(rio.read_json(path)["val_loss"])


def test_on_damage_must_be_a_known_policy(tmp_path):
    with pytest.raises(ValueError, match="on_damage"):
        rio.read_json(tmp_path / "x.json", on_damage="ignore")
