"""Error types whose message is meant to be shown to the user as one line."""


class FedsoundError(Exception):
    """Base class for errors reported to the user as a single line (no traceback)."""


class ConfigError(FedsoundError, ValueError):
    """A configuration file or flag has an unknown key, a wrong type or an out-of-range value."""


class DataError(FedsoundError, ValueError):
    """Input data (audio, metadata, store) is missing or malformed."""
