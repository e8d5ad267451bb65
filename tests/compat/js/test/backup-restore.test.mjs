// backupSecret -> delete + purge -> restoreSecretBackup, through the official JS SDK.
import { test } from "node:test";
import assert from "node:assert/strict";
import { collect, deleteAndWait, makeClient, rejectsWithStatus, uniqueName, vaultUrl } from "../lib/coffer.mjs";

const { client } = makeClient();

test("backup, delete + purge, restore brings back every version and value", async () => {
  const name = uniqueName("js-backup");
  const v1 = await client.setSecret(name, "version one", { tags: { gen: "1" } });
  const v2 = await client.setSecret(name, "version two", { contentType: "text/plain", tags: { gen: "2" } });
  const v3 = await client.setSecret(name, "version three (disabled)", { enabled: false });

  const backup = await client.backupSecret(name);
  assert.ok(backup instanceof Uint8Array, "backupSecret should return a Uint8Array");
  assert.ok(backup.length > 0);

  await deleteAndWait(client, name);
  await client.purgeDeletedSecret(name);
  await rejectsWithStatus(client.getSecret(name, { version: v2.properties.version }), 404);

  const restored = await client.restoreSecretBackup(backup);
  assert.equal(restored.name, name);
  assert.equal(restored.version, v3.properties.version);
  assert.equal(restored.id, `${vaultUrl}/secrets/${name}/${v3.properties.version}`);

  const versions = await collect(client.listPropertiesOfSecretVersions(name));
  assert.deepEqual(
    versions.map((p) => p.version).sort(),
    [v1.properties.version, v2.properties.version, v3.properties.version].sort(),
  );
  assert.equal(versions.find((p) => p.version === v3.properties.version).enabled, false);

  const got1 = await client.getSecret(name, { version: v1.properties.version });
  assert.equal(got1.value, "version one");
  assert.deepEqual(got1.properties.tags, { gen: "1" });
  const got2 = await client.getSecret(name, { version: v2.properties.version });
  assert.equal(got2.value, "version two");
  assert.equal(got2.properties.contentType, "text/plain");
  await rejectsWithStatus(client.getSecret(name), 403);

  await client.updateSecretProperties(name, v3.properties.version, { enabled: true });
  assert.equal((await client.getSecret(name)).value, "version three (disabled)");
});

test("restore over an existing name is 409", async () => {
  const name = uniqueName("js-restore-exists");
  await client.setSecret(name, "exists");
  const backup = await client.backupSecret(name);
  await rejectsWithStatus(client.restoreSecretBackup(backup), 409);
  assert.equal((await client.getSecret(name)).value, "exists");
  assert.equal((await collect(client.listPropertiesOfSecretVersions(name))).length, 1);
});

test("restore while the name is soft-deleted is 409", async () => {
  const name = uniqueName("js-restore-deleted");
  await client.setSecret(name, "soft");
  const backup = await client.backupSecret(name);
  await deleteAndWait(client, name);
  await rejectsWithStatus(client.restoreSecretBackup(backup), 409);
  await client.purgeDeletedSecret(name);
  assert.equal((await client.restoreSecretBackup(backup)).name, name);
  assert.equal((await client.getSecret(name)).value, "soft");
});

test("backup of a missing secret is 404 SecretNotFound", async () => {
  await rejectsWithStatus(client.backupSecret(uniqueName("js-missing")), 404, "SecretNotFound");
});

test("restore of a garbage blob is 400", async () => {
  await rejectsWithStatus(client.restoreSecretBackup(new TextEncoder().encode("not a coffer backup blob")), 400);
});
