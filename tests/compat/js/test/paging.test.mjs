// Listing secrets and versions across several pages, through the official JS SDK.
import { test } from "node:test";
import assert from "node:assert/strict";
import { VERSION_RE, collect, collectPages, makeClient, uniqueName, vaultUrl } from "../lib/coffer.mjs";

const COUNT = 30; // more than one default page of 25
const rec = makeClient();
const { client } = rec;

let secretsSetup;
function manySecrets() {
  secretsSetup ??= (async () => {
    const prefix = uniqueName("js-page");
    const names = [];
    for (let i = 0; i < COUNT; i++) {
      const name = `${prefix}-${String(i).padStart(2, "0")}`;
      await client.setSecret(name, `value-${i}`, { tags: { idx: String(i) }, contentType: "text/plain" });
      names.push(name);
    }
    return names;
  })();
  return secretsSetup;
}

let versionsSetup;
function manyVersions() {
  versionsSetup ??= (async () => {
    const name = uniqueName("js-versions");
    const versions = [];
    for (let i = 0; i < COUNT; i++) versions.push((await client.setSecret(name, `v${i}`)).properties.version);
    return { name, versions };
  })();
  return versionsSetup;
}

test("listPropertiesOfSecrets: default page size is 25, every secret once, no values", async () => {
  const names = await manySecrets();
  rec.clear();
  const pages = await collectPages(client.listPropertiesOfSecrets());
  assert.ok(pages.length >= 2, `expected several pages, got ${pages.length}`);
  assert.equal(pages[0].length, 25);
  for (const page of pages) assert.ok(page.length <= 25);
  const items = pages.flat();
  const ids = items.map((p) => p.id);
  assert.equal(new Set(ids).size, ids.length, "a secret appeared twice across pages");
  const mine = items.filter((p) => names.includes(p.name));
  assert.deepEqual(mine.map((p) => p.name).sort(), [...names].sort());
  for (const p of mine) {
    assert.equal(p.id, `${vaultUrl}/secrets/${p.name}`);
    assert.equal(p.version, undefined);
    assert.equal(p.enabled, true);
    assert.equal(p.contentType, "text/plain");
    assert.deepEqual(p.tags, { idx: String(Number(p.name.split("-").pop())) });
    assert.ok(p.createdOn instanceof Date);
  }

  const responses = rec.matching("GET", /^\/secrets\/?$/);
  assert.equal(responses.length, pages.length);
  for (const r of responses) {
    assert.equal(r.status, 200);
    for (const item of r.body.value) assert.ok(!("value" in item), `listing leaked a value: ${JSON.stringify(item)}`);
  }
  for (const r of responses.slice(0, -1)) {
    assert.ok(r.body.nextLink?.startsWith(`${vaultUrl}/secrets?`), `bad nextLink ${r.body.nextLink}`);
  }
  assert.ok(!responses.at(-1).body.nextLink);
});

test("listPropertiesOfSecrets: byPage({ maxPageSize: 7 })", async () => {
  const names = await manySecrets();
  rec.clear();
  const pages = await collectPages(client.listPropertiesOfSecrets(), { maxPageSize: 7 });
  assert.equal(pages[0].length, 7);
  for (const page of pages) assert.ok(page.length <= 7);
  const seen = pages.flat().map((p) => p.name);
  assert.equal(new Set(seen).size, seen.length);
  for (const n of names) assert.ok(seen.includes(n), `${n} missing from the listing`);
  assert.ok(pages.length >= Math.ceil(seen.length / 7));

  const responses = rec.matching("GET", /^\/secrets\/?$/);
  assert.equal(new URL(responses[0].url).searchParams.get("maxresults"), "7");
  for (const r of responses.slice(0, -1)) {
    assert.equal(new URL(r.body.nextLink).searchParams.get("maxresults"), "7", r.body.nextLink);
  }
});

test("listPropertiesOfSecrets: plain iteration sees every secret", async () => {
  const names = await manySecrets();
  const seen = (await collect(client.listPropertiesOfSecrets())).map((p) => p.name);
  for (const n of names) assert.ok(seen.includes(n));
});

test("listPropertiesOfSecretVersions: pages of 25 and of 4", async () => {
  const { name, versions } = await manyVersions();
  rec.clear();
  const pages = await collectPages(client.listPropertiesOfSecretVersions(name));
  assert.deepEqual(pages.map((p) => p.length), [25, 5]);
  const items = pages.flat();
  assert.deepEqual(items.map((p) => p.version).sort(), [...versions].sort());
  for (const p of items) {
    assert.equal(p.name, name);
    assert.match(p.version, VERSION_RE);
    assert.equal(p.id, `${vaultUrl}/secrets/${name}/${p.version}`);
  }
  for (const r of rec.matching("GET", /^\/secrets\/[^/]+\/versions$/)) {
    for (const item of r.body.value) assert.ok(!("value" in item));
  }

  const small = await collectPages(client.listPropertiesOfSecretVersions(name), { maxPageSize: 4 });
  assert.deepEqual(small.map((p) => p.length), [4, 4, 4, 4, 4, 4, 4, 2]);
  assert.deepEqual(small.flat().map((p) => p.version).sort(), [...versions].sort());
});

test("listPropertiesOfSecrets: maxPageSize above 25 is capped (or rejected with 400)", async () => {
  const names = await manySecrets();
  let pages;
  try {
    pages = await collectPages(client.listPropertiesOfSecrets(), { maxPageSize: 100 });
  } catch (err) {
    assert.equal(err.statusCode, 400, String(err));
    return;
  }
  for (const page of pages) assert.ok(page.length <= 25, `page of ${page.length}`);
  const seen = pages.flat().map((p) => p.name);
  for (const n of names) assert.ok(seen.includes(n));
});
