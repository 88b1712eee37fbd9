"""The live page at ``/``: one HTML file (``deploy/static/index.html``, plain HTML/JS, no build),
with the server's defaults filled in. It streams ``POST /v1/chat/completions`` (fetch and a
``ReadableStream`` over the SSE) into one column per worker and highlights the answer."""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files

from deploy.config import ServeConfig

MARK = "/*SETTINGS*/{}"


@cache
def _template() -> str:
    return files("deploy").joinpath("static/index.html").read_text(encoding="utf-8")


def page_html(model_id: str, config: ServeConfig) -> str:
    """The page with this server's model, worker limits and default budget."""
    settings = {"model": model_id, "workers": config.workers, "max_workers": config.max_workers,
                "max_steps": config.max_steps}
    # JSON inside <script>: escape '<' so a model name can never close the script element
    return _template().replace(MARK, json.dumps(settings).replace("<", "\\u003c"), 1)
