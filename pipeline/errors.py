"""One error base for everything the project refuses, each kind with its exit code.

The command line prints any `DclipError` as one `error: …` line and exits with its code; anything
else is a bug and keeps its traceback. The message names the file and the field at fault.

    ParamsError     2   a params file that cannot be used (a key, a value, a combination)
    InputError      1   input data that does not follow its format, or a model that cannot load
    UsageError      2   a command-line argument that cannot be used
    MissingOutput   3   an upstream stage's output is not there: run that stage (dvc repro)
"""

from __future__ import annotations


class DclipError(Exception):
    """Refused, with a message for the user; `exit_code` is what the command line exits with."""

    exit_code = 1


class ParamsError(DclipError, ValueError):
    """A params file that cannot be used; the message names the file, each key and its value."""

    exit_code = 2


class InputError(DclipError, ValueError):
    """Input data or a model file that cannot be used; the message names the file and the field."""

    exit_code = 1


class UsageError(DclipError, ValueError):
    """A command-line argument that cannot be used (an unknown name, a count out of range)."""

    exit_code = 2


class MissingOutput(DclipError, FileNotFoundError):
    """An output of an earlier stage is missing: the pipeline state, not the params, is at fault."""

    exit_code = 3
