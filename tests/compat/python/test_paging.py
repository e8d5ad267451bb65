"""Listing secrets and versions, across several pages, through the official Python SDK."""

from __future__ import annotations

import math
from typing import List
from urllib.parse import parse_qs, urlsplit

import pytest
from azure.core.exceptions import HttpResponseError
from azure.core.rest import HttpRequest

from coffer_compat import VERSION_RE, unique

COUNT = 30  # > one default page of 25


@pytest.fixture(scope="module")
def many_secrets(client) -> List[str]:
    prefix = unique("py-page")
    names = [f"{prefix}-{i:02d}" for i in range(COUNT)]
    for i, n in enumerate(names):
        client.set_secret(n, f"value-{i}", tags={"idx": str(i)}, content_type="text/plain")
    return names


@pytest.fixture(scope="module")
def many_versions(client):
    n = unique("py-versions")
    versions = [client.set_secret(n, f"v{i}").properties.version for i in range(COUNT)]
    return n, versions


def _pages(pager) -> List[list]:
    return [list(page) for page in pager]


def test_list_secrets_default_page_size_is_25(client, many_secrets, vault_url, recorder):
    recorder.clear()
    pages = _pages(client.list_properties_of_secrets().by_page())
    assert len(pages) >= 2
    assert len(pages[0]) == 25
    assert all(len(p) <= 25 for p in pages)
    items = [item for page in pages for item in page]
    ids = [item.id for item in items]
    assert len(ids) == len(set(ids)), "a secret appeared twice across pages"
    mine = {item.name: item for item in items if item.name in set(many_secrets)}
    assert set(mine) == set(many_secrets)
    for n, item in mine.items():
        assert item.id == f"{vault_url}/secrets/{n}"  # list items carry no version
        assert item.version is None
        assert item.enabled is True
        assert item.content_type == "text/plain"
        assert item.tags == {"idx": str(int(n.rsplit("-", 1)[1]))}
        assert item.created_on is not None and item.updated_on is not None

    # Wire-level checks: values never appear in listings, nextLink is absolute on the same vault.
    responses = recorder.matching("GET", r"^/secrets/?$")
    assert len(responses) == len(pages)
    for resp in responses:
        assert resp["status"] == 200
        for item in resp["body"]["value"]:
            assert "value" not in item, f"listing leaked a secret value: {item}"
    for resp in responses[:-1]:
        link = resp["body"].get("nextLink")
        assert link and link.startswith(f"{vault_url}/secrets?"), link
    assert not responses[-1]["body"].get("nextLink")


def test_list_secrets_small_page_size(client, many_secrets, vault_url, recorder):
    recorder.clear()
    pages = _pages(client.list_properties_of_secrets(max_page_size=7).by_page())
    total = sum(len(p) for p in pages)
    assert total >= COUNT
    assert len(pages[0]) == 7
    assert all(len(p) <= 7 for p in pages)
    assert len(pages) >= math.ceil(total / 7)
    names = [item.name for page in pages for item in page]
    assert len(names) == len(set(names))
    assert set(many_secrets) <= set(names)

    responses = recorder.matching("GET", r"^/secrets/?$")
    first = parse_qs(urlsplit(responses[0]["url"]).query)
    assert first.get("maxresults") == ["7"]
    for resp in responses[:-1]:
        link = resp["body"]["nextLink"]
        assert link.startswith(f"{vault_url}/secrets?")
        # The page size must survive in the nextLink query (clients re-send it verbatim).
        assert parse_qs(urlsplit(link).query).get("maxresults") == ["7"], link


def test_list_secrets_page_size_above_25_is_capped_or_rejected(client, many_secrets):
    try:
        pages = _pages(client.list_properties_of_secrets(max_page_size=100).by_page())
    except HttpResponseError as err:  # the real service may reject maxresults > 25 instead
        assert err.status_code == 400
        return
    assert all(len(p) <= 25 for p in pages)
    assert set(many_secrets) <= {item.name for page in pages for item in page}


def test_list_secrets_resume_from_continuation_token(client, many_secrets):
    pager = client.list_properties_of_secrets(max_page_size=5).by_page()
    first = [i.name for i in next(pager)]
    second = [i.name for i in next(pager)]
    token = pager.continuation_token
    assert token, "expected a nextLink after the second page"
    third = [i.name for i in next(pager)]

    resumed = client.list_properties_of_secrets(max_page_size=5).by_page(continuation_token=token)
    assert [i.name for i in next(resumed)] == third
    assert not set(first) & set(second) and not set(second) & set(third)


def test_list_versions_pages(client, many_versions, vault_url, recorder):
    n, versions = many_versions
    recorder.clear()
    pages = _pages(client.list_properties_of_secret_versions(n).by_page())
    assert len(pages[0]) == 25
    assert len(pages) == 2
    items = [item for page in pages for item in page]
    assert sorted(item.version for item in items) == sorted(versions)
    for item in items:
        assert item.name == n
        assert VERSION_RE.match(item.version)
        assert item.id == f"{vault_url}/secrets/{n}/{item.version}"
        assert item.enabled is True
    for resp in recorder.matching("GET", r"^/secrets/[^/]+/versions$"):
        for item in resp["body"]["value"]:
            assert "value" not in item


def test_list_versions_small_page_size(client, many_versions):
    n, versions = many_versions
    pages = _pages(client.list_properties_of_secret_versions(n, max_page_size=4).by_page())
    assert [len(p) for p in pages] == [4] * 7 + [2]
    assert sorted(item.version for page in pages for item in page) == sorted(versions)


def test_list_versions_iterates_all_without_by_page(client, many_versions):
    n, versions = many_versions
    assert sorted(p.version for p in client.list_properties_of_secret_versions(n)) == sorted(versions)


def test_raw_list_response_shape(client, many_secrets, vault_url):
    """The documented wire shape: {value:[SecretItem], nextLink}, through the SDK's own pipeline."""
    resp = client.send_request(HttpRequest("GET", "/secrets?maxresults=3"))
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    body = resp.json()
    assert set(body) <= {"value", "nextLink"}
    assert len(body["value"]) == 3
    for item in body["value"]:
        assert set(item) >= {"id", "attributes"}
        assert "value" not in item
        attrs = item["attributes"]
        assert isinstance(attrs["created"], int) and isinstance(attrs["updated"], int)
        assert isinstance(attrs["enabled"], bool)
    link = body["nextLink"]
    assert link.startswith(f"{vault_url}/secrets?")
    query = parse_qs(urlsplit(link).query)
    assert query.get("maxresults") == ["3"]

    # Following the nextLink as given (Python overwrites only api-version) yields the next items.
    nxt = client.send_request(HttpRequest("GET", link))
    assert nxt.status_code == 200
    ids_1 = {i["id"] for i in body["value"]}
    ids_2 = {i["id"] for i in nxt.json()["value"]}
    assert ids_2 and not ids_1 & ids_2
