"""trioproxy: a PostgreSQL connection proxy and pooler on trio.

Public API (everything else is private and may change)::

    config = trioproxy.Config(...)            # or trioproxy.load_config("proxy.toml")
    addresses = await nursery.start(trioproxy.serve, config)
"""

from __future__ import annotations

from trioproxy._server.proxy import Proxy, ProxyAddress, open_proxy, serve
from trioproxy.config import (
    BackendConfig,
    BackendTLS,
    Config,
    ListenAddress,
    PoolConfig,
    PoolMode,
    ProxyConfig,
    UserConfig,
    load_config,
    parse_config,
)
from trioproxy.errors import ConfigError, TrioproxyError

__version__ = "0.1.0"

__all__ = [
    "BackendConfig",
    "BackendTLS",
    "Config",
    "ConfigError",
    "ListenAddress",
    "PoolConfig",
    "PoolMode",
    "Proxy",
    "ProxyAddress",
    "ProxyConfig",
    "TrioproxyError",
    "UserConfig",
    "__version__",
    "load_config",
    "open_proxy",
    "parse_config",
    "serve",
]
