"""The one error every reader raises for a malformed raw file."""

from __future__ import annotations

from pipeline.errors import InputError


class SourceError(InputError):
    """A raw dataset file that does not follow its format; the message names the file and the key,
    e.g. "captions_train2017.json: annotations[3].caption: expected a string, got int"."""
