"""The one exception type users see: a single line that names the bad input and what to do."""


class GeojepaError(Exception):
    """A user-facing error. ``str(err)`` is one line: what is wrong, with what, and what to do."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
