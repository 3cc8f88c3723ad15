"""The folder the docs' commands run in: small real stand-ins under the names the pages use.

Built once per session (``build``, with the CLI where it can: module moves leave it alone), then mirrored per
block (``mirror``): real folders, each file a symlink except the small model files, which are copied, so a block
that overwrites one (``-o ferretnet-s.onnx``) replaces its own copy and never the shared file behind a link. The
authors' checkpoint, the reference images and the reference clip are links to ../shared/reference, never copies.

| name in the pages | stand-in |
| --- | --- |
| ferretnet-s-median-3.pth, clip.mp4 | the reference checkpoint, the reference clip |
| photos/, a.png | 4 of the reference images (`PHOTOS`), one of them |
| b.jpg, photo.jpg | a reference image re-encoded as JPEG |
| best.pt | FerretNet-S, seeded random weights, 64-pixel crop |
| ferretnet-s.onnx, s.onnx, s-fp16.onnx, s-int8.onnx | best.pt exported at 64x64 (fp32, fp16, INT8) |
| data/train, data/val, val/, test/, ForenSynths/ | a proxy dataset of 64-pixel images (sizes below) |
| configs/, Makefile | the repository's |
| models/client_example.py | the client `ferret export triton` writes |
| manifest.parquet | a `path` column naming the reference images (absolute paths: Ray's workers run elsewhere) |
| keys.txt, cert.pem, key.pem | one API token; a self-signed certificate for 127.0.0.1 |

Proxy dataset sizes: 20 + 20 train images, 110 + 110 val (calibration needs 100 real), 10 + 10 per test decoder.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

from .docs_commands import ROOT

# four of the ten reference images, the smallest (256-512 px): every mode, --crop none and --explain too, in seconds
PHOTOS = ("fake_biggan_butterfly.png", "fake_SD3_5_mountain.png", "real_coco_giraffe.png",
          "real_imageNet_butterfly.png")
COPIED = {".pt", ".pth", ".onnx", ".py", ".txt", ".pem"}  # small files a command may overwrite: copies


def _link(target: Path, name: Path) -> None:
    name.parent.mkdir(parents=True, exist_ok=True)
    name.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def _ferret(*args: str, cwd: Path) -> None:
    """The stand-ins are made by the CLI itself (its public interface: module moves do not touch it)."""
    proc = subprocess.run([sys.executable, "-m", "ferret_runtime.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"building the docs sandbox: ferret {' '.join(args)}: {proc.stderr[-3000:]}"


def _models(out: Path) -> None:
    import torch

    from ferret_runtime.preprocess import Preprocess
    from ferret_train import create_model
    from ferret_train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    save_checkpoint(out / "best.pt", create_model("ferretnet-s").eval(), preprocess=Preprocess(crop=64))
    small = ("-w", "best.pt", "--input-size", "64")
    _ferret("export", "onnx", *small, "-o", "s.onnx", "--no-verify", cwd=out)
    _ferret("export", "onnx", *small, "-o", "s-fp16.onnx", "--fp16", "--no-verify", cwd=out)
    _ferret("export", "onnx", *small, "-o", "s-int8.onnx", "--int8", "--calib-data", "data/train",
            "--calib-images", "32", cwd=out)
    shutil.copy(out / "s.onnx", out / "ferretnet-s.onnx")
    # the client `ferret export triton` writes beside its models (a repository of its own: the Triton page's
    # export must find models/ without a model in it)
    _ferret("export", "triton", "--model", "s.onnx", "--repo", "_triton", cwd=out)
    (out / "models").mkdir()
    shutil.copy(out / "_triton" / "client_example.py", out / "models" / "client_example.py")


def _data(out: Path) -> None:
    from ferret_runtime.samples import write_proxy_dataset

    proxy = write_proxy_dataset(out / "proxy", size=64, n_train=20, n_val=110, n_test=10)
    for name, split in (("data/train", "train"), ("data/val", "val"), ("val", "val"), ("test", "test"),
                        ("ForenSynths/train", "train"), ("ForenSynths/val", "val"), ("ForenSynths/test", "test")):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(proxy[split], out / name, copy_function=os.symlink)


def build(out: Path, reference: Path) -> Path:
    """Every stand-in, in ``out`` (taking about 15 s: the models and the dataset)."""
    from .serving import self_signed

    out.mkdir(parents=True, exist_ok=True)
    images = [reference / "images" / name for name in PHOTOS]
    _link(reference / "ferretnet-s-median-3.pth", out / "ferretnet-s-median-3.pth")
    for img in images:
        _link(img, out / "photos" / img.name)
    _link(reference / "images" / "fake_biggan_butterfly.png", out / "a.png")
    _link(reference / "real-kunming-1.mp4", out / "clip.mp4")
    with Image.open(reference / "images" / "real_coco_giraffe.png") as im:
        im.convert("RGB").save(out / "b.jpg", quality=95)
    shutil.copy(out / "b.jpg", out / "photo.jpg")
    _data(out / "_data")
    for name in ("data", "val", "test", "ForenSynths"):
        (out / "_data" / name).rename(out / name)
    _models(out)
    _link(ROOT / "configs", out / "configs")
    _link(ROOT / "Makefile", out / "Makefile")
    _manifest(out / "manifest.parquet", [out / "photos" / img.name for img in images])
    (out / "keys.txt").write_text("docs-test-token\n")
    self_signed(out)
    return out


def _manifest(path: Path, images: list[Path]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": [str(p) for p in images]}), path)


def mirror(assets: Path, dest: Path) -> Path:
    """A block's own sandbox: ``assets`` as real folders of links, small model files copied."""
    dest.mkdir(parents=True)
    for src in sorted(assets.iterdir()):
        if src.name.startswith("_"):
            continue
        if src.is_symlink() or (src.is_file() and src.suffix not in COPIED):
            (dest / src.name).symlink_to(os.readlink(src) if src.is_symlink() else src)
        elif src.is_file():
            shutil.copy2(src, dest / src.name)
        else:
            shutil.copytree(src, dest / src.name, symlinks=True, copy_function=_copy_or_link)
    return dest


def _copy_or_link(src: str, dst: str) -> None:
    if Path(src).suffix in COPIED:
        shutil.copy2(src, dst)
    else:
        os.symlink(src, dst)
