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


SERVED = "# needs: ember serve"


@pytest.mark.slow
def test_readme_python_examples_run_embedded(
    ember_test_home: Path,
    smollm2_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from ember import llm
    from ember._backends import EmbeddedBackend

    monkeypatch.setenv("EMBER_HOME", str(ember_test_home))
    for var in ("EMBER_BASE_URL", "EMBER_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    backend = EmbeddedBackend(str(ember_test_home))  # closed here: pools stop their workers
    llm.use_backend(backend)
    try:
        for code in blocks("python"):
            if SERVED not in code:
                exec(compile(code, str(README), "exec"), {})
        assert len(backend.pools()) == 1  # the example that declares a pool ran on it
    finally:
        llm.use_backend(None)
        backend.close()
    assert "Paris" in capsys.readouterr().out


@pytest.mark.slow
def test_readme_serve_examples_run_against_ember_serve(
    ember_test_home: Path,
    smollm2_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Starts `ember serve` as the README says, then runs its curl and openai examples."""
    import json
    import os
    import subprocess

    from ember_platform.serve_process import free_port, start_serve

    ledger = f"sqlite:///{tmp_path / 'ledger.db'}"
    server = start_serve(
        ember_test_home, port=free_port(), args=["--ledger-url", ledger, "--log-level", "warning"]
    )
    try:
        assert server.key, server.log
        base = server.base_url
        env = {**os.environ, "OPENAI_API_KEY": server.key, "OPENAI_BASE_URL": f"{base}/v1"}
        curls = [b for b in blocks("bash") if SERVED in b]
        assert curls
        for block in curls:
            script = block.replace("http://127.0.0.1:8000", base)
            done = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            assert "Paris" in json.loads(done.stdout)["choices"][0]["message"]["content"]
        monkeypatch.setenv("OPENAI_API_KEY", server.key)
        monkeypatch.setenv("OPENAI_BASE_URL", f"{base}/v1")
        served = [b for b in blocks("python") if SERVED in b]
        assert served
        for code in served:
            exec(compile(code, str(README), "exec"), {})
        out = capsys.readouterr().out
        assert "Paris" in out and "completion_tokens" in out
    finally:
        server.stop()


@pytest.mark.slow
def test_readme_cli_tour_runs(ember_test_home: Path, smollm2_dir: Path) -> None:
    lines = [
        line.strip()
        for b in blocks("bash")
        for line in b.splitlines()
        if line.strip().startswith(".venv/bin/ember ")
        and " chat" not in line
        and " serve" not in line
    ]
    assert lines, "the README tour has no ember commands"
    for line in lines:
        argv = shlex.split(line, comments=True)[1:]
        out, err = io.StringIO(), io.StringIO()
        code = main(["--home", str(ember_test_home), *argv], stdout=out, stderr=err)
        assert code == 0, f"{line!r} failed: {err.getvalue()}"
        if "capital of France" in line:
            assert "Paris" in out.getvalue()
