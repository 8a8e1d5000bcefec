"""The base of the errors whose message already says what to do.

`dnl-zoo` prints such an error as one line, without a traceback, and exits
with status 1: a missing dataset, a busy workdir, a non-finite loss, a damaged
checkpoint or one of another state layout. A traceback remains for errors that
are bugs.
"""


class ActionableError(Exception):
    """An error whose message names what was expected, what arrived and what
    to do next."""
