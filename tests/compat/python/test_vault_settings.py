"""Vault-level settings as the SDK sees them: retention days, recovery level, purge protection.

Vaults (created by run.sh): COFFER_PY_VAULT_90 with the default retention (90 days, purge allowed) and
COFFER_PY_VAULT_PROTECTED with 7 days and purge protection.
"""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from coffer_compat import unique


@pytest.fixture(scope="module")
def client90(coffer, make_client_module):
    return make_client_module(coffer.vault_url(os.environ.get("COFFER_PY_VAULT_90", "pyretain90")))


@pytest.fixture(scope="module")
def protected(coffer, make_client_module):
    return make_client_module(coffer.vault_url(os.environ.get("COFFER_PY_VAULT_PROTECTED", "pyprotected")))


def _delete(client, name):
    poller = client.begin_delete_secret(name)
    poller.wait(timeout=30)
    assert poller.done()
    return poller.result()


def test_default_retention_is_90_days_recoverable_purgeable(client90):
    name = unique("py-ret90")
    secret = client90.set_secret(name, "x")
    assert secret.properties.recoverable_days == 90
    assert secret.properties.recovery_level == "Recoverable+Purgeable"
    deleted = _delete(client90, name)
    assert deleted.properties.recoverable_days == 90
    delta = deleted.scheduled_purge_date - deleted.deleted_date
    assert abs(delta - timedelta(days=90)) <= timedelta(seconds=60)
    client90.purge_deleted_secret(name)
    with pytest.raises(ResourceNotFoundError):
        client90.get_deleted_secret(name)


def test_purge_protection(protected):
    name = unique("py-protected")
    secret = protected.set_secret(name, "keep me")
    assert secret.properties.recoverable_days == 7
    assert secret.properties.recovery_level == "CustomizedRecoverable"
    deleted = _delete(protected, name)
    assert deleted.properties.recovery_level == "CustomizedRecoverable"

    with pytest.raises(HttpResponseError) as err:
        protected.purge_deleted_secret(name)
    assert err.value.status_code == 403
    assert err.value.error.code == "Forbidden"

    # Still there, and still recoverable.
    assert protected.get_deleted_secret(name).name == name
    poller = protected.begin_recover_deleted_secret(name)
    poller.wait(timeout=30)
    assert poller.done()
    assert protected.get_secret(name).value == "keep me"


def test_vaults_are_isolated(client, client90):
    name = unique("py-isolated")
    client.set_secret(name, "in pycompat")
    with pytest.raises(ResourceNotFoundError):
        client90.get_secret(name)
    assert name not in {p.name for p in client90.list_properties_of_secrets()}
    client90.set_secret(name, "in pyretain90")
    assert client.get_secret(name).value == "in pycompat"
    assert client90.get_secret(name).value == "in pyretain90"
