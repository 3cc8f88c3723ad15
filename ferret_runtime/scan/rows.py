"""The rows ``ferret scan`` writes: their Parquet schema, and file names that are not UTF-8.

Beneath the scorer (``scorer``, which makes rows), the part store (``store``, which commits and merges
them) and the source reader (``source``, which reads a manifest's ``path_bytes``).

Schema (one row per input, in the source's order):

======================  ======================  ================================================
column                  type                    value
======================  ======================  ================================================
``path``                string                  the input as text: undecodable bytes of a file
                                                name as backslash escapes (``\\xff.png``), as
                                                ``ferret detect`` prints it
``logit``               float64                 null on an error row
``prob_fake``           float64                 null on an error row
``label``               string                  ``real`` / ``fake``; null on an error row
``error``               string                  null, or why this input has no verdict
``model_sha256``        string                  the model file's SHA-256
``scanned_at``          timestamp[us, UTC]      when its part was scored
``path_bytes``          binary                  the input's exact bytes (``os.fsencode``): the
                                                key every row is matched by, and the way back to
                                                a file whose name is not UTF-8
======================  ======================  ================================================

Why two path columns: Arrow strings must be UTF-8, and a POSIX file name is any bytes. Python
carries such a name as a string with surrogate escapes, which Arrow rejects (that stopped every
scan meeting one). ``path`` is for reading, ``path_bytes`` is faithful; two different names never
share ``path_bytes`` (a literal ``\\xff`` in a name and the byte 0xff print alike in ``path``).
Outputs written before ``path_bytes`` existed (seven columns) are read with it filled from
``path``: they could only hold UTF-8 names, so that is exact.
"""

from __future__ import annotations

import os
from typing import Any

COLUMNS = ("path", "logit", "prob_fake", "label", "error", "model_sha256", "scanned_at", "path_bytes")


def schema() -> Any:
    import pyarrow as pa

    return pa.schema([("path", pa.string()), ("logit", pa.float64()), ("prob_fake", pa.float64()),
                      ("label", pa.string()), ("error", pa.string()), ("model_sha256", pa.string()),
                      ("scanned_at", pa.timestamp("us", tz="UTC")), ("path_bytes", pa.binary())])


def raw(path: str) -> bytes:
    """A path's bytes: what the OS gave (surrogate escapes undone), else UTF-8 with any other
    lone surrogate kept as is (no such name can exist on disk; it is still a distinct key)."""
    try:
        return os.fsencode(path)
    except UnicodeEncodeError:
        return path.encode("utf-8", "surrogatepass")


def from_raw(data: bytes) -> str:
    """The string Python's file functions take for these bytes (``os.fsdecode``)."""
    return os.fsdecode(data)


def printable(text: str) -> str:
    """``text`` with the bytes no UTF-8 decoder accepts shown as backslash escapes: always valid UTF-8."""
    try:
        data = text.encode("utf-8", "surrogateescape")  # a file name's original bytes again
    except UnicodeEncodeError:  # a lone surrogate the OS did not make
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return data.decode("utf-8", "backslashreplace")


def conform(table: Any, source: str) -> Any:
    """``table`` (read from ``source``) in :func:`schema`, adding ``path_bytes`` to an output
    written before it existed; a table that cannot be made so raises ``ValueError`` naming it."""
    import pyarrow as pa

    names = table.column_names
    missing = [c for c in COLUMNS if c not in names]
    if missing == ["path_bytes"]:
        table = table.append_column("path_bytes", pa.array([None if p is None else p.encode("utf-8")
                                                              for p in table.column("path").to_pylist()],
                                                             pa.binary()))
    elif missing:
        raise ValueError(f"{source}: received columns {names}; expected ferret scan's {list(COLUMNS)}")
    try:
        return table.select(list(COLUMNS)).cast(schema())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError) as e:
        raise ValueError(f"{source}: received columns of other types ({e}); expected ferret scan's schema") from None
