"""llama.cpp's sources as vendored in the llama-cpp-python sdist, fetched once per checkout.

`llama_sdist()` downloads the pinned sdist with pip (once), unpacks it under
`.cache/llama-cpp-python-<version>/` and returns that directory. Unpacking goes to a
temporary directory renamed into place under a file lock, so parallel test workers
never see a half-extracted tree.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
DOWNLOADS = CACHE / "sdist"


def llama_sdist(version: str = VERSION) -> Path:
    """The unpacked sdist's top directory; its llama.cpp tree is `vendor/llama.cpp`."""
    if version != VERSION:
        raise ValueError(f"only llama-cpp-python {VERSION} is pinned")
    dest = CACHE / f"llama-cpp-python-{version}"
    if (dest / "vendor" / "llama.cpp").is_dir():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".llama-cpp-python-{version}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (dest / "vendor" / "llama.cpp").is_dir():
            return dest
        archive = _download(version)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=CACHE))
        try:
            with tarfile.open(archive) as tf:
                tf.extractall(tmp, filter="data")
            (top,) = tmp.iterdir()  # llama_cpp_python-<version>/
            os.rename(top, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def llama_cpp_dir(version: str = VERSION) -> Path:
    """The vendored llama.cpp tree (convert_hf_to_gguf.py, conversion/, gguf-py/, src/)."""
    return llama_sdist(version) / "vendor" / "llama.cpp"


def _download(version: str) -> Path:
    archive = DOWNLOADS / f"llama_cpp_python-{version}.tar.gz"
    if archive.is_file():
        return archive
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
         f"llama-cpp-python=={version}", "-d", str(DOWNLOADS)],
        check=True, capture_output=True, text=True,
    )
    if not archive.is_file():
        raise FileNotFoundError(f"pip download left no {archive.name} in {DOWNLOADS}")
    return archive


# llama.cpp's converter names the pre-tokenizer by hashing the tokenizer's output on a fixed
# text and refuses hashes it does not know; a tiny test tokenizer's hash is never known, so
# the run below answers "qwen35", the name it gives the released Qwen3.5 tokenizers.
_CONVERT_MAIN = """
import runpy, sys
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen35"
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def llama_convert_hf(hf_dir: Path, out: Path, outtype: str = "f32", *args: str, timeout: float = 300) -> Path:
    """Run the sdist's `convert_hf_to_gguf.py` on `hf_dir` with its own vendored gguf-py."""
    src = llama_cpp_dir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), str(src)])}
    cmd = [sys.executable, "-c", _CONVERT_MAIN, str(src / "convert_hf_to_gguf.py"), str(hf_dir),
           "--outtype", outtype, "--outfile", str(out), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed ({r.returncode}):\n{r.stderr[-4000:]}")
    return out
