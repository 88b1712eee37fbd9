"""``hogwild serve`` as a user runs it: a fresh process with its own local Ray, the default model,
the URL printed, a request answered, Ctrl-C stops it cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from tests.test_serve_e2e import CHAT, _free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_hogwild_serve_rejects_bad_options():
    from deploy.cli import main

    assert main(["serve", "--port", "0"]) == 2
    assert main(["serve", "--replicas", "0"]) == 2


WAIT_SCRIPT = """
import signal, threading, time
from deploy.cli import wait_for_interrupt

def poke():  # SIGINT to this thread, not the main one: what the kernel may do in a Ray process
    time.sleep(0.3)
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)

threading.Thread(target=poke).start()
try:
    wait_for_interrupt()
except KeyboardInterrupt:
    print("interrupted")
"""


def test_ctrl_c_handled_by_another_thread_still_stops_the_wait():
    """Regression: the serve CLI slept an hour at a time and missed a SIGINT taken by another thread."""
    done = subprocess.run([sys.executable, "-c", WAIT_SCRIPT], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "interrupted", done.stderr


def test_hogwild_serve_prints_the_url_and_stops_on_ctrl_c(tmp_path):
    """The CLI on the default model: a fresh process with its own local Ray."""
    port, log = _free_port(), tmp_path / "stderr.txt"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "deploy.cli", "serve", "--port", str(port), "--num-cpus", "2",
                                 "--max-steps", "8"], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line, (line, log.read_text()[-2000:])
        import httpx

        body = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_steps": 8, "temperature": 0}
        r = httpx.post(f"http://127.0.0.1:{port}{CHAT}", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["model"] == "SmolLM2-135M-Instruct"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
