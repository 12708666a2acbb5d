"""Errors a user can act on: the command line prints them as one line and exits 2."""

from __future__ import annotations

from pathlib import Path


class PneumoscanError(Exception):
    """A problem with the user's input or setup, reported as one line, never a traceback."""


class UnreadableImage(PneumoscanError):
    """A file that cannot be decoded into an X-ray image; the message names the file and why."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
