"""The one error type for user mistakes: the CLI prints its message on one line and exits 2; and the
chain an exception carries (what it was raised from, or while handling)."""

from collections.abc import Iterator


class KDCacheError(Exception):
    """A user-facing problem: bad flags, missing or mismatched files, no data.

    The message must say what is wrong and what to do about it, in one line.
    """


def error_chain(e: BaseException | None) -> Iterator[BaseException]:
    """`e`, then what it was raised from (or while handling), and so on: torch and h5py wrap the
    error that matters (a full disk, an interrupt) in one of their own."""
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__
