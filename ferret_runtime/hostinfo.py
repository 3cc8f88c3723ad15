"""What the CPU at hand can do at most: its float32 fused multiply-add (FMA) peak, read from the CPU's own flags.

``fma_peak()`` is the ceiling a CPU benchmark is measured against: a network of ``M`` multiply-accumulates
(MACs) per image cannot run faster than ``fma_peak().macs_per_s / M`` images per second on the usable cores.
The figure is ``cores x FMA units per core x float32 lanes per unit x clock``:

- lanes, from ``/proc/cpuinfo``'s ``flags``: ``avx512f`` -> 16, ``avx2`` and ``fma`` -> 8, any other x86 -> 4
  (SSE, no FMA: one multiply port and one add port give about one MAC per lane per cycle, counted as one unit);
- FMA units per core: 2, the number current server cores issue per cycle (Intel Xeon Gold/Platinum since
  Skylake-SP, AMD Zen 2 and newer on 256-bit). That is an assumption, not a flag: Xeon Silver/Bronze have one
  512-bit unit (``FERRET_FMA_UNITS=1`` corrects it for such a host). AMD Zen 4 (``AuthenticAMD``, ``cpu family``
  25 with ``avx512f``) runs a 512-bit FMA as two halves on its two 256-bit units: it is counted as 1 unit of 16
  lanes, the same 32 MACs per cycle as its AVX2 figure (Zen 5, family 26, has full-width 512-bit units);
- clock: ``cpufreq/base_frequency`` (intel_pstate), else ``cpufreq/cpuinfo_max_freq``, else the ``@ 2.60GHz``
  in ``model name``, else ``cpu MHz``;
- cores: the usable CPUs (``os.sched_getaffinity``) counted once per physical core (``physical id`` and
  ``core id`` in ``/proc/cpuinfo``), since two hyperthreads share one core's FMA units.

A host whose ``/proc/cpuinfo`` has no x86 ``flags`` line (ARM, another OS) gives lanes ``None``: the peak is
"unknown", never a guessed number. Example: a 2-core AVX-512 Xeon at 2.6 GHz gives 2 x 2 x 16 x 2.6e9 =
166.4 GMAC/s, so FerretNet-B at 2.34 GMAC/image peaks at about 71 images/s.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
CPUFREQ = Path("/sys/devices/system/cpu/cpu0/cpufreq")
DEFAULT_FMA_UNITS = 2


@dataclass(frozen=True)
class FmaPeak:
    """The float32 FMA ceiling of the usable cores; ``lanes`` or ``ghz`` None means it is unknown."""

    cores: int
    fma_units: int
    lanes: int | None
    ghz: float | None
    source: str

    @property
    def macs_per_s(self) -> float | None:
        """Multiply-accumulates per second at most, or None when lanes or clock are unknown."""
        if self.lanes is None or self.ghz is None:
            return None
        return self.cores * max(1, self.fma_units) * self.lanes * self.ghz * 1e9

    def images_per_s(self, macs_per_image: float) -> float | None:
        """The most images per second a network of ``macs_per_image`` MACs could reach here."""
        peak = self.macs_per_s
        return None if peak is None or macs_per_image <= 0 else peak / macs_per_image

    def describe(self) -> str:
        """One line: the product and its parts, or why it is unknown."""
        if self.macs_per_s is None:
            what = "SIMD lanes" if self.lanes is None else "clock"
            return f"FMA peak unknown ({what} not found: {self.source}); {self.cores} usable cores"
        units = f"{self.fma_units} FMA" if self.fma_units else "no FMA (mul+add)"
        return (f"FMA peak {self.macs_per_s / 1e9:.1f} GMAC/s = {self.cores} cores x {units} x {self.lanes} "
                f"float32 lanes x {self.ghz:.2f} GHz ({self.source})")


def _fields(block: str) -> dict[str, str]:
    out = {}
    for line in block.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _processors(cpuinfo: str) -> list[dict[str, str]]:
    """One dict per ``processor`` block (x86 and ARM both separate blocks by a blank line)."""
    blocks = [_fields(b) for b in re.split(r"\n\s*\n", cpuinfo)]
    return [b for b in blocks if "processor" in b and b["processor"].isdigit()]


ZEN4 = ("AuthenticAMD", "25")  # vendor_id and cpu family of AMD Zen 3/Zen 4; only Zen 4 has avx512f


def _lanes(flags: set[str], cpu: tuple[str, str] = ("", "")) -> tuple[int, int, str]:
    """(float32 lanes, FMA units counted per core before the override, flag that decided it) for ``flags`` of a
    CPU of (vendor_id, cpu family)."""
    if "avx512f" in flags:
        if cpu == ZEN4:
            return 16, 1, "avx512f (Zen 4: 512-bit FMAs as two 256-bit halves)"
        return 16, DEFAULT_FMA_UNITS, "avx512f"
    if "avx2" in flags and "fma" in flags:
        return 8, DEFAULT_FMA_UNITS, "avx2+fma"
    return 4, 0, "sse, no fma"


def _read_khz(path: Path) -> float | None:
    try:
        return int(path.read_text().strip()) / 1e6
    except (OSError, ValueError):
        return None


def _clock(first: dict[str, str], cpufreq: Path | None) -> tuple[float | None, str]:
    """GHz and where it came from, in the order the module docstring gives."""
    if cpufreq is not None:
        for name in ("base_frequency", "cpuinfo_max_freq"):
            ghz = _read_khz(cpufreq / name)
            if ghz:
                return ghz, f"cpufreq {name}"
    match = re.search(r"@\s*([0-9.]+)\s*GHz", first.get("model name", ""))
    if match:
        return float(match.group(1)), "model name"
    try:
        mhz = float(first.get("cpu MHz", ""))
    except ValueError:
        mhz = 0.0
    if mhz > 0:
        return mhz / 1e3, "cpu MHz"
    return None, "no clock in cpufreq or /proc/cpuinfo"


def _fma_units(default: int, env: dict[str, str]) -> tuple[int, str]:
    raw = env.get("FERRET_FMA_UNITS", "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw), "FERRET_FMA_UNITS"
    return default, "assumed"


def fma_peak(cpuinfo: str | None = None, usable: set[int] | None = None, *,
             cpufreq: Path | None = CPUFREQ, env: dict[str, str] | None = None) -> FmaPeak:
    """This host's float32 FMA peak (see the module docstring). The arguments exist for tests: the text of a
    ``/proc/cpuinfo``, the usable CPU numbers, the cpufreq folder (None: none) and the environment."""
    env = dict(os.environ) if env is None else env
    if cpuinfo is None:
        try:
            cpuinfo = CPUINFO.read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    procs = _processors(cpuinfo)
    if usable is None:
        try:
            usable = set(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            usable = set(range(os.cpu_count() or 1))
    mine = [p for p in procs if int(p["processor"]) in usable] or procs
    if mine and all("core id" in p for p in mine):
        cores = len({(p.get("physical id", "0"), p["core id"]) for p in mine})
    else:
        cores = len(mine) or len(usable) or 1
    first = mine[0] if mine else {}
    if "flags" not in first:  # not x86 (ARM lists "Features"): no rule here would give a true number
        units, _ = _fma_units(DEFAULT_FMA_UNITS, env)
        return FmaPeak(cores, units, None, None, "no x86 flags in /proc/cpuinfo")
    lanes, units, flag = _lanes(set(first["flags"].split()), (first.get("vendor_id", ""), first.get("cpu family", "")))
    if units:
        units, how = _fma_units(units, env)
    else:
        how = "no fma flag"
    ghz, clock_src = _clock(first, cpufreq)
    return FmaPeak(cores, units, lanes, ghz, f"{flag}; {units} FMA units {how}; clock from {clock_src}")
