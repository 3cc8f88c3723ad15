"""The files of a calibration: the data's provenance (which images, by content), and the copy of
the model that carries the fit (checkpoint key, ONNX ``ferret.*`` props, or the engine's sidecar).

Apart from the fitting because it is the part other commands share (``ferret eval`` checks whether
it is given the very images a model was calibrated on) and the part that must never touch an input.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ferret_runtime.errors import ConfigError
from ferret_runtime.metadata import CALIBRATION_KEY, PREFIX

from .data import Sample


def data_digest(samples: list[Sample], root: str | Path) -> str:
    """SHA-256 over the labelled images (relative path, label, content), in path order: the same
    images give the same digest wherever the folder lies."""
    root = Path(root)
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: s.path.relative_to(root).as_posix()):
        h.update(f"{s.path.relative_to(root).as_posix()}\0{s.label}\0".encode())
        with open(s.path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def data_record(samples: list[Sample], root: str | Path) -> dict[str, Any]:
    """What the provenance says about the calibration data: where, how many, which bytes."""
    return {"path": str(Path(root).resolve()), "n_real": sum(s.label == 0 for s in samples),
            "n_fake": sum(s.label == 1 for s in samples), "sha256": data_digest(samples, root)}


def same_data(record: dict[str, Any] | None, samples: list[Sample], root: str | Path) -> bool:
    """Whether ``samples`` are the images a calibration ``record`` was fitted on (counts first, so a
    different folder is not hashed)."""
    data = (record or {}).get("data")
    if not isinstance(data, dict):
        return False
    if (data.get("n_real"), data.get("n_fake")) != (sum(s.label == 0 for s in samples),
                                                    sum(s.label == 1 for s in samples)):
        return False
    return data.get("path") == str(Path(root).resolve()) or data.get("sha256") == data_digest(samples, root)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether two paths name one file or folder: by identity where both exist (a hard link or a
    symlink to the model is the model), by resolved path otherwise."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def model_writer(src: str | Path, out: str | Path) -> Callable[[Path, Path, dict[str, Any]], None]:
    """The writer for the format of ``src``, once ``out`` is checked to be a new file of that format
    (the command calls it before any work, :func:`write_calibrated` again before writing)."""
    src, out = Path(src), Path(out)
    if same_file(src, out):
        raise ConfigError(f"Received -o {out}, the input model itself; expected a new file (the input is kept)")
    if out.suffix.lower() != src.suffix.lower():
        raise ConfigError(f"Received -o {out}; expected a {src.suffix} file like the input {src.name}")
    writers: dict[str, Callable[[Path, Path, dict[str, Any]], None]] = {
        ".pt": _write_checkpoint, ".pth": _write_checkpoint, ".onnx": _write_onnx, ".engine": _write_engine}
    writer = writers.get(src.suffix.lower())
    if writer is None:
        raise ConfigError(f"Received model {src} with suffix {src.suffix!r}; expected one of {', '.join(writers)}")
    return writer


def write_calibrated(src: str | Path, out: str | Path, record: dict[str, Any]) -> Path:
    """A copy of the model file ``src`` at ``out`` whose metadata holds the calibration ``record``
    (and its threshold): checkpoint key, ONNX ``ferret.*`` props, or the engine's sidecar."""
    model_writer(src, out)(Path(src), Path(out), record)
    return Path(out)


def _write_checkpoint(src: Path, out: Path, record: dict[str, Any]) -> None:
    import torch

    from ferret_runtime.fileio import atomic_write

    from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint

    ckpt = read_checkpoint(src)
    if "model_config" not in ckpt:
        # an original checkpoint: its LPD may be known only from its file name, which -o changes, so
        # it is written in our format, which records it
        loaded = load_checkpoint(src)
        save_checkpoint(out, loaded.model, preprocess=loaded.preprocess, meta={"converted_from": src.name},
                        extra={CALIBRATION_KEY: record})
        return
    ckpt = {**ckpt, CALIBRATION_KEY: record}
    atomic_write(out, lambda f: torch.save(ckpt, f))


def _write_onnx(src: Path, out: Path, record: dict[str, Any]) -> None:
    import onnx

    from ferret_runtime.fileio import atomic_write

    model = onnx.load(str(src))
    props = {p.key: p for p in model.metadata_props}
    prov_key, thr_key = PREFIX + "provenance", PREFIX + "threshold"
    provenance = json.loads(props[prov_key].value) if prov_key in props else {}
    provenance[CALIBRATION_KEY] = record
    for key, value in ((prov_key, json.dumps(provenance, sort_keys=True)), (thr_key, str(record["threshold"]))):
        if key in props:
            props[key].value = value
        else:
            model.metadata_props.add(key=key, value=value)
    atomic_write(out, model.SerializeToString())


def _write_engine(src: Path, out: Path, record: dict[str, Any]) -> None:
    from ferret_runtime import sidecar
    from ferret_runtime.fileio import atomic_copy

    side = sidecar.read(src)  # checked before anything is written
    provenance = dict(side.meta.get("provenance", {}))
    provenance[CALIBRATION_KEY] = record
    atomic_copy(src, out)
    sidecar.rewrite(src, out, {PREFIX + "provenance": json.dumps(provenance, sort_keys=True),
                               PREFIX + "threshold": str(record["threshold"])})
