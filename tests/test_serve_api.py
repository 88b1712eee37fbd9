"""The HTTP app in-process (FastAPI's TestClient, a tiny random model): routes, OpenAI shapes,
streaming, validation, auth, overload; one real-HTTP disconnect through uvicorn on loopback; the
Serve configs against Ray's own schema."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from fastapi.testclient import TestClient

from deploy.app import create_app
from deploy.backend import local_backend
from deploy.config import ServeConfig
from workers.model import load_model, tiny_config

TINY = tiny_config("llama", initializer_range=0.15, max_position_embeddings=16384)  # room for long sessions
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
GREEDY = {"temperature": 0, "max_steps": 10, "max_step_tokens": 6, "check_every": 4}


def ask(content: str = "What is 2 + 3?", **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], **GREEDY, **extra}


@pytest.fixture(scope="module")
def tiny():
    return load_model(TINY, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def backend(tiny):
    backend = local_backend(ServeConfig(model=TINY, kv_tokens=1 << 15, max_steps=10, max_steps_limit=2000,
                                        max_workers=4, max_prompt_chars=2000, max_body_bytes=50_000), lm=tiny)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def client(backend):
    return TestClient(create_app(backend))


def read_sse(lines) -> list:
    """The ``data:`` payloads of an event stream (JSON decoded, ``[DONE]`` kept as a string)."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def stream(client, path: str, body: dict) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return read_sse(response.iter_lines())


def choice_texts(chunks: list, key: str = "content") -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"] if isinstance(chunk, dict) else []:
            piece = choice["delta"].get(key) if "delta" in choice else choice.get("text")
            texts[choice["index"]] = texts.get(choice["index"], "") + (piece or "")
    return texts


# ---- shapes ----------------------------------------------------------------------------------------
def test_chat_completion_has_the_answer_usage_and_per_worker_texts(client):
    r = client.post("/v1/chat/completions", json=ask(workers=3))
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "random-llama"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"] == (body["hogwild"]["answer"] or "")
    assert body["choices"][0]["finish_reason"] in {"stop", "length"}
    workers = body["hogwild"]["workers"]
    assert [w["name"] for w in workers] == ["Alice", "Bob", "Carol"]
    assert all(w["text"] for w in workers) and body["hogwild"]["transcript"]
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] == sum(w["tokens"] for w in workers) > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streamed_deltas_add_up_to_the_non_streamed_texts(client, path):
    body = ask(workers=2) if "chat" in path else {"prompt": "What is 2 + 3?", "workers": 2, **GREEDY}
    whole = client.post(path, json=body).json()
    chunks = stream(client, path, body)
    assert chunks[-1] == "[DONE]"
    texts = choice_texts(chunks[:-1])
    assert [texts[i] for i in range(2)] == [w["text"] for w in whole["hogwild"]["workers"]]
    finish = [c for c in chunks[:-1] if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and [c["index"] for c in finish[0]["choices"]] == [0, 1]
    assert finish[0]["hogwild"]["answer"] == whole["hogwild"]["answer"]
    assert finish[0]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    usage = chunks[-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert {c["id"] for c in chunks[:-1]} == {chunks[0]["id"]}
    expected = "chat.completion.chunk" if "chat" in path else "text_completion"
    assert {c["object"] for c in chunks[:-1]} == {expected}


def test_stream_reports_the_shared_history_and_can_leave_out_usage(client):
    chunks = stream(client, "/v1/chat/completions", ask(stream_options={"include_usage": False}))
    events = [c["hogwild"]["type"] for c in chunks[:-1] if "hogwild" in c]
    assert events[0] == "Started" and "StepDone" in events and events[-1] == "Finished"
    assert not any("usage" in c for c in chunks[:-1])
    roles = [ch for c in chunks[:-1] for ch in c["choices"] if ch["delta"].get("role")]
    assert [ch["index"] for ch in roles] == [0, 1]


def test_seeded_sampling_repeats_and_stop_cuts_the_answer(client):
    body = ask(temperature=0.9, top_p=0.9, seed=5)
    first, second = (client.post("/v1/chat/completions", json=body).json() for _ in range(2))
    assert first["hogwild"]["workers"] == second["hogwild"]["workers"]
    other = client.post("/v1/chat/completions", json={**body, "seed": 6}).json()
    assert other["hogwild"]["workers"] != first["hogwild"]["workers"]


def test_stop_sequences_cut_the_answer():
    from cluster.transcript import SessionResult
    from deploy.stream import OpenAIFormat

    result = SessionResult("p", "42 apples. Done", "answer", "combined", (), (), 3, {})
    assert OpenAIFormat("chat", "m", [". "]).answer(result) == ("42 apples", "stop")
    assert OpenAIFormat("chat", "m", ["zzz"]).answer(result) == ("42 apples. Done", "stop")
    assert OpenAIFormat("chat", "m").answer(SessionResult("p", None, "budget", "", (), (), 3, {})) == ("", "length")


def test_models_health_and_page(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["random-llama"]
    assert client.get("/v1/models/random-llama").json()["id"] == "random-llama"
    assert client.get("/v1/models/gpt-4").status_code == 404
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["live"] == 0
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '"model": "random-llama"' in page.text and '"max_workers": 4' in page.text
    assert "v1/chat/completions" in page.text and "getReader" in page.text


# ---- bad input -------------------------------------------------------------------------------------
def _malformed() -> list[tuple[str, object]]:
    """(what, body): 40+ requests a server must refuse with a 4xx."""
    msg = [{"role": "user", "content": "hi"}]
    cases: list[tuple[str, object]] = [
        ("not json", "{"), ("truncated", '{"messages": ['), ("garbage", "\x00\x01"), ("empty body", ""),
        ("json list", "[]"), ("json string", '"hello"'), ("json number", "3"), ("json null", "null"),
        ("nan", '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
    ]
    cases += [(f"body {i}", body) for i, body in enumerate([
        {}, {"messages": []}, {"messages": "hi"}, {"messages": [{}]}, {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": ""}]}, {"messages": [{"role": "user", "content": "   "}]},
        {"messages": [{"role": "system", "content": "be brief"}]}, {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": 5}]}, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        {"messages": [{"role": "user", "content": "x", "extra": 1}]}, {"messages": [None]},
        {"messages": msg, "workers": 0}, {"messages": msg, "workers": 5}, {"messages": msg, "workers": 99},
        {"messages": msg, "workers": "2"}, {"messages": msg, "workers": 2.5}, {"messages": msg, "workers": True},
        {"messages": msg, "max_tokens": 0}, {"messages": msg, "max_tokens": -3}, {"messages": msg, "max_steps": 0},
        {"messages": msg, "max_steps": 2001}, {"messages": msg, "max_step_tokens": 0}, {"messages": msg, "check_every": -1},
        {"messages": msg, "temperature": -1}, {"messages": msg, "temperature": "0.5"}, {"messages": msg, "temperature": 3},
        {"messages": msg, "top_p": 0}, {"messages": msg, "top_p": 1.5}, {"messages": msg, "seed": -1},
        {"messages": msg, "seed": "x"}, {"messages": msg, "stream": "yes"}, {"messages": msg, "n": 2},
        {"messages": msg, "layout": "spiral"}, {"messages": msg, "mode": "eager"}, {"messages": msg, "stop": [""]},
        {"messages": msg, "stop": ["a", "b", "c", "d", "e"]}, {"messages": msg, "stop": 7},
        {"messages": msg, "model": "gpt-4"}, {"messages": msg, "worker": 2}, {"messages": msg, "logprobs": True},
        {"messages": msg, "presence_penalty": 0.5}, {"messages": msg, "stream_options": {"include_usage": "no"}},
        {"messages": [{"role": "user", "content": "x" * 2001}]},
    ])]
    return cases


def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(client):
    cases = _malformed()
    assert len(cases) >= 40
    for what, body in cases:
        content = body if isinstance(body, str) else json.dumps(body)
        r = client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, (what, body, r.status_code, r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"], (what, error)
    for body in [{"prompt": ""}, {"prompt": ["a", "b"]}, {"prompt": 3}, {}, {"prompt": "x", "echo": True}]:
        assert client.post("/v1/completions", json=body).status_code == 400, body
    assert client.post("/v1/chat/completions", json=ask()).status_code == 200


def test_errors_say_what_was_wrong(client):
    def error(body, path="/v1/chat/completions"):
        r = client.post(path, json=body) if not isinstance(body, str) else client.post(
            path, content=body, headers={"content-type": "application/json"})
        return r.status_code, r.json()["error"]

    status, err = error("{")
    assert status == 400 and err["code"] == "invalid_json"
    status, err = error(ask(workers=5))
    assert status == 400 and "workers" in err["message"] and "4" in err["message"]
    status, err = error(ask(model="gpt-4"))
    assert status == 404 and err["code"] == "model_not_found" and "random-llama" in err["message"]
    status, err = error(ask(worker=2))
    assert status == 400 and err["param"] == "worker" and "unknown field" in err["message"]
    status, err = error(ask("x" * 2001))
    assert status == 400 and err["code"] == "context_length_exceeded"
    status, err = error(ask(max_steps=2001))
    assert status == 400 and "2000" in err["message"]
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    assert client.get("/v1/chat/completions").status_code == 405


def test_an_oversized_body_is_refused(client):
    r = client.post("/v1/chat/completions", json=ask("y" * 60_000))
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_prompt_beyond_the_context_is_a_400(tiny):
    backend = local_backend(ServeConfig(model=TINY, kv_tokens=1 << 14, max_prompt_chars=40_000), lm=tiny)
    try:
        r = TestClient(create_app(backend)).post("/v1/chat/completions", json=ask("z " * 9000))
        assert r.status_code == 400 and "context" in r.json()["error"]["message"]
    finally:
        backend.close()


def test_api_key_and_overload(tiny):
    backend = local_backend(ServeConfig(model=TINY, kv_tokens=1 << 12, api_key="s3cret", max_waiting=0,
                                        retry_after_s=3), lm=tiny)
    try:
        client = TestClient(create_app(backend))
        assert client.post("/v1/chat/completions", json=ask()).status_code == 401
        wrong = client.post("/v1/chat/completions", json=ask(), headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models").status_code == 401
        assert client.get("/health").status_code == 200 and client.get("/").status_code == 200
        busy = client.post("/v1/chat/completions", json=ask(), headers={"Authorization": "Bearer s3cret"})
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "3"
        assert busy.json()["error"]["type"] == "rate_limit_error"
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        backend.close()


def test_a_closed_host_is_a_503(tiny):
    backend = local_backend(ServeConfig(model=TINY, kv_tokens=1 << 12), lm=tiny)
    backend.close()
    r = TestClient(create_app(backend)).post("/v1/chat/completions", json=ask())
    assert r.status_code == 503 and "Retry-After" in r.headers


# ---- real HTTP: a client that leaves -----------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_disconnected_stream_cancels_its_session_and_frees_its_blocks(backend):
    import httpx
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(backend), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        before = backend.stats()
        body = {**ask(workers=4), "max_steps": 2000, "stream": True}  # runs for seconds
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = response.iter_lines()
                seen = [line for _, line in zip(range(6), lines)]
                assert any(line.startswith("data: ") for line in seen)
                assert backend.stats()["live"] == 1 and backend.stats()["used_pages"] > before["used_pages"]
            deadline = time.monotonic() + 20
            while ((stats := backend.stats())["live"] or stats["cancelled"] == before["cancelled"]) \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            assert stats["cancelled"] == before["cancelled"] + 1  # the client left; the session did not end itself
            assert stats["live"] == 0 and stats["used_pages"] == before["used_pages"] and stats["claimed_pages"] == 0
            assert http.post("/v1/chat/completions", json=ask()).status_code == 200  # still serving
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_only_cancels_that_took_effect_are_counted(backend):
    from deploy.backend import SessionOptions

    before = backend.stats()["cancelled"]
    ended = backend.submit("What is 2 + 3?", SessionOptions(workers=1, max_steps=4))
    ended.result()
    backend.cancel(ended)  # the client left after the end: nothing was stopped
    running = backend.submit("What is 2 + 3?", SessionOptions(workers=4, max_steps=2000))
    backend.cancel(running)
    running.done.wait(30)
    assert backend.stats()["cancelled"] == before + 1


class _Ending:
    """A handle whose program has reported ``events``; the host thread has not set ``done`` yet."""

    def __init__(self, events: list) -> None:
        self.events, self.done, self.cancels = events, threading.Event(), 0

    def poll(self) -> list:
        events, self.events = self.events, []
        return events


@pytest.mark.parametrize("finished", [True, False])
def test_a_stream_closed_after_the_finish_does_not_cancel_its_session(finished):
    import asyncio
    from contextlib import aclosing

    from cluster.events import Delta, Finished
    from deploy.stream import session_events

    handle = _Ending([Delta(0, 1, "4"), *([Finished("4", "answer", 0, 1)] if finished else [])])

    async def read_one_batch_and_leave() -> list:
        async with aclosing(session_events(handle, cancel=lambda h: setattr(h, "cancels", h.cancels + 1))) as it:
            return await anext(it)

    assert len(asyncio.run(read_one_batch_and_leave())) == (2 if finished else 1)
    assert handle.cancels == (0 if finished else 1)  # a running session is cancelled, an ended one not


# ---- configuration -----------------------------------------------------------------------------------
def test_serve_configs_pass_rays_schema_and_build_the_app_config():
    from ray.serve.schema import ServeDeploySchema

    kuberay = yaml.safe_load((DEPLOY / "kuberay.yaml").read_text())
    assert kuberay["kind"] == "RayService"
    for text in [(DEPLOY / "serve.yaml").read_text(), kuberay["spec"]["serveConfigV2"]]:
        schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
        (app,) = schema.applications
        assert app.import_path == "deploy.serve_app:build_app"
        config = ServeConfig.from_args(app.args)
        assert config.model == "default" and config.workers == 2
        assert app.deployments[0].name == "hogwild"
    with pytest.raises(Exception, match="import_path"):
        ServeDeploySchema.model_validate({"applications": [{"name": "x", "route_prefix": "/"}]})


def test_endpoint_settings_are_checked():
    from cache_service.errors import ConfigError
    from deploy.gang import gang_bundles
    from deploy.serve_app import deployment_options

    with pytest.raises(ConfigError, match="unknown endpoint settings"):
        ServeConfig.from_args({"modle": "default"})
    with pytest.raises(ConfigError, match="workers"):
        ServeConfig(workers=9)
    with pytest.raises(ConfigError, match="max_steps"):
        ServeConfig(max_steps=0)
    assert deployment_options(ServeConfig()) == {}
    gang = deployment_options(ServeConfig(actors=2), "cuda")
    assert gang["placement_group_bundles"] == [{"CPU": 1.0}, {"GPU": 1.0}, {"GPU": 1.0}, {"CPU": 0.1}]
    assert gang_bundles(ServeConfig(actors=1), "cpu")[1] == {"CPU": 1.0}


def test_a_gang_in_a_group_of_the_wrong_size_is_refused_before_it_starts():
    from types import SimpleNamespace

    from cache_service.errors import ConfigError
    from deploy.gang import gang_bundles, start_gang

    config = ServeConfig(model=TINY, actors=2)
    short = SimpleNamespace(bundle_specs=gang_bundles(config, "cpu")[:-1])  # no Ray is started: refused first
    with pytest.raises(ConfigError, match="3 bundles, a gang of 2 actors needs 4"):
        start_gang(config, short)
