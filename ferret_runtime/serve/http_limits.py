"""What bounds ``ferret serve`` below the app: connections, header deadlines, TLS, tokens, open files.

The settings, the API keys and the TLS context are checked before the model loads (one line,
exit 2); the protocol that enforces the connection limits is ``http_protocol.py``.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger("uvicorn.error")  # uvicorn configures its handler and level
OVER_CAPACITY = "ferret_over_capacity"  # set in the request state by the protocol for requests past the cap
FD_RESERVE = 64  # file descriptors kept for the process itself (model, libraries, temporary files)


@dataclass
class ServerLimits:
    """Connection-level settings handed to uvicorn and to the protocol below."""

    max_connections: int = 256  # requests in progress (head received, not yet answered); past it 503
    keep_alive_timeout: float = 5.0
    shutdown_timeout: float = 20.0
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    max_idle_connections: int = 512  # connections with no request in progress; past it the oldest is closed
    max_header_kb: float = 16.0  # a request's line and headers; past it 431


def load_api_keys(path: str | Path) -> tuple[str, ...]:
    """Bearer tokens from a file, one per line (``#`` comments and blank lines skipped); ConfigError when
    it is unreadable or holds none."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"Received --api-key-file {path}: cannot read it ({e.__class__.__name__}); "
                          "expected a readable text file of tokens, one per line") from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise ConfigError(f"Received --api-key-file {path} with no token; expected one or more, one per line "
                          "(lines starting with # are comments)")
    if not all(k.isascii() for k in keys):
        raise ConfigError(f"Received --api-key-file {path} with a non-ASCII token; expected ASCII tokens")
    return keys


def tls_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """The server's TLS context; ConfigError (one line) for a missing, mismatched or encrypted key, so
    ``ferret serve`` refuses before it loads the model."""
    for flag, path in (("--ssl-certfile", certfile), ("--ssl-keyfile", keyfile)):
        if not Path(path).is_file():
            raise ConfigError(f"Received {flag} {path}: no such file; expected a PEM file")
    asked: list[bool] = []

    def no_passphrase() -> bytes:  # else OpenSSL would prompt on the terminal
        asked.append(True)
        return b""

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(certfile, keyfile, password=no_passphrase)
    except ssl.SSLError as e:
        if asked:
            raise ConfigError(f"Received --ssl-keyfile {keyfile} protected by a passphrase; expected an unencrypted "
                              "key (ferret serve reads no passphrase: "
                              "keep the key readable by its user only)") from None
        if e.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"Received --ssl-certfile {certfile} and --ssl-keyfile {keyfile} that do not match; "
                              "expected the certificate's own private key") from None
        raise ConfigError(f"Received --ssl-certfile {certfile} and --ssl-keyfile {keyfile} that OpenSSL cannot load "
                          f"({e.reason or e}); expected a PEM certificate (chain) and its private key") from None
    except OSError as e:
        raise ConfigError(f"Received --ssl-certfile {certfile} or --ssl-keyfile {keyfile}: cannot read it "
                          f"({e.__class__.__name__}); expected readable PEM files") from None
    return ctx


def key_file_warning(keyfile: str) -> str | None:
    """A warning when the private key is readable by other users; None when it is not."""
    mode = os.stat(keyfile).st_mode
    if mode & 0o004:
        return (f"[serve] warning: --ssl-keyfile {keyfile} is readable by other users (mode {mode & 0o777:o}); "
                f"expected 600 (chmod 600 {keyfile})")
    return None


def fit_fd_limit(connections: int) -> None:
    """Raise the soft limit on open files to fit ``connections`` sockets and the process's own files;
    ConfigError when the hard limit cannot."""
    try:
        import resource
    except ImportError:  # not a POSIX system: nothing to raise
        return
    need = connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ConfigError(f"Received --max-connections + --max-idle-connections = {connections} with {hard} open "
                          f"files allowed (ulimit -Hn); expected at most {hard - FD_RESERVE}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def listen_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for uvicorn to listen on; ConfigError when the address is taken or not ours."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"Received --host {host} --port {port}: cannot listen there ({e.strerror or e}); expected "
                          "a free port on an address of this machine") from None
    return sock

