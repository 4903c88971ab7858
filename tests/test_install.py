"""Installing peftune: the Python floor, and the offline bundle for a GPU machine with no
package registry (``make gpu-bundle``, ``benchmarks/gpu_smoke.sh --bundle``)."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_a_python_older_than_3_11_is_told_so_before_a_venv_is_made(tmp_path):
    fake = tmp_path / "python3.10"
    fake.write_text("#!/bin/sh\necho 3.10\n")  # what the version probe prints on 3.10
    fake.chmod(0o755)
    old = subprocess.run(["make", "-s", "check-python", f"PYTHON={fake}"], cwd=ROOT,
                         capture_output=True, text=True)
    assert old.returncode != 0
    assert f"peftune needs Python 3.11 or newer; {fake} is Python 3.10" in old.stderr
    assert subprocess.run(["make", "-s", "check-python", f"PYTHON={sys.executable}"],
                          cwd=ROOT, capture_output=True).returncode == 0
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"  # pip refuses older ones itself


def test_importing_peftune_on_python_3_10_names_the_floor():
    code = "import sys; sys.version_info = (3, 10, 14, 'final', 0); import peftune"
    src = str(ROOT / "src")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": src})
    assert out.returncode != 0
    assert "ImportError: peftune needs Python 3.11 or newer; this is Python 3.10" in out.stderr
