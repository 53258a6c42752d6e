"""Reads a running daemon's JSON API, for ``table --url`` and ``trace --url``."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from sockwatch.errors import SockwatchError


class DaemonClient:
    def __init__(self, url: str, timeout: float = 5.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise SockwatchError(f"--url must look like http://host:port, not {url!r}")
        self.base = url.rstrip("/")
        self.timeout = timeout

    def get(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.base}{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=self.timeout) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:
            raise SockwatchError(f"sockwatch daemon at {self.base} answered {exc.code} for {path}")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise SockwatchError(f"cannot reach a sockwatch daemon at {self.base}: {reason}")
        except json.JSONDecodeError:
            raise SockwatchError(f"{self.base}{path} did not answer JSON: is it sockwatch?")
