"""benchmarks/gpu_check.py on a CPU: the no-GPU exit, --out, the report writer and the table, the time
budget (per section, per cell), section 6's order (eager first, torch.compile last and optional), and the
pytest row (its output read, a missing optional package skipped instead of a collection error).
tests/test_gpu_check_bare.py runs these from an uninstalled checkout in a venv with only the bare GPU
image's packages."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from benchmarks import gpu_check
from tests.conftest import ROOT, _driver_gpus

no_gpu_here = pytest.mark.skipif(_driver_gpus() > 0, reason="checks the machine without a GPU")


class Clock:
    """gpu_check's clock, stopped: it moves only when a test says so."""

    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(gpu_check, "now", c)
    return c


@no_gpu_here
def test_without_a_gpu_one_line_and_exit_2(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no GPU: "), proc.stdout
    assert not proc.stderr.strip()
    assert not out.exists()  # nothing written, not even the folder


@no_gpu_here
def test_make_gpu_check_passes_out_and_args(tmp_path):
    make = ["make", "-s", "gpu-check", f"PYTHON={sys.executable}", f"OUT={tmp_path / 'my results'}"]
    dry = subprocess.run([*make, "-n", "GPU_CHECK_ARGS=--no-compile --budget 200"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.split("\n")[0] == (f"{sys.executable} -m benchmarks.gpu_check "
                                         f"--out \"{tmp_path / 'my results'}\" --no-compile --budget 200")
    proc = subprocess.run(make, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and proc.stdout.startswith("gpu-check: no GPU: ")
    assert len(proc.stdout.strip().splitlines()) == 1


def test_bad_out_and_budget_are_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--out", str(tmp_path / "a-file" / "results")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"--out {tmp_path / 'a-file' / 'results'}: cannot write there ({tmp_path / 'a-file'} is not "
                        "a folder)")
    with pytest.raises(SystemExit) as exit_:
        gpu_check.main(["--budget", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().endswith("--budget 0: expected a positive number of seconds")


def test_writable_creates_nothing(tmp_path):
    assert gpu_check.writable(tmp_path / "a" / "b") is None
    assert not (tmp_path / "a").exists()
    (tmp_path / "f").write_text("")
    assert gpu_check.writable(tmp_path / "f" / "x") == f"{tmp_path / 'f'} is not a folder"


def _synthetic() -> gpu_check.Result:
    result = gpu_check.Result(env={"gpu": "NVIDIA H100 80GB HBM3", "driver_cuda": "13.0", "nvrtc": "13.0"})
    result.add("env", "gpu", None, "NVIDIA H100 80GB HBM3 (sm_90, 80 GiB)")
    result.add("kernels", "median k=3", True, "16 cases")
    result.add("kernels", "max k=7", False, "16 cases", "f16 (1, 1, 1, 1) residual=True")
    result.add("speed", "lpd_residual float32", None, "3,000 GB/s, 90% of a copy")
    return result


def test_report_writer_and_table(tmp_path):
    result = _synthetic()
    json_path, table_path = gpu_check.write_report(result, tmp_path / "out")
    assert (json_path, table_path) == (tmp_path / "out" / "gpu-check.json", tmp_path / "out" / "gpu-check.txt")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu-check.json", "gpu-check.txt"]
    data = json.loads(json_path.read_text())
    assert data["failed"] == 1 and data["checks"] == 2 and data["env"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert [r["ok"] for r in data["rows"]] == [None, True, False, None]
    table = gpu_check.format_table(result).splitlines()
    assert table_path.read_text().splitlines() == table
    assert table[0].split()[:3] == ["section", "check", "result"]
    assert "FAIL" in table[3] and "f16 (1, 1, 1, 1)" in table[3] and "PASS" in table[2]
    assert table[-1].split()[-5:] == ["1", "failed", "of", "2", "checks"] and " FAIL " in table[-1]
    assert gpu_check.default_out("NVIDIA H100 80GB HBM3") == ROOT / "benchmarks" / "results" / "nvidia-h100-80gb-hbm3"


def test_the_table_says_the_time_and_what_the_budget_cut():
    result = _synthetic()
    result.env.update(budget_s=330.0, total_s=341.4)
    result.cut += ["npr eager 2 of 6 cells", "pytest (stopped)"]
    table = gpu_check.format_table(result).splitlines()
    assert table[-2].split() == ["summary", "time", "341", "s", "of", "the", "330", "s", "budget;", "cut", "short:",
                                 "npr", "eager", "2", "of", "6", "cells;", "pytest", "(stopped)"]
    assert table[-1].startswith("summary") and "correctness" in table[-1]


def test_a_section_that_raises_is_a_failed_row():
    result = gpu_check.Result()

    def boom(r):
        raise RuntimeError("cuModuleLoadData: received CUDA_ERROR_UNSUPPORTED_PTX_VERSION")

    gpu_check.section(result, "plugin", boom)
    row, = result.rows
    assert (row.section, row.ok) == ("plugin", False) and "UNSUPPORTED_PTX_VERSION" in row.value
    assert result.env["seconds"]["plugin"] >= 0


def test_a_section_sees_its_share_and_only_while_it_runs(clock):
    result = gpu_check.Result(deadline=clock() + 1000)
    seen = []

    def speed(r):
        seen.append(r.left())
        clock.t += 15

    gpu_check.section(result, "speed", speed, budget_s=40)
    gpu_check.section(result, "kernels", lambda r: seen.append(r.left()))
    assert seen == [40, 985]
    assert result.left() == 985 and result.section_end == math.inf and result.env["seconds"]["speed"] == 15


def test_section_budgets_keep_time_for_the_later_sections(monkeypatch, clock):
    monkeypatch.setattr(gpu_check, "will_run", lambda name: name != "backends")  # no TensorRT, no onnxruntime-gpu
    result = gpu_check.Result(deadline=clock() + 200)
    later = ["backends", "pytest"]
    assert gpu_check.section_budget("kernels", later, result) is None  # correctness: always runs, no share
    assert gpu_check.section_budget("speed", later, result) == 100  # its own cap: 200 - 90 kept for pytest is more
    clock.t += 50
    assert gpu_check.section_budget("speed", later, result) == 60  # 150 left - 90 kept for pytest
    monkeypatch.setattr(gpu_check, "will_run", lambda name: True)
    assert gpu_check.section_budget("speed", later, result) == 0  # 150 - (60 + 90)
    assert gpu_check.section_budget("backends", ["pytest"], result) == 60
    assert gpu_check.section_budget("pytest", [], result) == 150
    clock.t += 155
    assert gpu_check.section_budget("pytest", [], result) == 0


def test_every_section_is_listed_in_order():
    assert list(gpu_check.SECTIONS) == ["env", "kernels", "preprocess", "plugin", "torch", "speed", "decode",
                                        "backends", "pytest"]
    assert gpu_check.slug("NVIDIA H200") == "nvidia-h200"


def test_the_budgets_fit_six_minutes():
    # the run's budget leaves 30 s of the 6 minutes for Python's start-up, the imports and the writes;
    # the budgeted sections' reserves fit in it beside about 2 minutes of correctness sections
    assert gpu_check.RUN_BUDGET_S <= 330
    assert sum(gpu_check.RESERVE_S.values()) + 120 <= gpu_check.RUN_BUDGET_S


def test_backends_section_without_a_cuda_provider_or_tensorrt_only_reports(monkeypatch):
    # CPU onnxruntime (no CUDA provider) and no TensorRT: two informative rows, nothing built, nothing failed
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorrt" else real(name, *a))
    result = gpu_check.Result()
    gpu_check.check_backends(result)
    rows = {r.name: r for r in result.rows}
    assert set(rows) == {"onnxruntime-gpu", "tensorrt"} and not result.failed
    assert rows["onnxruntime-gpu"].value.endswith("CUDA provider no") and rows["tensorrt"].value == "not installed"


# ------------------------------------------------------------------------------ main, on fake sections
def _fake_sections(calls: list, fail: bool = False):
    def env(r):
        r.env["gpu"] = "NVIDIA H100 80GB HBM3"
        r.add("env", "gpu", None, "NVIDIA H100 80GB HBM3")

    def kernels(r):
        calls.append(("kernels", r.left()))
        r.add("kernels", "median k=3", not fail, "16 cases")

    def budgeted(name):
        def fn(r):
            calls.append((name, r.left()))
            r.add(name, name, None, "ran")
        return fn

    return {"env": env, "kernels": kernels, "speed": budgeted("speed"), "backends": budgeted("backends"),
            "pytest": budgeted("pytest")}


def test_main_runs_the_sections_within_their_shares_and_writes_one_json_and_one_table(tmp_path, monkeypatch, capsys,
                                                                                        clock):
    calls = []
    monkeypatch.setattr(gpu_check, "SECTIONS", _fake_sections(calls))
    monkeypatch.setattr(gpu_check, "no_gpu_reason", lambda: None)
    monkeypatch.setattr(gpu_check, "will_run", lambda name: True)
    assert gpu_check.main(["--out", str(tmp_path / "r"), "--budget", "300"]) == 0
    shares = dict(calls)
    assert shares == {"kernels": 300,  # a correctness section: the run's deadline only
                      "speed": 100,  # its own cap (300 - 60 - 90 = 150 would be left for it)
                      "backends": 150, "pytest": 150}
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["section", "check", "result"]
    assert out[-1] == f"written: {tmp_path / 'r' / 'gpu-check.json'} and gpu-check.txt"
    assert (tmp_path / "r" / "gpu-check.txt").read_text().splitlines() == out[:-1]  # the one table, as printed
    data = json.loads((tmp_path / "r" / "gpu-check.json").read_text())
    assert data["env"]["budget_s"] == 300 and set(data["env"]["seconds"]) == set(shares) | {"env"}
    assert out[-2].split()[:3] == ["summary", "correctness", "PASS"]


def test_main_exit_1_on_a_failure_and_a_read_only_default_goes_to_a_temporary_folder(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(gpu_check, "SECTIONS", _fake_sections(calls, fail=True))
    monkeypatch.setattr(gpu_check, "no_gpu_reason", lambda: None)
    (tmp_path / "checkout-file").write_text("")
    monkeypatch.setattr(gpu_check, "RESULTS", tmp_path / "checkout-file" / "results")  # cannot be written
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert gpu_check.main(["--only", "env", "kernels"]) == 1
    out = capsys.readouterr().out.splitlines()
    fallback = tmp_path / "tmp" / "ferret-gpu-check-nvidia-h100-80gb-hbm3"
    assert out[-1] == (f"written: {fallback / 'gpu-check.json'} and gpu-check.txt "
                       f"({tmp_path / 'checkout-file' / 'results'}/nvidia-h100-80gb-hbm3 cannot be written: "
                       f"{tmp_path / 'checkout-file'} is not a folder)")
    assert json.loads((fallback / "gpu-check.json").read_text())["failed"] == 1
    assert [c[0] for c in calls] == ["kernels"]


# --------------------------------------------------------------------------------- section 6's cells
def test_cells_all_measured_when_there_is_time():
    result = gpu_check.Result(deadline=time.monotonic() + 100)
    cells, error = gpu_check.measure_cells(result, (1, 8, 32), lambda b: 2.0 * b, cell_s=5)
    assert (cells, error) == (["b1 500/s", "b8 500/s", "b32 500/s"], None)


def test_a_cell_that_would_overrun_its_budget_is_left_out_with_the_larger_ones(clock):
    result = gpu_check.Result(deadline=clock() + 100)
    asked = []

    def measure(b):
        asked.append(b)
        clock.t += 0.05 * b  # b1: 0.05 s, so b2 should take 0.1 s and b8 0.4 s
        return 1.0

    cells, error = gpu_check.measure_cells(result, (1, 2, 8, 16), measure, cell_s=0.3)
    assert (cells, error, asked) == (["b1 1,000/s", "b2 2,000/s", "b8 -", "b16 -"], None, [1, 2])
    result = gpu_check.Result(deadline=clock() + 0.25)  # the section's time, not the cell's budget, stops b8
    asked.clear()
    cells, error = gpu_check.measure_cells(result, (1, 2, 8), measure, cell_s=10)
    assert (cells, asked) == (["b1 1,000/s", "b2 2,000/s", "b8 -"], [1, 2])


def test_no_cell_starts_once_the_section_is_out_of_time(clock):
    result = gpu_check.Result(deadline=clock() + 100, section_end=clock() - 1)
    cells, error = gpu_check.measure_cells(result, (1, 8), lambda b: pytest.fail("measured"), cell_s=5)
    assert cells == ["b1 -", "b8 -"] and error is None


def test_oom_ends_the_row_and_another_error_is_returned():
    class OOM(Exception):
        pass

    def measure(b):
        if b == 32:
            raise OOM()
        return 1.0

    result = gpu_check.Result(deadline=time.monotonic() + 100)
    assert gpu_check.measure_cells(result, (1, 8, 32, 64), measure, 5, (OOM,)) == (["b1 1,000/s", "b8 8,000/s",
                                                                                      "b32 OOM"], None)

    def broken(b):
        raise RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED\nmore detail")

    assert gpu_check.measure_cells(result, (1, 8), broken, 5, (OOM,)) == (
        ["b1 error"], "RuntimeError: cuDNN error: CUDNN_STATUS_NOT_SUPPORTED")


def test_reason_is_the_innermost_cause():
    try:
        try:
            raise RuntimeError("Cannot find a working triton installation. Either the package is not installed")
        except RuntimeError as inner:
            raise ValueError("backend='inductor' raised:") from inner
    except ValueError as e:
        assert gpu_check.reason(e) == ("RuntimeError: Cannot find a working triton installation. Either the package "
                                       "is not installed")


def _cpu_timer(fn, iters=5, warmup=1):
    for _ in range(warmup):
        fn()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e3


class BackendCompilerFailed(Exception):
    """Stands in for torch._dynamo.exc.BackendCompilerFailed, which wraps the compiler's own error."""

    def __init__(self, inner):
        super().__init__("backend='inductor' raised:\n" + str(inner))
        self.inner_exception = inner


def test_models_eager_first_and_a_compile_without_triton_only_says_why(monkeypatch, clock):
    """Issue 21: torch.compile without triton lost the whole section, eager numbers included. Now every
    eager row has its numbers, the first compile row says why, the others say it was not tried."""
    import torch

    compiled = []

    def no_triton(model, **kwargs):
        compiled.append(kwargs)

        def run(x):
            raise BackendCompilerFailed(RuntimeError("Cannot find a working triton installation. More information "
                                                     "on installing Triton can be found at ..."))
        return run

    monkeypatch.setattr(torch, "compile", no_triton)
    result = gpu_check.Result(deadline=clock() + 300)
    gpu_check.check_models(result, batches=(1, 2), models=("ferretnet-s", "npr"), device="cpu", timer=_cpu_timer,
                           size=64, compile_cell_s=10, cell_s=600)
    rows = [(r.name, r.ok) for r in result.rows]
    assert rows == [("ferretnet-s eager", None), ("npr eager", None), ("ferretnet-s compile", None),
                    ("npr compile", None)]
    for row in result.rows[:2]:
        cells = row.value.split(", ")
        assert [c.split()[0] for c in cells] == ["b1", "b2"] and all(c.endswith("/s") for c in cells), row.value
        assert float(cells[1].split()[1].removesuffix("/s").replace(",", "")) > 0
    assert result.rows[2].value == "not run" and result.rows[2].detail == (
        "torch.compile failed: RuntimeError: Cannot find a working triton installation. More information on installing "
        "Triton can be found at ...")
    assert (result.rows[3].value, result.rows[3].detail) == ("not run", "torch.compile failed on ferretnet-s")
    assert compiled == [{"mode": "reduce-overhead"}]  # npr was not compiled in vain
    assert not result.failed and result.cut == []


def test_models_compile_rows_when_it_compiles_and_none_without_time(monkeypatch, clock):
    import torch

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)  # "compiles" to itself
    result = gpu_check.Result(deadline=clock() + 300)
    gpu_check.check_models(result, batches=(1,), models=("ferretnet-s",), device="cpu", timer=_cpu_timer,
                           size=64, compile_cell_s=10, cell_s=600)
    eager, compile_ = result.rows
    assert compile_.name == "ferretnet-s compile" and compile_.value.startswith("b1 ") and compile_.value.endswith("/s")
    assert compile_.detail == "images/s at 64x64, CUDA graphs"
    result = gpu_check.Result(deadline=clock() + 5)  # less than a compile may take: not started
    gpu_check.check_models(result, batches=(1,), models=("ferretnet-s",), device="cpu", timer=_cpu_timer,
                           size=64, compile_cell_s=10, cell_s=600)
    assert result.rows[1].value == "not run" and result.rows[1].detail.endswith("a compile may take 10 s")
    assert result.cut == ["ferretnet-s compile"]
    result = gpu_check.Result(deadline=clock() + 300)
    gpu_check.check_models(result, batches=(1,), models=("ferretnet-s",), device="cpu", timer=_cpu_timer,
                           size=64, compile=False)
    assert [(r.name, r.value) for r in result.rows][1:] == [("torch.compile", "not run (--no-compile)")]


def test_an_eager_model_that_raises_fails_its_row_only(monkeypatch, clock):
    import torch

    from ferret_train import create_model

    def illegal_access(x):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def create(arch):
        if arch == "cnndetection":
            raise KeyError("resnet50 weights layout")
        model = create_model(arch)
        if arch == "npr":
            model.forward = illegal_access
        return model

    monkeypatch.setattr("ferret_train.create_model", create)
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)
    result = gpu_check.Result(deadline=clock() + 300)
    gpu_check.check_models(result, batches=(1,), models=("npr", "cnndetection", "ferretnet-s"), device="cpu",
                           timer=_cpu_timer, size=64, compile_cell_s=10, cell_s=600)
    rows = {r.name: r for r in result.rows}
    assert list(rows) == ["npr eager", "cnndetection eager", "ferretnet-s eager", "npr compile",
                          "cnndetection compile", "ferretnet-s compile"]
    npr = rows["npr eager"]
    assert (npr.ok, npr.value, npr.detail) == (False, "b1 error",
                                               "RuntimeError: CUDA error: an illegal memory access was encountered")
    bad = rows["cnndetection eager"]
    assert (bad.ok, bad.value, bad.detail) == (False, "not run",
                                               "creating it raised KeyError: 'resnet50 weights layout'")
    for name in ("npr compile", "cnndetection compile"):
        assert (rows[name].value, rows[name].detail) == ("not run", "it failed in eager mode")
    for name in ("ferretnet-s eager", "ferretnet-s compile"):  # the models after them still measured
        assert rows[name].ok is None and rows[name].value.startswith("b1 ") and rows[name].value.endswith("/s")
    assert [r.name for r in result.failed] == ["npr eager", "cnndetection eager"]


# ------------------------------------------------------------------------------------- the pytest row
SAMPLE_TESTS = {
    "test_ok.py": """
        import pytest
        def test_passes():
            pass
        @pytest.mark.gpu
        def test_gpu_passes():
            pass
        @pytest.mark.gpu
        def test_gpu_skips():
            pytest.skip("no CUDA GPU visible to PyTorch on this machine")
    """,
    "test_needs_starlette.py": """
        import pytest
        import starlette_is_not_installed_here
        @pytest.mark.gpu
        def test_gpu_serve():
            pass
    """,
}


def _sample(tmp_path, files):
    for name, code in files.items():
        (tmp_path / name).write_text(textwrap.dedent(code))
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = --benchmark-disable\nmarkers =\n    gpu: a GPU\n")
    return tmp_path


def test_a_missing_optional_package_skips_its_module_instead_of_failing_collection(tmp_path, monkeypatch):
    _sample(tmp_path, SAMPLE_TESTS)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    args = [a if a != "tests" else "." for a in gpu_check.PYTEST_ARGS]
    output, code, stopped = gpu_check.run_pytest(args, tmp_path, 120)
    assert (code, stopped) == (0, False), output
    ok, value, detail = gpu_check.pytest_row(output, code, stopped, 120)
    assert ok is True and value.startswith("1 passed, 2 skipped, 1 deselected in "), value
    assert detail in ("1 skipped: no CUDA GPU visible to PyTorch on this machine; 1 skipped: needs "
                      "starlette_is_not_installed_here, which is not installed here",
                      "1 skipped: needs starlette_is_not_installed_here, which is not installed here; "
                      "1 skipped: no CUDA GPU visible to PyTorch on this machine")
    # without gpu_check's arguments: the ini's addopts is refused where pytest-benchmark is missing, and
    # with it the missing package is a collection error; either way the row would fail
    output, code, _ = gpu_check.run_pytest(["-q", "-m", "gpu", "-p", "no:cacheprovider", "-p", "no:benchmark", "."],
                                           tmp_path, 120)
    assert code in (2, 4) and gpu_check.pytest_row(output, code, False, 120)[0] is False


def test_a_project_module_that_does_not_import_is_still_an_error(tmp_path, monkeypatch):
    _sample(tmp_path, {"test_broken.py": "import ferret_runtime.no_such_module\n"})
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    args = [a if a != "tests" else "." for a in gpu_check.PYTEST_ARGS]
    output, code, _ = gpu_check.run_pytest(args, tmp_path, 120)
    ok, value, detail = gpu_check.pytest_row(output, code, False, 120)
    assert code == 2 and ok is False and "1 error" in value and detail == "failed: test_broken.py", output


def test_failures_are_named_and_a_run_stopped_at_its_budget_says_so(tmp_path, monkeypatch):
    _sample(tmp_path, {"test_mix.py": """
        import pytest, time
        @pytest.mark.gpu
        def test_gpu_a(): pass
        @pytest.mark.gpu
        def test_gpu_b(): assert 1 == 2
        @pytest.mark.gpu
        def test_gpu_slow(): time.sleep(600)
    """})
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    args = [a if a != "tests" else "." for a in gpu_check.PYTEST_ARGS]
    t0 = time.monotonic()
    output, code, stopped = gpu_check.run_pytest(args, tmp_path, 20)
    assert stopped and code is None and time.monotonic() - t0 < 40
    assert gpu_check.pytest_row(output, code, stopped, 20) == (
        False, "stopped at the 20 s budget: 1 passed, 1 failed, 0 skipped so far", ""), output
    (tmp_path / "test_mix.py").write_text((tmp_path / "test_mix.py").read_text().replace("time.sleep(600)", "pass"))
    output, code, stopped = gpu_check.run_pytest(args, tmp_path, 120)
    ok, value, detail = gpu_check.pytest_row(output, code, stopped, 120)
    assert (code, ok, detail) == (1, False, "failed: test_mix.py::test_gpu_b")
    assert value.startswith("1 failed, 2 passed")


def test_the_pytest_section_on_this_checkout(monkeypatch):
    """The real row: this checkout's gpu tests, all collected (none errors), each skipped with its reason here."""
    result = gpu_check.Result(deadline=time.monotonic() + 300)
    gpu_check.section(result, "pytest", gpu_check.check_pytest, budget_s=240)
    row, = result.rows
    assert row.ok is True, row
    if _driver_gpus() == 0:
        assert " skipped, " in row.value and "passed" not in row.value and "error" not in row.value, row.value
        assert "no CUDA GPU visible to" in row.detail


def test_same_bits_sees_the_sign_of_zero():
    import numpy as np

    from benchmarks.gpu_check import same_bits

    for dtype in (np.float16, np.float32):
        a = np.array([0.0, 1.5, -2.0], dtype)
        assert same_bits(a, a.copy())
        assert not same_bits(a, np.array([-0.0, 1.5, -2.0], dtype))  # equal values, other bits
        assert np.array_equal(a, np.array([-0.0, 1.5, -2.0], dtype))  # ... which array_equal misses
    assert not same_bits(np.zeros(3, np.float16), np.zeros(3, np.float32))
    assert not same_bits(np.zeros(3, np.float32), np.zeros(4, np.float32))
