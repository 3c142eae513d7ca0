"""The exceptions ``main.py`` prints as one short message instead of a traceback."""


class UsageError(Exception):
    """A flag, config key or file the user supplied cannot be used; the message names it and says what to do."""


class TrainingError(Exception):
    """Training cannot go on (e.g. the loss became non-finite); the message says where and what to resume from."""


def user_message(err: BaseException) -> str:
    """The message to show. An error raised in a DataLoader worker comes back wrapped in the worker's traceback;
    only its original last line is kept."""
    text = str(err).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def error_text(err: BaseException) -> str:
    """``str(err)`` without the quotes ``KeyError`` adds around its message."""
    if isinstance(err, KeyError) and len(err.args) == 1:
        return str(err.args[0])
    return str(err)
