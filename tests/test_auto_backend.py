"""--backend auto: the choice from a measured table, and its on-disk cache (hit, key change, corrupt, unwritable).

The cache tests count measurements through a stand-in ``measure`` (its table is the test's own); one test
measures for real, on a 64x64 FerretNet-S, to check the table's shape and that the Detector runs what it chose.
"""

from __future__ import annotations

import json

import pytest

from ferret_runtime.backends import auto

from .conftest import png, run_ferret, small_onnx

TABLE = [
    {"runtime": "onnxruntime", "streams": 1, "batch": 1, "img_s": 10.0},
    {"runtime": "onnxruntime", "streams": 2, "batch": 1, "img_s": 20.0},
    {"runtime": "onnxruntime", "streams": 2, "batch": 2, "img_s": 18.0},
    {"runtime": "openvino", "streams": 1, "batch": 1, "img_s": 12.0},
    {"runtime": "openvino", "streams": 2, "batch": 1, "img_s": 20.5},  # within the 5% margin of 20.0
    {"runtime": "openvino", "streams": 2, "batch": 2, "img_s": 30.0},
]


def test_pick_fastest_with_margin_and_overrides():
    assert auto.pick(TABLE, None, None) == ("openvino", 2, 2)
    assert auto.pick(TABLE, None, 1) == ("onnxruntime", 2, 1)  # 20.5 < 1.05 * 20.0: the default runtime
    assert auto.pick(TABLE, 1, None) == ("openvino", 1, 1)  # 12.0 >= 1.05 * 10.0
    assert auto.pick(TABLE, 3, None) == ("openvino", 3, 2)  # streams the table lacks: kept, runtime from all rows
    assert auto.pick(TABLE, 2, 32) == ("openvino", 2, 32)
    assert auto.pick(TABLE[:3], None, None) == ("onnxruntime", 2, 1)


@pytest.fixture
def counted(monkeypatch):
    """auto.measure replaced: returns TABLE, counts its calls."""
    calls = []

    def fake(path, open_backend, runtimes, options, seconds=0):
        calls.append(list(runtimes))
        return [r for r in TABLE if r["runtime"] in runtimes]

    monkeypatch.setattr(auto, "measure", fake)
    monkeypatch.setattr(auto, "installed_runtimes", lambda: {"onnxruntime": "1.0", "openvino": "2.0"})
    return calls


def test_cache_hit_and_key_change(counted, tmp_path, monkeypatch):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model one")
    first = auto.choose(model, None, cache=tmp_path / "c")
    assert (first.runtime, first.streams, first.batch, first.cached) == ("openvino", 2, 2, False)
    assert first.path is not None and first.path.parent == tmp_path / "c"
    assert json.loads(first.path.read_text())["table"] == TABLE
    again = auto.choose(model, None, cache=tmp_path / "c", streams=1)
    assert again.cached and (again.runtime, again.streams) == ("openvino", 1) and len(counted) == 1
    assert "cached in" in again.describe() and "\n" not in again.describe()
    model.write_bytes(b"model two")  # another file: measured again
    assert not auto.choose(model, None, cache=tmp_path / "c").cached and len(counted) == 2
    monkeypatch.setattr(auto, "installed_runtimes", lambda: {"onnxruntime": "1.1", "openvino": "2.0"})
    assert not auto.choose(model, None, cache=tmp_path / "c").cached and len(counted) == 3  # an upgrade
    monkeypatch.setattr(auto, "usable_cores", lambda: 97)
    assert not auto.choose(model, None, cache=tmp_path / "c").cached and len(counted) == 4  # another share
    assert len(list((tmp_path / "c").glob("auto-*.json"))) == 4


@pytest.mark.parametrize("content", ["{not json", '{"key": 1, "table": []}', "[]"])
def test_corrupt_cache_is_measured_again_with_a_warning(counted, tmp_path, content):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    path = auto.choose(model, None, cache=tmp_path).path
    key = json.loads(path.read_text())["key"]
    path.write_text(content if content != "[]" else json.dumps({"key": key, "table": [{"runtime": "x"}]}))
    with pytest.warns(RuntimeWarning, match="ignoring this backend auto cache file"):
        choice = auto.choose(model, None, cache=tmp_path)
    assert not choice.cached and len(counted) == 2
    assert json.loads(path.read_text())["table"] == TABLE  # rewritten whole


def test_unwritable_cache_still_chooses(counted, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    choice = auto.choose(model, None, cache=blocker / "cache")
    assert (choice.runtime, choice.path, choice.cached) == ("openvino", None, False)
    assert "not saved" in choice.describe()


def test_cache_folder_follows_ferret_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FERRET_CACHE", str(tmp_path))
    assert auto.default_cache_dir() == tmp_path / "backends"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("torch", reason="the test model is exported from PyTorch (the 'train' extra)")
    pytest.importorskip("onnxruntime", reason="the 'export' extra")
    return small_onnx(tmp_path_factory.mktemp("auto"))


def test_real_measurement_and_detector(tiny, tmp_path, monkeypatch):
    from ferret_runtime import Detector

    monkeypatch.setenv("FERRET_CACHE", str(tmp_path))
    monkeypatch.setattr(auto, "SECONDS_PER_SETTING", 0.01)
    runtimes = sorted(auto.installed_runtimes())
    with Detector.open(tiny, device="cpu", backend="auto") as det:
        choice = det.auto_choice
        assert choice is not None and det.backend.auto_choice is choice and not choice.cached
        rows = {(r["runtime"], r["streams"], r["batch"]) for r in choice.table}
        assert rows == {(rt, s, b) for rt in runtimes for s, b in auto.settings()}
        assert all(r["img_s"] > 0 for r in choice.table)
        assert (choice.runtime, choice.streams, choice.batch) == auto.pick(choice.table, None, None)
        assert det.backend.name == choice.runtime and det.backend.slots == choice.streams
        assert det.batch_size == choice.batch
        assert det.predict([png(64)])[0].error is None
    with Detector.open(tiny, device="cpu", backend="auto", batch_size=3, streams=1) as det:
        assert det.auto_choice.cached and det.batch_size == 3 and det.backend.slots == 1
    with Detector.open(tiny, device="cpu", backend="onnxruntime") as det:
        assert det.auto_choice is None and det.batch_size == 32


def test_ferret_backend_env_pins_a_runtime_where_it_reads_the_file(tiny, monkeypatch):
    from ferret_runtime import Detector

    monkeypatch.setenv("FERRET_BACKEND", "onnxruntime")
    with Detector.open(tiny, device="cpu") as det:
        assert det.backend.name == "onnxruntime" and det.auto_choice is None


def test_cli_says_what_auto_took(tiny, tmp_path):
    import os

    (tmp_path / "a.png").write_bytes(png(64))
    env = {**os.environ, "FERRET_CACHE": str(tmp_path / "cache")}
    env.pop("FERRET_BACKEND", None)
    proc = run_ferret("detect", str(tmp_path / "a.png"), "-m", str(tiny), "--device", "cpu", "--json", "-q", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "backend auto:" in line]
    assert len(lines) == 1 and "measured now" in lines[0], proc.stderr
    assert len(list((tmp_path / "cache" / "backends").glob("auto-*.json"))) == 1  # $FERRET_CACHE/backends
