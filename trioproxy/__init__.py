"""trioproxy: a PostgreSQL connection proxy on trio (public API re-exports only)."""

from __future__ import annotations

__version__ = "0.1.0"
