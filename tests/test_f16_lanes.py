"""float16 in lpd.cu as the GPU stores it, run on the CPU (issue 21, part 5).

The float16 kernels load, convert, pack and store halves with single PTX instructions (cvt.f32.f16,
cvt.rn.f16.f32, cvt.rn.f16x2.f32, mov.b32 {lo, hi}, min/max.f16x2, __byte_perm, vector loads and
stores). The host build implements each of them bit for bit, and the code around them (which value goes
to which lane, which half to which row, which byte a word holds) is the same code the device compiles.
Here: each instruction against its specification (numpy's IEEE rounding, the PTX ISA and CUDA docs),
the float16 kernels emulated with real halves against numpy's rounding of the float32 result, and lpd.cu
built with a lane swapped, or a byte picked wrong, in that shared code: the same checks then fail.
"""

from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

from ferret_runtime.kernels import host, launch, read_source
from ferret_runtime.preprocess import normalize


def f16(x: np.ndarray) -> np.ndarray:
    """numpy's float32 -> float16 (IEEE round to nearest even) as bits: the reference for cvt.rn.f16.f32."""
    return np.asarray(x, np.float32).astype(np.float16).view(np.uint16)


def assert_same_bits(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    view = {2: np.uint16, 4: np.uint32}[got.dtype.itemsize]
    np.testing.assert_array_equal(got.view(view), want.view(view))


# ------------------------------------------------------------------------------------------------
# The instructions, as the host build implements them, against their specifications
# ------------------------------------------------------------------------------------------------


def test_cvt_rn_f16_f32_rounds_to_nearest_even():
    # every float16 value, every midpoint between two neighbours (a tie) and the float32 values either side of
    # it, the subnormals, the overflow threshold (65520: a tie whose even neighbour is inf), both signs, and a
    # million random float32 bit patterns
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float32)
    mids = ((halves[:-1].astype(np.float64) + halves[1:]) / 2).astype(np.float32)  # exact: 12 significant bits
    near = np.concatenate([mids, np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf)), halves,
                           np.float32([65504, 65519.99, 65520, 65536, 1e30, np.inf, 2.0**-25, 2.0**-26, 1e-30])])
    random = np.random.default_rng(0).integers(0, 2**32, 1_000_000, dtype=np.uint32).view(np.float32)
    x = np.concatenate([near, -near, random[~np.isnan(random)]])
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(host.f16_bits(x), f16(x))
    assert host.f16_bits(np.float32([2.0**-25, 3 * 2.0**-25, 65520]).tolist()).tolist() == [0x0000, 0x0002, 0x7C00]
    nan = host.f16_bits(np.float32([np.nan, -np.nan]))
    assert nan.tolist() == [0x7FFF, 0x7FFF]  # the canonical NaN (no payload is specified)


def test_cvt_f32_f16_is_exact():
    bits = np.arange(2**16, dtype=np.uint16)
    got, want = host.f16_to_f32(bits), bits.view(np.float16).astype(np.float32)
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(got.view(np.uint32)[finite], want.view(np.uint32)[finite])
    assert np.isnan(got[~finite]).all() and (~finite).sum() == 2 * 1023


def test_cvt_rn_f16x2_f32_puts_its_first_operand_in_the_upper_half():
    # PTX ISA, cvt: "the value converted from input a is stored in the upper half of d and the value
    # converted from input b is stored in the lower half of d"
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(10_000).astype(np.float32), rng.standard_normal(10_000).astype(np.float32)
    want = f16(a).astype(np.uint32) << 16 | f16(b).astype(np.uint32)
    np.testing.assert_array_equal(host.cvt_f16x2(a, b), want)
    assert host.cvt_f16x2(np.float32([1.0]), np.float32([2.0])).tolist() == [0x3C004000]


def test_pack_and_unpack_keep_lane_0_in_bits_0_to_15():
    # __half2 holds .x (lane 0) in the low 16 bits; lpd.cu's ferret_pack(lane0, lane1) and ferret_unpack
    rng = np.random.default_rng(2)
    lane0 = rng.standard_normal(10_000).astype(np.float16).astype(np.float32)
    lane1 = rng.standard_normal(10_000).astype(np.float16).astype(np.float32)
    packed = host.pack_f16x2(lane0, lane1)
    np.testing.assert_array_equal(packed, f16(lane0).astype(np.uint32) | f16(lane1).astype(np.uint32) << 16)
    back0, back1 = host.unpack_f16x2(packed)
    np.testing.assert_array_equal(back0, lane0)
    np.testing.assert_array_equal(back1, lane1)


def byte_perm_spec(x: int, y: int, s: int) -> int:
    """CUDA's __byte_perm: result byte n = input byte s<4n+2:4n>, input bytes 0..3 from x, 4..7 from y."""
    data = (y << 32 | x).to_bytes(8, "little")
    return int.from_bytes(bytes(data[(s >> (4 * n)) & 7] for n in range(4)), "little")


def test_byte_perm_follows_its_selector_nibbles():
    rng = np.random.default_rng(3)
    x, y, s = (rng.integers(0, 2**32, 5000, dtype=np.uint32) for _ in range(3))  # s's unused bits set too
    got = host.byte_perm(x, y, s)
    assert got.tolist() == [byte_perm_spec(int(a), int(b), int(c)) for a, b, c in zip(x, y, s)]
    # what normalize asks for: byte k of w, then zeros (y = 0)
    w = np.full(4, 0x44332211, np.uint32)
    assert host.byte_perm(w, np.zeros(4, np.uint32), 0x4440 + np.arange(4, dtype=np.uint32)).tolist() == \
        [0x11, 0x22, 0x33, 0x44]


ZEROS_AND_NAN = np.float32([0.0, -0.0, np.nan, 1.0, -1.0, np.inf, -np.inf, 1e-45])


@pytest.mark.parametrize("op", ["min", "max"])
def test_float_min_max_order_minus_zero_below_plus_zero(op):
    # FMNMX (fminf/fmaxf, PTX min/max.f32): IEEE 754-2019 minimumNumber/maximumNumber. -0 < +0 whatever the
    # operand order (x86's MINSS, and so C's fminf on the host, return an operand by its position)
    a, b = (m.ravel() for m in np.meshgrid(ZEROS_AND_NAN, ZEROS_AND_NAN))
    got = host.minmax_f32(a, b, op)
    with np.errstate(invalid="ignore"):
        want = (np.fmin if op == "min" else np.fmax)(a, b)  # the NaN rule; zeros: numpy's fmin takes either
    zeros = (a == 0) & (b == 0)
    want[zeros] = np.where(np.signbit(a[zeros]) | np.signbit(b[zeros]), -0.0, 0.0) if op == "min" else \
        np.where(~np.signbit(a[zeros]) | ~np.signbit(b[zeros]), 0.0, -0.0)
    both_nan = np.isnan(a) & np.isnan(b)
    np.testing.assert_array_equal(got[~both_nan].view(np.uint32), want[~both_nan].view(np.uint32))
    assert got[both_nan].view(np.uint32).tolist() == [0x7FFFFFFF]  # the canonical NaN
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((2, 10_000)).astype(np.float32)
    np.testing.assert_array_equal(host.minmax_f32(a, b, op), (np.minimum if op == "min" else np.maximum)(a, b))


@pytest.mark.parametrize("op", ["min", "max"])
def test_half2_min_max_work_lane_by_lane_as_the_float_ones(op):
    # min.f16x2/max.f16x2 (HMNMX2): each lane as FMNMX would on its value, sign of zero and NaN included
    rng = np.random.default_rng(5)
    values = np.concatenate([ZEROS_AND_NAN, rng.standard_normal(200).astype(np.float32)]).astype(np.float16)
    a = rng.choice(values, (2, 20_000))
    b = rng.choice(values, (2, 20_000))
    pa = a[0].view(np.uint16).astype(np.uint32) | a[1].view(np.uint16).astype(np.uint32) << 16
    pb = b[0].view(np.uint16).astype(np.uint32) | b[1].view(np.uint16).astype(np.uint32) << 16
    got = host.minmax_f16x2(pa, pb, op)
    for lane in (0, 1):
        want = host.minmax_f32(a[lane].astype(np.float32), b[lane].astype(np.float32), op)
        lane_bits = (got >> (16 * lane) & 0xFFFF).astype(np.uint16)
        nan = np.isnan(want)
        np.testing.assert_array_equal(lane_bits[~nan], f16(want[~nan]))
        assert (lane_bits[nan] == 0x7FFF).all()


# ------------------------------------------------------------------------------------------------
# The float16 kernels, emulated with halves in the device's lanes
# ------------------------------------------------------------------------------------------------


def residual_input(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """float16 values with ties and signed zeros (the 0 pad against -0 inputs)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float16)
    x[..., ::3, ::2] = np.round(x[..., ::3, ::2])  # ties, and -0.0
    return x


RESIDUAL_SHAPES = [(1, 2, 200, 200), (1, 1, 131, 201)]  # interior and edge tiles; every tile an edge tile


@pytest.mark.parametrize("arch", [75, 80])  # one output at a time on floats; packed __half2 pairs
@pytest.mark.parametrize("shape", RESIDUAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_residual_f16_is_the_float_residual_rounded_once(shape, arch):
    x = residual_input(shape, 7)
    got = host.emulate_lpd(x, launch.launch_config("lpd_residual", shape, "float16", arch))
    assert (host.emulated_interior_blocks() > 0) == (shape[-1] % 4 == 0)
    assert_same_bits(got, host.lpd_residual_host(x.astype(np.float32)).astype(np.float16))


@pytest.mark.parametrize("k", [3, 5, 7])
def test_generic_f16_is_the_float_result_rounded_once(k):
    x = residual_input((2, 3, 37, 45), k)
    for func, residual in (("median", True), ("excmed", False), ("min", True), ("avg", False)):
        got = host.emulate_lpd(x, launch.launch_config("lpd_generic", x.shape, "float16", 80, k), func, k, residual)
        call = host.lpd_residual_host if residual else host.lpd_reconstruct_host
        assert_same_bits(got, call(x.astype(np.float32), func, k).astype(np.float16))


@pytest.mark.parametrize("shape", [(2, 200, 300, 3), (1, 131, 201, 3)], ids=lambda s: "x".join(map(str, s)))
def test_preprocess_lpd_f16_stores_row_pairs_in_their_rows(shape):
    # interior tiles convert two rows of a column with one cvt.rn.f16x2.f32 and store each half in its row
    images = np.random.default_rng(8).integers(0, 256, shape, dtype=np.uint8)
    got = host.emulate_preprocess_lpd(images, launch.launch_config("preprocess_lpd", shape, "float16", 90))
    assert (host.emulated_interior_blocks() > 0) == (shape[2] % 4 == 0)
    assert_same_bits(got, host.preprocess_lpd_host(images).astype(np.float16))


@pytest.mark.parametrize("shape", [(2, 40, 70, 3), (1, 5, 3, 3)], ids=lambda s: "x".join(map(str, s)))
def test_normalize_f16_vector_stores_keep_pixel_order(shape):
    # H*W % 4 == 0: 3 words per 4 pixels, bytes picked by __byte_perm, each channel's 4 halves as two packed
    # words in one 8-byte store; the other shape goes pixel by pixel
    images = np.random.default_rng(9).integers(0, 256, shape, dtype=np.uint8)
    got = host.emulate_normalize(images, launch.launch_config("normalize", shape, "float16", 90))
    assert_same_bits(got, normalize(images).astype(np.float16))


# ------------------------------------------------------------------------------------------------
# Mutations of the code the device and the host share: the checks above must fail on each
# ------------------------------------------------------------------------------------------------

MUTATIONS = {  # name: (text in lpd.cu, its replacement, the check that must now fail)
    "ferret_pack swaps its lanes": (
        "p.bits = ferret_cvt_f16x2(lane1, lane0);", "p.bits = ferret_cvt_f16x2(lane0, lane1);", "residual_sm80"),
    "ferret_unpack swaps its lanes": (
        "lane0 = ferret_h2f(lo);\n    lane1 = ferret_h2f(hi);", "lane0 = ferret_h2f(hi);\n    lane1 = ferret_h2f(lo);",
        "residual_sm80"),
    "a masked centre pair packed the other way": (
        "ferret_pack(a_prev, a0, a);", "ferret_pack(a0, a_prev, a);", "residual_sm80"),
    "the float16 vector load swaps the halves of a word": (
        "(unsigned short)w[0], (unsigned short)(w[0] >> 16),", "(unsigned short)(w[0] >> 16), (unsigned short)w[0],",
        "residual_sm75"),
    "ferret_store_rows2 converts its rows the other way": (
        "ferret_halves(ferret_cvt_f16x2(v1, v0), upper_row, lower_row);",
        "ferret_halves(ferret_cvt_f16x2(v0, v1), upper_row, lower_row);", "preprocess"),
    "normalize's float16 store packs pixels 0/1 and 2/3 the other way": (
        "ferret_cvt_f16x2(v[1], v[0]), ferret_cvt_f16x2(v[3], v[2])",
        "ferret_cvt_f16x2(v[0], v[1]), ferret_cvt_f16x2(v[2], v[3])", "normalize"),
    "normalize picks the bytes of a word in the wrong order": (
        "return ferret_byte_perm(w, 0u, 0x4440u + k);", "return ferret_byte_perm(w, 0u, 0x4440u + (3 - k));",
        "normalize"),
}


class Checks:
    """The float16 checks above on fixed inputs, each comparing the emulation's bits with the expected bits
    (computed once, with the real host build)."""

    def __init__(self):
        self.x = residual_input((1, 2, 200, 200), 11)
        self.images = np.random.default_rng(12).integers(0, 256, (1, 200, 300, 3), dtype=np.uint8)
        self.residual = host.lpd_residual_host(self.x.astype(np.float32)).astype(np.float16)
        self.preprocessed = host.preprocess_lpd_host(self.images).astype(np.float16)
        self.normalized = normalize(self.images).astype(np.float16)

    def run(self, name: str) -> None:
        if name.startswith("residual"):
            cfg = launch.launch_config("lpd_residual", self.x.shape, "float16", 80 if name == "residual_sm80" else 75)
            assert_same_bits(host.emulate_lpd(self.x, cfg), self.residual)
        elif name == "preprocess":
            cfg = launch.launch_config("preprocess_lpd", self.images.shape, "float16", 90)
            assert_same_bits(host.emulate_preprocess_lpd(self.images, cfg), self.preprocessed)
        else:
            cfg = launch.launch_config("normalize", self.images.shape, "float16", 90)
            assert_same_bits(host.emulate_normalize(self.images, cfg), self.normalized)


@pytest.fixture(scope="module")
def checks() -> Checks:
    return Checks()


@pytest.fixture(scope="module")
def mutated_libraries(tmp_path_factory):
    """lpd.cu's host build with each mutation, built two at a time (about 4 s each)."""
    source, cache = read_source(), tmp_path_factory.mktemp("mutants")

    def build(name: str):
        old, new, _ = MUTATIONS[name]
        assert source.count(old) == 1, f"{name}: the mutated text is no longer in lpd.cu once: {old!r}"
        return name, host.bind_host_library(host.build_host_library(cache, source=source.replace(old, new)))

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        return dict(pool.map(build, MUTATIONS))


@pytest.mark.parametrize("check", sorted({c for *_, c in MUTATIONS.values()}))
def test_the_checks_pass_on_lpd_cu(checks, check):
    checks.run(check)


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_swapped_lane_fails_the_checks(checks, mutated_libraries, monkeypatch, mutation):
    monkeypatch.setattr(host, "load_host_library", lambda: mutated_libraries[mutation])
    with pytest.raises(AssertionError):
        checks.run(MUTATIONS[mutation][2])
