"""The endpoint's settings: one checked object, built from keyword arguments or a Serve config's ``args``.

Per-request options (workers, budgets, sampling) come from the request body; these are the
server's defaults and limits, the model it serves, where its workers run and how much it queues.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Any

from cache_service.errors import ConfigError
from cluster.protocol import MAX_WORKERS

API_KEY_ENV = "HOGWILD_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    """Model, defaults and limits of the HTTP endpoint.

    ``actors`` 0 runs every worker on one engine inside the replica; ``actors`` >= 1 runs a gang of
    that many worker actors in the replica's placement group (a session's workers round-robin over them).
    ``api_key`` None reads ``$HOGWILD_API_KEY``; empty there too means no key is asked for.
    """

    model: Any = "default"  # 'default', a model path or hub id; a PretrainedConfig gives random weights (tests)
    served_name: str | None = None  # the id clients send as ``model`` (default: the model's own name)
    workers: int = 2  # per request, when the request does not say
    max_workers: int = MAX_WORKERS
    max_steps: int = 256  # default decode-step budget
    max_steps_limit: int = 4096  # the largest budget a request may ask for
    max_step_tokens: int = 128
    check_every: int = 64
    layout: str = "combined"
    mode: str = "instant"
    temperature: float = 0.6
    top_p: float = 0.95
    max_prompt_chars: int = 16_000
    max_body_bytes: int = 1 << 20
    kv_tokens: int | None = None
    kv_page_size: int = 16
    max_waiting: int = 64  # sessions queued for admission before requests get 429
    retry_after_s: int = 2
    threads: int | None = None  # torch CPU threads in the replica (None: torch's default)
    actors: int = 0
    device: str = "auto"
    api_key: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_workers <= MAX_WORKERS:
            raise ConfigError(f"max_workers must be between 1 and {MAX_WORKERS}, got {self.max_workers}")
        if not 1 <= self.workers <= self.max_workers:
            raise ConfigError(f"workers must be between 1 and max_workers ({self.max_workers}), got {self.workers}")
        for name in ("max_steps", "max_steps_limit", "max_step_tokens", "max_prompt_chars", "max_body_bytes",
                     "retry_after_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps > self.max_steps_limit:
            raise ConfigError(f"max_steps ({self.max_steps}) is above max_steps_limit ({self.max_steps_limit})")
        for name in ("check_every", "max_waiting", "actors"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1 (or unset), got {self.threads}")
        if not str(self.model).strip():
            raise ConfigError("the model is empty; give 'default' or a model path")

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> "ServeConfig":
        """From a Serve config's ``args`` mapping; unknown keys are an error naming the known ones."""
        args = dict(args or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ConfigError(f"unknown endpoint settings {unknown}; known: {', '.join(sorted(known))}")
        return cls(**args)

    @property
    def key(self) -> str | None:
        """The API key clients must send, or None."""
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV, "")
        return key or None
