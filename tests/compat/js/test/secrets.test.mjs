// Set / get / versions / update properties / validation errors, through the official JS SDK.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  VERSION_RE,
  collect,
  makeClient,
  rejectsWithStatus,
  retentionDays,
  uniqueName,
  vaultUrl,
} from "../lib/coffer.mjs";

const { client } = makeClient();

test("setSecret returns value, versioned id and attributes", async () => {
  const name = uniqueName("js-set");
  const before = Date.now() - 5000;
  const secret = await client.setSecret(name, "hunter2");
  assert.equal(secret.name, name);
  assert.equal(secret.value, "hunter2");
  const p = secret.properties;
  assert.match(p.version, VERSION_RE);
  assert.equal(p.id, `${vaultUrl}/secrets/${name}/${p.version}`);
  assert.equal(p.vaultUrl, vaultUrl);
  assert.equal(p.name, name);
  assert.equal(p.enabled, true);
  assert.ok(p.createdOn instanceof Date && p.updatedOn instanceof Date);
  assert.ok(p.createdOn.getTime() >= before && p.createdOn.getTime() <= Date.now() + 5000);
  assert.equal(p.recoverableDays, retentionDays);
  assert.equal(p.recoveryLevel, "CustomizedRecoverable+Purgeable");
  assert.equal(p.notBefore, undefined);
  assert.equal(p.expiresOn, undefined);
  assert.equal(p.contentType, undefined);
});

test("getSecret latest and by version", async () => {
  const name = uniqueName("js-get");
  const v1 = await client.setSecret(name, "first");
  const v2 = await client.setSecret(name, "second");
  assert.notEqual(v1.properties.version, v2.properties.version);

  const latest = await client.getSecret(name);
  assert.equal(latest.value, "second");
  assert.equal(latest.properties.version, v2.properties.version);
  assert.equal(latest.properties.id, v2.properties.id);

  const old = await client.getSecret(name, { version: v1.properties.version });
  assert.equal(old.value, "first");
  assert.equal(old.properties.version, v1.properties.version);
});

test("each setSecret creates a new version", async () => {
  const name = uniqueName("js-versions");
  const versions = [];
  for (let i = 0; i < 5; i++) versions.push((await client.setSecret(name, `value-${i}`)).properties.version);
  assert.equal(new Set(versions).size, 5);
  for (const v of versions) assert.match(v, VERSION_RE);
  const listed = await collect(client.listPropertiesOfSecretVersions(name));
  assert.deepEqual(listed.map((p) => p.version).sort(), [...versions].sort());
  for (let i = 0; i < versions.length; i++) {
    assert.equal((await client.getSecret(name, { version: versions[i] })).value, `value-${i}`);
  }
});

// Dates stay before 2038: @azure/keyvault-secrets 4.11.2 serialises nbf/exp with `(ms / 1000) | 0`
// (int32), so later dates wrap negative inside the SDK before they reach the server.
test("setSecret with every optional field", async () => {
  const name = uniqueName("js-opts");
  const notBefore = new Date("2020-01-02T03:04:05Z");
  const expiresOn = new Date("2037-06-07T08:09:10Z");
  const tags = { env: "test", owner: "compat" };
  const secret = await client.setSecret(name, "v", { contentType: "text/plain", tags, notBefore, expiresOn, enabled: true });
  assert.equal(secret.properties.contentType, "text/plain");
  assert.deepEqual(secret.properties.tags, tags);
  assert.equal(secret.properties.notBefore.getTime(), notBefore.getTime());
  assert.equal(secret.properties.expiresOn.getTime(), expiresOn.getTime());

  const got = await client.getSecret(name);
  assert.equal(got.value, "v");
  assert.equal(got.properties.contentType, "text/plain");
  assert.deepEqual(got.properties.tags, tags);
  assert.equal(got.properties.notBefore.getTime(), notBefore.getTime());
  assert.equal(got.properties.expiresOn.getTime(), expiresOn.getTime());
});

test("values round-trip exactly", async () => {
  const values = [
    " leading and trailing spaces ",
    "multi\nline\r\nvalue\twith tab",
    "unicode: \u00e9\u00e8 \u4f60\u597d \u{1F511}",
    '{"json": [1, 2, "three"], "quote": "\\""}',
  ];
  const base = uniqueName("js-values");
  for (let i = 0; i < values.length; i++) {
    const name = `${base}-${i}`;
    assert.equal((await client.setSecret(name, values[i])).value, values[i]);
    assert.equal((await client.getSecret(name)).value, values[i]);
  }
});

test("getSecret of a missing secret is 404 SecretNotFound", async () => {
  await rejectsWithStatus(client.getSecret(uniqueName("js-missing")), 404, "SecretNotFound");
});

test("getSecret of a missing version is 404", async () => {
  const name = uniqueName("js-missing-version");
  await client.setSecret(name, "x");
  await rejectsWithStatus(client.getSecret(name, { version: "0".repeat(32) }), 404, "SecretNotFound");
});

test("updateSecretProperties of the latest version", async () => {
  const name = uniqueName("js-update");
  const created = await client.setSecret(name, "value");
  const notBefore = new Date("2021-01-01T00:00:00Z");
  const expiresOn = new Date("2037-01-01T00:00:00Z");
  const props = await client.updateSecretProperties(name, "", {
    contentType: "application/json",
    tags: { a: "1", b: "2" },
    notBefore,
    expiresOn,
  });
  assert.equal(props.name, name);
  assert.equal(props.version, created.properties.version);
  assert.equal(props.contentType, "application/json");
  assert.deepEqual(props.tags, { a: "1", b: "2" });
  assert.equal(props.notBefore.getTime(), notBefore.getTime());
  assert.equal(props.expiresOn.getTime(), expiresOn.getTime());
  assert.equal(props.enabled, true);

  const got = await client.getSecret(name);
  assert.equal(got.value, "value");
  assert.equal(got.properties.version, created.properties.version);
  assert.equal(got.properties.contentType, "application/json");
  assert.deepEqual(got.properties.tags, { a: "1", b: "2" });
  assert.equal((await collect(client.listPropertiesOfSecretVersions(name))).length, 1);

  const partial = await client.updateSecretProperties(name, created.properties.version, { contentType: "text/plain" });
  assert.equal(partial.contentType, "text/plain");
  assert.deepEqual(partial.tags, { a: "1", b: "2" });
  assert.equal(partial.expiresOn.getTime(), expiresOn.getTime());
});

test("updateSecretProperties of a specific older version", async () => {
  const name = uniqueName("js-update-version");
  const v1 = await client.setSecret(name, "one");
  const v2 = await client.setSecret(name, "two");
  const props = await client.updateSecretProperties(name, v1.properties.version, { tags: { old: "yes" } });
  assert.equal(props.version, v1.properties.version);
  assert.deepEqual(props.tags, { old: "yes" });
  assert.deepEqual((await client.getSecret(name, { version: v1.properties.version })).properties.tags, { old: "yes" });
  const latest = await client.getSecret(name);
  assert.equal(latest.properties.version, v2.properties.version);
  assert.ok(!latest.properties.tags || Object.keys(latest.properties.tags).length === 0);
});

test("updateSecretProperties of a missing secret is 404", async () => {
  await rejectsWithStatus(client.updateSecretProperties(uniqueName("js-missing"), "", { contentType: "x" }), 404);
});

test("getSecret of a disabled secret is 403 Forbidden", async () => {
  const name = uniqueName("js-disabled");
  await client.setSecret(name, "cannot-read-me", { enabled: false });
  const err = await rejectsWithStatus(client.getSecret(name), 403, "Forbidden");
  assert.ok(!String(err.message).includes("cannot-read-me"));
  const versions = await collect(client.listPropertiesOfSecretVersions(name));
  assert.equal(versions.length, 1);
  assert.equal(versions[0].enabled, false);
});

test("disable then enable through updateSecretProperties", async () => {
  const name = uniqueName("js-toggle");
  const created = await client.setSecret(name, "toggle");
  assert.equal((await client.updateSecretProperties(name, created.properties.version, { enabled: false })).enabled, false);
  await rejectsWithStatus(client.getSecret(name), 403, "Forbidden");
  assert.equal((await client.updateSecretProperties(name, created.properties.version, { enabled: true })).enabled, true);
  assert.equal((await client.getSecret(name)).value, "toggle");
});

test("the disabled flag is per version", async () => {
  const name = uniqueName("js-disabled-version");
  const v1 = await client.setSecret(name, "old-enabled");
  await client.setSecret(name, "new-disabled", { enabled: false });
  await rejectsWithStatus(client.getSecret(name), 403);
  assert.equal((await client.getSecret(name, { version: v1.properties.version })).value, "old-enabled");
});

for (const bad of ["bad_name!", "has space", "dot.name", "a".repeat(128)]) {
  test(`invalid name ${bad.length > 20 ? `(${bad.length} chars)` : JSON.stringify(bad)} is 400 BadParameter`, async () => {
    await rejectsWithStatus(client.setSecret(bad, "x"), 400, "BadParameter");
  });
}

test("a 127-character name is accepted", async () => {
  const name = (uniqueName("js-max") + "x".repeat(127)).slice(0, 127);
  assert.equal(name.length, 127);
  assert.equal((await client.setSecret(name, "ok")).name, name);
  assert.equal((await client.getSecret(name)).value, "ok");
});

test("value size limit is 25 KiB", async () => {
  const name = uniqueName("js-size");
  const limit = 25 * 1024;
  assert.equal((await client.setSecret(name, "a".repeat(limit))).value.length, limit);
  await rejectsWithStatus(client.setSecret(name, "a".repeat(limit + 1)), 400, "BadParameter");
  assert.equal((await collect(client.listPropertiesOfSecretVersions(name))).length, 1);
});

test("tag count limit is 15", async () => {
  const name = uniqueName("js-tags");
  const fifteen = Object.fromEntries(Array.from({ length: 15 }, (_, i) => [`t${i}`, String(i)]));
  const sixteen = Object.fromEntries(Array.from({ length: 16 }, (_, i) => [`t${i}`, String(i)]));
  assert.deepEqual((await client.setSecret(name, "x", { tags: fifteen })).properties.tags, fifteen);
  await rejectsWithStatus(client.setSecret(name, "x", { tags: sixteen }), 400, "BadParameter");
  await rejectsWithStatus(client.updateSecretProperties(name, "", { tags: sixteen }), 400);
  assert.deepEqual((await client.getSecret(name)).properties.tags, fifteen);
});

test("content type limit is 255 characters", async () => {
  const name = uniqueName("js-ctype");
  assert.equal((await client.setSecret(name, "x", { contentType: "c".repeat(255) })).properties.contentType, "c".repeat(255));
  await rejectsWithStatus(client.setSecret(name, "x", { contentType: "c".repeat(256) }), 400);
});
