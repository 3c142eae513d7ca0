"""The one exception type for bad user input, so ``main.py`` can print it as a short message, not a traceback."""


class UsageError(Exception):
    """A flag, config key or file the user supplied cannot be used; the message names it and says what to do."""
