// Challenge-based authentication and service versions, as the official JS SDK sees them.
import { test } from "node:test";
import assert from "node:assert/strict";
import { request } from "node:https";
import { coffer, makeClient, rejectsWithStatus, staticCredential, uniqueName, vaultUrl } from "../lib/coffer.mjs";

const CHALLENGE_RE = /^Bearer authorization="(https:\/\/[^"]+)\/([^"/]+)", resource="([^"]+)"$/;

/** A raw HTTPS request with no token (trusts the CA through NODE_EXTRA_CA_CERTS). */
function rawRequest(method, url, headers = {}, body = undefined) {
  return new Promise((resolve, reject) => {
    const req = request(url, { method, headers, timeout: 10e3 }, (res) => {
      let data = "";
      res.setEncoding("utf8");
      res.on("data", (c) => (data += c));
      res.on("end", () => resolve({ status: res.statusCode, headers: res.headers, body: data }));
    });
    req.on("error", reject);
    req.on("timeout", () => req.destroy(new Error("timeout")));
    if (body !== undefined) req.write(body);
    req.end();
  });
}

async function challenge() {
  const res = await rawRequest("GET", `${vaultUrl}/secrets?api-version=7.5`);
  assert.equal(res.status, 401);
  const m = CHALLENGE_RE.exec(res.headers["www-authenticate"] ?? "");
  assert.ok(m, `unexpected challenge header: ${res.headers["www-authenticate"]}`);
  return { res, authority: m[1], tenant: m[2], resource: m[3] };
}

test("an unauthenticated request gets the Key Vault challenge", async () => {
  const { res, authority, resource } = await challenge();
  assert.equal(authority, coffer.authority);
  assert.equal(resource, coffer.resource);
  assert.equal(JSON.parse(res.body).error.code, "Unauthorized");
});

test("a bodiless unauthenticated PUT gets 401, not 400", async () => {
  const res = await rawRequest("PUT", `${vaultUrl}/secrets/${uniqueName("js-challenge")}?api%2Dversion=2025-07-01`, {
    "Content-Type": "application/json",
    "Content-Length": "0",
  });
  assert.equal(res.status, 401);
  assert.match(res.headers["www-authenticate"] ?? "", CHALLENGE_RE);
});

test("the SDK asks the credential for <zone>/.default and the challenge tenant", async () => {
  const { tenant } = await challenge();
  const credential = staticCredential();
  const { client } = makeClient({ credential });
  const name = uniqueName("js-scope");
  await client.setSecret(name, "x");
  assert.equal((await client.getSecret(name)).value, "x");
  assert.ok(credential.calls.length > 0, "the SDK never asked the credential for a token");
  for (const call of credential.calls) {
    assert.deepEqual(call.scopes, [`${coffer.resource}/.default`]);
    assert.equal(call.tenantId, tenant);
  }
});

test("a token that is not a JWT is rejected with 401", async () => {
  const { client } = makeClient({ credential: staticCredential("not-a-jwt") });
  await rejectsWithStatus(client.getSecret(uniqueName("js-auth")), 401);
});

test("a JWT with a tampered signature is rejected with 401", async () => {
  const [head, payload, sig] = coffer.token().split(".");
  const i = Math.floor(sig.length / 2);
  const tampered = `${head}.${payload}.${sig.slice(0, i)}${sig[i] === "A" ? "B" : "A"}${sig.slice(i + 1)}`;
  const { client } = makeClient({ credential: staticCredential(tampered) });
  await rejectsWithStatus(client.getSecret(uniqueName("js-auth")), 401);
});

for (const serviceVersion of ["7.0", "7.1", "7.2", "7.3", "7.4", "7.5", "7.6", "2025-07-01"]) {
  test(`serviceVersion ${serviceVersion}: set, get, list`, async () => {
    const { client } = makeClient({ serviceVersion });
    const name = uniqueName(`js-api-${serviceVersion.replace(/\./g, "-")}`);
    const secret = await client.setSecret(name, `value for ${serviceVersion}`, { tags: { api: serviceVersion } });
    assert.equal(secret.value, `value for ${serviceVersion}`);
    const got = await client.getSecret(name);
    assert.equal(got.value, secret.value);
    assert.deepEqual(got.properties.tags, { api: serviceVersion });
    let found = false;
    for await (const p of client.listPropertiesOfSecrets()) if (p.name === name) found = true;
    assert.ok(found);
  });
}
