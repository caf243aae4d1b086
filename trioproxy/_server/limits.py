"""Process resource limits the proxy adjusts for itself at start.

[shell] Every client costs the proxy one file descriptor, and every linked client one more
for its server connection. Many systems start processes with a soft ``RLIMIT_NOFILE`` of
1024 while allowing far more (the hard limit), so a proxy that does not raise its soft
limit fails with EMFILE at about 500 linked clients. ``raise_fd_limit()`` raises the soft
limit to the hard limit, as PgBouncer and most servers do; it never lowers it, and it
never raises the hard limit (that needs privileges and is the operator's decision).

On macOS the hard limit may be ``RLIM_INFINITY`` while the kernel refuses soft values
above ``OPEN_MAX`` (kern.maxfilesperproc); the call then falls back to that cap.
"""

from __future__ import annotations

import logging
import resource

__all__ = ["OPEN_MAX_FALLBACK", "raise_fd_limit"]

logger = logging.getLogger("trioproxy")

#: The soft limit tried when the hard limit is "infinity" and the kernel refuses it.
OPEN_MAX_FALLBACK = 10240


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit; return ``(soft, hard)`` after.

    Never lowers the soft limit and never raises the hard one. Failures are logged, not
    raised: the proxy runs on with the limit it was given.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if soft != resource.RLIM_INFINITY and (target == resource.RLIM_INFINITY or target > soft):
        candidates = [target]
        if target == resource.RLIM_INFINITY:
            candidates.append(OPEN_MAX_FALLBACK)
        for candidate in candidates:
            if candidate != resource.RLIM_INFINITY and candidate <= soft:
                continue  # never lower it
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (candidate, hard))
            except (ValueError, OSError) as exc:
                logger.warning(
                    "could not raise the open-file limit from %s to %s: %s",
                    _show(soft),
                    _show(candidate),
                    exc,
                )
                continue
            break
    new_soft, new_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if new_soft != soft:
        logger.info(
            "open-file limit raised from %s to %s (hard limit %s)",
            _show(soft),
            _show(new_soft),
            _show(new_hard),
        )
    else:
        logger.info("open-file limit: %s (hard limit %s)", _show(new_soft), _show(new_hard))
    return new_soft, new_hard


def _show(value: int) -> str:
    if value == resource.RLIM_INFINITY:
        return "unlimited"
    return str(value)
