"""The one exception type the CLI turns into a clear message and a non-zero exit."""


class Gpt2LabError(Exception):
    """A user-facing error: bad input, a missing file, an impossible setting."""
