"""``ferret serve`` under the attacks of issue 22: no request stalls the server, no client input is a 500,
every refusal is an answer the client can read (and is counted), and idle, slow or half-open (TLS)
connections never lock ordinary clients out.

Each attack runs against a real server on 127.0.0.1 while a probe client fetches /healthz on a fresh
connection every 50 ms: the probes must keep answering within a second (PROBE_CLAIM, with a margin).
"""

from __future__ import annotations

import json
import math
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx (the 'dev' extra)")
pytest.importorskip("starlette", reason="ferret serve needs the 'serve' extra")

from ferret_runtime.serve import kserve  # noqa: E402

from .conftest import small_onnx  # noqa: E402
from .serving import HOST, metric, open_upload, png, read_until_closed, self_signed, server  # noqa: E402

# The claim: probes answer within a second while any attack below runs. On a shared, loaded 2-core
# machine the worst probe of each attack was 0.06-0.82 s over three runs (the request flood's worst, where
# the probe shares two cores with inference); the assertion allows half as much again for a loaded CI
# machine. Before the fixes the same attacks held probes 2.9 s to 60 s.
PROBE_CLAIM = 1.0
PROBE_LIMIT = 1.5 * PROBE_CLAIM
INFER = "/v2/models/m/infer"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return small_onnx(tmp_path_factory.mktemp("attack_model"), "m.onnx")


@pytest.fixture(scope="module")
def srv(model):
    with server("-m", str(model), "--device", "cpu") as s:  # every limit at its default
        yield s


@contextmanager
def probing(url: str, verify: ssl.SSLContext | bool = True) -> Iterator[list[float]]:
    """Latencies of GET /healthz, each on a new connection, every 50 ms while the block runs (inf: failed)."""
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            start = time.monotonic()
            try:
                ok = httpx.get(url + "/healthz", timeout=10, verify=verify).status_code == 200
            except httpx.TransportError:
                ok = False
            latencies.append(time.monotonic() - start if ok else math.inf)
            stop.wait(0.05)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    try:
        yield latencies
    finally:
        deadline = time.monotonic() + 10
        while len(latencies) < 3 and time.monotonic() < deadline:  # a few probes, however quick the attack
            time.sleep(0.05)
        stop.set()
        thread.join(30)


def _answered_in_time(latencies: list[float]) -> None:
    assert len(latencies) >= 3, latencies
    assert max(latencies) < PROBE_LIMIT, f"worst probe {max(latencies):.2f} s of {len(latencies)}"
    print(f"probes: {len(latencies)}, worst {max(latencies) * 1000:.0f} ms")


def _post(url: str, body: bytes, headers: dict | None = None, path: str = INFER) -> httpx.Response:
    return httpx.post(url + path, content=body, headers=headers or {}, timeout=120)


def _rss_peak_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _images_input(**fields) -> dict:
    return {"name": "images", "datatype": "BYTES", "shape": [1], "data": ["x"], **fields}


# --------------------------------------------------------------------------- 1. one request never stalls the server
def _huge_shape_body() -> bytes:
    shape = ",".join(["7"] * 1_200_000)  # 2.4 MB: its element count used to be multiplied out on the loop
    # % rather than an f-string (noqa: UP031): every brace of the JSON template would need doubling
    return ('{"inputs":[{"name":"images","datatype":"BYTES","shape":[%s],"data":["x"]}]}'  # noqa: UP031
            % shape).encode()


def test_a_shape_of_a_million_numbers_is_refused_at_once(srv):
    with probing(srv.url) as latencies:
        start = time.monotonic()
        r = _post(srv.url, _huge_shape_body())
        seconds = time.monotonic() - start
    assert r.status_code == 413 and "expected at most 1 MB (--max-json-mb" in r.json()["error"], r.text[:300]
    assert seconds < 5, seconds
    _answered_in_time(latencies)


def test_the_codec_refuses_a_huge_shape_in_linear_time():
    # past the size check (as with a larger --max-json-mb), the rank is checked before anything is counted
    start = time.monotonic()
    with pytest.raises(kserve.ProtocolError, match=r"with shape \[7, 7, 7, 7, \.\.\.\]; expected a list of at most 8 "):
        kserve.parse_infer_request(_huge_shape_body(), None, max_images=64, max_json=32 * 1024 * 1024)
    assert time.monotonic() - start < 2  # it was 16.7 s: quadratic in the body


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
def test_thirty_megabytes_of_nested_empty_arrays_neither_stall_nor_grow_the_server(srv):
    body = (b'{"inputs":[{"name":"pixels","datatype":"UINT8","shape":[1,1,1,3],"data":['
            + b"[]," * 10_000_000 + b"[]]}]}")
    before = _rss_peak_kb(srv.proc.pid)
    with probing(srv.url) as latencies:
        r = _post(srv.url, body)
    grown_mb = (_rss_peak_kb(srv.proc.pid) - before) / 1024
    assert r.status_code == 413 and "expected at most 1 MB (--max-json-mb" in r.json()["error"], r.text[:300]
    assert grown_mb < 200, f"peak RSS grew {grown_mb:.0f} MB"  # the body and its copy, not ~20x it as objects
    _answered_in_time(latencies)


def test_the_largest_json_accepted_is_parsed_off_the_event_loop(srv):
    # 1 MB of empty arrays, about the costliest JSON per byte, just under --max-json-mb: json.loads (which
    # holds the interpreter lock throughout) and the walk over 350,000 lists run in the parse thread
    filler = b"[]," * ((1024 * 1024 - 200) // 3)
    body = b'{"inputs":[{"name":"pixels","datatype":"UINT8","shape":[1,1,1,3],"data":[' + filler + b"[]]}]}"
    with probing(srv.url) as latencies, ThreadPoolExecutor(3) as pool:  # three at once: parsed one after another
        answers = list(pool.map(lambda _: _post(srv.url, body), range(3)))
    for r in answers:
        assert r.status_code == 400 and "data of 0 element(s)" in r.json()["error"], r.text[:300]
    _answered_in_time(latencies)


def test_a_multipart_body_of_near_miss_boundaries_is_parsed_off_the_event_loop(srv):
    # python-multipart spends ~0.35 us a byte on "\r\n--BOUNDARY-" repeated: 10 s of CPU for 30 MB
    boundary = "XyZ"
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="f"; filename="a.png"\r\n\r\n'.encode()
            + b"\r\n--XyZ-" * (30 * 1024 * 1024 // 8) + f"\r\n--{boundary}--\r\n".encode())
    with probing(srv.url) as latencies:
        r = _post(srv.url, body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}, path="/v1/detect")
    assert r.status_code == 400 and "a.png: not an image" in r.json()["error"], r.text[:300]
    _answered_in_time(latencies)


# --------------------------------------------------------------------------- 2. no 500 from anything a client sends
HOSTILE = {
    "header length of 5000 digits": ({"inputs": [_images_input()]}, {"Inference-Header-Content-Length": "1" * 5000},
                                     "Inference-Header-Content-Length"),
    "header length '²'": ({"inputs": [_images_input()]}, {"Inference-Header-Content-Length": "²"},
                          "Inference-Header-Content-Length"),
    "JSON nested 100k deep": (b"[" * 100_000 + b"]" * 100_000, {}, "nested too deeply"),
    "input name a list": ({"inputs": [_images_input(name=["images"])]}, {}, "Received input ['images']"),
    "input name an object": ({"inputs": [_images_input(name={"a": 1})]}, {}, "Received input {'a': 1}"),
    "output name a list": ({"inputs": [_images_input()], "outputs": [{"name": ["logits"]}]}, {},
                           "Received requested output ['logits']"),
    "lone surrogate in BYTES": (b'{"inputs":[{"name":"images","datatype":"BYTES","shape":[1],"data":["\\ud800"]}]}', {},
                                "images[0] with surrogates not allowed"),
    "shape entry of 2200 digits": ({"inputs": [_images_input(shape=[int("9" * 2200)] * 2)]}, {}, "with shape [999"),
    "binary_data_output a string": ({"inputs": [_images_input()], "parameters": {"binary_data_output": "false"}}, {},
                                    "binary_data_output 'false'"),
    "binary_data a string": ({"inputs": [_images_input()],
                              "outputs": [{"name": "logits", "parameters": {"binary_data": "false"}}]}, {},
                             "binary_data 'false' for output 'logits'"),
}


def test_hostile_fields_are_400s_naming_the_field(srv):
    before = httpx.get(srv.url + "/metrics").text
    for case, (body, headers, field) in HOSTILE.items():
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        if "²" in headers.get("Inference-Header-Content-Length", ""):  # latin-1 on the wire, as a client may send it
            headers = {"Inference-Header-Content-Length": "²".encode("latin-1")}
        r = _post(srv.url, content, headers)
        assert r.status_code == 400, (case, r.status_code, r.text[:300])
        assert field in r.json()["error"], (case, r.json())
    after = httpx.get(srv.url + "/metrics").text
    assert metric(after, 'ferret_requests_total{code="500"}') == 0
    assert metric(after, 'ferret_requests_total{code="400"}') - metric(before, 'ferret_requests_total{code="400"}') \
        == len(HOSTILE)
    assert "Traceback" not in srv.log(), srv.log()[-3000:]


# ------------------------------------------------------------------- 3. every refusal is a readable, counted answer
def _raw_exchange(port: int, head: bytes, body: bytes = b"", pause: float = 0.0) -> bytes:
    """Send ``head`` then ``body`` on a raw socket and return what the server answered (b"" on a reset)."""
    s = socket.create_connection((HOST, port), timeout=30)
    try:
        s.sendall(head)
        time.sleep(pause)
        try:
            s.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may stop reading once it has answered: what matters is what it answered
        data, _, _ = read_until_closed(s, 30)
        return data
    except ConnectionResetError:
        return b""
    finally:
        s.close()


def test_an_upload_over_the_body_limit_and_a_huge_header_get_413_and_431(srv):
    big = os.urandom(33 * 1024 * 1024)  # over the default 32 MB; Connection: close made uvicorn reset at once
    with probing(srv.url) as latencies:
        answer = _raw_exchange(srv.port, b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                               b"Content-Length: %d\r\n\r\n" % len(big), big, pause=0.2)
        header = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
        in_one = _raw_exchange(srv.port, header)
        in_pieces = _raw_exchange(srv.port, header[:20_000], header[20_000:], pause=0.2)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"expected at most 32 MB (--max-body-mb)" in answer
    for data in (in_one, in_pieces):
        assert data.startswith(b"HTTP/1.1 431"), data[:200]
        head, _, body = data.partition(b"\r\n\r\n")
        assert json.loads(body)["error"] == ("Received a request head over 16384 bytes; expected at most that "
                                             "(--max-header-kb)")
    _answered_in_time(latencies)


def test_unknown_routes_and_methods_answer_json_and_every_error_is_counted(srv, tmp_path):
    before = httpx.get(srv.url + "/metrics").text
    missing = httpx.get(srv.url + "/v2/repository/index", timeout=30)
    wrong_method = httpx.post(srv.url + "/healthz", timeout=30)
    other_model = httpx.get(srv.url + "/v2/models/other", timeout=30)
    other_ready = httpx.get(srv.url + "/v2/models/other/ready", timeout=30)
    bad_http = _raw_exchange(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    after = httpx.get(srv.url + "/metrics").text
    assert missing.status_code == 404 and missing.json()["error"].startswith("Received GET /v2/repository/index, not a "
                                                                             "route of this server")
    assert wrong_method.status_code == 405 and wrong_method.json() == {"error": "Received POST /healthz; expected "
                                                                                "GET, HEAD"}
    assert other_model.status_code == 404 and "Received model 'other'" in other_model.json()["error"]
    assert other_ready.status_code == 404 and other_ready.content == b""  # the protocol's probe: an empty body
    assert bad_http.startswith(b"HTTP/1.1 400") and b"invalid HTTP/1.1 request" in bad_http
    for code, n in (("404", 3), ("405", 1), ("400", 1)):
        key = f'ferret_requests_total{{code="{code}"}}'
        assert metric(after, key) - metric(before, key) == n, (code, metric(after, key), metric(before, key))


# --------------------------------------------------------------------------- 4. connections
def test_idle_and_stalled_connections_never_keep_ordinary_clients_out(srv):
    idle = []
    for i in range(300):  # past the 256 requests in progress that --max-connections allows
        s = socket.create_connection((HOST, srv.port), timeout=30)
        if i % 2:
            s.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # a head that never ends
        idle.append(s)
    stalled = [open_upload(srv.port, 100_000, b"\0" * 1000) for _ in range(20)]
    image = png(64)
    try:
        with probing(srv.url) as latencies, ThreadPoolExecutor(8) as pool:
            start = time.monotonic()
            codes = list(pool.map(lambda _: _post(srv.url, image, path="/v1/detect").status_code, range(38)))
            seconds = time.monotonic() - start
    finally:
        for s in idle + stalled:
            s.close()
    assert codes == [200] * 38, codes
    assert seconds < 20, seconds
    _answered_in_time(latencies)


@contextmanager
def tls_server(model: Path, tmp: Path, *args: str) -> Iterator[tuple]:
    pytest.importorskip("cryptography", reason="self-signed certificates (the 'dev' extra)")
    cert, key = self_signed(tmp)
    key.chmod(0o600)
    ctx = ssl.create_default_context(cafile=str(cert))
    with server("-m", str(model), "--device", "cpu", "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), *args,
                verify=ctx, scheme="https") as srv:
        yield srv, ctx


def test_tls_sockets_that_never_handshake_are_closed_at_the_header_deadline(model, tmp_path):
    with tls_server(model, tmp_path, "--read-timeout", "1") as (srv, ctx):
        start = time.monotonic()
        silent = [socket.create_connection((HOST, srv.port), timeout=30) for _ in range(40)]
        with probing(srv.url, verify=ctx) as latencies, ThreadPoolExecutor(40) as pool:
            outcomes = list(pool.map(lambda s: read_until_closed(s, 8), silent))
        seconds = time.monotonic() - start
        with httpx.Client(base_url=srv.url, timeout=30, verify=ctx) as c:
            served = c.post("/v1/detect", content=png(64))
            metrics = c.get("/metrics").text
        for s in silent:
            s.close()
    assert all(closed for _, _, closed in outcomes), sum(not closed for _, _, closed in outcomes)
    assert seconds < 1 + 3, seconds  # asyncio's own handshake timeout is 60 s
    assert served.status_code == 200
    assert metric(metrics, 'ferret_connections_closed_total{reason="header_timeout"}') == 40
    _answered_in_time(latencies)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_past_max_idle_connections_the_oldest_idle_one_is_closed(model, tmp_path, scheme):
    """Counted from accept: over TLS the silent sockets are still in their handshake when evicted."""
    args = ("--max-idle-connections", "20", "--read-timeout", "30")
    plain = server("-m", str(model), "--device", "cpu", *args)
    with (tls_server(model, tmp_path, *args) if scheme == "https" else _paired(plain)) as (srv, verify):
        idle = [socket.create_connection((HOST, srv.port), timeout=30) for _ in range(100)]
        time.sleep(0.5)
        with httpx.Client(base_url=srv.url, timeout=30, verify=verify) as c:
            served = c.post("/v1/detect", content=png(64))
        outcomes = [read_until_closed(s, 0.5) for s in idle]
        metrics = httpx.get(srv.url + "/metrics", timeout=30, verify=verify).text
        for s in idle:
            s.close()
    assert served.status_code == 200
    evicted = sum(closed for _, _, closed in outcomes)
    assert evicted >= 80, evicted  # the oldest ones, to keep at most 20 idle (the client's own included)
    assert outcomes[-1][2] is False  # the newest is still open: eviction takes the oldest first
    assert metric(metrics, 'ferret_connections_closed_total{reason="evicted"}') >= 80


@contextmanager
def _paired(context) -> Iterator[tuple]:
    with context as srv:
        yield srv, True
