"""Whole pages of prompt prefixes, kept so later sessions with the same prompt start skip them.

Many sessions share the start of their prompt (the collaboration instructions before the problem),
and a block's keys are stored at block-local positions, so the K/V of a prompt's first pages depend
on those tokens only: a new session's prompt block can begin with the pages another session wrote.
Page ``k`` of a prompt is found by its own tokens and the cached page before it (a chain, compared
token for token, never by a hash alone). The cache only names pages; the ``KVStore`` counts who
holds them and asks the cache to forget the least recently used ones it alone holds when it needs
room (a page is forgotten after every page cached after it in its chain).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

_ROOT = -1  # the parent of a prompt's first page

Key = tuple[int, tuple[int, ...]]  # (the cached page before it, or _ROOT; the page's tokens)


class PrefixCache:
    """Page ids by prompt prefix, least recently used first."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self._pages: OrderedDict[Key, int] = OrderedDict()
        self._keys: dict[int, Key] = {}
        self._children: dict[int, int] = {}  # cached page -> cached pages right after it

    def __len__(self) -> int:
        return len(self._pages)

    def pages(self) -> list[int]:
        return list(self._keys)

    def lookup(self, tokens: Sequence[int]) -> list[int]:
        """The cached pages of the longest whole-page prefix of ``tokens`` (marked recently used)."""
        parent, found = _ROOT, []
        for key in self._chain(tokens):
            page = self._pages.get((parent, key))
            if page is None:
                break
            self._pages.move_to_end((parent, key))
            found.append(page)
            parent = page
        return found

    def insert(self, tokens: Sequence[int], pages: Sequence[int]) -> list[int]:
        """Remember that ``pages`` hold the whole pages of ``tokens``; the pages newly cached (the
        caller holds them for the cache). Where another page is cached for the same prefix, the
        chain stops: a cached page's holders then always hold every page before it, so a page only
        the cache holds has nothing after it that anyone else holds, and can always be forgotten."""
        parent, added = _ROOT, []
        for key, page in zip(self._chain(tokens), pages):
            cached = self._pages.get((parent, key))
            if cached is None:
                if page in self._keys:  # already cached as another prefix's page: cannot be both
                    break
                self._pages[(parent, key)] = cached = page
                self._keys[page] = (parent, key)
                self._children[page] = 0
                if parent != _ROOT:
                    self._children[parent] += 1
                added.append(page)
            elif cached != page:
                break
            parent = cached
        return added

    def evict(self, n: int, sole: Callable[[int], bool]) -> list[int]:
        """Forget up to ``n`` pages only the cache holds, least recently used last pages first."""
        out: list[int] = []
        progress = True
        while len(out) < n and progress:
            progress = False
            for key, page in list(self._pages.items()):
                if len(out) == n:
                    break
                if self._children[page] == 0 and sole(page):
                    self._forget(key, page)
                    out.append(page)
                    progress = True
        return out

    def clear(self) -> None:
        self._pages.clear()
        self._keys.clear()
        self._children.clear()

    def _forget(self, key: Key, page: int) -> None:
        del self._pages[key], self._keys[page], self._children[page]
        if key[0] != _ROOT:
            self._children[key[0]] -= 1

    def _chain(self, tokens: Sequence[int]) -> list[tuple[int, ...]]:
        size = self.page_size
        return [tuple(tokens[k * size : (k + 1) * size]) for k in range(len(tokens) // size)]
