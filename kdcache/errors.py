"""The one error type for user mistakes: the CLI prints its message on one line and exits 2."""


class KDCacheError(Exception):
    """A user-facing problem: bad flags, missing or mismatched files, no data.

    The message must say what is wrong and what to do about it, in one line.
    """
