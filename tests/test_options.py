"""The options dataclasses are the one place an option is spelled: the CLI's defaults are the Python API's."""

from __future__ import annotations

import inspect

import pytest
import typer

from uncurl.cli import COMMANDS, Output, app
from uncurl.cluster import plan_layer
from uncurl.options import DEFAULT_MERGE, DEFAULT_METHOD, DEFAULT_ROUTER
from uncurl.pipeline import PruneOptions, RunOptions
from uncurl.sweep import SweepOptions


def spelled(value):
    """A default as the command line writes it: (6, 4, 2) -> "6,4,2"."""
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


@pytest.mark.parametrize("command", ["prune", "profile", "eval", "sweep", "cost", "routes", "monitor"])
def test_every_cli_default_is_the_python_api_default(command):
    cls, names = COMMANDS[command]
    api, output = cls(), Output()
    params = [p for p in typer.main.get_command(app).commands[command].params if p.name != "help"]
    assert [p.name for p in params] == names  # every option is a field, and every field named is an option
    for p in params:
        expected = getattr(output, p.name) if p.name in vars(output) else spelled(getattr(api, p.name))
        assert p.default == expected, (command, p.opts, p.default, expected)


def test_the_defaults_are_the_studies_everywhere():
    """Python users get what the CLI gives: EAN, auto (fit where it applies), refit (a sweep also tries frequency)."""
    assert (RunOptions().method, RunOptions().merge, RunOptions().router_rows) == (DEFAULT_METHOD, DEFAULT_MERGE,
                                                                                   DEFAULT_ROUTER)
    assert PruneOptions().method == DEFAULT_METHOD
    sweep = SweepOptions()
    assert sweep.methods == (DEFAULT_METHOD, "frequency")
    assert (sweep.merges, sweep.routers) == ((DEFAULT_MERGE,), (DEFAULT_ROUTER,))
    cli = {p.opts[0]: p.default for p in typer.main.get_command(app).commands["sweep"].params}
    assert (cli["--method"], cli["--merge"], cli["--router"]) == ("ean,frequency", "auto", "refit")
    assert inspect.signature(plan_layer).parameters["method"].default == DEFAULT_METHOD


@pytest.mark.parametrize("command", ["prune", "profile", "eval", "sweep", "cost", "routes", "monitor"])
def test_readme_option_tables_are_uncurl_options(command):
    """README's option tables are `uncurl options --markdown COMMAND`, as `families --markdown` is its family table."""
    from pathlib import Path

    from typer.testing import CliRunner

    res = CliRunner().invoke(app, ["options", "--markdown", command])
    assert res.exit_code == 0, res.output
    section = (Path(__file__).resolve().parents[1] / "README.md").read_text().split(f"### `uncurl {command}`")[1]
    assert res.output.strip() in section.split("\n### ")[0]
