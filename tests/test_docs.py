"""Every example in README.md runs as written (issue 20): the docs cannot drift from the code.

Python blocks run in a fresh interpreter from the repository root; bash blocks run line by line with bash,
except the test command itself (``scripts/test.sh``, which is what runs this test).
"""

from __future__ import annotations

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


def test_readme_bash_examples_run() -> None:
    for block in examples("README.md", "bash"):
        for line in block.splitlines():
            command = line.split("#")[0].strip()
            if not command or any(skip in command for skip in NOT_RUN):
                continue
            done = subprocess.run(["bash", "-c", command], cwd=ROOT, capture_output=True, text=True, timeout=900,
                                  stdin=subprocess.DEVNULL)
            assert done.returncode == 0, f"{command!r} failed:\n{done.stderr[-3000:]}"
