"""The one exception type slimdiff raises for bad input; the CLI prints it as a single line."""


class SlimdiffError(ValueError):
    """Bad input: the message names the problem and what would be valid."""
