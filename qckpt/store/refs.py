"""Branch and tag names, and how revisions are spelled.

A name is 1-128 characters of letters, digits and ``._+=-``, starts with a
letter or digit, contains no ``..`` and does not end with ``.`` or ``.lock``.
So names never contain path separators, control characters or spaces, and
``@`` stays free for revisions such as ``main@120`` (step 120 on main).
"""

from __future__ import annotations

import re

from qckpt.errors import InvalidRefNameError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,127}")


def check_ref_name(name: str, kind: str = "branch") -> str:
    """Return ``name`` if valid, else raise ``InvalidRefNameError`` explaining the rules."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name or name.endswith((".", ".lock")):
        raise InvalidRefNameError(
            f"invalid {kind} name {name!r}: use 1-128 letters, digits and '._+=-', starting with a "
            "letter or digit, without '..', path separators, spaces or control characters"
        )
    return name
