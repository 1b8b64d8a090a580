"""Every command given a bad value of each kind: non-zero exit, one line on stderr naming the value, no
traceback (issue 20). Runs the installed console script, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rwkv_stream.loading import shipped_dir

CLI = [sys.executable, "-m", "rwkv_stream"]
CASES = [  # (arguments, what the one line must name)
    (["info", "/no/such/model.pth"], "/no/such/model.pth"),
    (["info", "shipped:nope"], "nope"),
    (["generate", "hi", "--model", "/no/such/dir"], "/no/such/dir"),
    (["generate", "hi", "--dtype", "fp7"], "fp7"),
    (["generate", "hi", "--max-tokens", "-1"], "-1"),
    (["generate", "hi", "--top-p", "3"], "3"),
    (["bench", "--shape", "huge"], "huge"),
    (["train", "--steps", "many", "--out", "x"], "many"),
    (["train", "--task", "transcript", "--corpus", "c", "--init", "shipped:gone", "--out", "x"], "gone"),
    (["no-such-command"], "no-such-command"),
    (["demo", "--input", "/no/such/transcript.txt"], "/no/such/transcript.txt"),
    (["demo", "--min-words", "0"], "0"),
    (["demo", "--realtime", "--speed", "-2"], "-2"),
    (["consume", "--config", "/no/such/consumer.toml"], "/no/such/consumer.toml"),
    (["consume", "--delivery", "twice"], "twice"),
    (["consume", "--max-streams", "-3"], "-3"),
    (["consume", "--bootstrap-servers", "127.0.0.1:1", "--max-streams", "lots"], "lots"),
    (["kafka", "init-topics", "--bootstrap-servers", "127.0.0.1:1"], "127.0.0.1:1"),
    (["kafka", "dlq-replay", "--bootstrap-servers", "127.0.0.1:1"], "127.0.0.1:1"),
    (["consume", "--config", "{toml:max_stream = 3}"], "did you mean 'max_streams'"),
    (["consume", "--config", "{toml:max_streams = 'lots'}"], "'lots'"),
    (["consume", "--config", "{toml:[client]\nrequest_timout_ms = 3}"], "did you mean 'request_timeout_ms'"),
    (["consume", "--config", "{toml:[client]\nsecurity_protocol = 'PLAINTEXT'\nmax_streams = 9}"],
     "move it above [client]"),
    (["consume", "--config", "{toml:max_streams = }"], "not valid TOML"),
]


@pytest.mark.parametrize(("args", "named"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_a_bad_value_is_one_line_naming_it(args: list[str], named: str, tmp_path: Path) -> None:
    env = {**os.environ, "RWKV_STREAM_CONSUME_BOOTSTRAP_SERVERS": "127.0.0.1:1"}
    args = [_materialize(a, tmp_path) for a in args]
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0, done
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, done.stderr
    assert named in lines[0], lines[0]


def _materialize(arg: str, tmp_path: Path) -> str:
    """``{toml:TEXT}`` becomes the path of a file holding TEXT (``\\n`` for new lines)."""
    if not arg.startswith("{toml:"):
        return arg
    path = tmp_path / "consumer.toml"
    path.write_text(arg[len("{toml:"):-1].replace("\\n", "\n"))
    return str(path)


def test_version_and_module_entry_point() -> None:
    done = subprocess.run([*CLI, "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("rwkv-stream ")


def test_debug_shows_the_traceback() -> None:
    done = subprocess.run([*CLI, "--debug", "info", "/no/such/model.pth"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_train_starts_from_the_shipped_model(tmp_path: Path) -> None:
    """`rwkv-stream train --init shipped` resolves like every model source (it used to fail)."""
    words = ["so", "we", "will", "meet", "on", "monday", "at", "ten", "okay", "do", "not", "be", "late", "the",
             "quick", "brown", "fox"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, n in (("train.txt", 20), ("test.txt", 4)):
        paras = [" ".join(words[(i + j) % len(words)] for j in range(25)).capitalize() + "." for i in range(n)]
        (corpus / name).write_text("\n\n".join(paras))
    done = subprocess.run([*CLI, "train", "--task", "transcript", "--init", "shipped", "--corpus", str(corpus),
                           "--steps", "2", "--batch-size", "2", "--ctx", "32", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (shipped_dir() / "tokenizer.json").read_bytes()
