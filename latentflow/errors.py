"""One exception family for mistakes a user can fix. The CLI prints its message as a single
line (``error: ...``) instead of a traceback, so every message names the file or value at
fault and says what to do."""


class LatentflowError(Exception):
    """A user-facing error: bad config, bad data, missing file, unusable checkpoint."""


class ConfigError(LatentflowError):
    pass


class DataError(LatentflowError):
    pass


class CheckpointError(LatentflowError):
    """A run, checkpoint or export that cannot be used as asked."""


class DiskError(LatentflowError):
    """Writing a checkpoint, export, cache or asset failed; what existed before is intact."""


class TrainingDiverged(LatentflowError):
    """Loss, gradients or weights became non-finite."""


class PeerLost(LatentflowError):
    """Another process of a distributed run died or stalled. Every surviving process
    reports it, since the main process may be the one that is gone."""


class Stopped(Exception):
    """A long operation (sampling, encoding) gave up because a stop was requested (a signal,
    or the launcher gone); not a user error: the caller decides what to save and how to exit."""


def printable(value) -> str:
    """``value`` as text for one line of a terminal: newlines, NUL and other control
    characters, and the undecodable bytes of a file name, shown as escapes."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(value))
