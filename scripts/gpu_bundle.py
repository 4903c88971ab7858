"""The offline bundle for a GPU machine that reaches no package registry (``make gpu-bundle``).

    python scripts/gpu_bundle.py build gpu-bundle     # wheels/, tokenizer/, MANIFEST.json
    python scripts/gpu_bundle.py build DIR --python 3.11   # for this machine's CPU test
    python scripts/gpu_bundle.py image-site DIR       # what the GPU image has, linked from here

The GPU image holds Python 3.12, a CUDA build of torch and accelerate (our pin); what else it
has is listed in ``IMAGE``. The bundle holds, as Python 3.12 manylinux x86_64 wheels at the
versions installed in this environment, every other package peftune's pinned dependencies
need; bitsandbytes with only its CPU and CUDA-13 libraries (the image's torch is cu130);
peftune itself; and the embedded model's tokenizer, without weights (the smoke trains small
random LLaMA models). ``benchmarks/gpu_smoke.sh --bundle DIR`` installs it with
``pip --no-index``. ``image-site`` links the ``IMAGE`` packages (and what they need) of this
environment into DIR, so that a test can pretend to be the bare GPU machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
LIMIT_MIB = 60
# Already on the GPU image, and too large to carry: torch (its CUDA build), accelerate (the
# same 1.15.0 we pin), and the big binary packages that datasets, rouge-score and the report
# need. aclsum is the embedded data set (29 MB), which the smoke does not use. Their own
# dependencies are the image's business and are not walked.
IMAGE = ("torch", "accelerate", "numpy", "pyarrow", "pandas", "matplotlib", "aclsum")
# Published as a source archive only: its (pure-Python) wheel is built here.
BUILT_HERE = ("rouge-score",)
# Taken apart below: only the libraries the image's CUDA major version loads are kept.
STRIPPED = {"bitsandbytes": re.compile(r"bitsandbytes/libbitsandbytes_(cpu|cuda13\d)\.so$")}
TARGET = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
          "os_name": "posix", "implementation_name": "cpython",
          "platform_python_implementation": "CPython"}
PLATFORMS = ("manylinux_2_39_x86_64", "manylinux_2_35_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_31_x86_64", "manylinux_2_28_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_24_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def closure(roots: list[str], *, python: str, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Name -> installed version of ``roots`` and everything they need on the target
    (Python ``python``, Linux x86_64), extras included where asked for; ``skip`` and what
    only they need are left out."""
    target = {**TARGET, "python_version": python, "python_full_version": f"{python}.0"}
    found: dict[str, str] = {}
    done: set[tuple[str, str]] = set()
    todo = [Requirement(r) for r in roots]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in skip:
            continue
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in done:
                continue
            done.add((name, extra))
            try:
                found[name] = md.version(name)
                requires = md.requires(name) or []
            except md.PackageNotFoundError:
                sys.exit(f"{name} is needed on the GPU machine but not installed here; "
                         "run `make setup` first")
            for line in requires:
                dep = Requirement(line)
                if dep.marker is None or dep.marker.evaluate({**target, "extra": extra}):
                    todo.append(dep)
    return found


def pinned() -> list[str]:
    """peftune's dependencies as pyproject.toml pins them."""
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def download(packages: dict[str, str], folder: Path, python: str) -> None:
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pins = {name: f"{name}=={version}" for name, version in sorted(packages.items())}
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--implementation", "cp", *platforms,
                    "-d", str(folder), *(p for n, p in pins.items() if n not in BUILT_HERE)],
                   check=True)
    built = [p for n, p in pins.items() if n in BUILT_HERE]
    if built:
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w",
                        str(folder), *built], check=True)


def strip_wheel(wheel: Path, keep: re.Pattern[str]) -> None:
    """Rewrite ``wheel`` without the shared libraries ``keep`` does not match (and their
    RECORD lines)."""
    stripped = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(stripped, "w",
                                                         zipfile.ZIP_DEFLATED) as dst:
        dropped = {i.filename for i in src.infolist()
                   if i.filename.endswith(".so") and not keep.search(i.filename)}
        for info in src.infolist():
            if info.filename in dropped:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if line.split(b",")[0].decode() not in dropped)
            dst.writestr(info, data)
    stripped.replace(wheel)


def peftune_wheel(folder: Path) -> None:
    with tempfile.TemporaryDirectory() as build:
        # a copy: building in the checkout would leave build/ and egg-info behind
        shutil.copytree(ROOT, build, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", ".venv", "runs", "gpu-bundle", "build", "*.egg-info", "__pycache__"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                        str(folder), build], check=True)


def tokenizer(folder: Path) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from peftune import models
    from peftune.config import ModelConfig

    models.load_tokenizer(ModelConfig()).save_pretrained(folder)


def size_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def build(out: Path, python: str) -> None:
    packages = closure(pinned(), python=python, skip=IMAGE)
    wheels = out / "wheels"
    if out.exists():
        shutil.rmtree(out)
    wheels.mkdir(parents=True)
    download(packages, wheels, python)
    for name, keep in STRIPPED.items():
        for wheel in wheels.glob(f"{name}-*.whl"):
            strip_wheel(wheel, keep)
    peftune_wheel(wheels)
    tokenizer(out / "tokenizer")
    manifest = {"python": python, "image": list(IMAGE), "packages": packages,
                "wheels": sorted(w.name for w in wheels.glob("*.whl"))}
    (out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    size = size_mib(out)
    print(f"{out}: {len(manifest['wheels'])} wheels and a tokenizer, {size:.1f} MiB")
    if size > LIMIT_MIB:
        sys.exit(f"{out} is {size:.1f} MiB, over the {LIMIT_MIB} MiB a GPU call can carry")


def image_site(folder: Path) -> None:
    """Link the files of the ``IMAGE`` packages and their dependencies into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for name in closure(list(IMAGE), python=here):
        dist = md.distribution(name)
        top = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for entry in top:
            source = Path(str(dist.locate_file(entry)))
            if source.exists() and not (folder / entry).exists():
                (folder / entry).symlink_to(source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("build", "image-site"))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--python", default="3.12", help="the Python version the wheels are "
                        "for (default: the GPU image's)")
    args = parser.parse_args()
    if args.command == "build":
        build(args.folder, args.python)
    else:
        image_site(args.folder)


if __name__ == "__main__":
    main()
