"""Two processes on one node pulling the default model at once: one pulls, the other waits and
loads the same files; nobody deletes a directory another one is reading."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# A child process: a fake (slow) download and conversion, then pull and "load" (read every file).
CHILD = """
import sys, time
from pathlib import Path
import workers.model_store as store

log = Path(sys.argv[1])

def download(workdir):
    with open(log, "a") as f:
        f.write("download\\n")
    time.sleep(1.0)
    gguf = workdir / "model.gguf"
    gguf.write_bytes(b"gguf")
    return gguf

def convert(gguf, out):
    out.mkdir()
    time.sleep(0.5)
    (out / "weights.bin").write_bytes(b"w" * 1000)
    (out / "config.json").write_text("{}")

store._download_gguf, store._convert = download, convert
path = store.pull_default_model(force=len(sys.argv) > 2)
time.sleep(0.5)  # still "loading" while the other process finishes its pull
print(path, len((path / "weights.bin").read_bytes()), (path / "model.gguf").read_bytes().decode())
"""


def pull_in_processes(tmp_path: Path, count: int, force: bool = False) -> list[str]:
    log = tmp_path / "downloads.log"
    command = [sys.executable, "-c", CHILD, str(log)] + (["force"] if force else [])
    env = {**os.environ, "HOGWILD_CACHE": str(tmp_path / "cache")}
    children = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                 cwd=Path(__file__).resolve().parents[1]) for _ in range(count)]
    outputs = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        outputs.append(out.strip())
    return outputs


def test_concurrent_pulls_download_once_and_both_load(tmp_path):
    outputs = pull_in_processes(tmp_path, 3)
    target = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    assert outputs == [f"{target} 1000 gguf"] * 3
    assert (tmp_path / "downloads.log").read_text().splitlines() == ["download"]
    leftovers = [p.name for p in target.parent.iterdir() if p.name != target.name and not p.name.endswith(".lock")]
    assert leftovers == []  # no staging directory left behind


def test_forced_pulls_replace_the_model_in_turn(tmp_path):
    pull_in_processes(tmp_path, 1)
    outputs = pull_in_processes(tmp_path, 2, force=True)
    target = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    assert outputs == [f"{target} 1000 gguf"] * 2
    assert (tmp_path / "downloads.log").read_text().splitlines() == ["download"] * 3
