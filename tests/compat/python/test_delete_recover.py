"""Soft delete, deleted-secret reads and listings, recover and purge, through the official Python SDK."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from azure.core.exceptions import HttpResponseError, ResourceExistsError, ResourceNotFoundError

from coffer_compat import unique

POLL_TIMEOUT = 30  # seconds; a synchronous server finishes after the first poll


def _delete(client, name):
    poller = client.begin_delete_secret(name)
    poller.wait(timeout=POLL_TIMEOUT)
    assert poller.done(), "delete poller did not complete"
    deleted = poller.result()
    return deleted


def _recover(client, name):
    poller = client.begin_recover_deleted_secret(name)
    poller.wait(timeout=POLL_TIMEOUT)
    assert poller.done(), "recover poller did not complete"
    recovered = poller.result()
    return recovered


def _close(a: datetime, b: datetime, seconds: int = 60) -> bool:
    return abs((a - b).total_seconds()) <= seconds


def test_soft_delete_get_deleted_list_deleted_and_recover(
    client, name, vault_url, retention_days, recorder
):
    v1 = client.set_secret(name, "one", tags={"k": "v"})
    v2 = client.set_secret(name, "two", content_type="text/plain", tags={"k": "v2"})

    recorder.clear()
    deleted = _delete(client, name)
    now = datetime.now(timezone.utc)
    assert deleted.name == name
    assert deleted.recovery_id == f"{vault_url}/deletedsecrets/{name}"
    assert deleted.id == v2.id
    assert deleted.properties.version == v2.properties.version
    assert deleted.properties.content_type == "text/plain"
    assert deleted.properties.tags == {"k": "v2"}
    assert deleted.deleted_date is not None and _close(deleted.deleted_date, now)
    assert deleted.scheduled_purge_date is not None
    assert _close(deleted.scheduled_purge_date, deleted.deleted_date + timedelta(days=retention_days))
    assert deleted.properties.recoverable_days == retention_days
    assert deleted.properties.recovery_level == "CustomizedRecoverable+Purgeable"
    delete_responses = recorder.matching("DELETE", rf"^/secrets/{name}$")
    assert [r["status"] for r in delete_responses] == [200]
    assert "value" not in delete_responses[0]["body"], "DELETE response leaked the value"

    # Gone from the live collection.
    with pytest.raises(ResourceNotFoundError) as err:
        client.get_secret(name)
    assert err.value.error.code == "SecretNotFound"
    with pytest.raises(ResourceNotFoundError):
        client.get_secret(name, v1.properties.version)
    assert name not in {p.name for p in client.list_properties_of_secrets()}

    # Readable in the deleted collection.
    got = client.get_deleted_secret(name)
    assert got.name == name
    assert got.recovery_id == deleted.recovery_id
    assert got.id == v2.id
    assert got.deleted_date == deleted.deleted_date
    assert got.scheduled_purge_date == deleted.scheduled_purge_date
    assert got.properties.recoverable_days == retention_days

    recorder.clear()
    listed = {d.name: d for d in client.list_deleted_secrets()}
    assert name in listed
    item = listed[name]
    assert item.recovery_id == deleted.recovery_id
    assert item.deleted_date == deleted.deleted_date
    assert item.scheduled_purge_date == deleted.scheduled_purge_date
    assert item.id == f"{vault_url}/secrets/{name}"
    for resp in recorder.matching("GET", r"^/deletedsecrets/?$"):
        for raw in resp["body"]["value"]:
            assert "value" not in raw

    # The name cannot be reused while it is soft-deleted.
    with pytest.raises(ResourceExistsError) as err:
        client.set_secret(name, "three")
    assert err.value.status_code == 409
    assert err.value.error.code == "Conflict"

    # Recover brings back every version.
    recovered = _recover(client, name)
    assert recovered.name == name
    assert recovered.version == v2.properties.version
    assert recovered.id == v2.id
    assert client.get_secret(name).value == "two"
    assert client.get_secret(name, v1.properties.version).value == "one"
    assert client.get_secret(name, v1.properties.version).properties.tags == {"k": "v"}
    assert {p.version for p in client.list_properties_of_secret_versions(name)} == {
        v1.properties.version,
        v2.properties.version,
    }
    with pytest.raises(ResourceNotFoundError):
        client.get_deleted_secret(name)
    assert name not in {d.name for d in client.list_deleted_secrets()}


def test_purge_deleted_secret(client, name, recorder):
    client.set_secret(name, "first-life")
    _delete(client, name)

    recorder.clear()
    assert client.purge_deleted_secret(name) is None
    purge = recorder.matching("DELETE", rf"^/deletedsecrets/{name}$")
    assert [r["status"] for r in purge] == [204]

    with pytest.raises(ResourceNotFoundError):
        client.get_deleted_secret(name)
    assert name not in {d.name for d in client.list_deleted_secrets()}
    with pytest.raises(ResourceNotFoundError):
        client.get_secret(name)

    # After a purge the name is free again and starts from scratch.
    again = client.set_secret(name, "second-life")
    assert client.get_secret(name).value == "second-life"
    assert [p.version for p in client.list_properties_of_secret_versions(name)] == [again.properties.version]


def test_missing_deleted_secret_errors(client):
    missing = unique("py-never")
    with pytest.raises(ResourceNotFoundError) as err:
        client.get_deleted_secret(missing)
    assert err.value.status_code == 404
    assert err.value.error.code == "SecretNotFound"

    with pytest.raises(ResourceNotFoundError) as err:
        client.purge_deleted_secret(missing)
    assert err.value.status_code == 404

    with pytest.raises(ResourceNotFoundError) as err:
        client.begin_delete_secret(missing)
    assert err.value.status_code == 404
    assert err.value.error.code == "SecretNotFound"

    with pytest.raises(ResourceNotFoundError) as err:
        client.begin_recover_deleted_secret(missing)
    assert err.value.status_code == 404


def test_purge_of_live_secret_is_not_allowed(client, name):
    client.set_secret(name, "alive")
    with pytest.raises(HttpResponseError) as err:
        client.purge_deleted_secret(name)
    assert err.value.status_code == 404
    assert client.get_secret(name).value == "alive"


def test_delete_twice_is_404(client, name):
    client.set_secret(name, "x")
    _delete(client, name)
    with pytest.raises(ResourceNotFoundError):
        client.begin_delete_secret(name)


def test_recover_poller_completes_for_disabled_secret(client, name):
    # The recover poller polls GET /secrets/{name}/; for a disabled secret that is 403, which ends it.
    created = client.set_secret(name, "disabled", enabled=False)
    _delete(client, name)
    recovered = _recover(client, name)
    assert recovered.version == created.properties.version
    assert recovered.enabled is False
    with pytest.raises(HttpResponseError) as err:
        client.get_secret(name)
    assert err.value.status_code == 403


def test_list_deleted_secrets_pages(client):
    prefix = unique("py-delpage")
    names = [f"{prefix}-{i}" for i in range(5)]
    for n in names:
        client.set_secret(n, "x")
        _delete(client, n)
    pages = [list(p) for p in client.list_deleted_secrets(max_page_size=2).by_page()]
    assert all(len(p) <= 2 for p in pages)
    assert len(pages[0]) == 2
    seen = [d.name for page in pages for d in page]
    assert len(seen) == len(set(seen))
    assert set(names) <= set(seen)
    for page in pages:
        for d in page:
            assert d.recovery_id and d.deleted_date and d.scheduled_purge_date
    for n in names:
        client.purge_deleted_secret(n)
