"""Installing peftune: the Python floor, and the offline bundle for a GPU machine with no
package registry (``make gpu-bundle``, ``benchmarks/gpu_smoke.sh --bundle``)."""

import json
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

from peftune import devices

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


def _image_venv(tmp_path: Path) -> Path:
    """A fresh venv that sees only what the GPU image has (torch, accelerate, numpy, ...,
    linked from this environment), as the GPU machine's own interpreter does."""
    image, venv = tmp_path / "image-site", tmp_path / "venv"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_bundle.py"), "image-site",
                    str(image)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next(venv.glob("lib/python3*/site-packages"))
    (site / "gpu_image.pth").write_text(f"{image}\n")
    return venv / "bin" / "python"


def _bundle(folder: Path, python: str) -> Path:
    if not (folder / "MANIFEST.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_bundle.py"), "build",
                        str(folder), "--python", python], check=True)
    return folder


@pytest.mark.slow
def test_make_gpu_bundle_fits_what_a_gpu_call_carries(tmp_path):
    """PEFTUNE_GPU_BUNDLE names a bundle built before (``make gpu-bundle``), else one is built."""
    bundle = _bundle(Path(os.environ.get("PEFTUNE_GPU_BUNDLE") or tmp_path / "b"), "3.12")
    size = sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file())
    assert size <= 60 * 2**20, f"{size / 2**20:.1f} MiB"
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    wheels = " ".join(manifest["wheels"])
    assert manifest["python"] == "3.12" and "torch" not in manifest["packages"]
    assert "cp312" in wheels and "peftune-0.1.0-py3-none-any.whl" in wheels
    with zipfile.ZipFile(next((bundle / "wheels").glob("bitsandbytes-*.whl"))) as whl:
        libraries = sorted(Path(n).name for n in whl.namelist() if n.endswith(".so"))
    assert libraries == ["libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so",
                         "libbitsandbytes_cuda132.so"]  # the image's torch is cu130
    assert (bundle / "tokenizer" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_the_gpu_smoke_runs_offline_from_the_bundle_in_a_fresh_venv(tmp_path):
    """The smoke installs a bundle with ``--no-index`` (and no pip configuration) next to
    the image's packages alone, and runs its CPU stages from it: nothing else is needed.
    The bundle is built for this machine's Python, whose CPU torch stands in for the GPU
    image's."""
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    bundle = _bundle(tmp_path / "bundle", here)
    python = _image_venv(tmp_path)
    assert subprocess.run([python, "-c", "import transformers"]).returncode != 0  # not yet
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env.update(PYTHON=str(python), WORK=str(tmp_path / "work"), PIP_CONFIG_FILE=os.devnull,
               OMP_NUM_THREADS="1")
    out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_smoke.sh"), "--cpu",
                          "--bundle", str(bundle), "--out", str(tmp_path / "out")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "smoke.json").read_text())
    status = {s["stage"]: (s["status"], s["note"]) for s in summary["stages"]}
    cuda = ("skipped", "needs CUDA")
    assert status == {"install": ("ok", ""), "versions": ("ok", ""), "setup": ("ok", ""),
                      "train-lora": ("ok", ""), "train-qlora": cuda, "evaluate": ("ok", ""),
                      "summarize": ("ok", ""), "export": ("ok", ""), "plan": cuda,
                      "gpu-bench": cuda, "fsdp-lora": cuda, "search": cuda}
    train = next(s for s in summary["stages"] if s["stage"] == "train-lora")
    assert train["training"] == ["cpu " + ("bf16" if devices.bf16_supported() else "fp32")]
    assert train["training_weights"] == ["float32"]  # model.dtype auto on a CPU
    assert summary["versions"]["unmet"] == []  # every bundled package's needs are met
    versions = summary["versions"]["versions"]
    assert versions["peftune_from"].startswith(str(tmp_path / "work" / "site"))  # the wheel's
    assert versions["transformers"] == "5.24.0" and versions["bitsandbytes"] == "0.50.2"
    assert "| train-lora | ok |" in (tmp_path / "out" / "smoke.md").read_text()
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as logs:  # each stage's output
        assert "./train-lora.log" in logs.getnames()
