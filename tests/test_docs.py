"""Every example in README.md runs as written (issue 20): the docs cannot drift from the code.

Python blocks run in a fresh interpreter from the repository root; bash blocks run as scripts in a scratch
folder that mirrors the repository, except the test command itself (``scripts/test.sh``, which runs this test).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)
NOT_RUN = ("scripts/test.sh",)  # runs the test suite: this very test


def examples(doc: str, language: str) -> list[str]:
    text = (ROOT / doc).read_text(encoding="utf-8")
    return [body for lang, body in BLOCK.findall(text) if lang == language]


def test_readme_has_examples() -> None:
    assert len(examples("README.md", "python")) >= 3 and examples("README.md", "bash")


@pytest.mark.parametrize("index", range(len(examples("README.md", "python"))))
def test_readme_python_example_runs(index: int) -> None:
    code = examples("README.md", "python")[index]
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"example {index} failed:\n{code}\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("index", range(len(examples("README.md", "bash"))))
def test_readme_bash_example_runs(index: int, tmp_path: Path) -> None:
    """Each bash block runs as a script (``set -e``) in a scratch folder that mirrors the repository (files the
    example writes land there), with the project's interpreter first on PATH, as after activating .venv."""
    block = "\n".join(line for line in examples("README.md", "bash")[index].splitlines()
                      if not any(skip in line for skip in NOT_RUN))
    for entry in ROOT.iterdir():
        if entry.name not in (".git",):
            (tmp_path / entry.name).symlink_to(entry)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-ec", block], cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                          stdin=subprocess.DEVNULL, env=env)
    assert done.returncode == 0, f"bash example {index} failed:\n{block}\n{done.stderr[-3000:]}"
