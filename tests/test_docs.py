"""Every example in README.md runs as written (issue 20): the docs cannot drift from the code.

Python blocks run in a fresh interpreter from the repository root; bash blocks run as scripts in a scratch
folder that mirrors the repository, except the test command itself (``scripts/test.sh``, which runs this test).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
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
    # the bootstrap scripts use this interpreter's venv by its real path: through the scratch folder's symlinked
    # .venv, a reinstall would write console scripts whose #! names the scratch folder, dead once it is removed
    env = {**os.environ, "RWKV_STREAM_VENV": sys.prefix,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(["bash", "-ec", block], cwd=tmp_path, capture_output=True, text=True, timeout=1200,
                          stdin=subprocess.DEVNULL, env=env)
    assert done.returncode == 0, f"bash example {index} failed:\n{block}\n{done.stderr[-3000:]}"


# ------------------------------------------------------------------------------------------ docs/kafka.md
KAFKA_NOT_RUN = ("scripts/kafka/broker.sh",  # the test brings its own broker
                 "bench/kafka_soak.py", "bench/kafka_bench.py")  # benchmarks of minutes, run by hand


def kafka_commands() -> list[str]:
    """The shell lines of docs/kafka.md's bash blocks, continuations joined, benchmarks left out."""
    lines = []
    for block in examples("docs/kafka.md", "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            command = line.split("  #")[0].strip()
            if command and not command.startswith("#") and not any(skip in command for skip in KAFKA_NOT_RUN):
                lines.append(command)
    return lines


@pytest.mark.kafka
def test_kafka_quick_start_runs_as_written(kafka_bootstrap: str, tmp_path: Path) -> None:
    """init-topics, consume (in the background, until ready), the Python producer/consumer example, then the
    rest of the commands: each as docs/kafka.md writes it, against the test's real broker."""
    commands = kafka_commands()
    assert any(c.startswith("rwkv-stream consume") for c in commands)
    ready = tmp_path / "ready"
    env = {**os.environ, "BOOTSTRAP": kafka_bootstrap, "RWKV_STREAM_CONSUME_READINESS_FILE": str(ready),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = {"cwd": ROOT, "env": env, "capture_output": True, "text": True, "stdin": subprocess.DEVNULL}
    consume = next(c for c in commands if c.startswith("rwkv-stream consume"))
    for command in commands[: commands.index(consume)]:
        done = subprocess.run(["bash", "-ec", command], timeout=120, **run)
        assert done.returncode == 0, f"{command!r}: {done.stderr[-2000:]}"
    log = (tmp_path / "consume.log").open("w")
    processor = subprocess.Popen(["bash", "-ec", f"exec {consume}"], cwd=ROOT, env=env, stdout=log, stderr=log,
                                 stdin=subprocess.DEVNULL)
    try:
        _wait_for(ready, processor, tmp_path / "consume.log")
        (example,) = examples("docs/kafka.md", "python")
        done = subprocess.run([sys.executable, "-c", example], timeout=300, **run)
        assert done.returncode == 0, done.stderr[-3000:]
        printed = [line for line in done.stdout.splitlines() if line.startswith("call-42")]
        assert len(printed) == 4, done.stdout
        assert [line.split()[1] for line in printed] == ["final", "interim", "final", "final"], done.stdout
        for command in commands[commands.index(consume) + 1 :]:
            done = subprocess.run(["bash", "-ec", command], timeout=120, **run)
            assert done.returncode == 0, f"{command!r}: {done.stderr[-2000:]}"
    finally:
        processor.terminate()
        assert processor.wait(timeout=120) == 0, (tmp_path / "consume.log").read_text()[-3000:]


def _wait_for(ready: Path, processor: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready.exists():
        assert processor.poll() is None, f"the processor exited: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"not ready after {timeout_s} s: {log.read_text()[-3000:]}"
        time.sleep(0.2)
