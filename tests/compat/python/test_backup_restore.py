"""backup_secret -> delete + purge -> restore_secret_backup, through the official Python SDK."""

from __future__ import annotations

import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError

from coffer_compat import unique


def _delete(client, name):
    poller = client.begin_delete_secret(name)
    poller.wait(timeout=30)
    assert poller.done(), "delete poller did not complete"


def test_backup_purge_restore_round_trip(client, name, vault_url):
    v1 = client.set_secret(name, "version one", tags={"gen": "1"})
    v2 = client.set_secret(name, "version two", content_type="text/plain", tags={"gen": "2"})
    v3 = client.set_secret(name, "version three (disabled)", enabled=False)

    backup = client.backup_secret(name)
    assert isinstance(backup, bytes)
    assert len(backup) > 0

    _delete(client, name)
    client.purge_deleted_secret(name)
    with pytest.raises(ResourceNotFoundError):
        client.get_secret(name, v2.properties.version)

    restored = client.restore_secret_backup(backup)
    assert restored.name == name
    assert restored.version == v3.properties.version
    assert restored.id == f"{vault_url}/secrets/{name}/{v3.properties.version}"
    assert restored.vault_url == vault_url

    versions = {p.version: p for p in client.list_properties_of_secret_versions(name)}
    assert set(versions) == {v1.properties.version, v2.properties.version, v3.properties.version}
    assert versions[v3.properties.version].enabled is False

    got1 = client.get_secret(name, v1.properties.version)
    assert got1.value == "version one"
    assert got1.properties.tags == {"gen": "1"}
    got2 = client.get_secret(name, v2.properties.version)
    assert got2.value == "version two"
    assert got2.properties.content_type == "text/plain"
    assert got2.properties.tags == {"gen": "2"}
    with pytest.raises(HttpResponseError) as err:  # the latest version is still disabled
        client.get_secret(name)
    assert err.value.status_code == 403

    client.update_secret_properties(name, enabled=True)
    assert client.get_secret(name).value == "version three (disabled)"


def test_restore_over_existing_name_is_409(client, name):
    client.set_secret(name, "exists")
    backup = client.backup_secret(name)
    with pytest.raises(ResourceExistsError) as err:
        client.restore_secret_backup(backup)
    assert err.value.status_code == 409
    assert client.get_secret(name).value == "exists"
    assert len(list(client.list_properties_of_secret_versions(name))) == 1


def test_restore_while_soft_deleted_is_409(client, name):
    client.set_secret(name, "soft")
    backup = client.backup_secret(name)
    _delete(client, name)
    with pytest.raises(ResourceExistsError) as err:
        client.restore_secret_backup(backup)
    assert err.value.status_code == 409
    client.purge_deleted_secret(name)
    assert client.restore_secret_backup(backup).name == name
    assert client.get_secret(name).value == "soft"


def test_backup_missing_secret_is_404(client):
    with pytest.raises(ResourceNotFoundError) as err:
        client.backup_secret(unique("py-missing"))
    assert err.value.status_code == 404
    assert err.value.error.code == "SecretNotFound"


def test_restore_garbage_is_400(client):
    with pytest.raises(HttpResponseError) as err:
        client.restore_secret_backup(b"this is not a coffer backup blob")
    assert err.value.status_code == 400
