"""Set / get / versions / update properties / validation errors, through the official Python SDK."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from coffer_compat import VERSION_RE, unique


def _utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def test_set_returns_value_id_and_attributes(client, vault_url, name, retention_days):
    before = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(seconds=5)
    secret = client.set_secret(name, "hunter2")

    assert secret.name == name
    assert secret.value == "hunter2"
    assert VERSION_RE.match(secret.properties.version or ""), secret.properties.version
    assert secret.id == f"{vault_url}/secrets/{name}/{secret.properties.version}"
    assert secret.properties.vault_url == vault_url
    assert secret.properties.enabled is True
    assert secret.properties.created_on is not None and secret.properties.updated_on is not None
    assert before <= secret.properties.created_on <= datetime.now(timezone.utc) + timedelta(seconds=5)
    assert secret.properties.recoverable_days == retention_days
    assert secret.properties.recovery_level == "CustomizedRecoverable+Purgeable"
    assert secret.properties.not_before is None
    assert secret.properties.expires_on is None
    assert not secret.properties.tags
    assert secret.properties.content_type is None
    assert not secret.properties.managed


def test_get_latest_and_by_version(client, name):
    v1 = client.set_secret(name, "first")
    v2 = client.set_secret(name, "second")

    assert v1.properties.version != v2.properties.version
    assert VERSION_RE.match(v2.properties.version)

    latest = client.get_secret(name)
    assert latest.value == "second"
    assert latest.properties.version == v2.properties.version
    assert latest.id == v2.id

    old = client.get_secret(name, v1.properties.version)
    assert old.value == "first"
    assert old.properties.version == v1.properties.version
    assert old.id == v1.id


def test_each_set_creates_a_new_version(client, name):
    versions = [client.set_secret(name, f"value-{i}").properties.version for i in range(5)]
    assert len(set(versions)) == 5
    assert all(VERSION_RE.match(v) for v in versions)
    listed = {p.version for p in client.list_properties_of_secret_versions(name)}
    assert listed == set(versions)
    for i, v in enumerate(versions):
        assert client.get_secret(name, v).value == f"value-{i}"


def test_set_with_all_optional_fields(client, name):
    nbf = _utc(2020, 1, 2, 3, 4, 5)
    exp = _utc(2040, 6, 7, 8, 9, 10)
    tags = {"env": "test", "owner": "compat"}
    secret = client.set_secret(
        name, "v", content_type="text/plain", tags=tags, not_before=nbf, expires_on=exp, enabled=True
    )
    assert secret.properties.content_type == "text/plain"
    assert secret.properties.tags == tags
    assert secret.properties.not_before == nbf
    assert secret.properties.expires_on == exp

    got = client.get_secret(name)
    assert got.value == "v"
    assert got.properties.content_type == "text/plain"
    assert got.properties.tags == tags
    assert got.properties.not_before == nbf
    assert got.properties.expires_on == exp


def test_values_round_trip_exactly(client, name):
    values = [
        " leading and trailing spaces ",
        "multi\nline\r\nvalue\twith tab",
        "unicode: \u00e9\u00e8 \u4f60\u597d \U0001F511",
        '{"json": [1, 2, "three"], "quote": "\\""}',
        "-----BEGIN PRIVATE KEY-----\nMIIB...\n-----END PRIVATE KEY-----\n",
    ]
    for i, value in enumerate(values):
        n = f"{name}-{i}"
        assert client.set_secret(n, value).value == value
        assert client.get_secret(n).value == value


def test_get_missing_secret_is_404_secret_not_found(client):
    missing = unique("py-missing")
    with pytest.raises(ResourceNotFoundError) as err:
        client.get_secret(missing)
    assert err.value.status_code == 404
    assert err.value.error is not None and err.value.error.code == "SecretNotFound"


def test_get_missing_version_is_404(client, name):
    client.set_secret(name, "x")
    with pytest.raises(ResourceNotFoundError) as err:
        client.get_secret(name, "0" * 32)
    assert err.value.status_code == 404
    assert err.value.error.code == "SecretNotFound"


def test_update_properties_of_latest(client, name):
    created = client.set_secret(name, "value")
    nbf = _utc(2021, 1, 1)
    exp = _utc(2041, 1, 1)
    props = client.update_secret_properties(
        name,
        content_type="application/json",
        tags={"a": "1", "b": "2"},
        not_before=nbf,
        expires_on=exp,
    )
    assert props.name == name
    assert props.version == created.properties.version
    assert props.content_type == "application/json"
    assert props.tags == {"a": "1", "b": "2"}
    assert props.not_before == nbf
    assert props.expires_on == exp
    assert props.enabled is True
    assert props.updated_on >= props.created_on

    got = client.get_secret(name)
    assert got.value == "value"  # updating properties never changes the value or creates a version
    assert got.properties.version == created.properties.version
    assert got.properties.content_type == "application/json"
    assert got.properties.tags == {"a": "1", "b": "2"}
    assert got.properties.not_before == nbf
    assert got.properties.expires_on == exp
    assert len(list(client.list_properties_of_secret_versions(name))) == 1

    # A partial update only changes what it names.
    props2 = client.update_secret_properties(name, content_type="text/plain")
    assert props2.content_type == "text/plain"
    assert props2.tags == {"a": "1", "b": "2"}
    assert props2.expires_on == exp

    # Replacing tags replaces the whole map.
    props3 = client.update_secret_properties(name, tags={"only": "this"})
    assert props3.tags == {"only": "this"}


def test_update_properties_of_specific_version(client, name):
    v1 = client.set_secret(name, "one")
    v2 = client.set_secret(name, "two")
    props = client.update_secret_properties(name, v1.properties.version, tags={"old": "yes"})
    assert props.version == v1.properties.version
    assert props.tags == {"old": "yes"}
    assert client.get_secret(name, v1.properties.version).properties.tags == {"old": "yes"}
    assert not client.get_secret(name, v2.properties.version).properties.tags
    assert client.get_secret(name).properties.version == v2.properties.version


def test_update_missing_secret_is_404(client):
    with pytest.raises(ResourceNotFoundError) as err:
        client.update_secret_properties(unique("py-missing"), content_type="x")
    assert err.value.status_code == 404


def test_get_disabled_secret_is_403_forbidden(client, name):
    client.set_secret(name, "cannot-read-me", enabled=False)
    with pytest.raises(HttpResponseError) as err:
        client.get_secret(name)
    assert err.value.status_code == 403
    assert err.value.error is not None and err.value.error.code == "Forbidden"
    assert "cannot-read-me" not in str(err.value)

    # Its properties are still listed, showing it disabled.
    versions = list(client.list_properties_of_secret_versions(name))
    assert len(versions) == 1 and versions[0].enabled is False


def test_disable_then_enable_via_update(client, name):
    created = client.set_secret(name, "toggle")
    props = client.update_secret_properties(name, enabled=False)
    assert props.enabled is False
    with pytest.raises(HttpResponseError) as err:
        client.get_secret(name, created.properties.version)
    assert err.value.status_code == 403
    assert err.value.error.code == "Forbidden"

    props = client.update_secret_properties(name, enabled=True)
    assert props.enabled is True
    assert client.get_secret(name).value == "toggle"


def test_disabled_flag_is_per_version(client, name):
    v1 = client.set_secret(name, "old-enabled")
    client.set_secret(name, "new-disabled", enabled=False)
    with pytest.raises(HttpResponseError) as err:
        client.get_secret(name)
    assert err.value.status_code == 403
    assert client.get_secret(name, v1.properties.version).value == "old-enabled"


@pytest.mark.parametrize("bad", ["bad_name!", "has space", "dot.name", "a" * 128])
def test_invalid_name_is_400_bad_parameter(client, bad):
    with pytest.raises(HttpResponseError) as err:
        client.set_secret(bad, "x")
    assert err.value.status_code == 400
    assert err.value.error is not None and err.value.error.code == "BadParameter"


def test_name_of_127_chars_is_accepted(client):
    n = ("py-max-" + unique("n"))
    n = (n + "x" * 127)[:127]
    assert len(n) == 127
    secret = client.set_secret(n, "ok")
    assert secret.name == n
    assert client.get_secret(n).value == "ok"


def test_value_size_limit(client, name):
    limit = 25 * 1024
    ok = client.set_secret(name, "a" * limit)
    assert len(ok.value) == limit
    assert len(client.get_secret(name).value) == limit

    with pytest.raises(HttpResponseError) as err:
        client.set_secret(name, "a" * (limit + 1))
    assert err.value.status_code == 400
    assert err.value.error.code == "BadParameter"
    # The rejected set created no version.
    assert len(list(client.list_properties_of_secret_versions(name))) == 1


def test_value_size_limit_counts_bytes_not_characters(client, name):
    # 12801 two-byte characters = 25602 bytes > 25600.
    with pytest.raises(HttpResponseError) as err:
        client.set_secret(name, "\u00e9" * 12801)
    assert err.value.status_code == 400


def test_tag_count_limit(client, name):
    fifteen = {f"t{i}": str(i) for i in range(15)}
    assert client.set_secret(name, "x", tags=fifteen).properties.tags == fifteen

    sixteen = {f"t{i}": str(i) for i in range(16)}
    with pytest.raises(HttpResponseError) as err:
        client.set_secret(name, "x", tags=sixteen)
    assert err.value.status_code == 400
    assert err.value.error.code == "BadParameter"

    with pytest.raises(HttpResponseError) as err:
        client.update_secret_properties(name, tags=sixteen)
    assert err.value.status_code == 400
    assert client.get_secret(name).properties.tags == fifteen


def test_content_type_limit(client, name):
    assert client.set_secret(name, "x", content_type="c" * 255).properties.content_type == "c" * 255
    with pytest.raises(HttpResponseError) as err:
        client.set_secret(name, "x", content_type="c" * 256)
    assert err.value.status_code == 400


def test_names_are_case_insensitive(client, name):
    # Key Vault object names are case-insensitive: another casing addresses the same secret.
    first = client.set_secret(name, "lower")
    assert client.get_secret(name.upper()).value == "lower"
    client.set_secret(name.upper(), "upper")
    assert client.get_secret(name).value == "upper"
    versions = {p.version for p in client.list_properties_of_secret_versions(name)}
    assert len(versions) == 2 and first.properties.version in versions


def test_concurrent_sets_each_create_a_version(client, name):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: client.set_secret(name, f"c{i}"), range(16)))
    versions = [r.properties.version for r in results]
    assert len(set(versions)) == 16
    assert {p.version for p in client.list_properties_of_secret_versions(name)} == set(versions)
    for r in results:
        assert client.get_secret(name, r.properties.version).value == r.value
    # The latest is one of them (whichever the server committed last).
    assert client.get_secret(name).properties.version in set(versions)
