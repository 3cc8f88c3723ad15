"""Helpers for the ``ferret serve`` tests: a real server in a subprocess on 127.0.0.1, images, raw sockets."""

from __future__ import annotations

import io
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from .conftest import free_port, png  # noqa: F401 (re-exported: the serve tests import them from here)

HOST = "127.0.0.1"  # every test server and client stays on loopback


@dataclass
class Server:
    """A running ``ferret serve``: its URL, process and stderr (a file, so a chatty log never blocks it)."""

    url: str
    proc: subprocess.Popen
    log_path: Path

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def server(*args: str, ready_timeout: float = 180, verify: ssl.SSLContext | bool = True,
           scheme: str = "http") -> Iterator[Server]:
    """Run ``ferret serve ARGS`` on a free port of 127.0.0.1 until /readyz answers; killed on exit."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "stderr.txt"
        with open(log_path, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "ferret_runtime.cli", "serve", "--host", HOST,
                                     "--port", str(port), "--log-level", "warning", *args],
                                    stdout=subprocess.DEVNULL, stderr=err, text=True)
        srv = Server(f"{scheme}://{HOST}:{port}", proc, log_path)
        deadline = time.time() + ready_timeout
        try:
            while True:
                if proc.poll() is not None:
                    raise AssertionError(f"server exited with {proc.returncode}: {srv.log()[-3000:]}")
                try:
                    if httpx.get(srv.url + "/readyz", timeout=1, verify=verify).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.time() > deadline:
                    raise AssertionError("server not ready in time")
                time.sleep(0.1)
            yield srv
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def flat_png(width: int, height: int, mode: str = "1") -> bytes:
    """An all-zero PNG: a few KB on the wire however many pixels it decodes to (a decompression bomb)."""
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def metric(text: str, name: str) -> float:
    """One sample's value from Prometheus text (0 when absent), e.g. ``ferret_requests_total{code="500"}``."""
    m = re.search(r"^" + re.escape(name) + r" (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def open_upload(port: int, content_length: int, sent: bytes = b"", path: str = "/v1/detect",
                headers: str = "") -> socket.socket:
    """A raw socket that sent a POST's head and ``sent`` of its body, then stalls (the caller decides)."""
    s = socket.create_connection((HOST, port), timeout=30)
    s.sendall(f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/octet-stream\r\n{headers}"
              f"Content-Length: {content_length}\r\n\r\n".encode() + sent)
    return s


def read_until_closed(s: socket.socket, timeout: float) -> tuple[bytes, float, bool]:
    """What the server sends until it closes the connection or ``timeout`` passes: (data, seconds, closed)."""
    start, data = time.monotonic(), b""
    s.settimeout(timeout)
    try:
        while chunk := s.recv(65536):
            data += chunk
    except TimeoutError:
        return data, time.monotonic() - start, False
    except ConnectionResetError:
        pass
    return data, time.monotonic() - start, True


def self_signed(tmp: Path, passphrase: bytes | None = None) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (encrypted when a passphrase is given), written as PEM."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ferret test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    return cert_path, key_path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A randomly initialised FerretNet-S checkpoint (the real architecture and memory, no weights to fetch)."""
    import torch

    from ferret_train import create_model
    from ferret_train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "s.pth", create_model("ferretnet-s").eval())
