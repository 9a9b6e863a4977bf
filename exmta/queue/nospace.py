"""Is an error a full file system? ENOSPC and EDQUOT are the client's 452, not an internal error.

RFC 5321 4.2.2 has ``452 Requested action not taken: insufficient system
storage``; Postfix and Exchange answer a full queue that way, log it as a
warning, and the client retries later. Any other error stays a 451 logged
with its traceback.
"""
from __future__ import annotations

import errno

__all__ = ["NO_SPACE_ERRNOS", "out_of_space"]

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def out_of_space(exc: BaseException | None) -> bool:
    """True when ``exc``, or an error it was raised from or during, is ENOSPC or EDQUOT."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False
