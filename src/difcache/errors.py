"""The one exception type difcache raises for user-facing misuse."""


class DifcacheError(ValueError):
    """Raised for every user-facing misuse; the message says what to do instead."""
