"""azure.keyvault.secrets.aio (aiohttp transport, trusts the CA through SSL_CERT_FILE)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Optional

from azure.core.credentials import AccessToken, AccessTokenInfo
from azure.core.exceptions import ResourceNotFoundError

from coffer_compat import CLIENT_KWARGS, VERSION_RE, unique


class AsyncStaticTokenCredential:
    """azure-core AsyncTokenCredential returning a fixed bearer token."""

    def __init__(self, token: str):
        self._token = token
        self.calls = 0

    async def get_token(self, *scopes: str, claims: Optional[str] = None, tenant_id: Optional[str] = None,
                        enable_cae: bool = False, **kwargs: Any) -> AccessToken:
        self.calls += 1
        return AccessToken(self._token, int(time.time()) + 3600)

    async def get_token_info(self, *scopes: str, options: Optional[dict] = None) -> AccessTokenInfo:
        self.calls += 1
        return AccessTokenInfo(self._token, int(time.time()) + 3600)

    async def close(self) -> None:
        pass

    async def __aenter__(self):
        return self

    async def __aexit__(self, *args: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "AsyncStaticTokenCredential(token=<hidden>)"


def test_async_set_get_list_delete(coffer, vault_url, retention_days):
    from azure.keyvault.secrets.aio import SecretClient

    # aiohttp ignores REQUESTS_CA_BUNDLE; it must pick the CA up from SSL_CERT_FILE.
    assert os.environ.get("SSL_CERT_FILE"), "SSL_CERT_FILE must point at the Coffer CA for aiohttp"

    async def scenario() -> None:
        cred = AsyncStaticTokenCredential(coffer.token)
        prefix = unique("py-async")
        async with SecretClient(vault_url=vault_url, credential=cred, **CLIENT_KWARGS) as client:
            first = await client.set_secret(f"{prefix}-0", "async one")
            second = await client.set_secret(f"{prefix}-0", "async two")
            assert VERSION_RE.match(first.properties.version)
            assert first.properties.version != second.properties.version
            assert (await client.get_secret(f"{prefix}-0")).value == "async two"
            assert (await client.get_secret(f"{prefix}-0", first.properties.version)).value == "async one"

            for i in range(1, 28):
                await client.set_secret(f"{prefix}-{i}", f"v{i}")
            names = set()
            pages = 0
            async for page in client.list_properties_of_secrets().by_page():
                pages += 1
                async for item in page:
                    names.add(item.name)
            assert pages >= 2
            assert {f"{prefix}-{i}" for i in range(28)} <= names

            versions = [p.version async for p in client.list_properties_of_secret_versions(f"{prefix}-0")]
            assert sorted(versions) == sorted([first.properties.version, second.properties.version])

            deleted = await client.delete_secret(f"{prefix}-0")
            assert deleted.recovery_id == f"{vault_url}/deletedsecrets/{prefix}-0"
            assert deleted.properties.recoverable_days == retention_days
            try:
                await client.get_secret(f"{prefix}-0")
                raise AssertionError("get after delete should be 404")
            except ResourceNotFoundError:
                pass
            await client.purge_deleted_secret(f"{prefix}-0")
        assert cred.calls >= 1

    asyncio.run(scenario())
