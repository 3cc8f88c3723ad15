"""The fused CUDA LPD kernel (ferret_runtime/kernels/lpd.cu): its math on the CPU, its build, its launch.

On a CPU-only machine: the host build (g++) of the kernels' own per-pixel and per-block code
against the original LPD's outputs, launch tuples, nvcc and NVRTC builds, the torch op on CPU.
With a GPU (``gpu`` marker): the kernels through the NVRTC launcher and the torch op, bit for bit
against the CPU.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import math
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ferret_runtime import cuda
from ferret_runtime.errors import ConfigError
from ferret_runtime.kernels import SOURCE_PATH, VARIANT_IDS, host, launch, nvrtc, read_source
from ferret_runtime.lpd_spec import LPD_SPECS, MEDIAN9_NETWORK, MEDIAN9_OUTPUT
from ferret_runtime.preprocess import MEAN, STD, center_crop, load_image, normalize
from ferret_runtime.samples import natural_image
from ferret_train.layers.lpd import LPD, lpd_reference

FUNCS = sorted(LPD_SPECS)
SOURCE = read_source()


def torch_residual(x: np.ndarray, func: str, k: int) -> np.ndarray:
    """The original unfold + reduce LPD (float32), as the residual the network sees."""
    xt = torch.from_numpy(x)
    return (xt - lpd_reference(xt, LPD_SPECS[func], k)).numpy()


def ties(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Few distinct values: equal neighbours everywhere."""
    return (np.random.default_rng(seed).integers(-2, 3, shape) / 2).astype(np.float32)


def report(name: str, got: np.ndarray, want: np.ndarray) -> float:
    with np.errstate(invalid="ignore"):  # inf - inf: equal infinities (min/max of a window of padding only)
        err = np.where(got == want, 0.0, np.abs(got.astype(np.float64) - want.astype(np.float64)))
    diff = float(err.max()) if got.size else 0.0
    print(f"{name}: max abs diff {diff:.3g}")
    return diff


@pytest.fixture(scope="module")
def lpd_ref(reference):
    return dict(np.load(reference / "lpd_reference.npz"))


# ------------------------------------------------------------------------------------------------
# (a) The host build equals the original LPD
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inp", ["continuous", "image"])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("func", FUNCS)
def test_host_matches_original_modules(lpd_ref, func, k, inp):
    x, want = lpd_ref[f"x_{inp}"], lpd_ref[f"{func}_k{k}_{inp}"]
    residual = host.lpd_residual_host(x, func, k)
    # the README's claim: medians, min and max bit for bit; avg within 2.4e-7 (its summation order)
    tol = 2.4e-7 if func == "avg" else 0.0
    assert report(f"{func} k={k} {inp} residual", residual, x - want) <= tol
    assert report(f"{func} k={k} {inp} reconstruction", host.lpd_reconstruct_host(x, func, k), want) <= tol


@pytest.mark.parametrize("data", ["normal", "ties"])
@pytest.mark.parametrize("func", FUNCS)
def test_host_k7_matches_torch_reference(func, data):
    shape = (2, 3, 13, 17)
    x = np.random.default_rng(7).standard_normal(shape).astype(np.float32) if data == "normal" else ties(shape, 7)
    # avg sums 49 values in row-major order where torch's mean uses its own order: a few ulps apart
    assert report(f"{func} k=7 {data}", host.lpd_residual_host(x, func, 7), torch_residual(x, func, 7)) <= 2e-6


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 3, 3, 5), (1, 1, 257, 511)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("func", ["median", "excmed", "min", "avg"])
def test_host_odd_sizes(shape, k, func):
    x = ties(shape, k) if shape[-1] < 100 else np.random.default_rng(k).standard_normal(shape).astype(np.float32)
    assert report(f"{func} k={k} {shape}", host.lpd_residual_host(x, func, k), torch_residual(x, func, k)) <= 2e-6


def _parse_network(source: str) -> tuple[list[tuple[int, int]], int]:
    body = source.split("// BEGIN MEDIAN9_NETWORK", 1)[1].split("// END MEDIAN9_NETWORK", 1)[0]
    pairs = [(int(a), int(b)) for a, b in re.findall(r"FERRET_CX\((\d+),\s*(\d+)\)", body)]
    output = int(re.search(r"return v\[(\d+)\];\s*// MEDIAN9_OUTPUT", source).group(1))
    return pairs, output


def test_cuda_network_is_the_spec_network():
    # checked, not generated: the exchanges written in lpd.cu are lpd_spec's, in order
    pairs, output = _parse_network(SOURCE)
    assert tuple(pairs) == MEDIAN9_NETWORK and output == MEDIAN9_OUTPUT


def test_cuda_variant_enum_follows_the_specs():
    enum = {name.lower(): int(v) for name, v in re.findall(r"FERRET_LPD_(\w+) = (\d+)", SOURCE)}
    assert enum == VARIANT_IDS == {name: i for i, name in enumerate(LPD_SPECS)}


def test_compiled_network_zero_one_principle():
    # retmed keeps all 9 values: the compiled median9 itself, on all 512 inputs of 0s and 1s
    rows = np.array(list(itertools.product([0.0, 1.0], repeat=9)), dtype=np.float32)
    np.testing.assert_array_equal(host.reduce_rows_host(rows, "retmed", 3), np.sort(rows, axis=1)[:, 4])


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("func", ["median", "excmed", "retmed"])
def test_compiled_selection_with_ties(func, k):
    # the median family on rows of 0/1 and of three values (ties everywhere), against a sort
    rng = np.random.default_rng(k)
    rows = np.concatenate([rng.integers(0, 2, (20000, k * k)), rng.integers(-1, 2, (20000, k * k))]).astype(np.float32)
    c = k * k // 2
    vals = rows.copy()
    if func == "median":
        vals[:, c] = 0.0
    elif func == "excmed":
        vals = np.delete(vals, c, axis=1)
    want = np.sort(vals, axis=1)[:, (vals.shape[1] - 1) // 2]  # lower middle for excmed's even count
    np.testing.assert_array_equal(host.reduce_rows_host(rows, func, k), want)


def test_host_wrappers_name_bad_inputs():
    with pytest.raises(ConfigError, match=r"Received x as ndarray of dtype float64 and shape \(1, 1, 2, 2\); "
                                          r"expected a float32"):
        host.lpd_residual_host(np.zeros((1, 1, 2, 2)))
    with pytest.raises(ConfigError, match="Received LPD function 'origin'"):
        host.lpd_residual_host(np.zeros((1, 1, 2, 2), np.float32), "origin")
    with pytest.raises(ConfigError, match="Received LPD window size 4"):
        host.lpd_residual_host(np.zeros((1, 1, 2, 2), np.float32), "median", 4)
    with pytest.raises(ConfigError, match=r"Received images as float32 of shape \(1, 2, 2, 3\); expected uint8"):
        host.preprocess_lpd_host(np.zeros((1, 2, 2, 3), np.float32))


def test_missing_compiler_is_named(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(host.HostBuildError, match="Received no C\\+\\+ compiler .*no-such-compiler-xyz"):
        host.find_compiler()


# ------------------------------------------------------------------------------------------------
# (b) Fused preprocessing equals normalise-then-LPD
# ------------------------------------------------------------------------------------------------


def _images(reference) -> np.ndarray:
    real = center_crop(load_image(reference / "images" / "real_coco_giraffe.png"), 64)
    fake = center_crop(load_image(reference / "images" / "fake_biggan_butterfly.png"), 64)
    return np.stack([real, fake, natural_image(np.random.default_rng(0), 64)])


def test_preprocess_lpd_host_equals_normalise_then_lpd(reference):
    images = _images(reference)
    want = torch_residual(normalize(images), "median", 3)
    got = host.preprocess_lpd_host(images)
    assert report("preprocess_lpd_host", got, want) == 0.0  # same float32 operations: bit for bit
    odd = images[:1, :3, :5]  # zero padding applies to the normalised image, also on tiny inputs
    np.testing.assert_array_equal(host.preprocess_lpd_host(odd), torch_residual(normalize(odd), "median", 3))


# ------------------------------------------------------------------------------------------------
# (e) Launch tuples: coverage and shared memory, checked by running the blocks on the CPU
# ------------------------------------------------------------------------------------------------

COVER_SHAPES = [(1, 1, 1, 1), (2, 3, 3, 5), (1, 1, 257, 511), (256, 3, 256, 256), (1, 3, 1, 4097), (30000, 3, 8, 8)]


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("shape", COVER_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_launch_config_covers_the_output(shape, k):
    n, c, h, w = shape
    cfg = launch.launch_config("lpd_generic", shape, "float16", "sm_90", k)
    (gx, gy, gz), (bx, by, bz) = cfg.grid, cfg.block
    rows = by * launch.ROWS_PER_THREAD
    assert cfg.name == "lpd_generic_f16" and cfg.arch == 90 and bz == 1 and bx * by <= launch.MAX_THREADS
    assert gx * bx >= w and (gx - 1) * bx < w  # every column, no idle column of blocks
    assert gy * rows >= h and (gy - 1) * rows < h
    assert gz == min(n * c, launch.MAX_GRID_YZ)  # planes past gridDim.z: the kernel's grid-stride loop
    r = k // 2
    assert cfg.shared_mem_bytes == (bx + 2 * r) * (rows + 2 * r) * 4  # one float tile plus its halo


def test_launch_config_preprocess_and_residual():
    cfg = launch.launch_config("preprocess_lpd", (4, 100, 70, 3), np.float32, (8, 0))
    # 32 x 64 tiles (8 rows per thread), compile-time block and static shared memory (three channel tiles)
    assert cfg.name == "preprocess_lpd_f32" and cfg.grid == (3, 2, 4) and cfg.block == launch.BLOCK_3X3
    assert cfg.shared_mem_bytes == 0 and launch.tile_shape("preprocess_lpd") == (32, 64)
    cfg = launch.launch_config("lpd_residual", (2, 3, 16, 33), torch.float16, 80)
    assert cfg.name == "lpd_residual_f16" and cfg.grid == (2, 1, 6)


@pytest.mark.parametrize("kernel, shape, dtype, k, match", [
    ("lpd_mean", (1, 1, 2, 2), "float32", 3, "Received kernel 'lpd_mean'; expected one of lpd_residual"),
    ("lpd_generic", (1, 1, 2, 2), "bfloat16", 3, "Received dtype bfloat16; expected one of float32, float16"),
    ("lpd_generic", (1, 2, 2), "float32", 3, r"Received shape \(1, 2, 2\) for lpd_generic; expected \(N, C, H, W\)"),
    ("lpd_generic", (1, 1, 0, 2), "float32", 3, r"Received shape \(1, 1, 0, 2\); expected sizes from 1"),
    ("lpd_residual", (1, 1, 2, 2), "float32", 5, "Received k=5 for lpd_residual; expected 3"),
    ("preprocess_lpd", (1, 2, 2, 4), "float32", 3, r"Received shape \(1, 2, 2, 4\) for preprocess_lpd"),
    ("normalize", (1, 3, 2, 2), "float32", 3, r"Received shape \(1, 3, 2, 2\) for normalize; expected \(N, H, W, 3\)"),
])
def test_launch_config_names_bad_inputs(kernel, shape, dtype, k, match):
    with pytest.raises(ConfigError, match=match):
        launch.launch_config(kernel, shape, dtype, 80, k)
    with pytest.raises(ConfigError, match="Received arch 'sm80x'"):
        launch.launch_config("lpd_generic", (1, 1, 2, 2), "float32", "sm80x")


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 3, 3, 5), (1, 2, 40, 70)], ids=lambda s: "x".join(map(str, s)))
def test_emulated_launch_equals_per_pixel(shape, k):
    # the kernel's tile load, halo and per-thread rows, run block by block as launch_config launches them
    x = ties(shape, k)
    for func in ("median", "min", "avg"):
        cfg = launch.launch_config("lpd_generic", shape, "float32", 80, k)
        got = host.emulate_lpd(x, cfg, func, k)
        np.testing.assert_array_equal(got, host.lpd_residual_host(x, func, k))
        rec = host.emulate_lpd(x, cfg, func, k, residual=False)
        np.testing.assert_array_equal(rec, host.lpd_reconstruct_host(x, func, k))
    cfg = launch.launch_config("lpd_residual", shape, "float32", 80)
    np.testing.assert_array_equal(host.emulate_lpd(x, cfg), host.lpd_residual_host(x))


def test_emulated_grid_stride_and_other_blocks():
    x = np.random.default_rng(0).standard_normal((3, 2, 37, 45)).astype(np.float32)
    want = host.lpd_residual_host(x, "excmed", 5)
    cfg = launch.launch_config("lpd_generic", x.shape, "float32", 80, 5)
    few_planes = dataclasses.replace(cfg, grid=(*cfg.grid[:2], 4))  # 6 planes on gridDim.z = 4
    np.testing.assert_array_equal(host.emulate_lpd(x, few_planes, "excmed", 5), want)
    for bx, by in [(8, 4), (16, 16), (1, 1)]:  # the kernels read blockDim; any block shape works
        rows = by * launch.ROWS_PER_THREAD
        other = dataclasses.replace(cfg, block=(bx, by, 1), grid=(math.ceil(45 / bx), math.ceil(37 / rows), 6),
                                    shared_mem_bytes=(bx + 4) * (rows + 4) * 4)
        np.testing.assert_array_equal(host.emulate_lpd(x, other, "excmed", 5), want)


def test_emulator_catches_short_grids_and_shared_memory():
    x = np.ones((1, 1, 40, 40), np.float32)
    cfg = launch.launch_config("lpd_generic", x.shape, "float32", 80, 3)
    short = dataclasses.replace(cfg, grid=(1, cfg.grid[1], 1))
    assert np.isnan(host.emulate_lpd(x, short, "median", 3)[..., 32:]).all()  # the NaN fill shows gaps
    small = dataclasses.replace(cfg, shared_mem_bytes=cfg.shared_mem_bytes - 4)
    with pytest.raises(host.HostBuildError, match="dynamic shared memory smaller than the block's tiles"):
        host.emulate_lpd(x, small, "median", 3)
    with pytest.raises(ConfigError, match=r"Received x as float32 of shape \(1, 1, 40, 40\) for lpd_generic_f16; "
                                          "expected float16"):
        host.emulate_lpd(x, launch.launch_config("lpd_generic", x.shape, "float16", 80), "median", 3)
    with pytest.raises(ConfigError, match="Received a launch config for 'normalize_f32'; expected one for "
                                          "preprocess_lpd_f32 or preprocess_lpd_f16"):
        host.emulate_preprocess_lpd(np.zeros((1, 4, 4, 3), np.uint8), launch.launch_config("normalize", (1, 4, 4, 3),
                                                                                           "float32", 80))


def test_emulated_preprocess_equals_per_pixel(reference):
    images = _images(reference)[:, :45, :37]
    cfg = launch.launch_config("preprocess_lpd", images.shape, "float32", 90)
    np.testing.assert_array_equal(host.emulate_preprocess_lpd(images, cfg), host.preprocess_lpd_host(images))


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (2, 3, 5, 3), (3, 45, 37, 3), (2, 257, 33, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_emulated_normalize_equals_numpy(shape):
    # the runtime's GPU normalisation for graphs that contain the LPD: numpy's float32 ops, bit for bit
    images = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    cfg = launch.launch_config("normalize", shape, "float32", 80)
    assert cfg.name == "normalize_f32" and cfg.shared_mem_bytes == 0
    np.testing.assert_array_equal(host.emulate_normalize(images, cfg), normalize(images))
    one_plane = dataclasses.replace(cfg, grid=(*cfg.grid[:2], 1))  # every image through the grid-stride loop
    np.testing.assert_array_equal(host.emulate_normalize(images, one_plane), normalize(images))
    mean, std = (0.5, 0.25, 0.0), (0.25, 0.5, 1.0)
    np.testing.assert_array_equal(host.emulate_normalize(images, cfg, mean, std), normalize(images, mean, std))


def test_emulated_normalize_shows_short_grids():
    images = np.zeros((1, 40, 70, 3), np.uint8)
    cfg = launch.launch_config("normalize", images.shape, "float32", 80)
    assert cfg.grid == (3, 1, 1) and cfg.block == (256, 1, 1)  # 4 pixels per thread over the flattened image
    out = host.emulate_normalize(images, dataclasses.replace(cfg, grid=(1, 1, 1))).reshape(1, 3, -1)
    assert np.isnan(out[..., 1024:]).all() and not np.isnan(out[..., :1024]).any()


@pytest.mark.parametrize("data", ["zero-one", "ties", "signed-zeros"])
def test_sliding_median_equals_the_network(data):
    # the residual kernel's sorted rows shared down a column against the 9-element network, block by block;
    # 0/1 images of 96 x 200 hold all 512 window patterns (0-1 principle), ties and +-0 everywhere
    rng = np.random.default_rng(11)
    x = {"zero-one": rng.integers(0, 2, (2, 3, 96, 200)).astype(np.float32),
         "ties": ties((2, 3, 96, 200), 3),
         "signed-zeros": rng.choice(np.array([-0.0, 0.0, -1.0, 1.0], np.float32), (2, 3, 96, 200))}[data]
    cfg = launch.launch_config("lpd_residual", x.shape, "float32", 90)
    got, want = host.emulate_lpd(x, cfg), host.lpd_residual_host(x)
    # bit for bit, the sign of a zero included: both networks select with the device's min/max (-0 < +0)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    if data == "zero-one":
        windows = np.lib.stride_tricks.sliding_window_view(x[..., :, :], (3, 3), axis=(2, 3)).reshape(-1, 9)
        assert len(np.unique(windows @ (2 ** np.arange(9)))) == 512
    # and the medians the grid reaches equal the reference's, with ties: by value (the == of array_equal), since
    # torch's median takes a zero by its position where min/max order -0 < +0, and (-0) - (+0) is -0
    np.testing.assert_array_equal(got, torch_residual(x, "median", 3))


@pytest.mark.parametrize("shape", [(1, 2, 200, 300), (2, 1, 131, 200), (1, 1, 140, 301)],
                         ids=lambda s: "x".join(map(str, s)))
def test_emulated_residual_interior_and_edge_tiles(shape):
    # interior tiles (vector staging, no bounds checks) and border tiles side by side: the same residual;
    # an odd width (301) sends every tile down the edge path
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    x[..., ::2, ::3] = np.round(x[..., ::2, ::3])  # ties
    cfg = launch.launch_config("lpd_residual", shape, "float32", 90)
    got = host.emulate_lpd(x, cfg)
    interior = host.emulated_interior_blocks()
    np.testing.assert_array_equal(got, host.lpd_residual_host(x))
    np.testing.assert_array_equal(got, torch_residual(x, "median", 3))
    assert (interior > 0) == (shape[-1] % 4 == 0), interior
    assert interior < math.prod(cfg.grid[:2])  # border tiles always take the edge path


def _float16_values(data: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """float32 arrays of float16 values: what lpd_residual_f16 holds in its tile."""
    rng = np.random.default_rng(seed)
    if data == "float16":  # every finite magnitude, subnormals included, both signs
        bits = rng.integers(0, 0x7C00, shape, dtype=np.uint16) | (rng.integers(0, 2, shape, dtype=np.uint16) << 15)
        return bits.view(np.float16).astype(np.float32)
    return {"zero-one": rng.integers(0, 2, shape).astype(np.float32), "ties": ties(shape, seed),
            "signed-zeros": rng.choice(np.array([-0.0, 0.0, -1.0, 1.0], np.float32), shape)}[data]


@pytest.mark.parametrize("data", ["zero-one", "ties", "signed-zeros", "float16"])
@pytest.mark.parametrize("shape", [(2, 3, 200, 200), (1, 2, 131, 200), (1, 1, 140, 301)],
                         ids=lambda s: "x".join(map(str, s)))
def test_packed_pairs_equal_the_column_network(data, shape):
    # lpd_residual_f16 on sm_80+ runs each min/max on two rows of a column packed in a __half2 (full sorts of
    # row pairs shared down the column, the masked centres as their own pairs); on sm_75 one output at a time on
    # floats. The emulator runs both as the device builds do (float16 in and out, the same pack, lanes and
    # min/max.f16x2): the same bits, sign of zero included, on interior and edge tiles (an odd height: a last
    # pair half outside the image), and numpy's rounding of the float32 residual
    x = _float16_values(data, shape, 23).astype(np.float16)
    pairs = host.emulate_lpd(x, launch.launch_config("lpd_residual", x.shape, "float16", 80))
    interior = host.emulated_interior_blocks()
    assert (interior > 0) == (shape[-1] % 4 == 0), interior
    column = host.emulate_lpd(x, launch.launch_config("lpd_residual", x.shape, "float16", 75))
    assert pairs.dtype == column.dtype == np.float16
    np.testing.assert_array_equal(pairs.view(np.uint16), column.view(np.uint16))
    with np.errstate(over="ignore"):  # differences of float16 values near 65504 round to inf, on both sides
        want = host.lpd_residual_host(x.astype(np.float32)).astype(np.float16)
        np.testing.assert_array_equal(pairs.view(np.uint16), want.view(np.uint16))
        np.testing.assert_array_equal(pairs, torch_residual(x.astype(np.float32), "median", 3).astype(np.float16))


@pytest.mark.parametrize("shape", [(2, 200, 300, 3), (1, 131, 200, 3), (1, 140, 301, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_emulated_preprocess_interior_and_edge_tiles(shape):
    images = np.random.default_rng(6).integers(0, 256, shape, dtype=np.uint8)
    cfg = launch.launch_config("preprocess_lpd", shape, "float32", 90)
    got = host.emulate_preprocess_lpd(images, cfg)
    interior = host.emulated_interior_blocks()
    np.testing.assert_array_equal(got, host.preprocess_lpd_host(images))
    np.testing.assert_array_equal(got, torch_residual(normalize(images), "median", 3))
    assert (interior > 0) == (shape[2] % 4 == 0), interior


@pytest.mark.parametrize("shape", [(1, 40, 70, 3), (3, 64, 48, 3), (2, 1, 4, 3)], ids=lambda s: "x".join(map(str, s)))
def test_emulated_normalize_fast_path(shape):
    # H*W % 4 == 0: three 32-bit words per 4 pixels, one vector store per channel
    images = np.random.default_rng(4).integers(0, 256, shape, dtype=np.uint8)
    cfg = launch.launch_config("normalize", shape, "float32", 90)
    np.testing.assert_array_equal(host.emulate_normalize(images, cfg), normalize(images))


def test_launch_constants_and_arguments_match_the_source():
    defines = dict(re.findall(r"#define (FERRET_\w+) (\d+)", SOURCE))
    assert int(defines["FERRET_ROWS_PER_THREAD"]) == launch.ROWS_PER_THREAD
    assert int(defines["FERRET_MAX_THREADS"]) == launch.MAX_THREADS >= math.prod(launch.BLOCK)
    kernels = dict(re.findall(r"FERRET_KERNEL\w* (\w+)\(([^)]*)\)", SOURCE))
    assert sorted(kernels) == sorted(f"{k}_{s}" for k in launch.KERNELS for s in ("f32", "f16"))
    for name, params in kernels.items():
        kinds = tuple("ptr" if "*" in p else p.split()[0] for p in params.split(","))
        assert kinds == launch.KERNEL_ARGS[name.rsplit("_", 1)[0]], name


def test_launch_and_host_modules_import_without_torch():
    code = textwrap.dedent("""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, _Block())
        import ferret_runtime.kernels.launch, ferret_runtime.kernels.host
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


# ------------------------------------------------------------------------------------------------
# (d) nvcc and NVRTC build the kernels; no spills
# ------------------------------------------------------------------------------------------------


ptxas_usage = nvrtc.ptxas_usage  # {'lpd_residual_f32': {'registers': 40, 'stack': 0, ...}, ...}


@pytest.fixture(scope="module")
def nvcc_builds(tmp_path_factory):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc (the CUDA toolkit) is not on PATH")
    out = tmp_path_factory.mktemp("nvcc")
    procs = {arch: subprocess.Popen([nvcc, "-cubin", f"-arch=sm_{arch}", "-Xptxas", "-v",
                                     "-o", str(out / f"lpd{arch}.cubin"), str(SOURCE_PATH)],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for arch in (75, 80, 90)}  # all at once: about 5 s each
    return {arch: (p.wait(timeout=600), p.stdout.read()) for arch, p in procs.items()}


@pytest.mark.parametrize("arch", [75, 80, 90])  # sm_75: T4, cvt.rn.f16x2.f32 (sm_80+) behind its fallback
def test_nvcc_builds_without_spills(nvcc_builds, arch):
    code, log = nvcc_builds[arch]
    assert code == 0, log
    usage = ptxas_usage(log)
    assert sorted(usage) == sorted(f"{k}_{s}" for k in launch.KERNELS for s in ("f32", "f16"))
    for name, u in sorted(usage.items()):
        print(f"sm_{arch} {name}: {u['registers']} registers, {u['stack']} B stack, "
              f"{u['spill_stores']} B spill stores, {u['spill_loads']} B spill loads")
        assert u["spill_stores"] == u["spill_loads"] == u["stack"] == 0, (name, u)
        assert u["registers"] <= 65536 // launch.MAX_THREADS  # fits __launch_bounds__(256)
    assert "warning" not in log, log  # e.g. a __launch_bounds__ minimum of blocks the SM cannot hold


@pytest.fixture(scope="module")
def nvrtc_ok():
    try:
        return nvrtc.nvrtc_version()
    except cuda.CudaError as e:
        pytest.skip(f"NVRTC unavailable: {e}")


@pytest.mark.parametrize("arch", [80, 90])
def test_nvrtc_compiles_ptx_on_the_cpu(nvrtc_ok, tmp_path, arch):
    first = nvrtc.compile_lpd(arch, "ptx", cache=tmp_path)
    ptx = first.data.decode(errors="replace")
    assert not first.from_cache and first.path.is_file()
    assert re.search(rf"\.target sm_{arch}\b", ptx)
    assert sorted(re.findall(r"\.entry (\w+)", ptx)) == sorted(f"{k}_{s}" for k in launch.KERNELS
                                                               for s in ("f32", "f16"))
    again = nvrtc.compile_lpd(arch, "ptx", cache=tmp_path)
    assert again.from_cache and again.data == first.data
    # a new process finds the file instead of compiling (the cache survives a restart)
    code = (f"from ferret_runtime.kernels import nvrtc; c = nvrtc.compile_lpd({arch}, 'ptx', "
            f"cache=__import__('pathlib').Path({str(tmp_path)!r})); print(c.from_cache, c.path)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.split() == ["True", str(first.path)], proc.stderr


def test_nvrtc_errors_are_named(nvrtc_ok, monkeypatch, tmp_path):
    monkeypatch.setattr(nvrtc, "read_source", lambda: "extern \"C\" __global__ void broken( { }")
    with pytest.raises(nvrtc.KernelCompileError,
                       match="nvrtcCompileProgram: received NVRTC_ERROR_COMPILATION .* expected success"):
        nvrtc.compile_lpd(80, "ptx", cache=tmp_path / "other")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where no CUDA driver is installed")
def test_no_driver_raises_a_named_cuda_error():
    try:
        importlib.import_module("cuda.bindings.driver")  # not `import cuda...`: that would shadow ferret_runtime.cuda
    except ImportError:
        with pytest.raises(cuda.CudaError, match="Received no cuda-python"):
            launch.LpdModule(0)
        return
    with pytest.raises(cuda.CudaError, match=r"cuInit: received (no CUDA driver|CUDA_ERROR_NO_DEVICE)"):
        launch.LpdModule(0)


# ------------------------------------------------------------------------------------------------
# (c) The torch custom op on CPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [3, 5, 7])
@pytest.mark.parametrize("func", FUNCS)
def test_op_on_cpu_equals_reference(func, k):
    x = torch.from_numpy(ties((2, 3, 9, 11), k))
    got = torch.ops.ferret.lpd(x, func, k)
    torch.testing.assert_close(got, lpd_reference(x, LPD_SPECS[func], k), rtol=0, atol=1e-6)
    torch.testing.assert_close(LPD(func, k, impl="op")(x), got, rtol=0, atol=0)


def test_op_compiles_fullgraph():
    x = torch.randn(2, 3, 17, 19)

    def residual(t: torch.Tensor) -> torch.Tensor:
        return t - torch.ops.ferret.lpd(t, "median", 3)

    compiled = torch.compile(residual, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), residual(x), rtol=0, atol=0)
    torch.testing.assert_close(compiled(torch.randn(1, 3, 5, 8)).shape, torch.Size([1, 3, 5, 8]))


@pytest.mark.parametrize("func, k", [("median", 3), ("excmed", 5)])
def test_opcheck(func, k):
    torch.library.opcheck(torch.ops.ferret.lpd.default, (torch.randn(2, 3, 7, 6), func, k))


def test_op_names_bad_inputs():
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ConfigError, match="Received LPD function 'origin'; expected a variant that reconstructs"):
        torch.ops.ferret.lpd(x, "origin", 3)
    with pytest.raises(ConfigError, match="Received LPD window size 4"):
        torch.ops.ferret.lpd(x, "median", 4)
    with pytest.raises(ConfigError, match=r"Received x of shape \(3, 4, 4\); expected \(N, C, H, W\)"):
        torch.ops.ferret.lpd(x[0], "median", 3)


def test_ferretnet_with_the_op_gives_reference_logits_on_cpu(authors_ckpt, reference):
    from ferret_runtime import Detector

    ref = json.loads((reference / "reference_logits.json").read_text())["images"]
    names = sorted(ref)[:2]
    with Detector.open(authors_ckpt, crop=256, lpd_impl="op", device="cpu") as det:
        results = det.predict([reference / "images" / n for n in names])
    for name, r in zip(names, results):
        assert abs(r.logit - ref[name]["logit_center_crop_256"]) <= 1e-4, (name, r.logit)


# ------------------------------------------------------------------------------------------------
# (f) On a GPU: the kernels through the NVRTC launcher and through the op
# ------------------------------------------------------------------------------------------------

GPU_CASES = [((1, 3, 1, 1), k) for k in (3, 5, 7)] + [((2, 3, 3, 5), k) for k in (3, 5, 7)] + \
            [((1, 3, 257, 511), k) for k in (3, 7)] + [((256, 3, 32, 48), 3), ((7, 3, 64, 64), 5)]
GPU_IDS = [f"{'x'.join(map(str, s))}-k{k}" for s, k in GPU_CASES]


def _gpu_input(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    x[..., ::3, ::2] = np.round(x[..., ::3, ::2])  # some ties, and -0 beside +0 (np.round(-0.3) is -0.0)
    return x


def assert_same_bits(got: np.ndarray, want: np.ndarray) -> None:
    """The same bit patterns (uint16/uint32 views), not just equal values: a -0 where the other path gives +0
    is a difference between two device paths (the spec lets only a comparison with torch's reference differ
    in the sign of a zero; see the README)."""
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    view = {2: np.uint16, 4: np.uint32}[got.dtype.itemsize]
    np.testing.assert_array_equal(got.view(view), want.view(view))


def _emulated(x: np.ndarray, func: str, k: int, residual: bool, arch: int) -> np.ndarray:
    """What launch.lpd runs for x (float32 or float16), on the host: the same kernel, grid and code path."""
    kernel = "lpd_residual" if residual and func == "median" and k == 3 else "lpd_generic"
    return host.emulate_lpd(x, launch.launch_config(kernel, x.shape, x.dtype, arch, k), func, k, residual)


def _launch(x: torch.Tensor, func: str, k: int, residual: bool = True) -> torch.Tensor:
    out = torch.empty_like(x)
    module = launch.get_module(x.device.index)
    launch.lpd(module, x.data_ptr(), out.data_ptr(), tuple(x.shape), x.dtype, func, k, residual,
               stream=torch.cuda.current_stream(x.device).cuda_stream)
    torch.cuda.synchronize(x.device)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("shape, k", GPU_CASES, ids=GPU_IDS)
def test_gpu_launcher_bit_for_bit(shape, k, func):
    x = _gpu_input(shape, k)
    want = host.lpd_residual_host(x, func, k)
    got = _launch(torch.from_numpy(x).cuda(), func, k).cpu().numpy()
    assert_same_bits(got, want)  # the same float32 operations as the host build, the same min/max
    if math.prod(shape) < 2**20:
        assert report(f"gpu {func} {shape} k={k} vs torch", got, torch_residual(x, func, k)) <= 2e-6
    rec = _launch(torch.from_numpy(x).cuda(), func, k, residual=False).cpu().numpy()
    assert_same_bits(rec, host.lpd_reconstruct_host(x, func, k))
    # float16: the float32 residual of the float16 values rounded once (numpy's rounding), and the emulation of
    # the kernel this GPU runs (lpd_residual_f16 on packed __half2 pairs from sm_80), bit for bit
    x16 = x.astype(np.float16)
    got16 = _launch(torch.from_numpy(x16).cuda(), func, k).cpu().numpy()
    assert got16.dtype == np.float16
    assert_same_bits(got16, host.lpd_residual_host(x16.astype(np.float32), func, k).astype(np.float16))
    assert_same_bits(got16, _emulated(x16, func, k, True, launch.get_module(0).arch))


@pytest.mark.gpu
@pytest.mark.parametrize("func", FUNCS)
@pytest.mark.parametrize("shape, k", GPU_CASES, ids=GPU_IDS)
def test_gpu_op_equals_cpu(shape, k, func):
    x = torch.from_numpy(_gpu_input(shape, k + 1))
    want = host.lpd_reconstruct_host(x.numpy(), func, k)
    got = torch.ops.ferret.lpd(x.cuda(), func, k)
    assert got.is_cuda and got.is_contiguous()
    assert_same_bits(got.cpu().numpy(), want)
    half = torch.ops.ferret.lpd(x.half().cuda(), func, k).cpu().numpy()  # lpd_generic_f16, rounded once
    assert_same_bits(half, host.lpd_reconstruct_host(x.half().float().numpy(), func, k).astype(np.float16))


@pytest.mark.gpu
def test_gpu_op_handles_views_streams_and_dtypes():
    x = torch.randn(2, 3, 40, 33, device="cuda")
    view = x.transpose(2, 3)  # non-contiguous: copied, not rejected
    # against torch's own reference: values (assert_close), as its median may take the other zero
    torch.testing.assert_close(torch.ops.ferret.lpd(view, "median", 3).cpu(),
                               lpd_reference(view.cpu().contiguous(), LPD_SPECS["median"], 3), rtol=0, atol=0)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # the op launches on PyTorch's current stream
        y = torch.ops.ferret.lpd(x, "excmed", 5)
    stream.synchronize()
    torch.testing.assert_close(y.cpu(), lpd_reference(x.cpu(), LPD_SPECS["excmed"], 5), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="Received x of dtype torch.bfloat16 on CUDA"):
        torch.ops.ferret.lpd(x.bfloat16(), "median", 3)
    assert torch.ops.ferret.lpd(x[:0], "median", 3).shape == (0, 3, 40, 33)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_preprocess_lpd(reference, dtype):
    images = np.concatenate([_images(reference), np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), np.uint8)])
    for batch in (images[:1, :1, :1], images[:2, :3, :5], images, np.repeat(images[:1, :31, :47], 256, axis=0)):
        batch = np.ascontiguousarray(batch)
        n, h, w, _ = batch.shape
        want = host.preprocess_lpd_host(batch)
        np.testing.assert_array_equal(want, torch_residual(normalize(batch), "median", 3))
        img = torch.from_numpy(batch).cuda()
        out = torch.empty((n, 3, h, w), dtype=dtype, device="cuda")
        launch.preprocess_lpd(launch.get_module(img.device.index), img.data_ptr(), out.data_ptr(), batch.shape, dtype,
                              MEAN, STD, stream=torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        got = out.cpu().numpy()
        if dtype == torch.float32:
            assert_same_bits(got, want)
        else:  # each float32 residual rounded once (numpy's rounding), and the emulated preprocess_lpd_f16
            assert_same_bits(got, want.astype(np.float16))
            cfg = launch.launch_config("preprocess_lpd", batch.shape, "float16", launch.get_module(0).arch)
            assert_same_bits(got, host.emulate_preprocess_lpd(batch, cfg))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_normalize(dtype):
    rng = np.random.default_rng(2)
    for shape in [(1, 1, 1, 3), (2, 3, 5, 3), (3, 257, 511, 3), (256, 31, 47, 3)]:
        batch = rng.integers(0, 256, shape, dtype=np.uint8)
        n, h, w, _ = shape
        img = torch.from_numpy(batch).cuda()
        out = torch.empty((n, 3, h, w), dtype=dtype, device="cuda")
        launch.normalize(launch.get_module(img.device.index), img.data_ptr(), out.data_ptr(), shape, dtype, MEAN, STD,
                         stream=torch.cuda.current_stream().cuda_stream)
        torch.cuda.synchronize()
        want = normalize(batch)
        if dtype == torch.float32:
            assert_same_bits(out.cpu().numpy(), want)
        else:
            assert_same_bits(out.cpu().numpy(), want.astype(np.float16))  # one rounding, to nearest even


@pytest.mark.gpu
def test_gpu_nvrtc_cache_survives_a_restart(tmp_path):
    code = ("from ferret_runtime.kernels import launch; m = launch.LpdModule(0); m.function('lpd_residual_f32'); "
            "print(m.compiled['lpd_residual_f32', 0].from_cache); m.close()")
    env = {**__import__("os").environ, "FERRET_CACHE": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env) for _ in range(2)]
    assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
    assert [r.stdout.strip() for r in runs] == ["False", "True"]
    assert len(list((tmp_path / "kernels").glob("lpd-*.cubin"))) == 1


@pytest.mark.gpu
def test_gpu_ferretnet_with_the_op_gives_reference_logits(authors_ckpt, reference):
    from ferret_runtime import Detector

    ref = json.loads((reference / "reference_logits.json").read_text())["images"]
    names = sorted(ref)
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 as on the CPU
    try:
        with Detector.open(authors_ckpt, crop=256, lpd_impl="op", device="cuda") as det:
            results = det.predict([reference / "images" / n for n in names])
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    for name, r in zip(names, results):
        assert r.error is None
        assert abs(r.logit - ref[name]["logit_center_crop_256"]) <= 1e-4, (name, r.logit)


# ------------------------------------------------------------------------------------------------
# (g) First-run risks: PTX newer than the driver, an unwritable cache, cold compiles
# ------------------------------------------------------------------------------------------------


def test_nvrtc_newer_than_the_driver_is_refused_in_one_line():
    with pytest.raises(cuda.CudaError, match=r"^Received NVRTC 13\.5 PTX for a driver of CUDA 13\.0; "
                                             r"expected a driver for CUDA 13\.5 or newer, "
                                             r"or pip install 'nvidia-cuda-nvrtc==13\.0\.\*'$"):
        nvrtc.check_nvrtc_driver("ptx", (13, 5), (13, 0))
    nvrtc.check_nvrtc_driver("cubin", (13, 5), (13, 0))  # CUBINs load within a major version
    nvrtc.check_nvrtc_driver("ptx", (13, 0), (13, 2))
    with pytest.raises(cuda.CudaError,
                       match=r"Received NVRTC 14\.0 CUBINs for a driver of CUDA 13\.0; .*'nvidia-cuda-nvrtc<14'"):
        nvrtc.check_nvrtc_driver("cubin", (14, 0), (13, 0))


def test_plugin_ptx_refused_on_an_older_driver(monkeypatch, tmp_path):
    from ferret_export.tensorrt import plugin as trt_plugin

    monkeypatch.setattr(trt_plugin, "driver_version", lambda: (13, 0))
    monkeypatch.setattr(trt_plugin, "nvrtc_version", lambda: (13, 5))
    with pytest.raises(cuda.CudaError, match=r"NVRTC 13\.5 PTX for a driver of CUDA 13\.0"):
        trt_plugin.compile_trt_ptx(cache=tmp_path)


def test_unwritable_cache_falls_back(monkeypatch, tmp_path):
    from ferret_runtime import kernels

    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")  # a file where a folder should be: unwritable even for root
    monkeypatch.setenv("FERRET_CACHE", str(blocked / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocked / "b"))
    monkeypatch.setattr(kernels.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert kernels.cache_dir() == tmp_path / "tmp" / f"ferret-{kernels._user()}" / "kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kernels.cache_dir() == tmp_path / "xdg" / "ferret" / "kernels"
    assert kernels.write_atomic(blocked / "x" / "y.bin", b"data") is False  # never raises


def test_compile_with_an_unwritable_cache(nvrtc_ok, tmp_path):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    built = nvrtc.compile_lpd(90, "cubin", cache=blocked / "kernels", kernels=("lpd_residual_f32",))
    assert not built.from_cache and built.data[:4] == b"\x7fELF" and not built.path.exists()


def test_only_the_needed_kernel_is_compiled(nvrtc_ok, tmp_path):
    # the cold start of the median 3x3 path builds one kernel, not all of them: measured by what NVRTC
    # emits, not by a wall time (that depends on the machine)
    one = nvrtc.compile_lpd(90, "ptx", cache=tmp_path, kernels=("lpd_residual_f32",))
    assert re.findall(r"\.entry (\w+)", one.data.decode()) == ["lpd_residual_f32"]
    every = nvrtc.compile_lpd(90, "ptx", cache=tmp_path)
    assert len(re.findall(r"\.entry (\w+)", every.data.decode())) == 2 * len(launch.KERNELS)
    assert 4 * len(one.data) < len(every.data)
    k5 = nvrtc.compile_lpd(90, "ptx", cache=tmp_path, kernels=("lpd_generic_f32",), window=5).data.decode()
    assert "lpd_generic_f32" in k5 and len(k5) < len(nvrtc.compile_lpd(90, "ptx", cache=tmp_path,
                                                                        kernels=("lpd_generic_f32",)).data)


@pytest.mark.parametrize("kernel, window", [("trt_lpd_residual_f16", 0), ("trt_lpd_generic_f32", 3),
                                            ("trt_lpd_generic_f16", 7)])
def test_plugin_node_ptx_is_small(nvrtc_ok, tmp_path, kernel, window):
    from ferret_export.tensorrt import plugin as trt_plugin

    ptx = trt_plugin.compile_trt_ptx(cache=tmp_path, kernels=(kernel,), window=window)
    assert re.findall(rb"\.entry (\w+)", ptx) == [kernel.encode()] and len(ptx) <= 200_000, len(ptx)


def test_launch_configs_are_cached_per_shape():
    a = launch.launch_config("lpd_residual", (8, 3, 224, 224), "float32", 90)
    assert launch.launch_config("lpd_residual", (8, 3, 224, 224), np.float32, "sm_90") is a


def test_launch_argument_arrays_are_built_once_per_argument_set():
    # no driver needed: a module whose driver records cuLaunchKernel's kernel-parameter pointer
    import contextlib
    import types

    calls = []
    drv = types.SimpleNamespace(CUstream=int, cuLaunchKernel=lambda *a: (calls.append(a), (0,))[1])
    module = object.__new__(launch.LpdModule)
    module.arch, module._drv, module._params = 90, drv, {}
    module.function = lambda name, window=0: name
    module.current = contextlib.nullcontext
    cfg = launch.launch_config("lpd_residual", (1, 3, 64, 64), "float32", 90)
    for _ in range(3):
        module.launch(cfg, (0x1000, 0x2000, 1, 3, 64, 64))
    module.launch(cfg, (0x3000, 0x2000, 1, 3, 64, 64))
    assert [c[0] for c in calls] == ["lpd_residual_f32"] * 4 and len({c[-2] for c in calls[:3]}) == 1
    assert calls[3][-2] != calls[0][-2] and len(module._params) == 2
    import ctypes
    ptrs = (ctypes.c_void_p * 6).from_address(calls[0][-2])
    assert ctypes.c_int.from_address(ptrs[4]).value == 64 and ctypes.c_void_p.from_address(ptrs[0]).value == 0x1000
    with pytest.raises(ConfigError, match="Received 5 arguments for lpd_residual_f32; expected 6"):
        module.launch(cfg, (0x1000, 0x2000, 1, 3, 64))
