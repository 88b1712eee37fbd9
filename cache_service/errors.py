"""One exception hierarchy for the whole project; every message says what to do."""


class HogwildError(Exception):
    """Base of every error raised on purpose by hogwild-ray."""


class UnsupportedError(HogwildError):
    """A model family, rope type, dtype or layout the engine does not handle."""


class LayoutError(HogwildError):
    """A view or block reference that does not fit the cache."""


class ConfigError(HogwildError):
    """An invalid option given by a user."""


class PoolExhaustedError(HogwildError):
    """The KV pool has no free pages for a request; nothing was written (wait, free, or enlarge it)."""
