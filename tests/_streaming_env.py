"""A side environment with MosaicML Streaming, for the tests that read MDS exports with `StreamingDataset`.

mosaicml-streaming 0.13 pins transformers<5 and numpy<2.2, so it stays out of the project's venv. This
venv (`.venv/streaming` by default, made by `make test` or on first use) holds only streaming and the
small packages its import needs, installed without their pins; torch, numpy, transformers, pyarrow and prep
itself come from the project's venv through a `.pth` file. One more thing: `import streaming` imports
its image datasets (`streaming.vision`), hence torchvision, and the registry's torchvision wheels are built
against CUDA torch and do not load beside the CPU torch used here ("operator torchvision::nms does not
exist"). In this venv `streaming/vision/__init__.py` is therefore emptied (a stand-in torchvision would make
transformers believe torchvision is usable). Nothing of streaming's own MDS reading (streaming.base) changes.

    python tests/_streaming_env.py [.venv/streaming]     # build it (idempotent)
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / ".venv" / "streaming"
STREAMING = "mosaicml-streaming==0.13.0"
# what `import streaming` needs beyond the project's packages (its setup.py ranges)
EXTRAS = ["Brotli>=1.0.9", "python-snappy>=0.6.1,<1", "cramjam", "zstd>=1.5.2.5,<2", "xxhash>=3,<5",
          "catalogue>=2,<3", "pillow"]
VISION_INIT = '"""Emptied in this side venv (tests/_streaming_env.py): its image datasets import torchvision."""\n'


def python(venv: Path = DEFAULT) -> Path:
    """The side venv's interpreter, building the venv first when it is missing."""
    marker = venv / ".complete"
    if not marker.is_file():
        build(venv)
    return venv / "bin" / "python"


def build(venv: Path = DEFAULT) -> None:
    """Create the venv, link the project's site-packages, install streaming and its import needs."""
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--clear", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], check=True, capture_output=True, text=True).stdout.strip())
    project = sysconfig.get_paths()["purelib"]
    (site / "zz_prep_project.pth").write_text(f"import site; site.addsitedir({project!r})\n")
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
           "--disable-pip-version-check", "--no-deps"]
    subprocess.run([*pip, STREAMING, *EXTRAS], check=True, env=os.environ | {"PIP_NO_INPUT": "1"})
    (site / "streaming" / "vision" / "__init__.py").write_text(VISION_INIT)
    subprocess.run([str(venv / "bin" / "python"), "-c", "import streaming"], check=True)
    (venv / ".complete").write_text(STREAMING + "\n")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    build(target.resolve())
    print(f"streaming venv ready: {target}")
