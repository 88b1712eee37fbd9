"""Text <-> token ids for the protocol: a tokenizer wrapper, and a character codec for random models.

A codec is all the protocol knows of a tokenizer: it encodes prompt pieces, decodes a step's tokens
to detect step ends and answers, renders the chat prompt, and names the tokens that would end the
reasoning early (suppressed while workers reason). Codecs are plain picklable objects.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from jinja2.exceptions import TemplateError

from cache_service.errors import ConfigError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


class Codec(Protocol):
    """Everything the protocol needs from a tokenizer."""

    stop_ids: tuple[int, ...]  # EOS, BOS, end-of-thinking...: never sampled while workers reason

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def render_chat(self, system: str, user: str) -> str: ...


class TokenizerCodec:
    """A Hugging Face tokenizer; reasoning models get the opening think tag their template expects."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        vocab = tokenizer.get_vocab()
        self.thinks = THINK_OPEN in vocab and THINK_CLOSE in vocab
        stops = set(tokenizer.all_special_ids)
        stops.update(i for i in (tokenizer.eos_token_id, tokenizer.bos_token_id) if i is not None)
        if self.thinks:
            stops.add(vocab[THINK_CLOSE])
        self.stop_ids = tuple(sorted(stops))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def render_chat(self, system: str, user: str) -> str:
        text = self._apply_template(system, user)
        if self.thinks and not text.rstrip().endswith(THINK_OPEN):
            text += THINK_OPEN + "\n"
        return text

    def _apply_template(self, system: str, user: str) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            return f"{system}\n\n{user}\n\n"
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError:  # templates without a system role: fold it into the user turn
            merged = [{"role": "user", "content": f"{system}\n\n{user}"}]
            return self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)


class CharCodec:
    """One token per character (id = code point) for tokenizer-less random models; 0 and 1 are stops."""

    stop_ids = (0, 1)

    def __init__(self, vocab_size: int = 128) -> None:
        if vocab_size < 128:
            raise ConfigError(f"a model without a tokenizer needs >= 128 tokens of vocabulary, has {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [ord(c) if 1 < ord(c) < self.vocab_size else ord("?") for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids if i not in self.stop_ids)

    def render_chat(self, system: str, user: str) -> str:
        return f"{system}\n\n{user}\n\n"


def codec_for(tokenizer, vocab_size: int) -> Codec:
    """The model's tokenizer, or a character codec when it has none (random test models)."""
    return TokenizerCodec(tokenizer) if tokenizer is not None else CharCodec(vocab_size)
