// Vault-level settings as the JS SDK sees them: retention days, recovery level, purge protection.
// Vaults (created by run.sh): COFFER_JS_VAULT_90 (default retention 90 days) and COFFER_JS_VAULT_PROTECTED
// (7 days, purge protection).
import { test } from "node:test";
import assert from "node:assert/strict";
import { coffer, deleteAndWait, makeClient, recoverAndWait, rejectsWithStatus, uniqueName } from "../lib/coffer.mjs";

const { client: client90 } = makeClient({ url: coffer.vaultUrl(process.env.COFFER_JS_VAULT_90 || "jsretain90") });
const { client: protectedClient } = makeClient({
  url: coffer.vaultUrl(process.env.COFFER_JS_VAULT_PROTECTED || "jsprotected"),
});
const { client } = makeClient();

test("default retention: 90 days, Recoverable+Purgeable", async () => {
  const name = uniqueName("js-ret90");
  const secret = await client90.setSecret(name, "x");
  assert.equal(secret.properties.recoverableDays, 90);
  assert.equal(secret.properties.recoveryLevel, "Recoverable+Purgeable");
  const deleted = await deleteAndWait(client90, name);
  const delta = deleted.scheduledPurgeDate.getTime() - deleted.deletedOn.getTime();
  assert.ok(Math.abs(delta - 90 * 86400e3) <= 60e3, `scheduledPurgeDate - deletedOn = ${delta} ms`);
  await client90.purgeDeletedSecret(name);
  await rejectsWithStatus(client90.getDeletedSecret(name), 404);
});

test("purge protection: CustomizedRecoverable, purge is 403 Forbidden, recover still works", async () => {
  const name = uniqueName("js-protected");
  const secret = await protectedClient.setSecret(name, "keep me");
  assert.equal(secret.properties.recoverableDays, 7);
  assert.equal(secret.properties.recoveryLevel, "CustomizedRecoverable");
  await deleteAndWait(protectedClient, name);
  await rejectsWithStatus(protectedClient.purgeDeletedSecret(name), 403, "Forbidden");
  assert.equal((await protectedClient.getDeletedSecret(name)).name, name);
  await recoverAndWait(protectedClient, name);
  assert.equal((await protectedClient.getSecret(name)).value, "keep me");
});

test("vaults are isolated from each other", async () => {
  const name = uniqueName("js-isolated");
  await client.setSecret(name, "in jscompat");
  await rejectsWithStatus(client90.getSecret(name), 404);
  await client90.setSecret(name, "in jsretain90");
  assert.equal((await client.getSecret(name)).value, "in jscompat");
  assert.equal((await client90.getSecret(name)).value, "in jsretain90");
});
