"""Request bodies of the OpenAI-compatible routes (pydantic), plus the Hogwild extra fields.

OpenAI's own fields are honoured where they make sense for N workers solving one problem:
``temperature``, ``top_p``, ``seed``, ``max_tokens`` (per worker: the decode-step budget, as OpenAI
counts ``max_tokens`` per choice), ``stop`` (cuts the answer before the first stop string) and
``stream``. Fields a Hogwild session cannot honour (``n`` > 1, ``logprobs``, ``tools`` ...) are
rejected with a message, not ignored. The Hogwild extras: ``workers``, ``layout``, ``mode``,
``max_steps``, ``check_every``, ``max_step_tokens``. Unknown fields are rejected (a typo such as
``worker`` would otherwise be silently dropped).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator, model_validator

MAX_STOP = 4


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = True


class HogwildFields(BaseModel):
    """Fields shared by both routes: sampling, budgets, Hogwild options."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    temperature: StrictFloat | None = Field(default=None, ge=0, le=2)
    top_p: StrictFloat | None = Field(default=None, gt=0, le=1)
    seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1)
    max_tokens: StrictInt | None = Field(default=None, gt=0)
    max_completion_tokens: StrictInt | None = Field(default=None, gt=0)
    stop: str | list[str] | None = None
    n: StrictInt = Field(default=1, ge=1, le=1, description="one answer per request; use workers for parallelism")
    user: str | None = None
    presence_penalty: StrictFloat = Field(default=0, ge=0, le=0)
    frequency_penalty: StrictFloat = Field(default=0, ge=0, le=0)
    logprobs: Literal[False] | None = None
    # Hogwild extras
    workers: StrictInt | None = Field(default=None, ge=1)
    layout: Literal["combined", "contiguous", "interleaved"] | None = None
    mode: Literal["instant", "lagged"] | None = None
    max_steps: StrictInt | None = Field(default=None, gt=0)
    check_every: StrictInt | None = Field(default=None, ge=0)
    max_step_tokens: StrictInt | None = Field(default=None, gt=0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @property
    def budget(self) -> int | None:
        """The decode-step budget asked for: ``max_steps``, else ``max_completion_tokens`` / ``max_tokens``."""
        return self.max_steps or self.max_completion_tokens or self.max_tokens


class ChatCompletionRequest(HogwildFields):
    messages: list[Message] = Field(min_length=1)

    @model_validator(mode="after")
    def _has_question(self) -> "ChatCompletionRequest":
        users = [m for m in self.messages if m.role == "user"]
        if not users or not users[-1].text.strip():
            raise ValueError("messages need a user message with non-empty content (the problem to solve)")
        return self

    def problem(self) -> str:
        """The last user message; earlier turns are quoted before it as context."""
        last = max(i for i, m in enumerate(self.messages) if m.role == "user")
        question = self.messages[last].text.strip()
        earlier = [f"{m.role}: {m.text.strip()}" for m in self.messages[:last] if m.text.strip()]
        if not earlier:
            return question
        return "Context from the conversation so far:\n" + "\n".join(earlier) + "\n\nProblem: " + question


class CompletionRequest(HogwildFields):
    prompt: str | list[str]
    echo: Literal[False] | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str:
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError("give exactly one prompt (a string, or a list with one string)")
            value = value[0]
        if not value.strip():
            raise ValueError("the prompt is empty; give the problem the workers should solve")
        return value

    def problem(self) -> str:
        return str(self.prompt).strip()


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
