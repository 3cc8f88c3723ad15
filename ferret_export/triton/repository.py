"""``ferret export triton``: an exported model -> a Triton Inference Server model repository.

What is written (``REPO/NAME`` appears all at once: it is assembled in a temporary directory beside
it and renamed into place, so a polling server never sees half a model)::

    REPO/NAME/config.pbtxt          platform, max_batch_size, input/output, dynamic_batching,
                                    instance_group, and the model's ``ferret.*`` metadata as parameters
    REPO/NAME/1/model.onnx          platform "onnxruntime_onnx"   (from a .onnx)
    REPO/NAME/1/model.plan          platform "tensorrt_plan"      (from a .engine or .plan)
    REPO/NAME/README.md             the exact preprocessing a client must apply, and how to serve it
    REPO/client_example.py          ``ferret_export.triton.client``, with this model's defaults: a
                                    numpy + tritonclient.http client (torch-free) that reads the
                                    preprocessing from the server's config, so it works for every
                                    FerretNet model in the repository

Input and output names, dtypes and shapes come from the ONNX graph itself (``onnx_model``), the
preprocessing from its ``ferret.*`` metadata. A TensorRT engine cannot be inspected without
TensorRT, so an engine ``M.engine`` (or ``M.plan``) must have its sidecar ``M.engine.json`` next to
it (format: ``ferret_runtime.sidecar``). With a profile there, ``--max-batch`` must not exceed the
profile's largest batch. The model file is read by ``triton.model``, the text files come from ``triton.templates``.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

from ferret_export.triton.model import ModelDescription, describe_model
from ferret_export.triton.templates import KINDS, TRITON_TYPES, config_text, readme_text, triton_dims
from ferret_runtime.errors import ConfigError
from ferret_runtime.fileio import atomic_copy, atomic_write, fsync_dir, sha256

DEFAULT_NAME = "ferretnet"
DEFAULT_MAX_BATCH = 64
DEFAULT_PREFERRED = (8, 16, 32)
DEFAULT_QUEUE_DELAY_US = 500
VERSION = "1"
CLIENT_EXAMPLE = "client_example.py"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


# -------------------------------------------------------------------------------------- validation
def _check_options(name: str, max_batch: int, instances: int, preferred: Sequence[int] | None, delay_us: int,
                   kind: str) -> tuple[int, ...]:
    if not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"Received model name {name!r}; expected letters, digits, '_', '-' and '.' "
                          "(it names the model's directory), not starting with '.' or '-'")
    if max_batch < 0:
        raise ConfigError(f"Received --max-batch {max_batch}; expected >= 0 (0: no batching by Triton)")
    if instances < 1:
        raise ConfigError(f"Received --instances {instances}; expected >= 1")
    if delay_us < 0:
        raise ConfigError(f"Received --max-queue-delay-us {delay_us}; expected >= 0")
    if kind not in KINDS:
        raise ConfigError(f"Received --kind {kind!r}; expected one of {', '.join(KINDS)}")
    if preferred is None:  # the default: the sizes that fit
        return tuple(b for b in DEFAULT_PREFERRED if b <= max_batch)
    sizes = tuple(sorted(set(int(b) for b in preferred)))
    if sizes and max_batch == 0:
        raise ConfigError(f"Received --preferred-batch {','.join(map(str, sizes))} with --max-batch 0; expected no "
                          "preferred sizes (dynamic batching needs max_batch_size > 0)")
    bad = [b for b in sizes if not 1 <= b <= max_batch]
    if bad:
        raise ConfigError(f"Received preferred batch size {bad[0]}; expected 1..{max_batch} (--max-batch)")
    return sizes


def _check_model(desc: ModelDescription, max_batch: int, kind: str) -> None:
    src = desc.path
    if desc.kind == "tensorrt" and kind != "gpu":
        raise ConfigError(f"{src}: received --kind {kind} for a TensorRT engine; "
                          "expected gpu (engines run on GPUs only)")
    if len(desc.inputs) != 1:
        names = ", ".join(t.name for t in desc.inputs) or "none"
        raise ConfigError(f"{src}: received a model with {len(desc.inputs)} inputs ({names}); expected one image input")
    pre = desc.meta["preprocess"]
    inp = desc.inputs[0]
    if (pre.dtype == "uint8") != (inp.dtype == "uint8") or len(inp.shape) != 4:
        raise ConfigError(f"{src}: received input {inp.name!r} {inp.dtype} {list(inp.shape)} while ferret.preprocess "
                          f"says {pre.dtype} {pre.layout}; expected a 4-D input of the dtype the metadata names")
    for t in desc.inputs + desc.outputs:
        if t.dtype not in TRITON_TYPES:
            raise ConfigError(f"{src}: received tensor {t.name!r} of dtype {t.dtype}; "
                              f"expected one of {list(TRITON_TYPES)}")
        if max_batch > 0 and (not t.shape or t.shape[0] != -1):
            batch_dim = t.shape[0] if t.shape else "(none: a scalar)"
            raise ConfigError(f"{src}: received tensor {t.name!r} with a static batch dimension {batch_dim} "
                              f"(shape {list(t.shape)}); expected a dynamic first dimension "
                              f"for --max-batch {max_batch} "
                              "(re-export with --dynamic, or pass --max-batch 0 to serve it without batching)")
        if max_batch > 0 and t.max_batch is not None and max_batch > t.max_batch:
            raise ConfigError(f"{src}: received --max-batch {max_batch}; expected <= {t.max_batch}, the largest batch "
                              f"of the engine's optimisation profile for {t.name!r}")


# ------------------------------------------------------------------------------------------ client
def client_example_text(desc: ModelDescription, *, name: str) -> str:
    """``ferret_export/triton/client.py`` with this model's name, preprocessing and threshold as its defaults."""
    pre = desc.meta["preprocess"]
    dtype = desc.inputs[0].dtype if desc.inputs[0].dtype in ("float32", "float16", "uint8") else pre.dtype
    defaults = {"MODEL_NAME": name, "THRESHOLD": float(desc.meta["threshold"]),
                "PREPROCESS": {"crop": pre.crop, "mean": list(pre.mean), "std": list(pre.std), "layout": pre.layout,
                               "dtype": dtype}}
    lines = resources.files(__package__).joinpath("client.py").read_text(encoding="utf-8").splitlines()
    for key, value in defaults.items():
        (i,) = [i for i, line in enumerate(lines) if line.startswith(key + " = ")]  # exactly one
        lines[i] = f"{key} = {value!r}" + ("  # noqa: E501" if key == "PREPROCESS" else "")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------- writing
def write_triton_repo(model_path: str | os.PathLike, repo: str | os.PathLike, *, name: str = DEFAULT_NAME,
                      max_batch: int = DEFAULT_MAX_BATCH, instances: int = 1,
                      preferred_batch: Sequence[int] | None = None, max_queue_delay_us: int = DEFAULT_QUEUE_DELAY_US,
                      kind: str = "gpu", force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Write ``repo/name`` (config.pbtxt, 1/model.onnx|model.plan, README.md) and ``repo/client_example.py``.

    ``preferred_batch=None`` takes 8, 16, 32 where they do not exceed ``max_batch``; explicit sizes
    must lie in 1..max_batch. An existing ``repo/name`` is replaced only with ``force``, and the new
    one appears by a rename, whole. Returns the model directory.
    """
    preferred = _check_options(name, max_batch, instances, preferred_batch, max_queue_delay_us, kind)
    desc = describe_model(model_path)
    _check_model(desc, max_batch, kind)
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise ConfigError(f"{repo}: received a repository path that is a file; expected a directory (or a new path)")
    target = repo / name
    if (target.exists() or target.is_symlink()) and not force:
        raise ConfigError(f"{target}: received a model directory that already exists; expected a new one "
                          "(pass --force to replace it)")
    repo.mkdir(parents=True, exist_ok=True)
    config = config_text(desc, name=name, max_batch=max_batch, instances=instances, preferred=preferred,
                         max_queue_delay_us=max_queue_delay_us, kind=kind, source_sha256=sha256(desc.path))
    readme = readme_text(desc, name=name, max_batch=max_batch, repo=str(repo), kind=kind)
    _write_model_dir(desc, repo, name, {"config.pbtxt": config, "README.md": readme})
    atomic_write(repo / CLIENT_EXAMPLE, client_example_text(desc, name=name).encode("utf-8"))
    inp = desc.inputs[0]
    log(f"[triton] wrote {target} ({desc.platform}, max_batch_size {max_batch}, input {inp.name!r} "
        f"{TRITON_TYPES[inp.dtype]} [{', '.join(map(str, triton_dims(inp, max_batch)[0]))}], "
        + (f"dynamic batching {list(preferred)} / {max_queue_delay_us} us, " if max_batch > 0 else "")
        + f"{instances} x {KINDS[kind]})")
    log(f"[triton] wrote {repo / CLIENT_EXAMPLE}; serve with: tritonserver --model-repository={repo}")
    return target


def _write_model_dir(desc: ModelDescription, repo: Path, name: str, texts: dict[str, str]) -> None:
    """Assemble ``repo/name`` in a temporary directory beside it, then rename it into place (replacing
    an old one, which is moved aside first and put back if the rename fails)."""
    target = repo / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=repo))
    old: Path | None = None
    try:
        atomic_copy(desc.path, tmp / VERSION / desc.filename)
        for rel in desc.extra_files:
            atomic_copy(desc.path.parent / rel, tmp / VERSION / rel)
        for filename, text in texts.items():
            atomic_write(tmp / filename, text.encode("utf-8"))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; a server in a container may run as another user
        if target.exists() or target.is_symlink():
            old = repo / f".{name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
        try:
            os.rename(tmp, target)
        except OSError:
            if old is not None:
                os.rename(old, target)
                old = None
            raise
        fsync_dir(repo)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
