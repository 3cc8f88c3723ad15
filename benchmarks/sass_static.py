"""Static figures of lpd.cu's kernels, read from the sm_90 CUBIN the runtime loads (no GPU needed).

For each kernel: registers, stack and spill (local memory) bytes, occupancy on sm_90 for the launch
``launch_config`` makes, and instructions per output read from the SASS control flow:

- the SASS is split into basic blocks (leaders: the entry, branch targets, the instruction after a
  branch or EXIT); a branch to an earlier (or the same) address is a backward branch, and its loop is
  the natural loop of its target: the head plus every block that reaches the branch without passing
  through the head. The outermost loops that write outputs (global stores) are the per-plane (or
  per-image) grid-stride loops: the kernels hoist the interior/edge choice out of them, so interior
  tiles run one loop with no bounds checks and border tiles (or unaligned inputs) another;
- hot loop = the one of those with the fewest instructions along its longest path from the head to
  the backward branch (predicated instructions count as executed; an edge-only branch inside it
  counts in full, so the figure is what an interior tile executes per pass, at most);
- an inner, run-time loop (a staging loop) weighs the tile elements each thread stages divided by
  the shared-memory stores in one pass of it (the compile-time loops are unrolled: no inner loop);
- divided by the outputs one thread writes per pass of the hot loop: output values for the LPD
  kernels, RGB pixels (three output values) for ``normalize`` and ``preprocess_lpd``;
- beside it, nothing hidden: ``static_per_output`` is every instruction of the kernel (prologue,
  edge loops, all paths) counted once over the same outputs, and ``loops`` lists each outermost loop
  with its longest path and its whole body (the table's ``edge/out``: the slowest other loop).

``python -m benchmarks.sass_static`` writes ``benchmarks/results/static/sm90.json`` and ``table.txt``
and prints the table; ``--check`` compares a fresh build with the recorded file. Needs NVRTC
(``nvidia-cuda-nvrtc``) and ``cuobjdump`` (the CUDA toolkit, or ``pip install nvidia-cuda-cuobjdump``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ferret_runtime.kernels import launch, nvrtc, source_hash

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "static"
ARCH = 90
# sm_90 limits (CUDA C Programming Guide, "Technical Specifications per Compute Capability")
SM90 = dict(regs=65536, threads=2048, blocks=32, smem=233472, smem_per_block_reserved=1024, reg_unit=256, warp=32)
# Goals from the issue: instructions per output (per RGB pixel for the NHWC kernels), occupancy, spills.
GOALS = {"lpd_residual": {"instructions_per_output": 50, "occupancy": 0.75},
         "normalize": {"instructions_per_output": 20}}
BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?(?:BRA|JMP)(?:\.\w+)*\s+(?:`?\(?\.?\w*\)?\s*)?(0x[0-9a-f]+)")


@dataclass(frozen=True)
class KernelFigures:
    """What one kernel costs, statically."""

    name: str
    registers: int
    stack_bytes: int
    local_bytes: int
    block_threads: int
    shared_bytes: int
    occupancy: float  # resident warps / 64 on sm_90
    loop_instructions: float  # the hot loop's longest path (interior tiles), inner loops weighted
    outputs_per_pass: int  # outputs (RGB pixels for NHWC kernels) one thread writes per pass of the hot loop
    instructions_per_output: float  # loop_instructions / outputs_per_pass: the figure
    total_instructions: int  # every instruction of the kernel (all paths, prologue, edge loops), once
    static_per_output: float  # total_instructions / outputs_per_pass: nothing left out
    loops: list  # every outermost loop (LoopFigures as dicts): the edge loops' figures beside the hot one


def find_tool(name: str) -> str:
    """``name`` on PATH, else in the nvidia-cuda-* wheels (nvidia/cu13/bin)."""
    found = shutil.which(name)
    if found:
        return found
    for base in map(Path, sys.path):
        for candidate in base.glob(f"nvidia/cu*/bin/{name}"):
            return str(candidate)
    raise FileNotFoundError(f"Received no {name} on PATH or in the nvidia wheels; expected the CUDA toolkit or "
                            f"`pip install nvidia-cuda-{name}`")


def build_cubin(arch: int = ARCH, kernels: tuple[str, ...] | None = None, window: int = 0) -> bytes:
    """lpd.cu compiled by NVRTC for sm_{arch} as the runtime compiles it (no disk cache): ``kernels`` only,
    lpd_generic for ``window`` only, as LpdModule loads them."""
    with tempfile.TemporaryDirectory() as tmp:
        return nvrtc.compile_lpd(arch, "cubin", cache=Path(tmp), kernels=kernels, window=window).data


def runtime_builds(arch: int = ARCH) -> list[tuple[str, bytes]]:
    """(label, CUBIN) of each build the runtime loads: one per kernel, lpd_generic one per window."""
    out = []
    for base in launch.KERNELS:
        for s in ("f32", "f16"):
            name = f"{base}_{s}"
            for k in ((3, 5, 7) if base == "lpd_generic" else (0,)):
                out.append((f"lpd_generic{k}_{s}" if k else name, build_cubin(arch, (name,), k)))
    return out


def _cuobjdump(cubin: bytes, *args: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lpd.cubin"
        path.write_bytes(cubin)
        return subprocess.run([find_tool("cuobjdump"), *args, str(path)], check=True, capture_output=True,
                              text=True).stdout


def parse_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    """{function: [(address, instruction), ...]} from ``cuobjdump -sass``."""
    out: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in text.splitlines():
        if m := re.search(r"Function : (\w+)", line):
            current = out.setdefault(m.group(1), [])
        elif current is not None and (m := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)):
            current.append((int(m.group(1), 16), m.group(2)))
    return out


def parse_resources(text: str) -> dict[str, dict[str, int]]:
    """{function: {'REG': 40, 'STACK': 0, 'SHARED': 0, 'LOCAL': 0, ...}} from ``cuobjdump -res-usage``."""
    out: dict[str, dict[str, int]] = {}
    name = None
    for line in text.splitlines():
        if m := re.search(r"Function (\w+):", line):
            name = m.group(1)
        elif name and "REG:" in line:
            out[name] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d\])?):(\d+)", line)}
            name = None
    return out


def _branch(text: str) -> tuple[int | None, bool, bool]:
    """(target, conditional, ends the block) of one instruction: a branch (BRA/JMP), an EXIT (no
    target), or neither (None, False, False)."""
    conditional = text.startswith("@") and not text.startswith("@PT ")
    if m := BRANCH.match(text):
        return int(m.group(1), 16), conditional, True
    if re.match(r"^(?:@!?U?P\w+\s+)?EXIT\b", text):
        return None, conditional, True
    return None, False, False


@dataclass
class Block:
    """A basic block: instructions [start, end) of the function, its successors (block indices)."""

    start: int
    end: int
    succs: list[int]


def basic_blocks(code: list[tuple[int, str]]) -> list[Block]:
    """The control-flow graph: leaders are the entry, branch targets and the instruction after a
    branch or EXIT; a conditional branch or EXIT falls through, an unconditional one does not."""
    index = {a: i for i, (a, _) in enumerate(code)}
    leaders = {0}
    for i, (_, t) in enumerate(code):
        target, _, ends = _branch(t)
        if ends and i + 1 < len(code):
            leaders.add(i + 1)
        if target is not None and target in index:
            leaders.add(index[target])
    starts = sorted(leaders)
    block_of = {s: n for n, s in enumerate(starts)}
    blocks = []
    for n, s in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(code)
        target, conditional, ends = _branch(code[end - 1][1])
        succs = []
        if target is not None and target in index and target != code[end - 1][0]:  # not the `BRA .` padding
            succs.append(block_of[index[target]])
        if (not ends or conditional) and end < len(code):
            succs.append(n + 1)
        blocks.append(Block(s, end, succs))
    return blocks


def natural_loops(blocks: list[Block], code: list[tuple[int, str]]) -> dict[int, set[int]]:
    """{head block: its body (blocks)}: an edge to a block at an earlier or the same address is a
    backward branch, and the loop is its head plus every block that reaches the branch without
    passing through the head (back edges to one head are one loop)."""
    preds: dict[int, list[int]] = {n: [] for n in range(len(blocks))}
    for n, b in enumerate(blocks):
        for s in b.succs:
            preds[s].append(n)
    found: dict[int, set[int]] = {}
    for n, b in enumerate(blocks):
        for h in b.succs:
            if code[blocks[h].start][0] <= code[b.end - 1][0]:
                body = found.setdefault(h, {h})
                stack = [n]
                while stack:
                    m = stack.pop()
                    if m not in body:
                        body.add(m)
                        stack.extend(preds[m])
    return found


def loops(code: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(head, back-branch) address pairs: a branch to an earlier address closes a loop."""
    found = []
    for addr, text in code:
        m = BRANCH.match(text)
        if m and int(m.group(1), 16) < addr:  # not the `BRA .` padding after EXIT
            found.append((int(m.group(1), 16), addr))
    return found


@dataclass(frozen=True)
class LoopFigures:
    """One loop of a kernel: its head and last address, the instructions along its longest path from
    the head to a backward branch (inner loops weighted), and every instruction of its body."""

    head: int
    last: int
    path_instructions: float
    body_instructions: int
    writes_outputs: bool


def _counted(text: str) -> bool:
    return not text.startswith("NOP")


def _opcode(text: str) -> str:
    return next(t for t in text.split() if not t.startswith("@"))


def loop_figures(code: list[tuple[int, str]], staged_per_thread: float) -> list[LoopFigures]:
    """The outermost loops of a function (those inside no other loop), each measured along its longest
    path (an instruction inside an inner, run-time loop weighs the tile elements each thread stages
    divided by the shared-memory stores in one pass of that loop)."""
    blocks = basic_blocks(code)
    nat = natural_loops(blocks, code)

    def instrs(n: int) -> list[str]:
        return [t for _, t in code[blocks[n].start:blocks[n].end]]

    outer = [h for h, body in nat.items() if not any(h2 != h and body <= b2 for h2, b2 in nat.items())]
    out = []
    for h in sorted(outer, key=lambda h: blocks[h].start):
        body = nat[h]
        weight = {n: 1.0 for n in body}
        for h2, inner in nat.items():
            if h2 != h and inner <= body:
                stores = sum(1 for n in inner for t in instrs(n) if _opcode(t).startswith("STS"))
                for n in inner:
                    weight[n] *= staged_per_thread / stores if stores else 1.0
        cost = {n: weight[n] * sum(map(_counted, instrs(n))) for n in body}
        best = _longest(blocks, body, {h2 for h2 in nat if h2 in body}, nat, h, cost)
        latches = [n for n in body if h in blocks[n].succs]
        out.append(LoopFigures(
            code[blocks[h].start][0], max(code[blocks[n].end - 1][0] for n in body),
            round(max(best.get(n, 0.0) for n in latches), 1), sum(_counted(t) for n in body for t in instrs(n)),
            any(_opcode(t).startswith(("STG", "ST.")) for n in body for t in instrs(n))))
    return out


def _longest(blocks: list[Block], body: set[int], heads: set[int], nat: dict[int, set[int]], h: int,
             cost: dict[int, float]) -> dict[int, float]:
    """Longest weighted path from ``h`` to each block of ``body``, over edges that stay in the body and
    are not back edges (an edge into a loop head from that loop's body)."""
    succ = {n: [s for s in blocks[n].succs if s in body and not (s in heads and n in nat[s])] for n in body}
    indeg = {n: 0 for n in body}
    for n in body:
        for s in succ[n]:
            indeg[s] += 1
    ready = [n for n in body if indeg[n] == 0]
    order = []
    while ready:
        n = ready.pop()
        order.append(n)
        for s in succ[n]:
            indeg[s] -= 1
            if indeg[s] == 0:
                ready.append(s)
    best: dict[int, float] = {h: cost[h]}
    for n in order:
        if n not in best:
            continue
        for s in succ[n]:
            best[s] = max(best.get(s, float("-inf")), best[n] + cost[s])
    return best


def hot_loop_count(code: list[tuple[int, str]], staged_per_thread: float) -> tuple[float, int]:
    """(instructions along the hot loop's longest path, inner loops weighted; every instruction of its
    body). The hot loop is, of the outermost loops that write outputs (global stores), the one with the
    shortest path: interior tiles run a loop with no bounds checks where border tiles run another. A
    kernel with no loop (its grid-stride loop proven to run once): the function up to its last EXIT."""
    found = loop_figures(code, staged_per_thread)
    candidates = [f for f in found if f.writes_outputs] or found
    if not candidates:
        body = [(a, t) for a, t in code if _counted(t)]
        last_exit = max(a for a, t in body if t.endswith("EXIT"))
        n = len([1 for a, _ in body if a <= last_exit])
        return float(n), n
    hot = min(candidates, key=lambda f: f.path_instructions)
    return hot.path_instructions, hot.body_instructions


def occupancy(registers: int, threads: int, shared: int) -> float:
    """Resident warps per SM over the maximum (64), from registers, threads and shared memory."""
    warps = math.ceil(threads / SM90["warp"])
    regs_per_warp = math.ceil(max(registers, 1) * SM90["warp"] / SM90["reg_unit"]) * SM90["reg_unit"]
    by_regs = (SM90["regs"] // regs_per_warp) // warps
    by_threads = SM90["threads"] // threads
    by_smem = SM90["smem"] // (shared + SM90["smem_per_block_reserved"]) if shared else SM90["blocks"]
    blocks = min(by_regs, by_threads, by_smem, SM90["blocks"])
    return blocks * warps / (SM90["threads"] // SM90["warp"])


def kernel_model(name: str) -> tuple[int, int, float, int]:
    """(threads per block, dynamic shared bytes, tile elements staged per thread, outputs per thread per pass)
    for kernel ``name`` (e.g. 'lpd_residual_f32') on a large input, from launch.py's launch geometry."""
    base = name.rsplit("_", 1)[0]
    dtype = "float16" if name.endswith("f16") else "float32"
    kernel, k = launch.kernel_family(base)
    shape = (1, 1024, 1024, 3) if kernel in launch.NHWC_KERNELS else (1, 1, 1024, 1024)
    cfg = launch.launch_config(kernel, shape, dtype, ARCH, k)
    threads = math.prod(cfg.block)
    tile_w, tile_h = launch.tile_shape(kernel, k)
    staged = 0.0 if kernel == "normalize" else (tile_w + 2 * (k // 2)) * (tile_h + 2 * (k // 2)) / threads
    if kernel == "preprocess_lpd":
        staged *= 3  # three channel tiles
    outputs = tile_w * tile_h // threads
    return threads, cfg.shared_mem_bytes, staged, outputs


def _function_body(code: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """The instructions of a function, without NOPs and the `BRA .` padding after its last EXIT."""
    return [(a, t) for a, t in code if _counted(t) and not (BRANCH.match(t) and int(BRANCH.match(t).group(1), 16) == a)]


def analyse(cubin: bytes, label: str | None = None) -> list[KernelFigures]:
    """Figures of the kernels in ``cubin`` (``label`` names a build holding one kernel)."""
    sass = parse_sass(_cuobjdump(cubin, "-sass"))
    res = parse_resources(_cuobjdump(cubin, "-res-usage"))
    figures = []
    for name in sorted(sass):
        threads, shared, staged, outputs = kernel_model(label or name)
        r = res[name]
        weighted, _ = hot_loop_count(sass[name], staged)
        total = len(_function_body(sass[name]))
        figures.append(KernelFigures(
            label or name, r["REG"], r["STACK"], r["LOCAL"], threads, shared + r["SHARED"],
            round(occupancy(r["REG"], threads, shared + r["SHARED"]), 3), round(weighted, 1), outputs,
            round(weighted / outputs, 1), total, round(total / outputs, 1),
            [asdict(f) for f in loop_figures(sass[name], staged)]))
    return figures


def goals_met(figures: list[KernelFigures]) -> dict[str, dict[str, bool]]:
    """Each goal of the issue, met or not, for the float32 kernels (float16 figures are reported beside)."""
    by = {f.name: f for f in figures}
    met: dict[str, dict[str, bool]] = {}
    for name, f in by.items():
        base = name.rsplit("_", 1)[0]
        g = met.setdefault(name, {"no_spills": f.stack_bytes == 0 and f.local_bytes == 0})
        for key, bound in GOALS.get(base, {}).items():
            g[key] = getattr(f, key) <= bound if key == "instructions_per_output" else getattr(f, key) >= bound
    for s in ("f32", "f16"):
        pre, norm, res = (by.get(f"{k}_{s}") for k in ("preprocess_lpd", "normalize", "lpd_residual"))
        if pre and norm and res:  # fused <= normalize + the residual of its three channels, per RGB pixel
            met[pre.name]["fused_le_two_pass"] = (pre.instructions_per_output <=
                                                  norm.instructions_per_output + 3 * res.instructions_per_output)
    return met


def table(figures: list[KernelFigures]) -> str:
    met = goals_met(figures)
    lines = [f"{'kernel':22s} {'regs':>4s} {'spill':>5s} {'occup':>6s} {'hot/out':>7s} {'loop':>7s} {'out/pass':>8s} "
             f"{'static/out':>10s} {'edge/out':>8s}  goals"]
    for f in figures:
        goals = ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met[f.name].items())
        others = [lp["path_instructions"] for lp in f.loops if lp["writes_outputs"]
                  and lp["path_instructions"] != f.loop_instructions]
        edge = f"{max(others) / f.outputs_per_pass:8.1f}" if others else f"{'-':>8s}"
        lines.append(f"{f.name:22s} {f.registers:4d} {f.stack_bytes + f.local_bytes:5d} {f.occupancy:6.0%} "
                     f"{f.instructions_per_output:7.1f} {f.loop_instructions:7.1f} {f.outputs_per_pass:8d} "
                     f"{f.static_per_output:10.1f} {edge}  {goals}")
    return "\n".join(lines)


def record(figures: list[KernelFigures], version: tuple[int, int]) -> dict:
    return {"arch": f"sm_{ARCH}", "compiler": f"NVRTC {version[0]}.{version[1]}",
            "source_hash": source_hash(*nvrtc.NVRTC_OPTIONS), "method": __doc__.split("\n\n")[1].strip(),
            "kernels": [asdict(f) for f in figures], "goals": GOALS, "goals_met": goals_met(figures)}


def load_recorded(path: Path = RESULTS / "sm90.json") -> dict:
    return json.loads(path.read_text())


@functools.lru_cache(maxsize=1)
def current() -> list[KernelFigures]:
    """The figures of the lpd.cu in this checkout, per runtime build (compiles each: a few seconds in all)."""
    return [f for label, cubin in runtime_builds() for f in analyse(cubin, label)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the recorded figures instead of writing them")
    args = ap.parse_args(argv)
    figures = current()
    print(table(figures))
    rec = record(figures, nvrtc.nvrtc_version())
    if args.check:
        old = load_recorded()
        same = old["kernels"] == rec["kernels"]
        print("recorded figures match" if same else "recorded figures differ: run python -m benchmarks.sass_static")
        return 0 if same else 1
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sm90.json").write_text(json.dumps(rec, indent=1) + "\n")
    (RESULTS / "table.txt").write_text(f"sm_{ARCH}, {rec['compiler']}, lpd.cu {rec['source_hash']}\n"
                                       + table(figures) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
