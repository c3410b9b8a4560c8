"""Reading a bearer token from a file, for the command lines of both sides.

A token given on the command line is readable by every user in
``/proc/PID/cmdline``; a file (a Kubernetes or Docker secret mount) or the
environment is not. This module only reads and checks the file; which flag or
variable wins is the CLI's business.
"""

from __future__ import annotations

from pathlib import Path


def read_token_file(path: str | Path) -> str:
    """The token in ``path``, surrounding whitespace (a trailing newline) stripped.

    Raises ``FileNotFoundError`` / ``ValueError`` with a message that says what
    is wrong: no such file, unreadable, not UTF-8, empty, or more than one line
    (a token holds no whitespace, so a second line is a mistake, not a token).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError("no such file")
    try:
        token = file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read it: {error}") from error
    if not token:
        raise ValueError("is empty")
    if any(c.isspace() for c in token):
        raise ValueError("holds whitespace inside the token (one token, on one line)")
    return token
