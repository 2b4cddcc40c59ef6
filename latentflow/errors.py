"""One exception type for mistakes a user can fix. The CLI prints its message as a single
line (``error: ...``) instead of a traceback, so every message names the file or value at
fault and says what to do."""


class LatentflowError(Exception):
    """A user-facing error: bad config, bad data, missing file, unusable checkpoint."""


class ConfigError(LatentflowError):
    pass


class DataError(LatentflowError):
    pass
