"""pytest fixtures for the Coffer compatibility suite (official azure-keyvault-secrets SDK).

See coffer_compat.py for the environment the runner (tests/compat/run.sh) provides.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Any, List

import pytest
from azure.keyvault.secrets import SecretClient

from coffer_compat import CLIENT_KWARGS, Coffer, ResponseRecorder, StaticTokenCredential


@pytest.fixture(scope="session")
def coffer() -> Coffer:
    data_dir = os.environ.get("COFFER_DATA_DIR")
    if not data_dir:
        pytest.exit("COFFER_DATA_DIR is not set: run the suite through tests/compat/run.sh", returncode=2)
    c = Coffer(data_dir)
    # Trust the server's CA in this process (the runner sources admin.env as well).
    for var in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        os.environ.setdefault(var, c.admin.get(var) or c.ca_file)
    return c


@pytest.fixture(scope="session")
def vault_name() -> str:
    return os.environ.get("COFFER_PY_VAULT", "pycompat")


@pytest.fixture(scope="session")
def retention_days() -> int:
    return int(os.environ.get("COFFER_RETENTION_DAYS", "7"))


@pytest.fixture(scope="session")
def vault_url(coffer: Coffer, vault_name: str) -> str:
    return coffer.vault_url(vault_name)


@pytest.fixture(scope="session")
def credential(coffer: Coffer) -> StaticTokenCredential:
    return StaticTokenCredential(coffer.token)


@pytest.fixture(scope="session")
def recorder() -> ResponseRecorder:
    return ResponseRecorder()


@pytest.fixture(scope="session")
def client(vault_url: str, credential: StaticTokenCredential, recorder: ResponseRecorder):
    c = SecretClient(vault_url=vault_url, credential=credential, raw_response_hook=recorder, **CLIENT_KWARGS)
    yield c
    c.close()


@pytest.fixture
def make_client(credential: StaticTokenCredential):
    """Factory for extra clients (other api-versions, other credentials)."""
    made: List[SecretClient] = []

    def factory(url: str, cred: Any = None, **kwargs: Any) -> SecretClient:
        opts = dict(CLIENT_KWARGS)
        opts.update(kwargs)
        c = SecretClient(vault_url=url, credential=cred or credential, **opts)
        made.append(c)
        return c

    yield factory
    for c in made:
        c.close()


@pytest.fixture(scope="module")
def make_client_module(credential: StaticTokenCredential):
    """Module-scoped factory for clients of other vaults."""
    made: List[SecretClient] = []

    def factory(url: str, **kwargs: Any) -> SecretClient:
        opts = dict(CLIENT_KWARGS)
        opts.update(kwargs)
        c = SecretClient(vault_url=url, credential=credential, **opts)
        made.append(c)
        return c

    yield factory
    for c in made:
        c.close()


@pytest.fixture
def name(request) -> str:
    """A fresh, valid secret name unique to this test."""
    base = re.sub(r"[^0-9A-Za-z]+", "-", request.node.name).strip("-")[:40]
    return f"py-{base}-{uuid.uuid4().hex[:8]}"
