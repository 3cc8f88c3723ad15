"""``ferret serve`` under hostile clients: bombs, slow-loris, aborted uploads, floods of parts, no token.

Real servers on 127.0.0.1 and real clients (httpx, raw sockets); small timeouts keep them fast.
"""

from __future__ import annotations

import re
import signal
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ferret_runtime import Detector
from ferret_runtime.backends.base import Backend, ModelInfo
from ferret_runtime.preprocess import Preprocess

httpx = pytest.importorskip("httpx", reason="the tests' HTTP client is httpx (the 'dev' extra)")
pytest.importorskip("starlette", reason="ferret serve needs the 'serve' extra")

from . import serving  # noqa: E402 (after the importorskips: serving needs httpx)
from .conftest import run_ferret  # noqa: E402
from .serving import (  # noqa: E402
    HOST,
    flat_png,
    free_port,
    metric,
    open_upload,
    png,
    read_until_closed,
    self_signed,
    server,
)

tiny_ckpt = serving.tiny_ckpt  # a shared fixture

RSS_CEILING = 2 * 1024**3  # the documented peak for FerretNet-S with the defaults


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


# --------------------------------------------------------------------------- memory
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
def test_bomb_burst_keeps_peak_memory_under_the_ceiling(tiny_ckpt):
    bomb = flat_png(13000, 13000)  # 169 Mpx, 507 MB as RGB, about 30 KB on the wire
    near = flat_png(6000, 6000, "L")  # 36 Mpx: just under the default 40 Mpx, so it is decoded
    with server("-w", str(tiny_ckpt)) as srv:
        pid, killed = srv.proc.pid, threading.Event()
        idle = _status_kb(pid, "VmHWM") * 1024  # model loaded and warmed up

        def watchdog() -> None:  # a regression must fail this test, not take the machine's memory with it
            while srv.proc.poll() is None and not done.is_set():
                if _status_kb(pid, "VmRSS") * 1024 > 2 * RSS_CEILING:
                    killed.set()
                    srv.proc.kill()
                    return
                time.sleep(0.02)

        done = threading.Event()
        guard = threading.Thread(target=watchdog, daemon=True)
        guard.start()

        def post(files: list) -> int | str:
            try:
                with httpx.Client(base_url=srv.url, timeout=120) as c:
                    return c.post("/v1/detect", files=files).status_code
            except httpx.TransportError as e:
                return repr(e)

        bombs = [[("f", (f"bomb{i}-{j}.png", bomb, "image/png")) for j in range(4)] for i in range(8)]
        nears = [[("f", (f"near{i}-{j}.png", near, "image/png")) for j in range(2)] for i in range(4)]
        with ThreadPoolExecutor(12) as pool:
            codes = list(pool.map(post, bombs + nears))
        done.set()
        guard.join()
        assert not killed.is_set(), f"server killed at over {2 * RSS_CEILING >> 20} MB RSS"
        peak = _status_kb(pid, "VmHWM") * 1024
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            after = c.post("/v1/detect", content=png(64))
            metrics = c.get("/metrics").text
    print(f"peak RSS {peak / 2**20:.0f} MB (idle {idle / 2**20:.0f} MB); codes {codes}")
    assert codes[:8] == [400] * 8, codes  # every bomb refused from its header
    assert all(isinstance(c, int) and (c == 200 or 400 <= c < 500 or c == 503) for c in codes), codes
    assert peak < RSS_CEILING, f"peak RSS {peak / 2**20:.0f} MB; expected under {RSS_CEILING >> 20} MB"
    assert after.status_code == 200
    assert metric(metrics, 'ferret_requests_total{code="500"}') == 0


def test_inflight_byte_budget_503_while_a_stalled_upload_holds_it(tiny_ckpt):
    body = png(300)  # ~270 KB of noise
    with server("-w", str(tiny_ckpt), "--max-inflight-mb", "0.4", "--max-body-mb", "0.3",
                "--read-timeout", "3") as srv:
        # a slow client holds ~200 KB of the 400 KB budget: a second 270 KB body does not fit beside it
        slow = open_upload(srv.port, len(body), body[:200_000])
        time.sleep(0.5)
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            refused = c.post("/v1/detect", content=body)
            during = c.get("/metrics").text
            answer, seconds, closed = read_until_closed(slow, 10)
            ok = c.post("/v1/detect", content=body)  # the stalled body was released with its 408
            metrics = c.get("/metrics").text
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "0.4 MB in all" in refused.json()["error"]
    assert metric(during, "ferret_inflight_bytes") == 200_000
    assert answer.startswith(b"HTTP/1.1 408") and closed and seconds < 4
    assert ok.status_code == 200
    assert metric(metrics, "ferret_inflight_bytes") == 0
    assert metric(metrics, 'ferret_requests_total{code="503"}') == 1
    assert metric(metrics, 'ferret_requests_total{code="408"}') == 1


def test_a_reservation_takes_only_what_the_budget_holds_and_gives_it_back_once():
    from ferret_runtime.serve.core import ByteBudget

    budget = ByteBudget(10)
    first, second = budget.reservation(), budget.reservation()
    assert first.take(6) and first.take(2) and first.held == 8
    assert not second.take(3)  # 8 + 3 > 10: refused, and nothing taken
    assert second.held == 0 and budget.used == 8
    assert second.take(2) and budget.used == 10
    first.release()
    first.release()  # a stray second release gives nothing back: it never frees other requests' bytes
    assert first.held == 0 and budget.used == 2
    second.release()
    assert budget.used == 0


# --------------------------------------------------------------------------- connections
def test_slow_loris_connections_closed_within_the_read_timeout_while_others_are_served(tiny_ckpt):
    n = 60
    with server("-w", str(tiny_ckpt), "--read-timeout", "1") as srv:
        loris = []
        for i in range(n):
            s = socket.create_connection((HOST, srv.port), timeout=10)
            if i % 3:  # most send part of a head; some send nothing at all
                s.sendall(b"POST /v1/detect HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            loris.append(s)
        start = time.monotonic()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            served = c.post("/v1/detect", content=png(64))
        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(lambda s: read_until_closed(s, 6), loris))
        elapsed = time.monotonic() - start
        for s in loris:
            s.close()
    assert served.status_code == 200
    assert all(closed for _, _, closed in outcomes), sum(not c for _, _, c in outcomes)
    assert all(data == b"" for data, _, _ in outcomes)
    assert elapsed < 1 + 3, elapsed  # read timeout + margin, for all of them


def test_stalled_body_gets_408_within_the_read_timeout(tiny_ckpt):
    with server("-w", str(tiny_ckpt), "--read-timeout", "1") as srv:
        s = open_upload(srv.port, 100_000, b"\x89PNG" + b"\0" * 996)
        answer, seconds, closed = read_until_closed(s, 10)
        s.close()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            metrics = c.get("/metrics").text
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"--read-timeout" in answer and closed and seconds < 1 + 2, seconds
    assert metric(metrics, 'ferret_requests_total{code="408"}') == 1


def test_sigterm_with_a_stalled_upload_exits_within_the_shutdown_timeout(tiny_ckpt):
    with server("-w", str(tiny_ckpt), "--read-timeout", "60", "--shutdown-timeout", "1") as srv:
        s = open_upload(srv.port, 100_000, b"\0" * 1000)
        time.sleep(0.3)
        start = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(timeout=30)
        seconds = time.monotonic() - start
        answer, _, _ = read_until_closed(s, 5)
        s.close()
        log = srv.log()
    assert code in (0, -signal.SIGTERM)
    assert seconds < 1 + 3, seconds  # the shutdown timeout, plus draining an empty batcher
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]  # cancelled: told to retry, not a 500
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log


def test_requests_past_max_connections_get_503_and_probes_still_answer(tiny_ckpt):
    with server("-w", str(tiny_ckpt), "--max-connections", "4", "--read-timeout", "5") as srv:
        idle = [socket.create_connection((HOST, srv.port), timeout=10) for _ in range(8)]  # idle ones do not count
        held = [open_upload(srv.port, 100_000, b"\0" * 1000) for _ in range(4)]  # four requests in progress
        time.sleep(0.3)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            probe = c.get("/healthz")
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            refused = c.post("/v1/detect", content=png(64))
        for s in held + idle:
            s.close()
        time.sleep(0.3)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            ok = c.post("/v1/detect", content=png(64))
            metrics = c.get("/metrics").text
    assert probe.status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert "--max-connections" in refused.json()["error"]
    assert ok.status_code == 200
    assert metric(metrics, 'ferret_requests_total{code="503"}') == 1


# --------------------------------------------------------------------------- disconnects and failures
def test_aborted_uploads_are_counted_and_log_no_traceback(tiny_ckpt):
    n = 20
    with server("-w", str(tiny_ckpt)) as srv:
        for _ in range(n):
            s = open_upload(srv.port, 100_000, b"\0" * 5000)
            time.sleep(0.02)  # the server has started reading this body
            s.close()
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            deadline = time.monotonic() + 10
            while metric(metrics := c.get("/metrics").text, "ferret_client_disconnects_total") < n \
                    and time.monotonic() < deadline:
                time.sleep(0.1)
            ok = c.post("/v1/detect", content=png(64))
        log = srv.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert metric(metrics, "ferret_client_disconnects_total") == n
    assert metric(metrics, "ferret_inflight_bytes") == 0
    assert ok.status_code == 200


class _Broken(Backend):
    """A backend whose every batch fails: a genuine server fault."""

    name = "broken"

    def __init__(self):
        self.info = ModelInfo("broken", "median", 3, Preprocess(crop=8))

    def run_impl(self, batch):
        raise RuntimeError("the accelerator fell off the bus")


def test_backend_failure_is_a_counted_json_500():
    import uvicorn

    from ferret_runtime.serve import create_app

    port = free_port()
    config = uvicorn.Config(create_app(Detector(_Broken()), warmup=False), host=HOST, port=port, log_level="critical")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=30) as c:
            failed = c.post("/v1/detect", content=png(16))
            metrics = c.get("/metrics").text
    finally:
        srv.should_exit = True
        thread.join(30)
    assert failed.status_code == 500
    assert failed.json() == {"error": "Received an unexpected server error; expected none (see the server log)"}
    assert metric(metrics, 'ferret_requests_total{code="500"}') == 1
    assert metric(metrics, 'ferret_errors_total{kind="internal"}') == 1


# --------------------------------------------------------------------------- multipart parts
def test_empty_parts_refused_before_queueing_and_parts_capped(tiny_ckpt):
    image = png(64)
    with server("-w", str(tiny_ckpt)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        empty = c.post("/v1/detect", files=[("f", ("a.png", image, "image/png")),
                                            ("f", ("hole.png", b"", "image/png"))])
        flood = c.post("/v1/detect", files=[("f", (f"e{i}.png", b"", "image/png")) for i in range(1000)]
                       + [("f", ("a.png", image, "image/png"))])
        many = c.post("/v1/detect", files=[("f", (f"i{i}.png", image, "image/png")) for i in range(65)])
        metrics = c.get("/metrics").text
        most = c.post("/v1/detect", files=[("f", (f"i{i}.png", image, "image/png")) for i in range(64)])
    assert empty.status_code == 400, empty.text
    assert empty.json()["error"] == "Received empty part(s) hole.png; expected image bytes in every part"
    assert flood.status_code == 413 and "more than 64 multipart parts" in flood.json()["error"]
    assert many.status_code == 413 and "(--max-parts)" in many.json()["error"]
    assert metric(metrics, "ferret_batch_size_count") == 0  # nothing of them reached the batcher
    assert most.status_code == 200 and len(most.json()["results"]) == 64


# --------------------------------------------------------------------------- authentication and TLS
def test_bearer_tokens_over_tls(tiny_ckpt, tmp_path):
    pytest.importorskip("cryptography", reason="self-signed certificates (the 'dev' extra)")
    cert, key = self_signed(tmp_path)
    keys = tmp_path / "keys.txt"
    keys.write_text("# ops: rotate monthly\nfirst-secret-token\n\nsecond-secret-token\n")
    ctx = ssl.create_default_context(cafile=str(cert))
    image = png(64)
    with server("-w", str(tiny_ckpt), "--api-key-file", str(keys), "--ssl-certfile", str(cert),
                "--ssl-keyfile", str(key), verify=ctx, scheme="https") as srv:
        with httpx.Client(base_url=srv.url, timeout=60, verify=ctx) as c:
            health, ready = c.get("/healthz"), c.get("/readyz")
            missing = c.post("/v1/detect", content=image)
            wrong = c.post("/v1/detect", content=image, headers={"Authorization": "Bearer first-secret-tokex"})
            basic = c.post("/v1/detect", content=image, headers={"Authorization": "Basic first-secret-token"})
            comment = c.post("/v1/detect", content=image, headers={"Authorization": "Bearer # ops: rotate monthly"})
            right = c.post("/v1/detect", content=image, headers={"Authorization": "Bearer second-secret-token"})
            closed_metrics = c.get("/metrics")
            metrics = c.get("/metrics", headers={"Authorization": "Bearer first-secret-token"})
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://{HOST}:{srv.port}/healthz", timeout=10)  # plain HTTP to the TLS port
    assert health.status_code == 200 and ready.status_code == 200
    for r in (missing, wrong, basic, comment, closed_metrics):
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "secret" not in r.text and r.json()["error"].startswith("Received no valid bearer token")
    assert right.status_code == 200 and len(right.json()["results"]) == 1
    assert metrics.status_code == 200
    assert metric(metrics.text, 'ferret_requests_total{code="401"}') == 5  # /metrics' own 401 too
    assert metric(metrics.text, 'ferret_requests_total{code="200"}') == 1


def test_metrics_public_opens_only_metrics(tiny_ckpt, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("token\n")
    with server("-w", str(tiny_ckpt), "--api-key-file", str(keys), "--metrics-public") as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.get("/metrics").status_code == 200
        assert c.post("/v1/detect", content=png(64)).status_code == 401


def test_key_file_and_tls_usage_errors(tmp_path):
    ckpt = tmp_path / "x.pth"
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "comments.txt").write_text("# tokens for the ops team\n\n  # none yet\n")
    for path, want in ((tmp_path / "empty.txt", "with no token; expected one or more"),
                       (tmp_path / "comments.txt", "with no token; expected one or more"),
                       (tmp_path / "absent.txt", "cannot read it (FileNotFoundError)"),
                       (tmp_path, "cannot read it (IsADirectoryError)")):
        proc = run_ferret("serve", "-w", str(ckpt), "--api-key-file", str(path))
        assert proc.returncode == 2 and want in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    proc = run_ferret("serve", "-w", str(ckpt), "--ssl-certfile", str(tmp_path / "c.pem"))
    assert proc.returncode == 2 and "only one of --ssl-certfile and --ssl-keyfile" in proc.stderr
    proc = run_ferret("serve", "-w", str(ckpt), "--read-timeout", "0")
    assert proc.returncode == 2 and "Received --read-timeout 0.0; expected > 0" in proc.stderr


def test_tls_start_up_errors_are_one_line_before_the_model_loads(tmp_path):
    pytest.importorskip("cryptography", reason="self-signed certificates (the 'dev' extra)")
    cert, key = self_signed(tmp_path)
    (tmp_path / "other").mkdir()
    _, other_key = self_signed(tmp_path / "other")
    (tmp_path / "locked").mkdir()
    locked_cert, locked_key = self_signed(tmp_path / "locked", passphrase=b"open sesame")
    for k in (key, other_key, locked_key):
        k.chmod(0o600)
    ckpt = tmp_path / "absent.pth"  # never opened: the TLS files are checked first
    for c, k, want in ((cert, tmp_path / "missing.pem",
                        f"Received --ssl-keyfile {tmp_path / 'missing.pem'}: no such file"),
                       (cert, other_key, "that do not match; expected the certificate's own private key"),
                       (locked_cert, locked_key, "protected by a passphrase; expected an unencrypted key")):
        proc = run_ferret("serve", "-w", str(ckpt), "--ssl-certfile", str(c), "--ssl-keyfile", str(k))
        assert proc.returncode == 2 and want in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    key.chmod(0o644)  # readable by every user: a warning, then the start-up goes on (to the absent model)
    proc = run_ferret("serve", "-w", str(ckpt), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key))
    warning, error = proc.stderr.strip().splitlines()
    assert warning == (f"[serve] warning: --ssl-keyfile {key} is readable by other users (mode 644); expected 600 "
                       f"(chmod 600 {key})")
    assert proc.returncode == 2 and "absent.pth" in error


def _option_help(out: str) -> dict[str, str]:
    """``--flag`` -> its help text on one line, from argparse's option list."""
    blocks: dict[str, str] = {}
    flag = None
    for line in out.splitlines():
        if re.match(r"^  -", line):
            flag = re.findall(r"--[a-z-]+", line)[-1]
            blocks[flag] = line.split(None, 1)[1] if " " in line.strip() else ""
        elif flag and line.startswith("    "):
            blocks[flag] += " " + line.strip()
        else:
            flag = None
    return {k: " ".join(v.split()) for k, v in blocks.items()}


def test_help_documents_every_limit_with_its_default():
    helps = _option_help(run_ferret("serve", "--help").stdout)
    for flag, default in (("--max-inflight-mb", "256.0"), ("--max-parts", "64"), ("--max-pixels", "40000000"),
                          ("--read-timeout", "10.0"), ("--max-connections", "256"), ("--keep-alive-timeout", "5.0"),
                          ("--max-idle-connections", "512"), ("--max-header-kb", "16.0"), ("--max-json-mb", "1.0"),
                          ("--shutdown-timeout", "20.0"), ("--max-body-mb", "32.0"), ("--max-queue", "256"),
                          ("--api-key-file", "no authentication"), ("--ssl-certfile", "plain HTTP"),
                          ("--metrics-public", "False")):
        assert f"(default: {default})" in helps[flag], (flag, helps[flag])
    assert "--ssl-keyfile" in helps
