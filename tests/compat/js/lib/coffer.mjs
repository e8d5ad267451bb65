// Shared helpers for the Coffer compatibility suite (official @azure/keyvault-secrets SDK).
//
// The runner (tests/compat/run.sh) starts `coffer server --dev`, creates the test vault with the CLI and
// sets COFFER_DATA_DIR (holds admin.env / dev.env), COFFER_JS_VAULT (default "jscompat") and
// COFFER_RETENTION_DAYS (default 7). NODE_EXTRA_CA_CERTS must already be set when node starts.
//
// The token is never printed: nothing here logs it, and the runner masks it in all output too.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFileSync, existsSync } from "node:fs";
import { join } from "node:path";
import { SecretClient } from "@azure/keyvault-secrets";

export const VERSION_RE = /^[0-9a-f]{32}$/;

/** Parse a shell word made of '...' / "..." / bare pieces (enough for `export KEY='value'` files). */
function shellUnquote(word) {
  let out = "";
  let i = 0;
  while (i < word.length) {
    const c = word[i];
    if (c === "'") {
      const end = word.indexOf("'", i + 1);
      if (end < 0) throw new Error("unterminated single quote");
      out += word.slice(i + 1, end);
      i = end + 1;
    } else if (c === '"') {
      i++;
      while (i < word.length && word[i] !== '"') {
        if (word[i] === "\\" && i + 1 < word.length) i++;
        out += word[i++];
      }
      i++;
    } else if (c === "\\" && i + 1 < word.length) {
      out += word[i + 1];
      i += 2;
    } else {
      out += c;
      i++;
    }
  }
  return out;
}

export function parseEnvFile(path) {
  const env = {};
  for (const raw of readFileSync(path, "utf8").split(/\r?\n/)) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const m = /^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$/.exec(line);
    if (m) env[m[1]] = shellUnquote(m[2]);
  }
  return env;
}

function loadCoffer() {
  const dataDir = process.env.COFFER_DATA_DIR;
  if (!dataDir) throw new Error("COFFER_DATA_DIR is not set: run the suite through tests/compat/run.sh");
  const adminPath = join(dataDir, "admin.env");
  if (!existsSync(adminPath)) throw new Error(`${adminPath} does not exist: is the server running in --dev mode?`);
  const admin = parseEnvFile(adminPath);
  for (const key of ["COFFER_URL", "COFFER_TOKEN"]) {
    if (!admin[key]) throw new Error(`${adminPath} has no ${key}`);
  }
  if (!process.env.NODE_EXTRA_CA_CERTS) {
    throw new Error("NODE_EXTRA_CA_CERTS is not set (node reads it at start-up only): use tests/compat/run.sh");
  }
  const url = new URL(admin.COFFER_URL);
  const portSuffix = url.port ? `:${url.port}` : "";
  const token = admin.COFFER_TOKEN;
  return Object.freeze({
    dataDir,
    zone: url.hostname,
    port: url.port ? Number(url.port) : 443,
    resource: `https://${url.hostname}${portSuffix}`,
    authority: `https://login.${url.hostname}${portSuffix}`,
    caFile: admin.NODE_EXTRA_CA_CERTS || admin.SSL_CERT_FILE || join(dataDir, "ca.pem"),
    vaultUrl: (vault) => `https://${vault}.${url.hostname}${portSuffix}`,
    // A function, not a property, so that printing this object never shows the token.
    token: () => token,
  });
}

export const coffer = loadCoffer();
export const vaultName = process.env.COFFER_JS_VAULT || "jscompat";
export const vaultUrl = coffer.vaultUrl(vaultName);
export const retentionDays = Number(process.env.COFFER_RETENTION_DAYS || "7");

/** A TokenCredential that returns a fixed token and records the scopes / tenant it was asked for. */
export function staticCredential(token = coffer.token()) {
  const calls = [];
  return {
    calls,
    async getToken(scopes, options) {
      calls.push({ scopes: Array.isArray(scopes) ? [...scopes] : [scopes], tenantId: options?.tenantId });
      return { token, expiresOnTimestamp: Date.now() + 3600e3 };
    },
    toJSON() {
      return { calls: calls.length, token: "<hidden>" };
    },
  };
}

/**
 * A SecretClient for `url` plus a recorder of every (final) HTTP response it saw.
 * The recorder sits after the retry policy and before the challenge/auth policy, so it sees the responses the
 * SDK acts on, not the 401 challenge round trip.
 */
export function makeClient({ url = vaultUrl, credential = staticCredential(), ...options } = {}) {
  const responses = [];
  const recorder = {
    name: "cofferCompatRecorder",
    async sendRequest(request, next) {
      const response = await next(request);
      let body;
      try {
        body = response.bodyAsText ? JSON.parse(response.bodyAsText) : undefined;
      } catch {
        body = undefined;
      }
      responses.push({ method: request.method, url: request.url, status: response.status, body });
      return response;
    },
  };
  const client = new SecretClient(url, credential, {
    retryOptions: { maxRetries: 1 },
    additionalPolicies: [{ policy: recorder, position: "perRetry" }],
    ...options,
  });
  return {
    client,
    credential,
    responses,
    matching(method, pathRe) {
      return responses.filter((r) => r.method === method && pathRe.test(new URL(r.url).pathname));
    },
    clear() {
      responses.length = 0;
    },
  };
}

export function uniqueName(prefix) {
  return `${prefix}-${randomBytes(4).toString("hex")}`;
}

/** Assert that `promiseOrFn` rejects with a RestError of the given status (and code, when given). */
export async function rejectsWithStatus(promiseOrFn, statusCode, code) {
  let caught;
  try {
    await (typeof promiseOrFn === "function" ? promiseOrFn() : promiseOrFn);
  } catch (err) {
    caught = err;
  }
  assert.ok(caught, `expected a ${statusCode} error, but the call succeeded`);
  assert.equal(caught.name, "RestError", `expected a RestError, got ${caught.name}: ${caught.message}`);
  assert.equal(caught.statusCode, statusCode, `status ${caught.statusCode}: ${caught.message}`);
  if (code !== undefined) assert.equal(caught.code, code, `code ${caught.code}: ${caught.message}`);
  return caught;
}

export async function collectPages(pagedIterator, settings) {
  const pages = [];
  for await (const page of pagedIterator.byPage(settings)) pages.push(page);
  return pages;
}

export async function collect(asyncIterable) {
  const out = [];
  for await (const item of asyncIterable) out.push(item);
  return out;
}

export async function deleteAndWait(client, name) {
  const poller = await client.beginDeleteSecret(name, { intervalInMs: 250 });
  const deleted = await poller.pollUntilDone();
  assert.ok(poller.isDone(), "delete poller did not complete");
  return deleted;
}

export async function recoverAndWait(client, name) {
  const poller = await client.beginRecoverDeletedSecret(name, { intervalInMs: 250 });
  const recovered = await poller.pollUntilDone();
  assert.ok(poller.isDone(), "recover poller did not complete");
  return recovered;
}
