"""The library reports through the `hae_fx` logger, never print(); `hae_fx.logs` shows it when asked."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest

from hae_fx import logs

ROOT = Path(__file__).resolve().parents[1]
#: command-line programs, whose printed lines are their output
PROGRAMS = {"hae_fx/cli.py", "hae_fx/demo.py", "hae_fx/deploy_runner.py", "models/synthvlm/train.py",
            "models/gemma_vlm/lm_pack.py"}


def test_the_library_prints_only_in_its_command_line_programs():
    printing = []
    for folder in ("hae_fx", "passes", "models"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = path.relative_to(ROOT).as_posix()
            calls = [node.lineno for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]
            if calls and name not in PROGRAMS:
                printing.append(f"{name}:{calls}")
    assert printing == [], "route these through logging.getLogger('hae_fx')"


@pytest.fixture
def hae_fx_logger():
    saved = (logs.logger.handlers[:], logs.logger.level, logs.logger.propagate)
    yield logs.logger
    logs.logger.handlers[:], logs.logger.level, logs.logger.propagate = saved


def test_configure_prints_on_stderr_once_however_often_called(hae_fx_logger, capsys):
    logs.configure("info")
    logs.configure(logging.INFO)
    logging.getLogger("hae_fx.transform").info("compiling the decode graph")
    logging.getLogger("hae_fx").debug("not shown at INFO")
    assert capsys.readouterr().err == "[hae_fx] compiling the decode graph\n"


def test_environment_variable_sets_the_level(hae_fx_logger, monkeypatch):
    monkeypatch.setenv(logs.LOG_ENV, "DEBUG")
    logs.configure_from_environment()
    assert hae_fx_logger.level == logging.DEBUG
    monkeypatch.setenv(logs.LOG_ENV, "chatty")
    with pytest.warns(UserWarning, match="HAE_FX_LOG: unknown log level 'chatty'"):
        logs.configure_from_environment()
    assert hae_fx_logger.level == logging.DEBUG
