"""The manual (docs/) and the README against what the code does.

- Every command and Python block shown in the README or docs/ runs (``slow``): each block in its own sandbox
  of stand-ins (tests/docs_sandbox.py), with the changes listed in tests/docs_commands.py's ``RULES`` only.
- Every ``ferret`` line parses with today's CLI, the rules table has no stale entry, no command hides in an
  untagged fence, every repository path a page names exists.
- The architecture page lists exactly the package modules in the tree, and the layering it states holds.
- ``mkdocs build --strict`` passes (``slow``) and the CLI reference covers every command.
"""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from ferret_runtime.cli import build_parser

from . import docs_commands as dc
from .serving import free_port

ROOT = dc.ROOT
BLOCKS = dc.blocks()
SHOWN = [c for b in BLOCKS for c in b.commands]
RUN = dc.unique_blocks()  # a block the README repeats from a guide runs once
PACKAGES = ("ferret_runtime", "ferret_train", "ferret_export")
TIMEOUT = 300  # one command, on a loaded 2-core machine


# --- the fast checks ----------------------------------------------------------------------------------------

def test_the_pages_show_the_main_commands():
    # an extraction that stopped matching would make every test below vacuous
    ferret = {tuple(shlex.split(c.text)[1:3]) for c in SHOWN if c.text.startswith("ferret ")}
    firsts = {w[0] for w in ferret}
    assert {"detect", "serve", "scan", "train", "eval", "calibrate", "compare", "export", "bench", "data"} <= firsts
    assert {("export", "onnx"), ("export", "tensorrt"), ("export", "triton")} <= ferret
    assert sum(c.lang == "python" for c in SHOWN) >= 4 and len(SHOWN) >= 40


def test_no_command_hides_in_an_untagged_fence():
    for path in dc.pages():
        for line, lang, _ in dc.fences(path):
            assert lang in dc.RUN_LANGS | dc.QUIET_LANGS, (
                f"{path.relative_to(ROOT)}:{line}: fence language {lang!r}; expected one of "
                f"{sorted(dc.RUN_LANGS)} (run by tests/test_docs.py) or {sorted(dc.QUIET_LANGS)} (shown only)")


@pytest.mark.parametrize("shown", [c for c in SHOWN if c.plain.startswith("ferret ")],
                         ids=lambda c: f"{c.page}:{c.line}")
def test_ferret_command_parses(shown, capsys):
    """As shown, and as the test runs it (with its rule's additions): no flag that does not exist."""
    for text in {shown.text, dc.prepared(shown, dc.rule_for(shown))}:
        try:
            args = build_parser().parse_args(shlex.split(text)[1:])
        except SystemExit as e:
            pytest.fail(f"{shown.where()}\ndoes not parse (exit {e.code}): {text}\n{capsys.readouterr().err}")
        assert callable(getattr(args, "func", None)), shown.where()


def test_the_flags_the_prose_names_exist():
    """`--max-pixels`, `--rule fpr --target-fpr 0.01`: every flag in inline code is some ferret command's
    (spans that start with another tool's name, `ray start --head`, are that tool's)."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import hooks
    finally:
        sys.path.remove(str(ROOT / "docs"))
    known = {flag for _, parser in hooks.commands(build_parser()) for flag in parser._option_string_actions}
    unknown = []
    for path in dc.pages():
        text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
        for span in re.findall(r"`([^`]+)`", text):
            if re.match(r"^[a-z]", span) and not span.startswith("ferret"):
                continue
            unknown += [f"{path.relative_to(ROOT)}: `{span}`" for flag in re.findall(r"(?<![\w-])(--[a-z][\w-]*)", span)
                        if flag not in known]
    assert not unknown, "flags no ferret command has:\n" + "\n".join(unknown)


def test_every_rule_is_used():
    for rule in dc.RULES:
        assert any(rule.matches(c) for c in SHOWN), f"rule {rule.pattern!r} matches no shown command: remove it"


def test_the_paths_the_pages_name_exist():
    """`ferret_export/quantize.py`, `configs/train.yaml`, ...: a page that names a moved file fails here."""
    pattern = re.compile(r"`((?:ferret_runtime|ferret_train|ferret_export|benchmarks|tests|configs|docs)/[\w./-]+)`")
    missing = []
    for path in dc.pages():
        for n, text in enumerate(path.read_text().splitlines(), 1):
            for name in pattern.findall(text):
                if "<" not in name and not (ROOT / name).exists():
                    missing.append(f"{path.relative_to(ROOT)}:{n}: {name}")
    assert not missing, "pages name files that do not exist:\n" + "\n".join(missing)


# --- the architecture page against the tree -------------------------------------------------------------

def _architecture_rows() -> dict[str, str]:
    text = (ROOT / "docs/internals/architecture.md").read_text()
    rows = re.findall(r"^\| `([\w/]+\.(?:py|cu))` \| (.+?) \|$", text, flags=re.M)
    assert len(rows) == len({r[0] for r in rows}), "a module listed twice"
    return dict(rows)


def _package_modules() -> set[str]:
    return {str(p.relative_to(ROOT)) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*")
            if p.suffix in (".py", ".cu") and "__pycache__" not in p.parts}


def test_architecture_lists_every_module_of_the_tree():
    rows, tree = _architecture_rows(), _package_modules()
    lacking, gone = sorted(tree - set(rows)), sorted(set(rows) - tree)
    message = "".join([
        "docs/internals/architecture.md lacks a row for:\n" + "".join(f"| `{m}` | ... |\n" for m in lacking)
        if lacking else "",
        "docs/internals/architecture.md lists modules that are not in the tree:\n" + "".join(f"{m}\n" for m in gone)
        if gone else ""])
    assert not message, message
    assert all(len(what.strip()) >= 5 for what in rows.values())


# --- the built manual ------------------------------------------------------------------------------------

def test_cli_reference_covers_every_command():
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import hooks
    finally:
        sys.path.remove(str(ROOT / "docs"))
    page = hooks.cli_reference()
    for words, _parser in hooks.commands(build_parser()):
        name = " ".join(words)
        assert re.search(rf"^#+ {re.escape(name)}$", page, flags=re.M), name
        assert f"usage: {name}" in page, name
    assert page.count("```text") >= 15 and "--max-body-mb" in page and "--calib-data" in page


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (the dev extra)")
    proc = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=_env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-5000:]
    cli = (tmp_path / "site/reference/cli/index.html").read_text()
    assert "ferret export tensorrt" in cli and "--max-body-mb" in cli
    api = (tmp_path / "site/reference/api/index.html").read_text()
    assert "ferret_runtime.detector.Detector.open" in api and "DynamicBatcher" in api


# --- every shown command, run ----------------------------------------------------------------------------

def _env(tmp: Path) -> dict[str, str]:
    import os

    env = {**os.environ, "MPLBACKEND": "Agg", "COLUMNS": "100", "FERRET_CACHE": str(tmp / "cache"),
           "PYTHONPATH": str(ROOT), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # ferret, python, torchrun
    return env


@pytest.fixture(scope="session")
def docs_assets(tmp_path_factory, reference):
    from .docs_sandbox import build

    return build(tmp_path_factory.mktemp("docs-assets") / "assets", reference)


def _available(needs: str) -> bool:
    from .conftest import _cuda_available, _driver_gpus

    if needs == "trt":
        import importlib.util

        return importlib.util.find_spec("tensorrt") is not None and (_cuda_available() or _driver_gpus() > 0)
    return _cuda_available() or _driver_gpus() > 0


def _fail(shown: dc.Shown, ran: str, detail: str) -> None:
    pytest.fail(f"\n  page:    {shown.page}, line {shown.line}\n  command: {shown.text if shown.lang == 'bash' else ''}"
                f"\n  ran:     {ran}\n{detail}", pytrace=False)


class _Server:
    """A shown server command, started on a free port of 127.0.0.1 and probed until /readyz answers."""

    def __init__(self, shown: dc.Shown, words: list[str], cwd: Path, env: dict, log: Path):
        self.shown, self.port = shown, free_port()
        self.shown_port = int(words[words.index("--port") + 1]) if "--port" in words else 8000
        self.words = dc.with_port(words, self.port)
        self.scheme = "https" if "--ssl-certfile" in words else "http"
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(self.words, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + TIMEOUT
        while True:
            if self.proc.poll() is not None:
                _fail(shown, shlex.join(self.words), f"  exited {self.proc.returncode} before /readyz:\n{self.tail()}")
            try:
                url = f"{self.scheme}://127.0.0.1:{self.port}/readyz"
                if httpx.get(url, timeout=2, verify=False).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                _fail(shown, shlex.join(self.words), f"  /readyz never answered 200:\n{self.tail()}")
            time.sleep(0.2)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self, check: bool) -> None:
        """SIGTERM, as the serve page promises: drain, then exit (uvicorn re-raises SIGTERM after a clean stop)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        if check and code not in (0, -signal.SIGTERM):
            _fail(self.shown, shlex.join(self.words), f"  exited {code} on SIGTERM:\n{self.tail()}")


def _run(shown: dc.Shown, argv: list[str], cwd: Path, env: dict, exits: tuple[int, ...],
         output: str | None = None) -> None:
    try:
        proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        _fail(shown, shlex.join(argv), f"  did not finish in {TIMEOUT} s")
    detail = (f"  exit {proc.returncode} (expected {exits})\n  stdout: {proc.stdout[-2000:]}\n"
              f"  stderr: {proc.stderr[-4000:]}")
    if proc.returncode not in exits or "Traceback (most recent call last)" in proc.stderr:
        _fail(shown, shlex.join(argv), detail)
    if proc.returncode != 0 and output and not re.search(output, proc.stdout + proc.stderr):
        _fail(shown, shlex.join(argv), f"  no line matching {output!r}\n{detail}")


def _run_block(block: dc.Block, box: Path, env: dict, logs: Path) -> tuple[int, list[str]]:
    """Run a block's commands in order in ``box``: (how many ran, why the others did not)."""
    server, skipped, ran = None, [], 0
    try:
        for n, shown in enumerate(block.commands):
            rule = dc.rule_for(shown)
            if rule and (rule.skip or (rule.needs and not _available(rule.needs))):
                skipped.append(f"{shown.where()}: {rule.reason}")
                continue
            text = dc.prepared(shown, rule)
            if rule and rule.exit and _available("gpu"):
                skipped.append(f"{shown.where()}: on a GPU it runs the whole check (about 5 minutes): run it alone")
                continue
            exits, output = (rule.exit, rule.output) if rule and rule.exit else ((0,), None)
            ran += 1
            if shown.lang == "python":
                program = box / f"block_{shown.line}.py"
                program.write_text(text)
                _run(shown, [sys.executable, str(program)], box, env, exits, output)
                continue
            if server:
                text = dc.to_server(text, server.shown_port, server.port)
            words = shlex.split(text)
            if dc.is_server(words, rule):
                if server:
                    server.stop(check=True)
                server = _Server(shown, words, box, env, logs / f"server_{n}.log")
                continue
            if words[0] == "curl":
                words += ["--fail-with-body", "-sS"] + (["--insecure"] if server and server.scheme == "https" else [])
            _run(shown, words, box, env, exits, output)
        if server:
            server.stop(check=True)
            server = None
    finally:
        if server:
            server.stop(check=False)
    return ran, skipped


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_shown_commands_run(block, docs_assets, tmp_path):
    from .docs_sandbox import mirror

    ran, skipped = _run_block(block, mirror(docs_assets, tmp_path / "box"), _env(tmp_path), tmp_path)
    if not ran:
        pytest.skip("; ".join(skipped))
    for line in skipped:
        print("skipped:", line)


def test_a_failing_command_names_its_page_line_and_command(tmp_path):
    """The harness itself: a shown command that fails reports where it is shown and what ran."""
    block = dc.Block("docs/x.md", 7, "bash", [dc.Shown("docs/x.md", 8, "bash", "python -c 'raise SystemExit(3)'")])
    with pytest.raises(pytest.fail.Exception) as failed:
        _run_block(block, tmp_path, _env(tmp_path), tmp_path)
    message = str(failed.value)
    assert "docs/x.md, line 8" in message and "raise SystemExit(3)" in message and "exit 3 (expected (0,))" in message
