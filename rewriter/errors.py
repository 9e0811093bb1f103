"""Errors a user can act on.

`UserError` carries one line saying what is wrong and what to do; the CLI prints it without a traceback
and exits with code 2. `VerificationError` means a pass broke its contract; the CLI exits with code 1.
`InternalError` is our own bug (exit 3), reported as such, never as the user's.
"""
from __future__ import annotations

import difflib


class RewriteError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 2


class UserError(RewriteError):
    """Bad input: unknown pass or option, unreadable file, model that won't trace, ..."""

    exit_code = 2


class InternalError(RewriteError):
    """A bug in this package met while working on the user's model (a pass raised something it did not mean to).
    Never the user's fault: the CLI says so and exits with code 3."""

    exit_code = 3


class VerificationError(RewriteError):
    """A pass produced a program that does not meet its contract."""

    exit_code = 1


def did_you_mean(word: str, choices) -> str:
    """' (did you mean "x"?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty), for one-line user messages."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:limit]
