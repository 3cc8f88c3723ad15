"""Verification before an engine is written: what it is compared with, on which inputs, and what a
failure leaves behind.

ferret_export/tensorrt/verify.py compares a plugin engine with its graph made portable again, on real
images and random batches at the profile's MIN/OPT/MAX batch and size plus a non-square image (a kernel
that swaps H and W fails there); a build whose engine disagrees writes nothing and keeps the previous
engine. The engine here is the stand-in TensorRT's (``standins.FakeTRT``), made to disagree on purpose.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from ferret_export.onnx.model import describe_onnx
from ferret_export.tensorrt import build as trt_export
from ferret_export.tensorrt import profile as trt_profile
from ferret_export.tensorrt import verify as trt_verify
from ferret_export.verify import ParityError
from ferret_runtime.preprocess import normalize

from . import trt_fixtures
from .trt_fixtures import ort_session, quiet

ckpt, graphs, fake_trt = trt_fixtures.ckpt, trt_fixtures.graphs, trt_fixtures.fake_trt  # shared fixtures


def test_verification_reference_for_plugin_graphs(graphs):
    """build_engine compares a plugin engine with the plugin graph made portable again."""
    x = normalize(np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    ref = trt_verify.portable_reference(graphs["plugin"])
    onnx.checker.check_model(ref, full_check=True)
    np.testing.assert_allclose(ort_session(ref).run(None, {"input": x})[0],
                               ort_session(graphs["portable"]).run(None, {"input": x})[0], rtol=1e-6, atol=1e-6)


def test_verification_cases_cover_min_opt_max(graphs, tmp_path):
    from ferret_runtime.samples import write_samples

    model = describe_onnx(graphs["dynamic_hw"])
    profile = trt_profile.profile_shapes(model, (1, 3, 5), (16, 32, 48))
    images = write_samples(tmp_path, n=1, size=40)
    cases = dict(trt_verify._cases(model, profile, images))
    assert [(k, v.shape) for k, v in cases.items()] == [
        ("real images (3)", (3, 32, 32, 3)), ("random, min batch 1", (1, 32, 32, 3)),
        ("random, opt batch 3", (3, 32, 32, 3)), ("random, max batch 5", (5, 32, 32, 3)),
        ("random, min size 16x16", (1, 16, 16, 3)), ("random, max size 48x48", (1, 48, 48, 3)),
        ("image, non-square 16x48", (1, 16, 48, 3))]  # a kernel that swaps H and W fails here
    assert all(v.dtype == np.uint8 for v in cases.values())


def test_build_writes_nothing_when_verification_fails(fake_trt, graphs, tmp_path):
    fake_trt.error = 0.01  # TensorRT "disagrees" with ONNX Runtime by 1e-2 everywhere
    out = tmp_path / "m.engine"
    out.write_bytes(b"the previous engine")
    with pytest.raises(ParityError, match=r"m\.engine: not written: 4 of 4 verification cases exceed "
                                                     r"atol 1e-03 \+ rtol 1e-03 \(worst max abs err 1\.000e-02\)"):
        trt_export.build_engine(graphs["portable"], out, batch=(1, 2, 5), log=quiet)
    assert out.read_bytes() == b"the previous engine" and sorted(p.name for p in tmp_path.iterdir()) == ["m.engine"]
