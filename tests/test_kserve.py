"""``ferret serve`` speaks the Open Inference Protocol (KServe v2): the real ``tritonclient.http``
client and the ``client_example.py`` that ``ferret export triton`` writes, against a live server on
127.0.0.1, agree with ``ferret detect --json``; the v2 routes share /v1/detect's limits and metrics."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ferret_runtime.preprocess import load_image
from ferret_runtime.samples import natural_image
from ferret_runtime.serve import kserve

from .conftest import run_ferret, small_onnx

httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx (the 'dev' extra)")
pytest.importorskip("starlette", reason="ferret serve needs the 'serve' extra")
try:
    import tritonclient.http as httpclient
except (ImportError, RuntimeError) as e:  # RuntimeError: tritonclient without its [http] extra (gevent)
    pytest.skip(f"needs tritonclient[http] ({e})", allow_module_level=True)

from .serving import metric, server  # noqa: E402

SIZES = [(64, 64), (64, 64), (64, 64), (64, 64), (72, 80), (50, 40)]  # (H, W): crops, and zero padding


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A small real ONNX export (FerretNet-S, random weights, crop 64)."""
    return small_onnx(tmp_path_factory.mktemp("kserve_model"), "ferret-s.onnx")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    tmp, rng = tmp_path_factory.mktemp("kserve_images"), np.random.default_rng(3)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        paths.append(tmp / f"img{i}.{'jpg' if i == 4 else 'png'}")
        Image.fromarray(natural_image(rng, max(h, w))[:h, :w]).save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def detected(model, images) -> dict[str, dict]:
    proc = run_ferret("detect", *map(str, images), "-m", str(model), "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    return {row["path"]: row for row in map(json.loads, proc.stdout.splitlines())}


@pytest.fixture(scope="module")
def srv(model):
    with server("-m", str(model), "--device", "cpu", "--max-parts", "8", "--max-body-mb", "1",
                "--max-delay-ms", "5") as s:
        yield s


def _client(srv, **kw):
    return httpclient.InferenceServerClient(url=srv.url.removeprefix("http://"), **kw)


def _same(got_logit: float, got_label: str | bytes, want: dict) -> None:
    got_label = got_label.decode() if isinstance(got_label, bytes) else got_label  # binary BYTES / JSON strings
    assert abs(got_logit - want["logit"]) <= 1e-5, (got_logit, want)  # batches of other sizes than detect's
    assert got_label == want["label"]


# ------------------------------------------------------------------------------------ tritonclient
def test_health_metadata_and_config(srv, model):
    c = _client(srv)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("ferret-s")
    assert not c.is_model_ready("other")
    assert "binary_tensor_data" in c.get_server_metadata()["extensions"]
    meta = c.get_model_metadata("ferret-s")
    assert meta["name"] == "ferret-s" and meta["versions"] == ["1"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("pixels", "UINT8", [-1, -1, -1, 3]), ("images", "BYTES", [-1])]
    assert [(t["name"], t["datatype"]) for t in meta["outputs"]] == [
        ("logits", "FP32"), ("prob_fake", "FP64"), ("labels", "BYTES")]
    params = meta["parameters"]
    assert json.loads(params["ferret.preprocess"]) == {"crop": 64,
                                                        "mean": pytest.approx([0.48145466, 0.4578275, 0.40821073]),
                                                        "std": pytest.approx([0.26862954, 0.26130258, 0.27577711]),
                                                        "layout": "NHWC", "dtype": "uint8"}
    assert params["ferret.threshold"] == "0.5" and params["ferret.arch"] == "ferretnet-s"
    import hashlib

    assert params["ferret.model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    cfg = c.get_model_config("ferret-s")
    assert cfg["max_batch_size"] == 8 and cfg["input"][0]["data_type"] == "TYPE_UINT8"
    assert {k: v["string_value"] for k, v in cfg["parameters"].items()} == params
    with pytest.raises(Exception, match="Received model 'other'; expected 'ferret-s'"):
        c.get_model_metadata("other")


@pytest.mark.parametrize("binary_out", [True, False], ids=["binary_outputs", "json_outputs"])
def test_tritonclient_encoded_images_as_bytes(srv, images, detected, binary_out):
    c = _client(srv)
    data = np.array([p.read_bytes() for p in images], dtype=np.object_)
    inp = httpclient.InferInput("images", [len(images)], "BYTES")
    inp.set_data_from_numpy(data, binary_data=True)
    outputs = None if binary_out else [httpclient.InferRequestedOutput(n, binary_data=False)
                                       for n in ("logits", "prob_fake", "labels")]
    res = c.infer("ferret-s", [inp], outputs=outputs, request_id="r-7")
    assert res.get_response()["id"] == "r-7"
    for name in ("logits", "prob_fake", "labels"):
        assert ("parameters" in res.get_output(name)) == binary_out  # binary_data_size only on binary outputs
    logits, probs, labels = res.as_numpy("logits"), res.as_numpy("prob_fake"), res.as_numpy("labels")
    assert logits.dtype == np.float32 and probs.dtype == np.float64 and logits.shape == (len(images),)
    for p, logit, prob, label in zip(images, logits, probs, labels):
        want = detected[str(p)]
        _same(float(logit), label, want)
        assert abs(prob - want["prob_fake"]) <= 1e-5


def test_tritonclient_decoded_pixels_as_uint8(srv, images, detected):
    c = _client(srv)
    groups: dict[tuple, list[Path]] = {}
    for p in images:
        groups.setdefault(load_image(p).shape, []).append(p)
    for paths in groups.values():
        x = np.stack([load_image(p) for p in paths])
        inp = httpclient.InferInput("pixels", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x, binary_data=True)
        res = c.infer("ferret-s", [inp], outputs=[httpclient.InferRequestedOutput("logits"),
                                                  httpclient.InferRequestedOutput("labels", binary_data=False)])
        assert [o["name"] for o in res.get_response()["outputs"]] == ["logits", "labels"]  # only those asked for
        for p, logit, label in zip(paths, res.as_numpy("logits"), res.as_numpy("labels")):
            _same(float(logit), label, detected[str(p)])


def test_plain_json_request_of_pixels(srv, images, detected):
    x = load_image(images[0])
    body = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, *x.shape], "data": x.tolist()}]}
    r = httpx.post(srv.url + "/v2/models/ferret-s/infer", json=body, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert out["logits"]["shape"] == [1] and out["labels"]["data"] == [detected[str(images[0])]["label"]]
    _same(out["logits"]["data"][0], out["labels"]["data"][0], detected[str(images[0])])


def test_client_example_runs_unchanged_against_ferret_serve(srv, model, images, detected, tmp_path):
    """The file ``ferret export triton`` writes, as a program, pointed at ferret serve instead of Triton."""
    from ferret_export.triton.repository import CLIENT_EXAMPLE, write_triton_repo

    write_triton_repo(model, tmp_path / "repo", name="ferret-s", log=lambda *_: None)
    proc = subprocess.run([sys.executable, str(tmp_path / "repo" / CLIENT_EXAMPLE), *map(str, images),
                           "--url", srv.url.removeprefix("http://"), "--model", "ferret-s"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in rows] == list(map(str, images))
    for r in rows:
        _same(r["logit"], r["label"], detected[r["path"]])


# ------------------------------------------------------------------------------- errors and limits
def _post(srv, body: dict, path: str = "/v2/models/ferret-s/infer", **kw) -> httpx.Response:
    return httpx.post(srv.url + path, json=body, timeout=60, **kw)


def test_errors_are_v2_json_and_counted(srv, images):
    c = _client(srv)
    metrics_before = httpx.get(srv.url + "/metrics").text
    data = np.array([images[0].read_bytes(), b"not an image", images[1].read_bytes()], dtype=np.object_)
    inp = httpclient.InferInput("images", [3], "BYTES")
    inp.set_data_from_numpy(data)
    with pytest.raises(Exception, match=r"images\[1\]: not an image Pillow can identify") as e:
        c.infer("ferret-s", [inp])
    assert e.value.status() == "400"
    many = httpclient.InferInput("pixels", [9, 8, 8, 3], "UINT8")
    many.set_data_from_numpy(np.zeros((9, 8, 8, 3), np.uint8))
    with pytest.raises(Exception, match="Received 9 images in one request; expected at most 8") as e:
        c.infer("ferret-s", [many])
    assert e.value.status() == "413"
    head = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 640, 640, 3],
                                   "parameters": {"binary_data_size": 640 * 640 * 3}}]}).encode()
    big = httpx.post(srv.url + "/v2/models/ferret-s/infer", content=head + bytes(640 * 640 * 3), timeout=60,
                     headers={"Inference-Header-Content-Length": str(len(head))})  # 1.2 MB over --max-body-mb 1
    assert big.status_code == 413 and "expected at most 1 MB" in big.json()["error"]
    cases = [
        ({"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1], "data": [0]}]}, 400, "Received input 'x'"),
        ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 1, 3], "data": [0, 0, 0]}]}, 400,
         "datatype 'FP32'; expected UINT8"),
        ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [0, 0, 300]}]}, 400,
         "integers in 0..255"),
        ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["x"]}],
          "outputs": [{"name": "scores"}]}, 400, "Received requested output 'scores'"),
    ]
    for body, status, message in cases:
        r = _post(srv, body)
        assert r.status_code == status and message in r.json()["error"], (r.status_code, r.text)
    r = _post(srv, cases[0][0], path="/v2/models/other/infer")
    assert r.status_code == 404 and r.json() == {"error": "Received model 'other'; expected 'ferret-s' (version 1)"}
    r = httpx.post(srv.url + "/v2/models/ferret-s/infer", content=b"{", timeout=60)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    after = httpx.get(srv.url + "/metrics").text
    for code, n in (("400", 6), ("413", 2), ("404", 1)):
        key = f'ferret_requests_total{{code="{code}"}}'
        assert metric(after, key) - metric(metrics_before, key) == n, code


def test_routes_we_lack_are_v2_errors_tritonclient_reads(srv):
    from tritonclient.utils import InferenceServerException

    c = _client(srv)
    with pytest.raises(InferenceServerException, match="Received POST /v2/repository/index, not a route") as e:
        c.get_model_repository_index()  # the model repository extension: not ours
    assert e.value.status() == "404"
    with pytest.raises(InferenceServerException, match="Received POST /v2/repository/models/ferret-s/load") as e:
        c.load_model("ferret-s")
    assert e.value.status() == "404"


def test_tokens_and_overload_as_on_v1(model, images, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("s3cret\n")
    auth = {"Authorization": "Bearer s3cret"}
    one = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["?"]}]}
    with server("-m", str(model), "--device", "cpu", "--api-key-file", str(keys), "--max-queue", "1") as srv:
        c = _client(srv)
        assert c.is_server_ready() and c.is_model_ready("ferret-s")  # probes stay open
        assert httpx.get(srv.url + "/v2/models/ferret-s").status_code == 401
        no = _post(srv, one)
        assert (no.status_code == 401 and no.headers["www-authenticate"] == "Bearer"
                and "bearer token" in no.json()["error"])
        inp = httpclient.InferInput("images", [1], "BYTES")
        inp.set_data_from_numpy(np.array([images[0].read_bytes()], dtype=np.object_))
        ok = c.infer("ferret-s", [inp], headers=dict(auth))  # tritonclient adds to the dict it is given
        assert ok.as_numpy("labels").shape == (1,)
        r = httpx.post(srv.url + "/v2/models/ferret-s/infer", headers=auth, timeout=60, json={
            "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2, 1, 1, 3], "data": [0] * 6}]})
        # two images never fit a queue of one: 503 at once, as on /v1/detect
        assert (r.status_code == 503 and r.headers["retry-after"] == "1"
                and "Received a request of 2 image" in r.json()["error"])
        metrics = httpx.get(srv.url + "/metrics", headers=auth).text
    for code, n in (("200", 1), ("401", 2), ("503", 1)):  # the metadata's 401 is counted too
        assert metric(metrics, f'ferret_requests_total{{code="{code}"}}') == n, (code, metrics)
    assert metric(metrics, "ferret_images_total") == 1


# ------------------------------------------------------------------------------------------- codec
def test_bytes_codec_round_trip_and_truncation():
    elements = [b"", b"\x00\xff" * 3, "é".encode()]
    blob = kserve.encode_bytes(elements)
    assert blob[:4] == b"\x00\x00\x00\x00" and blob[4:8] == (6).to_bytes(4, "little")
    assert kserve.decode_bytes(blob, 3, "images") == elements
    with pytest.raises(kserve.ProtocolError, match="claims 2 bytes with 1 left"):
        kserve.decode_bytes(kserve.encode_bytes([b"ab"])[:-1], 1, "images")
    with pytest.raises(kserve.ProtocolError, match="1 bytes after its 1 elements"):
        kserve.decode_bytes(kserve.encode_bytes([b"ab"]) + b"!", 1, "images")
    head = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [3],
                                   "parameters": {"binary_data_size": len(blob)}}]}).encode()
    req = kserve.parse_infer_request(head + blob, str(len(head)), max_images=8)
    assert [name for name, _ in req.items] == ["images[0]", "images[1]", "images[2]"]
    assert [data for _, data in req.items] == elements
    with pytest.raises(kserve.ProtocolError, match="binary_data_size 99"):
        kserve.parse_infer_request(head.replace(str(len(blob)).encode(), b"99") + blob, str(len(head)), max_images=8)


def test_model_name_flag_names_the_v2_routes(model, images, detected):
    with server("-m", str(model), "--device", "cpu", "--model-name", "detector") as srv:
        assert httpx.get(srv.url + "/v2/models/detector").json()["name"] == "detector"
        assert httpx.get(srv.url + f"/v2/models/{model.stem}").status_code == 404  # the default name is replaced
        inp = httpclient.InferInput("images", [1], "BYTES")
        inp.set_data_from_numpy(np.array([images[0].read_bytes()], dtype=np.object_))
        res = _client(srv).infer("detector", [inp])
        _same(float(res.as_numpy("logits")[0]), res.as_numpy("labels")[0], detected[str(images[0])])
