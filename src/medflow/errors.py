"""Errors a user can act on.

Anything raised as :class:`MedflowError` is the user's to fix (a bad file, a bad value); the CLI
prints its message on one line and exits with code 2. Any other exception is our bug and keeps
its traceback.
"""

from __future__ import annotations

from pathlib import Path


def one_line(text: str) -> str:
    """``text`` with line breaks and other unprintable characters escaped (``\\n``, ``\\x00``).

    Messages quote file names and ``dataset.json`` values, which may hold anything; escaping
    keeps every message on one line whatever they hold.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def brief(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message quotes a value, not a file."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MedflowError(Exception):
    """A problem with the user's input, stated in one line."""


class DataError(MedflowError):
    """A file or folder that cannot be used, named in the message.

    Args:
        path: the offending file or folder.
        problem: what is wrong with it and, where useful, what to do.
    """

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(one_line(f"{path}: {problem}"))


class OutputExistsError(MedflowError):
    """The output location already holds results and ``--force`` was not given."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        super().__init__(
            one_line(f"{path}: already exists and holds results; pass --force to overwrite")
        )


class OptionError(MedflowError, ValueError):
    """An option that does not fit the model at hand (a sampler the model cannot use), named
    with its value; a ``ValueError`` as well, as bad arguments to the Python API are."""
