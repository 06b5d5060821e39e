"""Error type raised by data preparation for bad input or output locations."""


class PrepError(ValueError):
    """Data preparation cannot proceed (missing or empty input, inconsistent classes, ...).

    The message is a single line meant to be shown to the user as is.
    """
