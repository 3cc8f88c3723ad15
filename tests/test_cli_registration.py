"""The ``ferret`` command table: built-ins without entry points, all-or-nothing registration, the extra named."""

from __future__ import annotations

import sys
import types

import pytest

from ferret_runtime import cli


def _module(name: str, register, requires=None) -> str:
    mod = types.ModuleType(name)
    mod.register = register
    if requires is not None:
        mod.REQUIRES = requires
    sys.modules[name] = mod
    return name


@pytest.fixture
def commands(monkeypatch):
    table: dict[str, str] = {}
    monkeypatch.setattr(cli, "BUILTIN_COMMANDS", table)
    monkeypatch.setattr(cli, "entry_points", lambda group: [])  # a plain checkout: no entry points at all
    yield table
    for name in [m for m in sys.modules if m.startswith("fake_cmd_")]:
        del sys.modules[name]


def test_a_register_that_fails_half_way_leaves_one_unavailable_command(commands, capsys):
    def half(sub):
        sub.add_parser("export", help="export things")  # then an import it needs fails, as onnx did
        import fake_cmd_absent_package  # noqa: F401

    commands["export"] = _module("fake_cmd_export", half)
    parser = cli.build_parser()  # before: argparse.ArgumentError: conflicting subparser: export
    assert "unavailable: needs fake_cmd_absent_package" in parser.format_help()
    assert parser.format_help().count("    export ") == 1 and "export things" not in parser.format_help()
    assert cli.main(["export", "onnx", "--weights", "x.pth"]) == 2
    assert "needs fake_cmd_absent_package" in capsys.readouterr().err


def test_requires_names_the_extra_without_importing_the_command(commands, capsys):
    calls = []
    commands["train"] = _module("fake_cmd_train", calls.append, requires=("fake_cmd_torchless",))
    commands["ok"] = _module("fake_cmd_ok", lambda sub: sub.add_parser("ok").set_defaults(func=lambda a: 0))
    assert cli.main(["train", "--epochs", "3", "--help"]) == 2 and calls == []
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ferret train: error: needs fake_cmd_torchless, not installed" in err
    assert cli.main(["ok"]) == 0


def test_install_hint_names_the_extras():
    assert cli.install_hint(["torch", "onnx"]) == \
        "needs torch, onnx, not installed (pip install 'ferretnet-deploy[export,train]')"
    assert cli.install_hint(["starlette"]).endswith("(pip install 'ferretnet-deploy[serve]')")


def test_an_optional_module_missing_at_run_time_is_one_line(commands, capsys):
    def register(sub):
        def run(args):
            raise ModuleNotFoundError("No module named 'av'", name="av")
        sub.add_parser("video").set_defaults(func=run)

    commands["video"] = _module("fake_cmd_video", register)
    assert cli.main(["video"]) == 2
    assert capsys.readouterr().err == ("ferret video: error: needs av, not installed "
                                       "(pip install 'ferretnet-deploy[video]')\n")


def test_builtins_need_no_entry_points(monkeypatch):
    monkeypatch.setattr(cli, "entry_points", lambda group: [])
    help_text = cli.build_parser().format_help()
    for name in cli.BUILTIN_COMMANDS:
        assert f"    {name}" in help_text
    assert "unavailable" not in help_text  # the development environment has every extra
