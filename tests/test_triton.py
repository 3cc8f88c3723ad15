"""``ferret export triton``: the model repository, its config.pbtxt (parsed with Triton's own protobuf),
the TensorRT sidecar, the README and the client example, and the errors."""

from __future__ import annotations

import importlib.util
import json
import py_compile
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from ferret_export.onnx.export import export_onnx
from ferret_export.onnx.graph import GraphOptions
from ferret_export.triton.repository import CLIENT_EXAMPLE, describe_model, write_triton_repo
from ferret_runtime import Detector, sidecar
from ferret_runtime.errors import ConfigError
from ferret_runtime.metadata import decode
from ferret_runtime.preprocess import Preprocess, load_image, normalize, prepare
from ferret_runtime.samples import natural_image
from ferret_train import create_model
from ferret_train.checkpoint import save_checkpoint

from .conftest import run_ferret


def _quiet(*_):
    pass


def _model_config_pb2():
    """Triton's ModelConfig protobuf from tritonclient; skip when it cannot be imported.

    ``tritonclient.grpc``'s package import needs grpcio; without it the generated module is loaded
    from its file, which needs protobuf only.
    """
    try:
        from tritonclient.grpc import model_config_pb2

        return model_config_pb2
    except (ImportError, RuntimeError) as e:
        first = e
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("tritonclient is not installed (pip install tritonclient protobuf): config.pbtxt is parsed with "
                    "its model_config_pb2")
    path = Path(next(iter(spec.submodule_search_locations))) / "grpc" / "model_config_pb2.py"
    try:
        mod_spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        return mod
    except Exception as e:  # e.g. a protobuf runtime older than the generated code
        pytest.skip(f"tritonclient's model_config_pb2 cannot be imported ({first}; by file: {e})")


def parse_config(model_dir: Path):
    from google.protobuf import text_format

    pb2 = _model_config_pb2()
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), pb2.ModelConfig()), pb2


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Small real exports: float dynamic H/W, uint8 --preprocess, static batch, the plugin LPD, no LPD."""
    tmp = tmp_path_factory.mktemp("triton_models")
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp / "s.pth", create_model("ferretnet-s").eval())
    variants = {"float": GraphOptions(input_size=32, dynamic_hw=True),
                "uint8": GraphOptions(input_size=32, preprocess=True),
                "static": GraphOptions(input_size=32, dynamic_batch=False),
                "plugin": GraphOptions(input_size=32, lpd="plugin"),
                "external": GraphOptions(input_size=32, lpd="external")}
    out = {}
    for key, opts in variants.items():
        out[key] = tmp / f"{key}.onnx"
        export_onnx(ckpt, out[key], opts, run_verify=False, log=_quiet)
    return out


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def _images(tmp: Path) -> list[Path]:
    """Odd sizes on purpose: one smaller than a 256 crop (zero padding), one larger (odd offsets)."""
    rng = np.random.default_rng(7)
    paths = []
    for i, (h, w) in enumerate([(301, 280), (200, 183), (257, 256)]):
        img = natural_image(rng, max(h, w))[:h, :w]
        paths.append(tmp / f"img{i}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def _load_client(repo: Path):
    spec = importlib.util.spec_from_file_location(f"client_example_{abs(hash(str(repo)))}", repo / CLIENT_EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------- ONNX
@pytest.mark.parametrize("kind", ["gpu", "cpu"], ids=["kind_gpu", "kind_cpu"])  # a bare "gpu" id marks it GPU-only
def test_onnx_repository_and_config(models, tmp_path, kind):
    repo = tmp_path / "repo"
    out = write_triton_repo(models["float"], repo, name="ferret-s", max_batch=32, instances=2, preferred_batch=[16, 4],
                            max_queue_delay_us=250, kind=kind, log=_quiet)
    assert out == repo / "ferret-s"
    assert (out / "1" / "model.onnx").read_bytes() == models["float"].read_bytes()
    assert sorted(p.name for p in repo.iterdir()) == [CLIENT_EXAMPLE, "ferret-s"]  # no temp dirs left
    cfg, pb2 = parse_config(out)
    assert cfg.name == "ferret-s" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 32
    (inp,), (outp,) = cfg.input, cfg.output
    assert inp.name == "input" and inp.data_type == pb2.TYPE_FP32 and list(inp.dims) == [3, -1, -1]
    assert outp.name == "logit" and outp.data_type == pb2.TYPE_FP32 and list(outp.dims) == [1]
    assert cfg.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 16]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 250
    (group,) = cfg.instance_group
    assert group.count == 2
    assert group.kind == {"gpu": pb2.ModelInstanceGroup.KIND_GPU, "cpu": pb2.ModelInstanceGroup.KIND_CPU}[kind]
    # every ferret.* key of the model, unchanged, and decodable by the runtime
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params == {k: v for k, v in _props(models["float"]).items() if k.startswith("ferret.")}
    meta = decode(params, "config.pbtxt")
    assert meta["preprocess"] == Preprocess(crop=256, layout="NCHW", dtype="float32")
    readme = (out / "README.md").read_text()
    for fact in ["0.48145466", "0.26862954", "divide by 255", "NCHW", "centre-crop to 256 x 256", "TYPE_FP32",
                 "prob_fake > 0.5"]:
        assert fact.lower() in readme.lower(), fact


def test_fixed_size_defaults_and_max_batch_zero(models, tmp_path):
    out = write_triton_repo(models["uint8"], tmp_path / "r1", max_batch=16, log=_quiet)
    cfg, pb2 = parse_config(out)
    assert cfg.name == "ferretnet" and cfg.max_batch_size == 16
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16]  # the default, capped at --max-batch
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    assert cfg.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU and cfg.instance_group[0].count == 1
    # a static-batch model served with max_batch_size 0: the dims are the full shape, no dynamic batching
    out = write_triton_repo(models["static"], tmp_path / "r2", max_batch=0, log=_quiet)
    cfg, _ = parse_config(out)
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [1, 3, 32, 32] and list(cfg.output[0].dims) == [1, 1]
    assert cfg.WhichOneof("scheduling_choice") is None


def test_uint8_preprocess_export(models, tmp_path):
    repo = tmp_path / "repo"
    out = write_triton_repo(models["uint8"], repo, log=_quiet)
    cfg, pb2 = parse_config(out)
    assert cfg.input[0].data_type == pb2.TYPE_UINT8 and list(cfg.input[0].dims) == [32, 32, 3]
    assert cfg.max_batch_size == 64 and list(cfg.dynamic_batching.preferred_batch_size) == [8, 16, 32]
    assert json.loads(cfg.parameters["ferret.preprocess"].string_value)["dtype"] == "uint8"
    # the repository's own path is in the README's commands, and pytest's tmp folders count up (pytest-255/...):
    # the "no /255 scaling" check reads the text without it
    readme = (out / "README.md").read_text().replace(str(repo.resolve()), "REPO").replace(str(repo), "REPO")
    assert "Send the uint8 pixels as they are, layout NHWC" in readme and "255" not in readme
    client = _load_client(repo)
    assert client.PREPROCESS["dtype"] == "uint8" and client.PREPROCESS["layout"] == "NHWC"
    pre = Preprocess(crop=32, layout="NHWC", dtype="uint8")
    for path in _images(tmp_path):
        got = client.preprocess(client.load_rgb(str(path)))
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, prepare(load_image(path), pre))


def test_onnx_with_external_data_copies_its_files(models, tmp_path):
    proto = onnx.load(str(models["float"]))
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(proto, str(ext / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=1024)
    out = write_triton_repo(ext / "m.onnx", tmp_path / "repo", log=_quiet)
    assert (out / "1" / "m.onnx.data").read_bytes() == (ext / "m.onnx.data").read_bytes()
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 40)).astype(np.float32)
    served = ort.InferenceSession(str(out / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    source = ort.InferenceSession(str(models["float"]), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(served.run(None, {"input": x})[0], source.run(None, {"input": x})[0])


# -------------------------------------------------------------------------------------- TensorRT
def _engine(tmp_path: Path, models, **kw) -> Path:
    engine = tmp_path / "s.engine"
    engine.write_bytes(b"not really a TensorRT engine: only the sidecar is read")
    props = _props(models["float"])
    props["ferret.lpd_mode"] = "plugin"
    props["ferret.provenance"] = json.dumps({"checkpoint": 'modèle "x"\\n\n\t€'})  # quoting survives the pbtxt
    inputs = kw.pop("inputs", [{"name": "images", "dtype": "HALF", "shape": [-1, 3, -1, -1],
                                "profile": {"min": [1, 3, 64, 64], "opt": [8, 3, 256, 256], "max": [32, 3, 512, 512]}}])
    outputs = kw.pop("outputs", [{"name": "logit", "dtype": "float32", "shape": [-1, 1]}])
    sidecar.write(engine, props, inputs, outputs, tensorrt_version="10.9.0")
    return engine


def test_engine_with_sidecar(models, tmp_path):
    engine = _engine(tmp_path, models)
    assert sidecar.path(engine).name == "s.engine.json"
    assert describe_model(engine).inputs[0].dtype == "float16"
    repo = tmp_path / "repo"
    out = write_triton_repo(engine, repo, max_batch=32, log=_quiet)
    assert (out / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert not (out / "1" / "model.onnx").exists()
    cfg, pb2 = parse_config(out)
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 32
    assert cfg.input[0].name == "images" and cfg.input[0].data_type == pb2.TYPE_FP16
    assert list(cfg.input[0].dims) == [3, -1, -1]
    assert cfg.parameters["ferret.lpd_mode"].string_value == "plugin"
    assert json.loads(cfg.parameters["ferret.provenance"].string_value)["checkpoint"] == 'modèle "x"\\n\n\t€'
    readme = (out / "README.md").read_text()
    assert "TensorRT 10.9.0" in readme and "ferret::lpd" in readme and "cast to float16" in readme
    assert _load_client(repo).PREPROCESS["dtype"] == "float16"
    # the profile's largest batch bounds --max-batch; engines run on GPUs only
    with pytest.raises(ConfigError, match=r"received --max-batch 64; expected <= 32, the largest batch"):
        write_triton_repo(engine, tmp_path / "r2", max_batch=64, log=_quiet)
    with pytest.raises(ConfigError, match=r"received --kind cpu for a TensorRT engine; expected gpu"):
        write_triton_repo(engine, tmp_path / "r3", max_batch=8, kind="cpu", log=_quiet)
    # typed JSON values for the ferret.* keys are accepted and encoded as in metadata_props
    data = json.loads(sidecar.path(engine).read_text())
    data["ferret.preprocess"] = json.loads(data["ferret.preprocess"])
    data["ferret.window_size"] = 3
    sidecar.path(engine).write_text(json.dumps(data))
    assert describe_model(engine).meta["window_size"] == 3


def test_engine_without_sidecar_is_a_clear_error(models, tmp_path):
    engine = tmp_path / "m.plan"
    engine.write_bytes(b"\0" * 16)
    with pytest.raises(ConfigError, match=r"m\.plan\.json: no such file; a TensorRT engine's input names"):
        write_triton_repo(engine, tmp_path / "repo", log=_quiet)
    assert not (tmp_path / "repo").exists()


@pytest.mark.parametrize("mutate, message", [
    (lambda d: "{not json", r"s\.engine\.json: received invalid JSON"),
    (lambda d: {**d, "version": 2}, r"received sidecar version 2; expected 1\.\.1"),
    (lambda d: {k: v for k, v in d.items() if k != "inputs"}, r"received 'inputs' = None; expected a non-empty list"),
    (lambda d: {**d, "inputs": [{**d["inputs"][0], "dtype": "complex64"}]}, r"inputs\[0\]: received dtype 'complex64'"),
    (lambda d: {**d, "inputs": [{**d["inputs"][0], "shape": [-1, 3, "H", 8]}]}, r"inputs\[0\]: received shape"),
    (lambda d: {k: v for k, v in d.items() if k != "ferret.arch"},
     r"without FerretNet metadata \(missing ferret\.arch\)"),
])
def test_invalid_sidecars(models, tmp_path, mutate, message):
    engine = _engine(tmp_path, models)
    data = mutate(json.loads(sidecar.path(engine).read_text()))
    sidecar.path(engine).write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(ConfigError, match=message):
        write_triton_repo(engine, tmp_path / "repo", max_batch=8, log=_quiet)


def test_static_batch_engine_needs_max_batch_zero(models, tmp_path):
    engine = _engine(tmp_path, models, inputs=[{"name": "input", "dtype": "float32", "shape": [1, 3, 256, 256]}],
                     outputs=[{"name": "logit", "dtype": "float32", "shape": [1, 1]}])
    with pytest.raises(ConfigError, match=r"tensor 'input' with a static batch dimension 1"):
        write_triton_repo(engine, tmp_path / "repo", log=_quiet)
    cfg, _ = parse_config(write_triton_repo(engine, tmp_path / "repo", max_batch=0, log=_quiet))
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [1, 3, 256, 256]


def test_engine_with_a_per_image_scalar_output(models, tmp_path):
    engine = _engine(tmp_path, models, outputs=[{"name": "logit", "dtype": "FLOAT", "shape": [-1]}])
    cfg, _ = parse_config(write_triton_repo(engine, tmp_path / "repo", max_batch=8, log=_quiet))
    (out,) = cfg.output
    assert list(out.dims) == [1] and out.HasField("reshape") and list(out.reshape.shape) == []


# ----------------------------------------------------------------------------------------- errors
def test_existing_model_dir_needs_force(models, tmp_path):
    repo = tmp_path / "repo"
    out = write_triton_repo(models["float"], repo, max_batch=8, log=_quiet)
    (out / "stale.txt").write_text("from the previous export")
    with pytest.raises(ConfigError, match=r"repo/ferretnet: received a model directory that already exists; "
                                          r"expected a new one \(pass --force to replace it\)"):
        write_triton_repo(models["uint8"], repo, log=_quiet)
    assert parse_config(out)[0].max_batch_size == 8  # untouched
    write_triton_repo(models["uint8"], repo, max_batch=4, force=True, log=_quiet)
    cfg, pb2 = parse_config(out)
    assert cfg.max_batch_size == 4 and cfg.input[0].data_type == pb2.TYPE_UINT8
    assert not (out / "stale.txt").exists()  # replaced whole, not merged
    assert sorted(p.name for p in repo.iterdir()) == [CLIENT_EXAMPLE, "ferretnet"]
    # another model beside it is left alone
    write_triton_repo(models["float"], repo, name="other", log=_quiet)
    assert (out / "1" / "model.onnx").read_bytes() == models["uint8"].read_bytes()


def test_static_batch_onnx_with_max_batch_is_an_error(models, tmp_path):
    with pytest.raises(ConfigError, match=r"static\.onnx: received tensor 'input' with a static batch dimension 1 "
                                          r"\(shape \[1, 3, 32, 32\]\); expected a dynamic first dimension for "
                                          r"--max-batch 64 \(re-export with --dynamic"):
        write_triton_repo(models["static"], tmp_path / "repo", log=_quiet)
    assert not (tmp_path / "repo").exists()


def test_models_triton_cannot_serve(models, tmp_path):
    with pytest.raises(ConfigError, match=r"plugin\.onnx: received an ONNX model with the ferret::lpd plugin node"):
        write_triton_repo(models["plugin"], tmp_path / "r", log=_quiet)
    with pytest.raises(ConfigError,
                       match=r"external\.onnx: received a model without its LPD \(ferret\.lpd_mode=external\)"):
        write_triton_repo(models["external"], tmp_path / "r", log=_quiet)
    assert not (tmp_path / "r").exists()
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 8, 8])
    foreign = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x],
        [onnx.helper.make_tensor_value_info("y", 1, ["N", 3, 8, 8])]))
    onnx.save(foreign, tmp_path / "foreign.onnx")
    with pytest.raises(ConfigError, match=r"foreign\.onnx: received a model without FerretNet metadata"):
        write_triton_repo(tmp_path / "foreign.onnx", tmp_path / "r", log=_quiet)
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x01garbage")
    with pytest.raises(ConfigError, match=r"junk\.onnx: received a file that is not an ONNX model"):
        write_triton_repo(tmp_path / "junk.onnx", tmp_path / "r", log=_quiet)
    with pytest.raises(ConfigError, match=r"m\.pth: received a model with suffix '\.pth'; expected \.onnx, \.engine"):
        write_triton_repo(tmp_path / "m.pth", tmp_path / "r", log=_quiet)
    with pytest.raises(ConfigError, match=r"missing\.onnx: no such model file"):
        write_triton_repo(tmp_path / "missing.onnx", tmp_path / "r", log=_quiet)


@pytest.mark.parametrize("kw, message", [
    ({"name": "a/b"}, r"Received model name 'a/b'; expected letters"),
    ({"name": ".hidden"}, r"Received model name '\.hidden'"),
    ({"max_batch": -1}, r"Received --max-batch -1; expected >= 0"),
    ({"instances": 0}, r"Received --instances 0; expected >= 1"),
    ({"preferred_batch": [8, 128]}, r"Received preferred batch size 128; expected 1\.\.64"),
    ({"preferred_batch": [4], "max_batch": 0}, r"Received --preferred-batch 4 with --max-batch 0"),
    ({"max_queue_delay_us": -5}, r"Received --max-queue-delay-us -5; expected >= 0"),
    ({"kind": "tpu"}, r"Received --kind 'tpu'; expected one of gpu, cpu"),
])
def test_invalid_options(models, tmp_path, kw, message):
    with pytest.raises(ConfigError, match=message):
        write_triton_repo(models["float"], tmp_path / "repo", log=_quiet, **kw)


# ----------------------------------------------------------------------------------------- client
def test_client_example_compiles_and_preprocesses_as_the_runtime(models, tmp_path):
    repo = tmp_path / "repo"
    write_triton_repo(models["float"], repo, log=_quiet)
    py_compile.compile(str(repo / CLIENT_EXAMPLE), cfile=str(tmp_path / "c.pyc"), doraise=True)
    client = _load_client(repo)
    text = (repo / CLIENT_EXAMPLE).read_text()
    assert "import torch" not in text and "from torch" not in text
    assert client.MODEL_NAME == "ferretnet" and client.PREPROCESS["crop"] == 256 and client.THRESHOLD == 0.5
    pre = Preprocess()
    for path in _images(tmp_path):
        got = client.preprocess(client.load_rgb(str(path)))
        want = normalize(prepare(load_image(path), pre)[None], pre.mean, pre.std)[0]
        assert got.dtype == np.float32 and got.shape == (3, 256, 256)
        np.testing.assert_array_equal(got, want)


class _FakeTriton:
    """tritonclient.http over ONNX Runtime, checking requests against config.pbtxt as Triton would."""

    def __init__(self, model_dir: Path):
        from google.protobuf import json_format

        cfg, _ = parse_config(model_dir)
        self.cfg = cfg
        self.config_json = json_format.MessageToDict(cfg, preserving_proto_field_name=True)
        self.session = ort.InferenceSession(str(model_dir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
        self.requests: list[tuple[int, ...]] = []
        fake = self

        class InferInput:
            def __init__(self, name, shape, datatype):
                self.name, self.shape, self.datatype = name, list(shape), datatype

            def set_data_from_numpy(self, x, binary_data=True):
                assert list(x.shape) == self.shape
                self.data = x

        class InferRequestedOutput:
            def __init__(self, name, binary_data=True):
                self.name = name

        class InferenceServerClient:
            def __init__(self, url):
                self.url = url

            def get_model_config(self, model):
                assert model == fake.cfg.name
                return fake.config_json

            def infer(self, model, inputs, outputs=None):
                (inp,) = inputs
                spec = fake.cfg.input[0]
                assert inp.name == spec.name and "TYPE_" + inp.datatype == fake.config_json["input"][0]["data_type"]
                dims = list(spec.dims)
                assert 1 <= inp.shape[0] <= fake.cfg.max_batch_size
                assert all(d in (-1, s) for d, s in zip(dims, inp.shape[1:])) and len(dims) == len(inp.shape) - 1
                fake.requests.append(tuple(inp.shape))
                (y,) = fake.session.run([outputs[0].name], {inp.name: inp.data})
                return types.SimpleNamespace(as_numpy=lambda name: y)

        self.http = types.ModuleType("tritonclient.http")
        self.http.InferInput, self.http.InferRequestedOutput = InferInput, InferRequestedOutput
        self.http.InferenceServerClient = InferenceServerClient


@pytest.mark.parametrize("variant", ["float", "uint8"])
def test_client_example_end_to_end_against_a_fake_server(models, tmp_path, variant, monkeypatch, capsys):
    repo = tmp_path / "repo"
    out = write_triton_repo(models[variant], repo, max_batch=2, log=_quiet)
    fake = _FakeTriton(out)
    package = types.ModuleType("tritonclient")
    package.http = fake.http
    monkeypatch.setitem(sys.modules, "tritonclient", package)
    monkeypatch.setitem(sys.modules, "tritonclient.http", fake.http)
    images = _images(tmp_path)
    client = _load_client(repo)
    assert client.main([*map(str, images), "--batch", "8"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["path"] for r in rows] == list(map(str, images))
    assert [n for n, *_ in fake.requests] == [2, 1]  # batched up to max_batch_size
    with Detector.open(models[variant], device="cpu") as det:
        want = det.predict(images)
    for r, w in zip(rows, want):
        assert abs(r["logit"] - w.logit) <= 1e-5 and r["label"] == w.label


# -------------------------------------------------------------------------------------------- CLI
def test_cli(models, tmp_path):
    repo = tmp_path / "repo"
    ok = run_ferret("export", "triton", "--model", str(models["float"]), "--repo", str(repo), "--max-batch", "16",
                    "--preferred-batch", "4,8", "--kind", "cpu", "--instances", "3")
    assert ok.returncode == 0, ok.stderr
    assert "[triton] wrote" in ok.stdout and (repo / "ferretnet" / "config.pbtxt").is_file()
    again = run_ferret("export", "triton", "-m", str(models["float"]), "-r", str(repo))
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines() == [
        f"ferret export: error: {repo / 'ferretnet'}: received a model directory that already exists; "
        "expected a new one (pass --force to replace it)"]
    forced = run_ferret("export", "triton", "-m", str(models["float"]), "-r", str(repo), "--force",
                        "--preferred-batch", "none")
    assert forced.returncode == 0, forced.stderr
    cfg, pb2 = parse_config(repo / "ferretnet")
    assert cfg.max_batch_size == 64 and not cfg.dynamic_batching.preferred_batch_size
    assert cfg.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU
    bad = run_ferret("export", "triton", "-m", str(models["float"]), "-r", str(repo), "--preferred-batch", "8,x")
    assert bad.returncode == 2 and "Received '8,x'; expected comma-separated positive integers" in bad.stderr
    helptext = run_ferret("export", "triton", "--help").stdout
    for opt in ["--model", "--repo", "--name", "--max-batch", "--instances", "--preferred-batch",
                "--max-queue-delay-us", "--kind", "--force", "Example:\n  ferret export triton"]:
        assert opt in helptext
