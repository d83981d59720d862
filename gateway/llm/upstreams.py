"""``GATEWAY_LLM_UPSTREAMS``: named upstreams. A URL is never taken from a request.

    {"default": {"url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY",
                 "api_key_file": "/run/secrets/openai", "timeout": 60}}

``api_key_env`` names an environment variable, ``api_key_file`` a file (for
Kubernetes secrets mounted as files); the env var wins when both are set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from gateway.settings import json_object

FAKE_SCHEME = "fake"  # the built-in demo upstream (gateway.llm.fake), dev mode only


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str  # base URL; the gateway POSTs to {url}/chat/completions
    api_key: str | None = None
    timeout: float = 60.0

    def __repr__(self) -> str:  # never show the key
        return f"Upstream({self.name!r}, {self.url!r}, timeout={self.timeout})"


def _api_key(spec: dict[str, object]) -> str | None:
    env = spec.get("api_key_env")
    if isinstance(env, str) and os.environ.get(env):
        return os.environ[env]
    path = spec.get("api_key_file")
    if isinstance(path, str) and path:
        return Path(path).read_text(encoding="utf-8").strip()
    return None


def load_upstreams(raw: str, *, allow_fake: bool = False) -> dict[str, Upstream]:
    """Parse the setting; raises ValueError naming what is wrong (at start-up, not per request)."""
    config = json_object(raw, "GATEWAY_LLM_UPSTREAMS", "name -> upstream")
    upstreams: dict[str, Upstream] = {}
    for name, spec in config.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("url"), str):
            raise ValueError(f"upstream {name!r} needs a 'url'")
        url = spec["url"].rstrip("/")
        scheme = urlsplit(url).scheme
        if scheme not in ("http", "https") and not (allow_fake and scheme == FAKE_SCHEME):
            raise ValueError(f"upstream {name!r}: url must be http(s)")
        timeout = spec.get("timeout", 60)
        if not isinstance(timeout, int | float) or timeout <= 0:
            raise ValueError(f"upstream {name!r}: timeout must be a positive number")
        upstreams[name] = Upstream(name, url, _api_key(spec), float(timeout))
    return upstreams
