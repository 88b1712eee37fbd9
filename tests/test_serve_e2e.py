"""The endpoint end to end: Ray Serve on a local Ray, real HTTP on a loopback port, a tiny random
model in the replica. Streamed and non-streamed agree; the official ``openai`` client works
unmodified; 8 concurrent streams each equal their run alone; a client that pauses reading still
gets its whole stream, one that leaves frees its session's blocks; malformed requests get 4xx and
the server keeps serving; the live page works in headless Chromium (screenshot saved)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from deploy.config import ServeConfig
from tests.test_serve_api import TINY, _malformed, ask, choice_texts, read_sse

pytestmark = pytest.mark.ray

PROBLEMS = ["What is 2 + 3?", "Name three primes.", "How many legs do 4 cats have?", "Is 91 prime?",
            "Spell 'cat' backwards.", "What is 12 / 4?", "Sum 1..10.", "Which is larger, 2^10 or 10^3?"]
CHAT = "/v1/chat/completions"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    import ray

    from deploy.cli import start, stop

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        config = ServeConfig(model=TINY, kv_tokens=1 << 15, max_steps=10, max_steps_limit=2000, max_workers=4,
                             max_step_tokens=6, check_every=4, max_prompt_chars=2000)
        yield start(config, host="127.0.0.1", port=_free_port())
    finally:
        stop()


@pytest.fixture(scope="module")
def http(url):
    import httpx

    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


def stream(http, body: dict, path: str = CHAT) -> list:
    with http.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        return read_sse(response.iter_lines())


def test_streamed_and_non_streamed_agree_over_http(http):
    body = ask(PROBLEMS[0], workers=3)
    whole = http.post(CHAT, json=body).json()
    chunks = stream(http, body)
    texts = choice_texts(chunks[:-1])
    assert [texts[i] for i in range(3)] == [w["text"] for w in whole["hogwild"]["workers"]]
    assert chunks[-1] == "[DONE]" and chunks[-2]["usage"] == whole["usage"]
    assert http.get("/health").json()["status"] == "ok"


def test_the_openai_client_works_unmodified(url, http):
    import openai

    client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0)
    (model,) = [m.id for m in client.models.list()]
    extra = {"workers": 2, "max_steps": 10, "max_step_tokens": 6, "check_every": 4}
    messages = [{"role": "user", "content": PROBLEMS[1]}]
    whole = client.chat.completions.create(model=model, messages=messages, temperature=0, extra_body=extra)
    assert whole.choices[0].message.content == (whole.model_extra["hogwild"]["answer"] or "")
    assert whole.usage.completion_tokens > 0
    texts: dict[int, str] = {}
    usage = None
    for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0, stream=True,
                                                extra_body=extra):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        usage = chunk.usage or usage
    assert [texts[0], texts[1]] == [w["text"] for w in whole.model_extra["hogwild"]["workers"]]
    assert usage.total_tokens == whole.usage.total_tokens
    completion = client.completions.create(model=model, prompt=PROBLEMS[1], temperature=0, extra_body=extra)
    assert completion.choices[0].text == whole.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="workers"):
        client.chat.completions.create(model=model, messages=messages, extra_body={"workers": 5})
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=messages)


def test_eight_concurrent_streams_each_equal_their_run_alone(http):
    bodies = [ask(p, workers=1 + i % 3, max_steps=8 + 2 * i) for i, p in enumerate(PROBLEMS)]
    alone = [http.post(CHAT, json=b).json()["hogwild"]["workers"] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: stream(http, b), bodies))
    for body, want, chunks in zip(bodies, alone, together):
        assert chunks[-1] == "[DONE]"
        texts = choice_texts(chunks[:-1])
        assert [texts[i] for i in range(body["workers"])] == [w["text"] for w in want]


def test_a_client_that_pauses_reading_gets_its_whole_stream(http):
    """A client still connected but not reading (for longer than its session runs) is not a client
    that left: the session runs to its end, nothing is cancelled, and the stream it reads afterwards
    is whole (the deltas add up to the non-streamed texts, then usage and [DONE])."""
    body = ask(PROBLEMS[4], workers=4, max_steps=120)
    whole = http.post(CHAT, json=body).json()
    before = http.get("/health").json()
    with http.stream("POST", CHAT, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: dropping the iterator closes the connection (a real disconnect)
        head = [line for _, line in zip(range(8), lines)]
        assert http.get("/health").json()["live"] == 1  # paused while its session runs
        deadline = time.monotonic() + 30
        while (health := http.get("/health").json())["live"] and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)  # and a while longer, the stream waiting in buffers
        assert health["live"] == 0 and health["cancelled"] == before["cancelled"]  # it ended by itself
        chunks = read_sse([*head, *lines])
    assert chunks[-1] == "[DONE]" and chunks[-2]["usage"] == whole["usage"]
    texts = choice_texts(chunks[:-1])
    assert [texts[i] for i in range(4)] == [w["text"] for w in whole["hogwild"]["workers"]]
    after = http.get("/health").json()
    assert after["cancelled"] == before["cancelled"] and after["claimed_pages"] == 0


def test_a_client_that_leaves_frees_its_sessions_blocks(http):
    before = http.get("/health").json()
    body = {**ask(workers=4), "max_steps": 2000, "stream": True}  # would run for tens of seconds
    with http.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept open until the block ends: then the client leaves
        seen = [line for _, line in zip(range(8), lines)]
        assert any(line.startswith("data: ") for line in seen)
        during = http.get("/health").json()
        assert during["live"] == 1 and during["cancelled"] == before["cancelled"], (during, before)
    deadline = time.monotonic() + 30
    while ((health := http.get("/health").json())["live"] or health["cancelled"] == before["cancelled"]) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health["cancelled"] == before["cancelled"] + 1  # stopped because the client left, not by its end
    assert health["live"] == 0 and health["used_pages"] == before["used_pages"] and health["claimed_pages"] == 0


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(http):
    cases = _malformed()
    assert len(cases) >= 40
    for what, body in cases:
        content = body if isinstance(body, str) else json.dumps(body)
        r = http.post(CHAT, content=content.encode("utf-8", "surrogatepass"),
                      headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (what, r.status_code, r.text)
        assert r.json()["error"]["message"]
    assert http.post(CHAT, json=ask()).status_code == 200


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_live_page_streams_every_worker_in_headless_chromium(url, tmp_path):
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("no system Chromium (apt-get install -y chromium); .ci/run installs it")
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    shots = Path(os.environ.get("HOGWILD_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.fill("#problem", PROBLEMS[2])
            page.fill("#workers", "3")
            page.fill("#budget", "40")
            page.fill("#temperature", "0")
            page.click("#run")
            page.wait_for_selector("#answer.shown", timeout=60_000)
            page.wait_for_function("document.body.dataset.done === '1'", timeout=30_000)
            columns = page.locator("#columns .worker")
            assert columns.count() == 3
            texts = [columns.nth(i).locator("pre").inner_text() for i in range(3)]
            assert all(t.strip() for t in texts)
            assert [columns.nth(i).locator("h2 span").inner_text() for i in range(3)] == ["Alice", "Bob", "Carol"]
            assert page.locator("#history li").count() >= 1
            assert "error" not in (page.get_attribute("#status", "class") or "")
            page.screenshot(path=str(shots / "live_page.png"), full_page=True)
        finally:
            browser.close()
    assert (shots / "live_page.png").stat().st_size > 10_000


def test_a_gang_replica_starts_its_actors_in_the_replicas_placement_group(http):
    from ray import serve
    from ray.util import placement_group_table

    from deploy.serve_app import HogwildDeployment, deployment_options

    def created() -> dict:
        return {k: v for k, v in placement_group_table().items() if v["state"] == "CREATED"}

    config = ServeConfig(model=TINY, kv_tokens=1 << 14, max_steps=10, max_workers=4, max_step_tokens=6,
                         check_every=4, actors=1)
    before = created()
    options = deployment_options(config, "cpu")
    assert len(options["placement_group_bundles"]) == 3  # the replica, one worker actor, the cache service
    serve.run(HogwildDeployment.options(name="gang", **options).bind(config), name="gang", route_prefix="/gang")
    try:
        whole = http.post("/gang" + CHAT, json=ask(PROBLEMS[3], workers=3)).json()
        chunks = stream(http, ask(PROBLEMS[3], workers=3), "/gang" + CHAT)
        texts = choice_texts(chunks[:-1])
        assert [texts[i] for i in range(3)] == [w["text"] for w in whole["hogwild"]["workers"]]
        new = [g for k, g in created().items() if k not in before]
        assert len(new) == 1 and len(new[0]["bundles"]) == 3  # Serve's group only: the gang reserved none
    finally:
        serve.delete("gang")
