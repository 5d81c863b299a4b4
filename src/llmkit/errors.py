"""One exception family: the CLI prints any of these as a single `error: ...` line and exits 2."""


class LLMKitError(Exception):
    """A problem the user can fix (bad input, missing file, bad value). The message names what and where."""


class ConfigError(LLMKitError):
    """A config key, value or file is wrong."""


class DataError(LLMKitError):
    """A corpus, dataset or token shard is missing, empty or malformed."""


class CheckpointError(LLMKitError):
    """A checkpoint or weight file is missing, truncated or does not fit the model."""
