"""Every example in the README runs (slow: the Python one uses the real default model)."""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import pytest

from ember_platform.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_two_commands_point_at_real_scripts() -> None:
    commands = [line for b in blocks("bash") for line in b.splitlines() if "scripts/" in line]
    assert any("scripts/setup.sh" in c for c in commands)
    assert any("scripts/test.sh" in c for c in commands)
    root = README.parent
    for script in re.findall(r"scripts/[\w.]+", " ".join(commands)):
        assert (root / script).is_file(), script
    assert "scripts/test.sh" in (root / ".ci" / "run").read_text()


@pytest.mark.slow
def test_readme_python_example_runs(
    ember_test_home: Path,
    smollm2_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("EMBER_HOME", str(ember_test_home))
    for code in blocks("python"):
        exec(compile(code, str(README), "exec"), {})
    assert "Paris" in capsys.readouterr().out


@pytest.mark.slow
def test_readme_cli_tour_runs(ember_test_home: Path, smollm2_dir: Path) -> None:
    lines = [
        line.strip()
        for b in blocks("bash")
        for line in b.splitlines()
        if line.strip().startswith(".venv/bin/ember ") and " chat" not in line
    ]
    assert lines, "the README tour has no ember commands"
    for line in lines:
        argv = shlex.split(line, comments=True)[1:]
        out, err = io.StringIO(), io.StringIO()
        code = main(["--home", str(ember_test_home), *argv], stdout=out, stderr=err)
        assert code == 0, f"{line!r} failed: {err.getvalue()}"
        if "capital of France" in line:
            assert "Paris" in out.getvalue()
