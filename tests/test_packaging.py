"""The wheel carries every module of src/ and integrations/ (a forgotten subpackage
in pyproject's `packages` fails here, not for a user), plus package data."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAPPING = {"src/hfcompress": "hfcompress", "integrations": "hfcompress/integrations"}


def test_wheel_contains_every_module(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("hfcompress-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for folder, pkg in MAPPING.items():
        for py in (ROOT / folder).rglob("*.py"):
            if "__pycache__" in py.parts:
                continue
            expected.add(f"{pkg}/{py.relative_to(ROOT / folder).as_posix()}")
    missing = sorted(expected - names)
    assert not missing, f"modules missing from the wheel (add their packages to pyproject): {missing}"
    data = sorted((ROOT / "src/hfcompress/data").glob("*.txt"))
    for f in data:
        assert f"hfcompress/data/{f.name}" in names
    assert any(n.endswith("entry_points.txt") for n in names)
