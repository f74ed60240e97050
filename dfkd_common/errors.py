"""The one exception type users see.

Library code raises :class:`DfkdError` for anything caused by input (a wrong file, a mismatched bank, an
unknown name, a diverging loss). The CLI prints its message as one line on stderr and exits non-zero;
everything else is a bug and keeps its traceback.
"""


class DfkdError(Exception):
    """A user-facing error: bad input or a run that cannot continue."""


class NonFiniteLossError(DfkdError):
    """Raised when a loss becomes NaN/inf, before any artifact is written."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name if it has none), at most ``limit`` characters:
    what an error line quotes of a library's own error."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
