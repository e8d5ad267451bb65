// Soft delete, deleted-secret reads and listings, recover and purge, through the official JS SDK.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  collect,
  collectPages,
  deleteAndWait,
  makeClient,
  recoverAndWait,
  rejectsWithStatus,
  retentionDays,
  uniqueName,
  vaultUrl,
} from "../lib/coffer.mjs";

const rec = makeClient();
const { client } = rec;
const DAY_MS = 86400e3;

function close(a, b, ms = 60e3) {
  return Math.abs(a.getTime() - b.getTime()) <= ms;
}

test("beginDeleteSecret, getDeletedSecret, listDeletedSecrets, 409 on reuse, beginRecoverDeletedSecret", async () => {
  const name = uniqueName("js-softdelete");
  const v1 = await client.setSecret(name, "one", { tags: { k: "v" } });
  const v2 = await client.setSecret(name, "two", { contentType: "text/plain", tags: { k: "v2" } });

  rec.clear();
  const deleted = await deleteAndWait(client, name);
  assert.equal(deleted.name, name);
  assert.equal(deleted.recoveryId, `${vaultUrl}/deletedsecrets/${name}`);
  assert.equal(deleted.properties.recoveryId, deleted.recoveryId);
  assert.equal(deleted.properties.id, v2.properties.id);
  assert.equal(deleted.properties.version, v2.properties.version);
  assert.equal(deleted.properties.contentType, "text/plain");
  assert.deepEqual(deleted.properties.tags, { k: "v2" });
  assert.ok(deleted.deletedOn instanceof Date && close(deleted.deletedOn, new Date()));
  assert.ok(deleted.scheduledPurgeDate instanceof Date);
  assert.ok(close(deleted.scheduledPurgeDate, new Date(deleted.deletedOn.getTime() + retentionDays * DAY_MS)));
  assert.equal(deleted.properties.recoverableDays, retentionDays);
  assert.equal(deleted.properties.recoveryLevel, "CustomizedRecoverable+Purgeable");
  const del = rec.matching("DELETE", new RegExp(`^/secrets/${name}$`));
  assert.deepEqual(del.map((r) => r.status), [200]);
  assert.ok(!("value" in del[0].body), "DELETE response leaked the value");

  await rejectsWithStatus(client.getSecret(name), 404, "SecretNotFound");
  await rejectsWithStatus(client.getSecret(name, { version: v1.properties.version }), 404);
  const live = (await collect(client.listPropertiesOfSecrets())).map((p) => p.name);
  assert.ok(!live.includes(name));

  const got = await client.getDeletedSecret(name);
  assert.equal(got.name, name);
  assert.equal(got.recoveryId, deleted.recoveryId);
  assert.equal(got.properties.id, v2.properties.id);
  assert.equal(got.deletedOn.getTime(), deleted.deletedOn.getTime());
  assert.equal(got.scheduledPurgeDate.getTime(), deleted.scheduledPurgeDate.getTime());

  rec.clear();
  const listed = (await collect(client.listDeletedSecrets())).find((d) => d.name === name);
  assert.ok(listed, "deleted secret missing from listDeletedSecrets");
  assert.equal(listed.recoveryId, deleted.recoveryId);
  assert.equal(listed.deletedOn.getTime(), deleted.deletedOn.getTime());
  assert.equal(listed.scheduledPurgeDate.getTime(), deleted.scheduledPurgeDate.getTime());
  assert.equal(listed.properties.id, `${vaultUrl}/secrets/${name}`);
  for (const r of rec.matching("GET", /^\/deletedsecrets\/?$/)) {
    for (const item of r.body.value) assert.ok(!("value" in item));
  }

  await rejectsWithStatus(client.setSecret(name, "three"), 409, "Conflict");

  const recovered = await recoverAndWait(client, name);
  assert.equal(recovered.name, name);
  assert.equal(recovered.version, v2.properties.version);
  assert.equal((await client.getSecret(name)).value, "two");
  const old = await client.getSecret(name, { version: v1.properties.version });
  assert.equal(old.value, "one");
  assert.deepEqual(old.properties.tags, { k: "v" });
  const versions = (await collect(client.listPropertiesOfSecretVersions(name))).map((p) => p.version).sort();
  assert.deepEqual(versions, [v1.properties.version, v2.properties.version].sort());
  await rejectsWithStatus(client.getDeletedSecret(name), 404);
});

test("purgeDeletedSecret answers 204 and frees the name", async () => {
  const name = uniqueName("js-purge");
  await client.setSecret(name, "first-life");
  await deleteAndWait(client, name);
  rec.clear();
  assert.equal(await client.purgeDeletedSecret(name), undefined);
  assert.deepEqual(rec.matching("DELETE", new RegExp(`^/deletedsecrets/${name}$`)).map((r) => r.status), [204]);
  await rejectsWithStatus(client.getDeletedSecret(name), 404);
  const deletedNames = (await collect(client.listDeletedSecrets())).map((d) => d.name);
  assert.ok(!deletedNames.includes(name));

  const again = await client.setSecret(name, "second-life");
  assert.equal((await client.getSecret(name)).value, "second-life");
  const versions = (await collect(client.listPropertiesOfSecretVersions(name))).map((p) => p.version);
  assert.deepEqual(versions, [again.properties.version]);
});

test("missing deleted secrets: get, purge, delete and recover are 404", async () => {
  const missing = uniqueName("js-never");
  await rejectsWithStatus(client.getDeletedSecret(missing), 404, "SecretNotFound");
  await rejectsWithStatus(client.purgeDeletedSecret(missing), 404);
  await rejectsWithStatus(() => deleteAndWait(client, missing), 404, "SecretNotFound");
  await rejectsWithStatus(() => recoverAndWait(client, missing), 404);
});

test("purging a live secret is 404 and leaves it alone", async () => {
  const name = uniqueName("js-purge-live");
  await client.setSecret(name, "alive");
  await rejectsWithStatus(client.purgeDeletedSecret(name), 404);
  assert.equal((await client.getSecret(name)).value, "alive");
});

test("recover poller completes for a disabled secret (403 on the poll)", async () => {
  const name = uniqueName("js-recover-disabled");
  const created = await client.setSecret(name, "disabled", { enabled: false });
  await deleteAndWait(client, name);
  const recovered = await recoverAndWait(client, name);
  assert.equal(recovered.version, created.properties.version);
  assert.equal(recovered.enabled, false);
  await rejectsWithStatus(client.getSecret(name), 403);
});

test("listDeletedSecrets pages with maxPageSize 2", async () => {
  const prefix = uniqueName("js-delpage");
  const names = Array.from({ length: 5 }, (_, i) => `${prefix}-${i}`);
  for (const n of names) {
    await client.setSecret(n, "x");
    await deleteAndWait(client, n);
  }
  const pages = await collectPages(client.listDeletedSecrets(), { maxPageSize: 2 });
  assert.equal(pages[0].length, 2);
  for (const page of pages) assert.ok(page.length <= 2);
  const seen = pages.flat();
  assert.equal(new Set(seen.map((d) => d.name)).size, seen.length);
  for (const n of names) assert.ok(seen.some((d) => d.name === n), `${n} missing`);
  for (const d of seen) assert.ok(d.recoveryId && d.deletedOn && d.scheduledPurgeDate);
  for (const n of names) await client.purgeDeletedSecret(n);
});
