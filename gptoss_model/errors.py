"""Errors shared by the library and the stages."""


class PermanentError(Exception):
    """An error a retry cannot fix (bad input, failed gate, bad config): stages fail at once."""
