"""detforge's exception types. Every error caused by user input is one of these, never a bare traceback."""

from __future__ import annotations


class DetforgeError(Exception):
    """Base class of every error detforge raises on purpose."""


class ConfigError(DetforgeError):
    """A configuration file, key or value is wrong."""


class DatasetError(DetforgeError):
    """An annotation file, image or dataset operation is wrong."""


class CheckpointError(DetforgeError):
    """A checkpoint or weight file cannot be used."""


class TrainingError(DetforgeError):
    """Training cannot go on (a non-finite loss, a finished run asked to resume, ...)."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (third-party messages can run to pages), else its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


def summarize(exc: BaseException) -> str:
    """``Type: first line of the message``, or just ``Type`` when the message is empty."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {first_line(exc)}" if text else type(exc).__name__
