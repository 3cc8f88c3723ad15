"""The TensorRT engine sidecar format (``ferret_runtime.sidecar``): what is written is what is read,
and what a reader cannot trust is refused by name. Torch-free, no TensorRT, no engine needed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from ferret_runtime import sidecar
from ferret_runtime.errors import ConfigError
from ferret_runtime.metadata import ARCHS, encode
from ferret_runtime.preprocess import Preprocess

BLOB = b"engine bytes"
META = {"arch": "ferretnet-s", "lpd_func": "median", "window_size": 3, "lpd_mode": "portable", "precision": "fp16",
        "preprocess": Preprocess(crop=32).to_dict(), "threshold": 0.5, "toolkit_version": "0.1.0"}
INPUTS = [{"name": "input", "dtype": "float32", "shape": [-1, 3, 32, 32],
           "profile": {"min": [1, 3, 32, 32], "opt": [8, 3, 32, 32], "max": [16, 3, 32, 32]}}]
OUTPUTS = [{"name": "logit", "dtype": "float32", "shape": [-1, 1]}]


def _record(**kw) -> dict:
    return {"tensorrt_version": "10.9.0.34", "gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
            "hardware_compat": False, "engine_sha256": hashlib.sha256(BLOB).hexdigest(), "lpd": "portable",
            "source_onnx_weights": ARCHS["ferretnet-s"].params, **kw}


def _pair(tmp_path: Path, record: dict | None = None, **props) -> Path:
    engine = tmp_path / "m.engine"
    engine.write_bytes(BLOB)
    p = encode({**META, **props})
    if record is not None:
        p[sidecar.ENGINE_KEY] = json.dumps(record)
    sidecar.write(engine, p, INPUTS, OUTPUTS, tensorrt_version="10.9.0.34")
    return engine


def _edit(engine: Path, change) -> None:
    path = sidecar.path(engine)
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


def test_path_is_beside_the_engine():
    assert sidecar.path("a/m.plan") == Path("a/m.plan.json") and sidecar.path(Path("m.engine")).name == "m.engine.json"


def test_write_then_read_round_trip(tmp_path):
    engine = _pair(tmp_path, _record())
    data = json.loads(sidecar.path(engine).read_text())
    assert (data["format"], data["version"]) == (sidecar.FORMAT, sidecar.VERSION) == ("ferret-tensorrt-sidecar", 1)
    side = sidecar.read(engine)
    assert side.path == sidecar.path(engine) and side.tensorrt_version == "10.9.0.34"
    assert side.props == encode(META) | {sidecar.ENGINE_KEY: json.dumps(_record())}
    assert side.meta["arch"] == "ferretnet-s" and side.meta["preprocess"] == Preprocess(crop=32)
    assert side.engine == _record()
    assert [(t.name, t.dtype, t.shape, t.max_batch) for t in side.inputs] == [("input", "float32", (-1, 3, 32, 32), 16)]
    assert [t.to_dict() for t in side.outputs] == OUTPUTS


def test_format_and_version_are_checked(tmp_path):
    engine = _pair(tmp_path, _record())
    _edit(engine, lambda d: {**d, "format": "onnx-sidecar"})
    with pytest.raises(ConfigError, match=r"m\.engine\.json: received format 'onnx-sidecar'; expected "
                                          r"'ferret-tensorrt-sidecar'"):
        sidecar.read(engine)
    _edit(engine, lambda d: {**d, "format": sidecar.FORMAT, "version": sidecar.VERSION + 1})
    with pytest.raises(ConfigError, match=r"received sidecar version 2; expected 1\.\.1 \(a newer toolkit wrote it\)"):
        sidecar.read(engine)
    _edit(engine, lambda d: {k: v for k, v in d.items() if k not in ("format", "version")})
    assert sidecar.read(engine).meta["arch"] == "ferretnet-s"  # both optional when reading


def test_a_missing_sidecar_says_what_it_is_for(tmp_path):
    engine = tmp_path / "bare.plan"
    engine.write_bytes(BLOB)
    with pytest.raises(ConfigError, match=r"bare\.plan\.json: no such file; expected it beside the engine, as 'ferret "
                                          r"export tensorrt' writes it"):
        sidecar.read(engine)
    with pytest.raises(ConfigError, match=r"bare\.plan\.json: no such file; the reader's own words"):
        sidecar.read(engine, "the reader's own words")


def test_the_build_record_is_required_where_asked(tmp_path):
    engine = _pair(tmp_path)
    assert sidecar.read(engine, require_engine=False).engine is None  # Triton needs only the I/O and metadata
    with pytest.raises(ConfigError, match=r"received no valid 'ferret\.engine' entry"):
        sidecar.read(engine)


def test_old_lpd_name_is_read_as_portable(tmp_path):
    engine = _pair(tmp_path, _record(lpd="native"))  # as toolkits before the rename wrote it
    assert sidecar.read(engine).engine["lpd"] == "portable"


def test_weights_must_match_the_named_architecture(tmp_path):
    b = ARCHS["ferretnet-b"].params
    engine = _pair(tmp_path, _record())
    _edit(engine, lambda d: {**d, sidecar.ENGINE_KEY: json.dumps(_record(source_onnx_weights=b))})
    with pytest.raises(ConfigError, match=rf"m\.engine\.json: metadata ferret\.arch says ferretnet-s \(126,289 "
                                          rf"parameters\); the graph's weights hold {b:,} values, the size of "
                                          r"ferretnet-b"):
        sidecar.read(engine)
    record = _record()
    del record["source_onnx_weights"]  # sidecars written before the count was recorded
    assert sidecar.read(_pair(tmp_path, record)).meta["arch"] == "ferretnet-s"


def test_write_refuses_what_it_could_not_read_back(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(BLOB)
    with pytest.raises(ConfigError, match=r"outputs\[0\]: received dtype 'complex64'"):
        sidecar.write(engine, encode(META), INPUTS, [{**OUTPUTS[0], "dtype": "complex64"}])
