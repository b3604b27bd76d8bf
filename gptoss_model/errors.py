"""The one base class of errors a retry cannot fix (bad input, failed gate, bad config)."""


class PermanentError(Exception):
    """An error that retrying the same work cannot fix; stages fail at once on it."""
