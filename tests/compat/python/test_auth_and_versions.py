"""Challenge-based authentication and api-version handling, as the official Python SDK sees them."""

from __future__ import annotations

import re

import pytest
import requests
from azure.core.exceptions import ClientAuthenticationError

from coffer_compat import StaticTokenCredential, unique

CHALLENGE_RE = re.compile(
    r'^Bearer authorization="(?P<authority>https://[^"]+)/(?P<tenant>[^"/]+)", resource="(?P<resource>[^"]+)"$'
)


def _challenge(coffer, vault_url):
    resp = requests.get(f"{vault_url}/secrets?api-version=7.5", verify=coffer.ca_file, timeout=10)
    assert resp.status_code == 401
    header = resp.headers.get("WWW-Authenticate", "")
    m = CHALLENGE_RE.match(header)
    assert m, f"unexpected challenge header: {header!r}"
    return resp, m


def test_unauthenticated_request_gets_key_vault_challenge(coffer, vault_url):
    resp, m = _challenge(coffer, vault_url)
    port = "" if coffer.port == 443 else f":{coffer.port}"
    assert m["authority"] == f"https://login.{coffer.zone}{port}"
    assert m["resource"] == coffer.resource
    assert resp.json()["error"]["code"] == "Unauthorized"


def test_bodiless_unauthenticated_put_gets_401_not_400(coffer, vault_url):
    # The SDKs' first request to a vault is the original method and URL with no body and no token.
    resp = requests.put(
        f"{vault_url}/secrets/{unique('py-challenge')}?api-version=2026-04-01",
        headers={"Content-Type": "application/json", "Content-Length": "0"},
        data=b"",
        verify=coffer.ca_file,
        timeout=10,
    )
    assert resp.status_code == 401
    assert CHALLENGE_RE.match(resp.headers.get("WWW-Authenticate", ""))


def test_sdk_asks_credential_for_zone_scope_and_challenge_tenant(coffer, vault_url, make_client):
    _, m = _challenge(coffer, vault_url)
    cred = StaticTokenCredential(coffer.token)
    client = make_client(vault_url, cred)
    name = unique("py-scope")
    client.set_secret(name, "x")
    assert client.get_secret(name).value == "x"
    assert cred.calls, "the SDK never asked the credential for a token"
    # The SDK passes the challenge's tenant on, except an AD FS one (tenant "adfs", the dev server's): its
    # challenge policy drops tenants ending in "adfs" (azure-keyvault-secrets _shared/challenge_auth_policy.py).
    expected_tenant = None if m["tenant"].lower().endswith("adfs") else m["tenant"]
    for call in cred.calls:
        assert call["scopes"] == [f"{coffer.resource}/.default"]
        assert call["tenant_id"] == expected_tenant


@pytest.mark.parametrize("bad_token", ["not-a-jwt", "tampered"])
def test_bad_tokens_are_rejected(coffer, vault_url, make_client, bad_token):
    if bad_token == "tampered":
        head, payload, sig = coffer.token.split(".")
        # Flip one character in the middle of the signature.
        i = len(sig) // 2
        sig = sig[:i] + ("A" if sig[i] != "A" else "B") + sig[i + 1 :]
        bad_token = ".".join([head, payload, sig])
    client = make_client(vault_url, StaticTokenCredential(bad_token))
    with pytest.raises(ClientAuthenticationError) as err:
        client.get_secret(unique("py-auth"))
    assert err.value.status_code == 401


@pytest.mark.parametrize(
    "api_version", ["7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2016-10-01", "2025-07-01", "2026-04-01"]
)
def test_api_versions_known_to_the_sdk(vault_url, make_client, api_version):
    client = make_client(vault_url, api_version=api_version)
    name = unique("py-api-" + api_version.replace(".", "-"))
    secret = client.set_secret(name, f"value for {api_version}", tags={"api": api_version})
    assert secret.value == f"value for {api_version}"
    got = client.get_secret(name)
    assert got.value == secret.value
    assert got.properties.tags == {"api": api_version}
    assert name in {p.name for p in client.list_properties_of_secrets()}
