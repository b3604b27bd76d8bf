"""Error bases shared by the library and the Prefect tasks."""


class PermanentError(Exception):
    """An error a retry cannot fix (bad input, bad config, failed gate): fail at once."""
