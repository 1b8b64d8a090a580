"""The wheel holds everything a user needs and nothing of the repo's development files (issue 20)."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"rwkv_stream": ROOT / "rwkv_stream", "rwkv_stream/components": ROOT / "components",
           "rwkv_stream/cuda": ROOT / "cuda", "rwkv_stream/configs": ROOT / "configs",
           "rwkv_stream/docs": ROOT / "docs"}


def build_wheel(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out)], check=True, timeout=300, cwd=out)
    (wheel,) = out.glob("rwkv_stream-*.whl")
    return wheel


def expected_files() -> set[str]:
    """Every module, kernel, config, doc and shipped-model file of the source tree, as the wheel names it."""
    want = set()
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc",):
                if prefix == "rwkv_stream" and any(p.endswith(".egg-info") for p in path.parts):
                    continue
                want.add(f"{prefix}/{path.relative_to(folder).as_posix()}")
    return want


def test_wheel_contents(tmp_path: Path) -> None:
    names = set(zipfile.ZipFile(build_wheel(tmp_path)).namelist())
    missing = sorted(expected_files() - names)
    assert not missing, f"files of the source tree missing from the wheel: {missing}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert {"rwkv_stream/py.typed", "rwkv_stream/docs/model-card.md", "rwkv_stream/configs/consumer.toml",
            "rwkv_stream/data/transcript-tagger/bundle.json"} <= names
    assert not [n for n in names if n.startswith(("tests/", "bench/", "scripts/")) or "/tests/" in n]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(next(tmp_path.glob("*.whl"))).read(entry_points).decode()
    assert "rwkv-stream = rwkv_stream.cli:main" in text and "rwkv = rwkv_stream.components.spacy_component" in text


BLOCKER = '''
import sys

BLOCKED = {"spacy", "thinc", "kafka", "prometheus_client", "crc32c", "cupy", "pyrwkv_tokenizer", "transformers"}


class _NotInstalled:
    """Modules of the extras are absent, as in `pip install rwkv-stream` without extras."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _NotInstalled())
'''


def fresh_venv_with(wheel: Path, where: Path) -> Path:
    """A new virtualenv holding the wheel without extras. The core dependencies (torch: 3 GB) are borrowed from
    the test's own environment through a path entry; every module an extra would bring is made unimportable."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=300)
    python = where / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   timeout=300)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    ours = Path(sysconfig.get_paths()["purelib"])
    (site / "borrowed_core_dependencies.pth").write_text(f"{ours}\n")
    (site / "sitecustomize.py").write_text(BLOCKER)
    return where / "bin"


def test_installed_wheel_without_extras_runs_the_demo_and_names_missing_extras(tmp_path: Path) -> None:
    bin_dir = fresh_venv_with(build_wheel(tmp_path / "wheel"), tmp_path / "venv")
    run = {"capture_output": True, "text": True, "timeout": 600, "cwd": tmp_path, "stdin": subprocess.DEVNULL}
    version = subprocess.run([str(bin_dir / "rwkv-stream"), "--version"], **run)
    assert version.returncode == 0 and version.stdout.startswith("rwkv-stream "), version
    where = subprocess.run([str(bin_dir / "python"), "-c", "import rwkv_stream; print(rwkv_stream.__file__)"], **run)
    assert str(tmp_path / "venv") in where.stdout, "the test must run the installed wheel, not the checkout"
    demo = subprocess.run([str(bin_dir / "rwkv-stream"), "demo", "--quiet"], **run)
    assert demo.returncode == 0 and "=== restored transcript ===" in demo.stdout, demo.stderr[-2000:]
    consume = subprocess.run([str(bin_dir / "rwkv-stream"), "consume"], **run)
    lines = consume.stderr.strip().splitlines()
    assert consume.returncode == 2 and len(lines) == 1 and "rwkv-stream[kafka]" in lines[0], consume.stderr
