"""Helpers for the Coffer compatibility suite (official azure-keyvault-secrets SDK).

The runner (tests/compat/run.sh) starts `coffer server --dev`, creates the test vault with the CLI and
sets:

* COFFER_DATA_DIR      the server's data dir (holds admin.env and dev.env)
* COFFER_PY_VAULT      the vault used by this suite (default: pycompat)
* COFFER_RETENTION_DAYS the soft-delete retention the vault was created with (default: 7)

The token from admin.env is never printed: the credential's repr hides it and the runner masks it in all
output as a second line of defence.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import threading
import time
import uuid
from typing import Any, Dict, List, Optional
from urllib.parse import urlsplit

from azure.core.credentials import AccessToken, AccessTokenInfo

VERSION_RE = re.compile(r"^[0-9a-f]{32}$")


def parse_env_file(path: str) -> Dict[str, str]:
    """Parse `export KEY='value'` lines (shell syntax) without executing anything."""
    out: Dict[str, str] = {}
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = shlex.split(line, comments=True, posix=True)
            if parts and parts[0] == "export":
                parts = parts[1:]
            for part in parts:
                if "=" in part:
                    key, _, value = part.partition("=")
                    out[key] = value
    return out


class Coffer:
    """What the tests need to know about the running server (never exposes the token in repr)."""

    def __init__(self, data_dir: str):
        self.data_dir = data_dir
        admin_path = os.path.join(data_dir, "admin.env")
        dev_path = os.path.join(data_dir, "dev.env")
        if not os.path.exists(admin_path):
            raise RuntimeError(f"{admin_path} does not exist: is the server running in --dev mode?")
        self.admin = parse_env_file(admin_path)
        self.dev = parse_env_file(dev_path) if os.path.exists(dev_path) else {}
        for key in ("COFFER_URL", "COFFER_TOKEN"):
            if not self.admin.get(key):
                raise RuntimeError(f"{admin_path} has no {key}")
        self._token = self.admin["COFFER_TOKEN"]
        url = urlsplit(self.admin["COFFER_URL"])
        self.zone = url.hostname  # e.g. localhost
        self.port = url.port or 443
        self.server_url = self.admin["COFFER_URL"].rstrip("/")
        self.ca_file = (
            self.admin.get("REQUESTS_CA_BUNDLE")
            or self.admin.get("SSL_CERT_FILE")
            or os.path.join(data_dir, "ca.pem")
        )

    @property
    def token(self) -> str:
        return self._token

    def vault_url(self, vault: str) -> str:
        port = "" if self.port == 443 else f":{self.port}"
        return f"https://{vault}.{self.zone}{port}"

    @property
    def resource(self) -> str:
        port = "" if self.port == 443 else f":{self.port}"
        return f"https://{self.zone}{port}"

    def __repr__(self) -> str:
        return f"Coffer(server_url={self.server_url!r}, token=<hidden>)"


def _jwt_exp(token: str) -> Optional[int]:
    try:
        payload = token.split(".")[1]
        payload += "=" * (-len(payload) % 4)
        exp = json.loads(base64.urlsafe_b64decode(payload)).get("exp")
        return int(exp) if exp is not None else None
    except Exception:  # not a JWT we can read: fall back to one hour
        return None


class StaticTokenCredential:
    """azure-core TokenCredential (and SupportsTokenInfo) returning a fixed bearer token.

    Records the scopes/tenant every call asked for, so tests can check what the challenge told the SDK.
    """

    def __init__(self, token: str):
        self._token = token
        self._lock = threading.Lock()
        self.calls: List[Dict[str, Any]] = []

    def _expires_on(self) -> int:
        exp = _jwt_exp(self._token)
        return exp if exp is not None else int(time.time()) + 3600

    def get_token(self, *scopes: str, claims: Optional[str] = None, tenant_id: Optional[str] = None,
                  enable_cae: bool = False, **kwargs: Any) -> AccessToken:
        with self._lock:
            self.calls.append({"method": "get_token", "scopes": list(scopes), "tenant_id": tenant_id})
        return AccessToken(self._token, self._expires_on())

    def get_token_info(self, *scopes: str, options: Optional[Dict[str, Any]] = None) -> AccessTokenInfo:
        options = dict(options or {})
        with self._lock:
            self.calls.append(
                {"method": "get_token_info", "scopes": list(scopes), "tenant_id": options.get("tenant_id")}
            )
        return AccessTokenInfo(self._token, self._expires_on())

    def close(self) -> None:  # TokenCredential protocol extras
        pass

    def __enter__(self):
        return self

    def __exit__(self, *args: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"StaticTokenCredential(calls={len(self.calls)}, token=<hidden>)"


class ResponseRecorder:
    """raw_response_hook that keeps (method, url, status, parsed JSON body) of every response."""

    def __init__(self) -> None:
        self.entries: List[Dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, pipeline_response: Any) -> None:
        req = pipeline_response.http_request
        resp = pipeline_response.http_response
        body: Any = None
        try:
            text = resp.text()
            body = json.loads(text) if text else None
        except Exception:
            body = None
        with self._lock:
            self.entries.append({"method": req.method, "url": req.url, "status": resp.status_code, "body": body})

    def clear(self) -> None:
        with self._lock:
            self.entries.clear()

    def matching(self, method: str, path_re: str, include_challenges: bool = False) -> List[Dict[str, Any]]:
        """Recorded responses for `method` whose URL path matches `path_re` (401 challenges left out)."""
        rx = re.compile(path_re)
        with self._lock:
            return [
                e
                for e in self.entries
                if e["method"] == method
                and rx.search(urlsplit(e["url"]).path)
                and (include_challenges or e["status"] != 401)
            ]


# Client options used everywhere: short timeouts and few retries so a misbehaving server fails fast.
CLIENT_KWARGS: Dict[str, Any] = {"connection_timeout": 10, "read_timeout": 60, "retry_total": 1}



def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
