"""Errors every layer may raise and the command line prints as one line."""

from __future__ import annotations


class CliError(Exception):
    """A problem the user can fix (a wrong argument, a missing file); one line, exit status 2."""
