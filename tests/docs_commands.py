"""The commands the README and docs/ show, read from their fenced blocks, and how a test runs each.

A ```bash block is a list of commands (one a line, ``# comments`` dropped, ``\\`` continues a line); a
```python block is one program. Any other fence must name a language that is not run (``text``, ``yaml``),
so no command hides in an untagged block. Each block runs in its own sandbox folder (see docs_sandbox.py),
its commands in order, so a later line may use what an earlier one wrote (export, then detect the file).

What a test changes in a command is in one table, ``RULES``, each entry with its reason: smoke settings for
long runs, GPU/TensorRT skips, commands another test runs, 127.0.0.1 for 0.0.0.0. Beyond the table the
harness only (1) gives every ``ferret serve`` a free port on 127.0.0.1 and points the block's later lines
(``localhost:8000``, ``127.0.0.1:8000``) at it, (2) adds ``--fail-with-body -sS`` to ``curl`` so an HTTP error
fails the test, and (3) runs console scripts (ferret, python, torchrun) from the test's own environment.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_LANGS = {"bash", "python"}
QUIET_LANGS = {"text", "yaml", "json", "toml", "console-output"}  # shown, never run


@dataclass
class Shown:
    """One command (bash) or program (python) as a page shows it."""

    page: str  # relative to the repository root
    line: int  # 1-based line of the command (a program: its block's first line)
    lang: str
    text: str  # a bash command without its comment (shlex-quoted words); a program's source

    @property
    def plain(self) -> str:
        """What rules match: the words joined by spaces (a program: its source)."""
        return " ".join(shlex.split(self.text)) if self.lang == "bash" else self.text

    def where(self) -> str:
        return f"{self.page}:{self.line}: {self.text if self.lang == 'bash' else '(python block)'}"


@dataclass
class Block:
    page: str
    line: int  # the opening fence
    lang: str
    commands: list[Shown] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """The README and every page of the manual."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def fences(path: Path) -> list[tuple[int, str, list[tuple[int, str]]]]:
    """(opening line, language, [(line, text)]) for every fenced block of a Markdown file."""
    out, open_at, lang, body = [], None, "", []
    for n, text in enumerate(path.read_text().splitlines(), 1):
        if open_at is None and text.lstrip().startswith("```"):
            open_at, lang, body = n, text.strip()[3:].strip(), []
        elif open_at is not None and text.strip() == "```":
            out.append((open_at, lang, body))
            open_at = None
        elif open_at is not None:
            body.append((n, text))
    if open_at is not None:
        raise AssertionError(f"{path.relative_to(ROOT)}:{open_at}: a fence that is never closed")
    return out


def bash_commands(page: str, body: list[tuple[int, str]]) -> list[Shown]:
    out, pending, start = [], "", 0
    for n, text in body:
        if not pending:
            start = n
        if text.rstrip().endswith("\\"):
            pending += text.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + text, comments=True)
        pending = ""
        if words:
            out.append(Shown(page, start, "bash", shlex.join(words)))
    return out


def blocks() -> list[Block]:
    """Every runnable block of every page, in page order."""
    out = []
    for path in pages():
        page = str(path.relative_to(ROOT))
        for line, lang, body in fences(path):
            if lang not in RUN_LANGS:
                continue
            block = Block(page, line, lang)
            if lang == "bash":
                block.commands = bash_commands(page, body)
            else:
                block.commands = [Shown(page, line, "python", "\n".join(t for _, t in body) + "\n")]
            if block.commands:
                out.append(block)
    return out


def unique_blocks() -> list[Block]:
    """Each block once: the README's tour repeats some of the guides' blocks word for word."""
    seen, out = set(), []
    for block in blocks():
        key = (block.lang, tuple(c.text for c in block.commands))
        if key not in seen:
            seen.add(key)
            out.append(block)
    return out


# --- what a test changes, and why: the one table --------------------------------------------------------

SMOKE_TRAIN = ["model.name=ferretnet-s", "total_epochs=1", "trainer.max_steps_per_epoch=2", "trainer.batch_size=8",
               "trainer.batch_size_test=64", "data.train_crop=64", "data.test_crop=64", "data.workers=0",
               "logger.log_freq=1"]


@dataclass
class Rule:
    """For shown commands matching ``pattern`` (a regex searched in the command or program):

    - ``skip``: not run here, with the reason (what runs it instead, or why it cannot run);
    - ``needs``: "gpu" or "trt": run only where one is available, else skipped with that reason;
    - ``replace``: (old, new) substitutions, then ``append``: words added at the end;
    - ``server``: run as a server (started, probed on /readyz, stopped at the end of its block);
    - ``exit``: the exit statuses that pass (default 0), for commands whose page says they exit otherwise,
      and ``output``: a regex their output must then match (``make`` exits 2 for any failing recipe).
    """

    pattern: str
    reason: str
    skip: bool = False
    needs: str | None = None
    replace: tuple[tuple[str, str], ...] = ()
    append: tuple[str, ...] = ()
    server: bool = False
    exit: tuple[int, ...] | None = None
    output: str | None = None

    def matches(self, shown: Shown) -> bool:
        return re.search(self.pattern, shown.plain) is not None


RULES: list[Rule] = [
    # commands another test or CI runs
    Rule(r"^make test$", "the test suite itself: CI runs it (.ci/run); run from a test it would recurse", skip=True),
    Rule(r"^make demo$", "tests/test_demo.py checks the Makefile's recipe is `ferret demo --out demo_out` and runs "
         "that command (2 epochs of 3 steps), checking its files and the table the pages show", skip=True),
    Rule(r"^make bench$", "`make test` collects the same benchmarks/ files (pytest-benchmark disabled: each runs "
         "once); timing them is no test", skip=True),
    Rule(r"^pip install ferretnet-deploy\[trt\]$", "TensorRT's wheels are for NVIDIA GPUs; no test installs them "
         "here (make gpu-check reports the version where they are)", skip=True),
    Rule(r"^pip install ", "tests/test_install.py installs the built wheel with these extras into a fresh venv "
         "(the package index is not a test's business)", skip=True),
    # hardware
    Rule(r"ferret export tensorrt|--model \S+\.engine", "needs TensorRT and a GPU", needs="trt"),
    Rule(r"^ferret bench --device cuda", "needs a CUDA GPU", needs="gpu"),
    Rule(r"^make gpu-check$", "without a GPU it must say so in one line and exit 2 (the page's exit statuses)",
         exit=(2,), output=r"(?m)^gpu-check: no GPU: .*expected an NVIDIA driver and a GPU$"),
    # stand-ins
    Rule(r"^tritonserver ", "Triton Inference Server is not installable here; `ferret serve` speaks the same "
         "protocol, so the client line after it runs against that, on the model the export wrote",
         replace=(("tritonserver --model-repository=models",
                   "ferret serve -m models/ferretnet/1/model.onnx --model-name ferretnet"),), server=True),
    Rule(r'ray\.init\(address="auto"\)', "no Ray cluster or S3 bucket here: a local instance (on 127.0.0.1: the "
         "harness sets RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) of 2 CPUs with one actor (Ray's read tasks need a CPU "
         "too: with two actors they would wait forever), on the local images",
         replace=(('ray.init(address="auto")', 'ray.init(num_cpus=2, include_dashboard=False)'),
                  ("s3://bucket/images/", "photos/"), ("concurrency=4", "concurrency=1"))),
    Rule(r"--host 0\.0\.0\.0", "tests listen on 127.0.0.1 only", replace=(("--host 0.0.0.0", "--host 127.0.0.1"),)),
    Rule(r"--ray auto", "no Ray cluster runs here: a throwaway local instance (the same code path), 2 actors on 2 "
         "cores", replace=(("--ray auto", "--ray local"), ("--concurrency 8", "--concurrency 2"))),
    # smoke settings for long runs
    Rule(r"^torchrun ", "2 CPU processes (gloo) instead of 4 GPUs; smoke settings as for ferret train",
         replace=(("--nproc_per_node 4", "--nproc_per_node 2"),), append=tuple(SMOKE_TRAIN)),
    Rule(r"^ferret train --resume ", "one more epoch of 2 steps on top of the smoke run it resumes",
         append=("total_epochs=2",)),
    Rule(r"^ferret train .*--init ", "smoke settings as below, before --init (KEY=VALUE words after an option do "
         "not parse)", replace=(("--init", shlex.join(SMOKE_TRAIN) + " --init"),)),
    Rule(r"^ferret train ", "smoke: FerretNet-S, 1 epoch of 2 steps, 64-pixel crops, on the tiny proxy data",
         append=tuple(SMOKE_TRAIN)),
    Rule(r"^ferret bench$", "smoke: FerretNet-S, two backends, batch 1, 2 timed batches at 64 pixels",
         append=("--models", "ferretnet-s", "--backends", "torch,onnxruntime", "--batch-sizes", "1", "--iters", "2",
                 "--warmup", "1", "--image-size", "64")),
    Rule(r"^ferret bench --workload ", "smoke: FerretNet-S on 2 files per set at a tenth of the size (crop256 stays "
         "256²), 64-pixel crops, one timed pass; the files cached in the sandbox, not the user's cache",
         append=("--count", "2", "--scale", "0.1", "--models", "ferretnet-s", "--image-size", "64", "--iters", "1",
                 "--batch-sizes", "2", "--workload-dir", "workload-cache")),
    Rule(r"^python -m benchmarks\.bench_pipeline$", "smoke: 16 images of 64 pixels, 2 requests per client; written "
         "here, not over benchmarks/results/", append=("--images", "16", "--size", "64", "--batch", "8",
                                                       "--requests-per-client", "2", "--out", ".")),
]


def rule_for(shown: Shown) -> Rule | None:
    return next((r for r in RULES if r.matches(shown)), None)


def prepared(shown: Shown, rule: Rule | None) -> str:
    """The command or program as the test runs it: the rule's substitutions and additions."""
    text = shown.text
    for old, new in rule.replace if rule else ():
        assert old in text, f"{shown.where()}: rule {rule.pattern!r} expects {old!r} in it"
        text = text.replace(old, new)
    if rule and rule.append:
        text = text + " " + shlex.join(rule.append)
    return text


def is_server(words: list[str], rule: Rule | None) -> bool:
    return (rule is not None and rule.server) or words[:2] == ["ferret", "serve"]


def with_port(words: list[str], port: int) -> list[str]:
    """A ``ferret serve`` command on ``port`` (its own ``--port`` replaced, or one added)."""
    if "--port" in words:
        i = words.index("--port")
        return words[:i + 1] + [str(port)] + words[i + 2:]
    return words + ["--port", str(port)]


def to_server(text: str, shown_port: int, port: int) -> str:
    """A later line of the block pointed at the test's server (the page says localhost:8000)."""
    return re.sub(rf"\b(localhost|127\.0\.0\.1):{shown_port}\b", f"127.0.0.1:{port}", text)
