"""hostinfo.fma_peak: parsed from fixture /proc/cpuinfo texts, checked against numbers derived by hand."""

from __future__ import annotations

import math

import pytest

from ferret_runtime.hostinfo import FmaPeak, fma_peak

XEON_FLAGS = "fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512cd avx512bw avx512vl"
EPYC_FLAGS = "fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 sha_ni"


def _block(n: int, core: int, flags: str, model: str, mhz: str, phys: int = 0, vendor: str = "x",
           family: str = "6") -> str:
    return (f"processor\t: {n}\nvendor_id\t: {vendor}\ncpu family\t: {family}\n"
            f"model name\t: {model}\ncpu MHz\t\t: {mhz}\n"
            f"physical id\t: {phys}\ncore id\t\t: {core}\nflags\t\t: {flags}\n")


# Two physical cores with two hyperthreads each (processors 0,2 on core 0; 1,3 on core 1), as Linux lists them.
XEON = "\n".join(_block(n, n % 2, XEON_FLAGS, "Intel(R) Xeon(R) Platinum 8259CL CPU @ 2.60GHz", "3100.000")
                 for n in range(4))
# An EPYC with no "@ GHz" in its model name: the clock comes from "cpu MHz".
EPYC = "\n".join(_block(n, n, EPYC_FLAGS, "AMD EPYC 7R32", "2799.998") for n in range(8))
ARM = "\n".join(f"processor\t: {n}\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32\n"
                f"CPU implementer\t: 0x41\nCPU part\t: 0xd0c\n" for n in range(4))
OLD = _block(0, 0, "fpu sse sse2 ssse3 sse4_1 sse4_2 avx", "Intel(R) Xeon(R) CPU E5-2670 0 @ 2.60GHz", "2600.0")


def test_avx512_xeon_hyperthreads_counted_once():
    # The example: 2 cores x 2 FMA units x 16 lanes x 2.6 GHz = 166.4e9 MAC/s;
    # FerretNet-B at 2.34e9 MAC/image -> 166.4 / 2.34 = 71.11 images/s.
    peak = fma_peak(XEON, {0, 1, 2, 3}, cpufreq=None, env={})
    assert (peak.cores, peak.fma_units, peak.lanes, peak.ghz) == (2, 2, 16, 2.6)
    assert math.isclose(peak.macs_per_s, 166.4e9)
    assert math.isclose(peak.images_per_s(2.34e9), 71.111, rel_tol=1e-4)
    assert "166.4 GMAC/s" in peak.describe() and "model name" in peak.describe()
    # Only one hyperthread of each core usable: still two cores; both threads of one core: one core.
    assert fma_peak(XEON, {0, 1}, cpufreq=None, env={}).cores == 2
    assert fma_peak(XEON, {0, 2}, cpufreq=None, env={}).cores == 1


def test_avx2_epyc_clock_from_cpu_mhz_and_affinity():
    peak = fma_peak(EPYC, {0, 1}, cpufreq=None, env={})
    # 2 cores x 2 x 8 lanes x 2.799998 GHz = 89.599936e9
    assert (peak.cores, peak.fma_units, peak.lanes) == (2, 2, 8)
    assert math.isclose(peak.macs_per_s, 89.599936e9)
    assert "cpu MHz" in peak.source


def test_zen4_avx512_counts_one_512_bit_unit():
    # Zen 4 (AuthenticAMD family 25) double-pumps 512-bit FMAs: 2 cores x 1 unit x 16 lanes x 2.6 GHz = 83.2e9,
    # the same as its AVX2 figure (2 x 2 x 8 x 2.6e9); Zen 5 (family 26) keeps 2 full-width units.
    zen4 = "\n".join(_block(n, n, XEON_FLAGS, "AMD EPYC 9R14 96-Core Processor", "2600.000", vendor="AuthenticAMD",
                            family="25") for n in range(2))
    peak = fma_peak(zen4, {0, 1}, cpufreq=None, env={})
    assert (peak.cores, peak.fma_units, peak.lanes) == (2, 1, 16)
    assert math.isclose(peak.macs_per_s, 83.2e9) and "Zen 4" in peak.source
    assert fma_peak(zen4.replace("family\t: 25", "family\t: 26"), {0, 1}, cpufreq=None, env={}).fma_units == 2
    assert fma_peak(zen4, {0, 1}, cpufreq=None, env={"FERRET_FMA_UNITS": "2"}).fma_units == 2


def test_cpufreq_base_frequency_wins_and_env_override(tmp_path):
    (tmp_path / "cpuinfo_max_freq").write_text("3500000\n")
    (tmp_path / "base_frequency").write_text("2100000\n")
    peak = fma_peak(XEON, {0, 1, 2, 3}, cpufreq=tmp_path, env={"FERRET_FMA_UNITS": "1"})
    # 2 cores x 1 unit (overridden) x 16 x 2.1 GHz = 67.2e9
    assert (peak.fma_units, peak.ghz) == (1, 2.1)
    assert math.isclose(peak.macs_per_s, 67.2e9)
    assert "FERRET_FMA_UNITS" in peak.source and "base_frequency" in peak.source
    (tmp_path / "base_frequency").unlink()
    assert fma_peak(XEON, {0}, cpufreq=tmp_path, env={"FERRET_FMA_UNITS": "junk"}).ghz == 3.5


def test_arm_is_unknown_not_a_number():
    peak = fma_peak(ARM, {0, 1, 2, 3}, cpufreq=None, env={})
    assert peak.lanes is None and peak.macs_per_s is None and peak.images_per_s(1e9) is None
    assert peak.cores == 4
    assert peak.describe().startswith("FMA peak unknown")


def test_no_fma_host_is_sse_one_mac_per_lane():
    peak = fma_peak(OLD, {0}, cpufreq=None, env={"FERRET_FMA_UNITS": "2"})
    # avx without avx2/fma: 4 lanes, no FMA (the override applies to FMA units only): 1 x 4 x 2.6 GHz
    assert (peak.cores, peak.fma_units, peak.lanes) == (1, 0, 4)
    assert math.isclose(peak.macs_per_s, 10.4e9)
    assert "no FMA" in peak.describe()


def test_this_host_gives_a_line():
    peak = fma_peak()
    assert isinstance(peak, FmaPeak) and peak.cores >= 1
    assert peak.describe() and "\n" not in peak.describe()


@pytest.mark.parametrize("text", ["", "garbage without colons\n\n"])
def test_empty_cpuinfo_is_unknown(text):
    assert fma_peak(text, {0, 1}, cpufreq=None, env={}).macs_per_s is None
