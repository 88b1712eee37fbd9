"""A session's events as OpenAI objects: streamed chunks (SSE) and the whole response.

Streaming follows OpenAI's ``n > 1`` convention: worker i's token deltas are ``choices[i]`` with
``index = i`` (the text the protocol inserts, step prefixes and checks, included, so the deltas of
choice i add up to worker i's text). The last content chunk carries every choice's
``finish_reason`` and, in the ``hogwild`` extension field, the answer; then a ``usage`` chunk with
no choices and ``data: [DONE]``. Events without text (Started, StepDone, Check) travel as chunks
with no choices and the event in ``hogwild``, so a page can show the shared history growing.
Non-streamed, the answer is ``choices[0].message.content`` (``text`` for completions) and
``hogwild`` holds the per-worker texts, the transcript and the timings.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Awaitable
from typing import Any

from cluster.events import Delta, Event, Finished, Started, Tick
from cluster.host import SessionHandle
from cluster.transcript import SessionResult

POLL_MIN_S = 0.002
POLL_MAX_S = 0.02
DISCONNECT_CHECK_S = 0.5
FINISH_REASONS = {"answer": "stop", "budget": "length", "context": "length"}


async def session_events(handle: SessionHandle, disconnected: Callable[[], Awaitable[bool]] | None = None,
                         cancel: Callable[[SessionHandle], None] | None = None) -> AsyncIterator[list[Event]]:
    """The handle's events in batches (what arrived since the last look), from asyncio, without
    parking a thread per session (a queued session may wait long; ``aevents`` would hold one of the
    event loop's few executor threads all that time). Ends as ``events()`` does (raising what ended
    the session); stops, cancelling the session, when ``disconnected()`` says the client is gone or
    when the consumer stops early (the generator is closed or its task cancelled): ``cancel(handle)``,
    by default ``handle.cancel()``. A session whose ``Finished`` event went by is not cancelled: it
    has ended, though the host thread may not have set ``handle.done`` yet."""
    delay, checked = POLL_MIN_S, time.monotonic()
    finished = False
    try:
        while True:
            events = handle.poll()
            finished = finished or any(isinstance(event, Finished) for event in events)
            if handle.done.is_set():
                if events:
                    yield events
                yield list(handle.events())  # what arrived since, then the end (or its error)
                return
            if events:
                yield events
                delay = POLL_MIN_S
                continue
            if disconnected is not None and time.monotonic() - checked > DISCONNECT_CHECK_S:
                checked = time.monotonic()
                if await disconnected():
                    return
            await asyncio.sleep(delay)
            delay = min(delay * 2, POLL_MAX_S)
    finally:
        if not (finished or handle.done.is_set()):
            (cancel or SessionHandle.cancel)(handle)


def cut_at_stop(text: str, stops: list[str] | None) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops or []) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class OpenAIFormat:
    """Builds the chunks and responses of one request (``kind`` chat or completion)."""

    def __init__(self, kind: str, model: str, stops: list[str] | None = None) -> None:
        self.kind, self.model, self.stops = kind, model, stops
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self.prompt_tokens = 0
        self.tokens: tuple[int, ...] = ()
        self.names: tuple[str, ...] = ()
        self.by: str | None = None  # the worker whose text gave the answer

    # ---- streaming -------------------------------------------------------------------------------
    def chunks(self, event: Event) -> list[dict]:
        """The chunks one event becomes (none for ticks, which only update the token counts)."""
        if isinstance(event, Tick):
            self.tokens = event.tokens
            return []
        if isinstance(event, Delta):
            return [self._chunk([self._choice(event.worker, event.text)])]
        if isinstance(event, Finished):
            self.by = self.names[event.by] if event.answer is not None and event.by < len(self.names) else None
            return []  # see final()
        if isinstance(event, Started):
            self.prompt_tokens, self.names = event.prompt_tokens, event.workers
            opening = [self._choice(i, "", role=True) for i in range(len(event.workers))]
            return [self._chunk([], event.to_dict()), self._chunk(opening)] if self.kind == "chat" else \
                [self._chunk([], event.to_dict())]
        return [self._chunk([], event.to_dict())]  # StepDone, Check and any other event

    def final(self, result: SessionResult) -> list[dict]:
        """The finish chunk (every choice's finish_reason, the answer) and the usage chunk."""
        answer, reason = self.answer(result)
        choices = [{**self._choice(i, None), "finish_reason": reason} for i in range(len(result.workers))]
        extension = {"type": "Finished", "answer": answer, "reason": result.reason, "steps": result.steps,
                     "by": self.by}
        return [self._chunk(choices, extension), {**self._chunk([]), "usage": self.usage(result)}]

    def _choice(self, index: int, text: str | None, role: bool = False) -> dict:
        if self.kind == "chat":
            delta: dict[str, Any] = {} if text is None else {"content": text}
            if role:
                delta["role"] = "assistant"
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": None}

    def _chunk(self, choices: list[dict], hogwild: dict | None = None) -> dict:
        chunk = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                 "choices": choices}
        if hogwild is not None:
            chunk["hogwild"] = hogwild
        return chunk

    # ---- whole responses -------------------------------------------------------------------------
    def answer(self, result: SessionResult) -> tuple[str, str]:
        """The answer text (cut at a stop string) and its finish_reason."""
        text, stopped = cut_at_stop(result.answer or "", self.stops)
        return text, "stop" if stopped else FINISH_REASONS.get(result.reason, "stop")

    def usage(self, result: SessionResult) -> dict:
        completion = sum(w.tokens for w in result.workers)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def response(self, result: SessionResult) -> dict:
        answer, reason = self.answer(result)
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": answer}, "logprobs": None,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": answer, "logprobs": None, "finish_reason": reason}
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice],
                "usage": self.usage(result), "hogwild": {**result.to_dict(), "by": self.by}}


def sse(data: dict | str) -> str:
    """One Server-Sent Event."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {payload}\n\n"
