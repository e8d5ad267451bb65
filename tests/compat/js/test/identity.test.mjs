// Identity scenarios with the official @azure/identity library and NO custom credential class.
//
// Every scenario runs the same tiny application, lib/identity-client.mjs:
//
//     new SecretClient(process.env.AZURE_KEYVAULT_URL, new DefaultAzureCredential())
//
// as a child process with an explicit, minimal environment (nothing inherited from the test process), so the
// only thing that decides how DefaultAzureCredential authenticates is the set of variables each scenario
// passes. Managed-identity scenarios run the child under another uid (`setpriv --reuid U --regid U
// --clear-groups`), which the dev agent attests through /proc.
//
// (a) managed identity: only dev.env's variables (App Service: IDENTITY_ENDPOINT + IDENTITY_HEADER; IMDS:
//     AZURE_POD_IDENTITY_AUTHORITY_HOST alone), bound uid (and uid + exe) succeeds, unbound uid is refused;
// (b) CI job: AZURE_CLIENT_ID / AZURE_CLIENT_SECRET / AZURE_TENANT_ID=adfs / AZURE_AUTHORITY_HOST of a service
//     principal made with `coffer sp create`; a wrong secret is refused;
// (c) workload identity: AZURE_FEDERATED_TOKEN_FILE holding a JWT signed by a test issuer trusted with
//     `coffer federation add`; another subject or another signing key is refused;
// (d) revocation: after `coffer role remove` / `coffer identity disable`, the very next call of the same
//     client (same credential, cached token) fails with 403 / 401.
//
// The exact environment of each scenario is listed in tests/compat/README.md. Secret values and tokens are
// never printed: the child reports a value's SHA-256 only.
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { spawn, spawnSync } from "node:child_process";
import { createHash, generateKeyPairSync, randomBytes, sign } from "node:crypto";
import { mkdtempSync, realpathSync, rmSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import { coffer, makeClient, parseEnvFile, uniqueName, vaultName, vaultUrl } from "../lib/coffer.mjs";

const HERE = dirname(fileURLToPath(import.meta.url));
const CLIENT = join(HERE, "..", "lib", "identity-client.mjs");
const NODE_EXE = realpathSync(process.execPath);
const SECRETS_USER = "Key Vault Secrets User";
const ISSUER = "https://issuer.test";
const AUDIENCE = "api://AzureADTokenExchange";
// (issuer, subject, audience) is unique per server: the namespace part is unique per run (the Python and Rust
// suites trust the same issuer with their own keys and subjects).
const NAMESPACE = `js-${randomBytes(4).toString("hex")}`;
const SUBJECT = `system:serviceaccount:${NAMESPACE}:app`;
const OTHER_SUBJECT = `system:serviceaccount:${NAMESPACE}:other`;
// Uids this suite binds or runs children under (the Python and Rust suites use 41xxx and 43xxx).
const OUR_UIDS = [42000, 43000];
const UNBOUND_UID = 42999;
let nextUid = 42001;
const NOT_BOUND = "No managed identity is bound to this process";
const DEV_ENV_VARS = [
  "AZURE_KEYVAULT_URL",
  "IDENTITY_ENDPOINT",
  "IDENTITY_HEADER",
  "AZURE_POD_IDENTITY_AUTHORITY_HOST",
  "SSL_CERT_FILE",
  "REQUESTS_CA_BUNDLE",
  "NODE_EXTRA_CA_CERTS",
];
const CA_VARS = ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"];

const devFile = parseEnvFile(join(coffer.dataDir, "dev.env"));
const adminFile = parseEnvFile(join(coffer.dataDir, "admin.env"));

// ---------------------------------------------------------------------------------------------------------
// The coffer CLI (admin.env is sourced by the runner: COFFER_URL, COFFER_TOKEN, COFFER_CA_FILE)
// ---------------------------------------------------------------------------------------------------------

function cofferBin() {
  const bin = process.env.COFFER_BIN;
  assert.ok(bin && existsSync(bin), "COFFER_BIN is not set: run the suite through tests/compat/run.sh");
  return bin;
}

/** Run `coffer ARGS -o json`; return the parsed JSON (or the text). `sensitive`: never show stdout. */
function cli(args, { sensitive = false } = {}) {
  const r = spawnSync(cofferBin(), [...args, "-o", "json"], {
    encoding: "utf8",
    stdio: ["ignore", "pipe", "pipe"],
    timeout: 60e3,
  });
  if (r.status !== 0) {
    const shown = sensitive ? "" : `\nstdout: ${(r.stdout ?? "").slice(-2000)}`;
    throw new Error(`coffer ${args.join(" ")} failed (exit ${r.status}${r.error ? `, ${r.error}` : ""}): ` +
      `${(r.stderr ?? "").slice(-2000)}${shown}`);
  }
  try {
    return JSON.parse(r.stdout);
  } catch {
    return r.stdout;
  }
}

// ---------------------------------------------------------------------------------------------------------
// The workload child process
// ---------------------------------------------------------------------------------------------------------

class Workload {
  /** identity-client.mjs as a child process: one DefaultAzureCredential + one SecretClient for its lifetime. */
  constructor(env, { uid } = {}) {
    let cmd = NODE_EXE;
    let args = [CLIENT];
    if (uid !== undefined) {
      args = ["--reuid", String(uid), "--regid", String(uid), "--clear-groups", cmd, ...args];
      cmd = "setpriv";
    }
    this.proc = spawn(cmd, args, { env, cwd: "/", stdio: ["pipe", "pipe", "pipe"] });
    this.stderr = [];
    this.proc.stderr.setEncoding("utf8");
    this.proc.stderr.on("data", (d) => {
      this.stderr.push(d);
      if (this.stderr.length > 40) this.stderr.splice(0, this.stderr.length - 40);
    });
    this.lines = [];
    this.waiters = [];
    this.exited = false;
    createInterface({ input: this.proc.stdout, crlfDelay: Infinity }).on("line", (line) => {
      const w = this.waiters.shift();
      if (w) w.resolve(line);
      else this.lines.push(line);
    });
    this.proc.on("exit", (code, signal) => {
      this.exited = true;
      for (const w of this.waiters.splice(0)) {
        w.reject(new Error(`workload exited (${code ?? signal}); stderr tail:\n${this.stderrTail()}`));
      }
    });
    this.proc.on("error", (err) => {
      for (const w of this.waiters.splice(0)) w.reject(err);
    });
  }

  stderrTail() {
    return this.stderr.join("").slice(-4000);
  }

  read(timeoutMs) {
    if (this.lines.length) return Promise.resolve(JSON.parse(this.lines.shift()));
    if (this.exited) return Promise.reject(new Error(`workload exited; stderr tail:\n${this.stderrTail()}`));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        const i = this.waiters.indexOf(waiter);
        if (i >= 0) this.waiters.splice(i, 1);
        reject(new Error(`workload gave no answer within ${timeoutMs / 1000}s; stderr tail:\n${this.stderrTail()}`));
      }, timeoutMs);
      const waiter = {
        resolve: (line) => {
          clearTimeout(timer);
          try {
            resolve(JSON.parse(line));
          } catch (err) {
            reject(new Error(`workload printed a non-JSON line: ${line.slice(0, 200)}`));
          }
        },
        reject: (err) => {
          clearTimeout(timer);
          reject(err);
        },
      };
      this.waiters.push(waiter);
    });
  }

  async start(timeoutMs = 60e3) {
    const ready = await this.read(timeoutMs);
    assert.ok(ready.ready, `workload did not start: ${JSON.stringify(ready)}`);
    return this;
  }

  async get(name, timeoutMs = 120e3) {
    this.proc.stdin.write(JSON.stringify({ op: "get", name }) + "\n");
    return this.read(timeoutMs);
  }

  async close() {
    if (this.exited) return;
    const exited = new Promise((resolve) => this.proc.once("exit", resolve));
    try {
      this.proc.stdin.end(JSON.stringify({ op: "exit" }) + "\n");
    } catch {
      // already gone
    }
    const timer = setTimeout(() => this.proc.kill("SIGKILL"), 15e3);
    await exited;
    clearTimeout(timer);
  }
}

/** Run `fn(workload)` with a started workload, always stopping it afterwards. */
async function withWorkload(env, opts, fn) {
  const w = new Workload(env, opts);
  try {
    await w.start();
    return await fn(w);
  } finally {
    await w.close();
  }
}

const sha256 = (value) => createHash("sha256").update(value, "utf8").digest("hex");

function assertRead(result, value, credential) {
  assert.ok(result.ok, `the workload could not read the secret: ${JSON.stringify(result)}`);
  assert.equal(result.sha256, sha256(value), "the workload read a different value");
  assert.equal(result.credential, credential, `DefaultAzureCredential settled on ${result.credential}`);
}

function assertRefused(result, ...fragments) {
  assert.ok(!result.ok, "the workload read the secret, but it should have been refused");
  for (const f of fragments) {
    assert.ok(result.message.includes(f), `${JSON.stringify(f)} not in the error: ${JSON.stringify(result)}`);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Environments
// ---------------------------------------------------------------------------------------------------------

// PATH and HOME only; HOME points nowhere so no developer-tool credential finds a login.
const baseEnv = () => ({ PATH: "/usr/local/bin:/usr/bin:/bin", HOME: "/nonexistent" });

/** dev.env's variables verbatim, except AZURE_KEYVAULT_URL, which names this suite's vault. */
function devEnv() {
  const missing = DEV_ENV_VARS.filter((k) => k !== "AZURE_KEYVAULT_URL" && !devFile[k]);
  assert.deepEqual(missing, [], `dev.env lacks ${missing}`);
  const env = baseEnv();
  for (const k of DEV_ENV_VARS) env[k] = devFile[k];
  env.AZURE_KEYVAULT_URL = vaultUrl;
  return env;
}

function imdsEnv() {
  const env = devEnv();
  delete env.IDENTITY_ENDPOINT;
  delete env.IDENTITY_HEADER;
  return env;
}

/** What a CI job has besides its credential: CA trust, the vault URL, the tenant and the authority host. */
function entraEnv() {
  const env = baseEnv();
  for (const k of CA_VARS) env[k] = devFile[k] || coffer.caFile;
  env.AZURE_KEYVAULT_URL = vaultUrl;
  env.AZURE_TENANT_ID = adminFile.AZURE_TENANT_ID || "adfs";
  env.AZURE_AUTHORITY_HOST = adminFile.AZURE_AUTHORITY_HOST || coffer.authority;
  return env;
}

function secretEnv(sp, secret = sp.clientSecret) {
  return { ...entraEnv(), AZURE_CLIENT_ID: sp.clientId, AZURE_CLIENT_SECRET: secret };
}

function workloadEnv(sp, tokenFile) {
  return { ...entraEnv(), AZURE_CLIENT_ID: sp.clientId, AZURE_FEDERATED_TOKEN_FILE: tokenFile };
}

// ---------------------------------------------------------------------------------------------------------
// Principals and secrets
// ---------------------------------------------------------------------------------------------------------

const admin = makeClient();

async function putSecret(prefix = "js-id") {
  const name = uniqueName(prefix);
  const value = `value-${randomBytes(16).toString("hex")}`;
  await admin.client.setSecret(name, value);
  return { name, value };
}

function makeIdentity({ uid, exe, role = true }) {
  const name = uniqueName("js-mi");
  cli(["identity", "create", name]);
  const bind = ["identity", "bind", name, "--uid", String(uid)];
  if (exe) bind.push("--exe", exe);
  cli(bind);
  if (role) cli(["role", "assign", "--principal", name, "--role", SECRETS_USER, "--scope", `/vaults/${vaultName}`]);
  return name;
}

function makeSp() {
  const name = uniqueName("js-sp");
  const sp = cli(["sp", "create", name], { sensitive: true });
  assert.ok(sp.clientId && sp.clientSecret, `sp create answered keys ${Object.keys(sp)}`);
  cli(["role", "assign", "--principal", name, "--role", SECRETS_USER, "--scope", `/vaults/${vaultName}`]);
  return { ...sp, name };
}

function uidSwitchingUnavailable() {
  const which = spawnSync("setpriv", ["--version"], { encoding: "utf8" });
  if (which.error) return "setpriv (util-linux) is not installed";
  if (process.geteuid() !== 0) return "running children under other uids needs root";
  const probe = spawnSync(
    "setpriv",
    ["--reuid", String(UNBOUND_UID), "--regid", String(UNBOUND_UID), "--clear-groups", "true"],
    { encoding: "utf8", timeout: 30e3 },
  );
  if (probe.status !== 0) return `setpriv cannot switch uid here (user namespace?): ${probe.stderr}`;
  return null;
}

/** Remove bindings left on this suite's uids by an earlier run against the same server. */
function unbindOurUids() {
  const listing = cli(["identity", "bindings"]);
  const rows = Array.isArray(listing) ? listing : (listing?.value ?? []);
  for (const row of rows) {
    if (row && row.uid >= OUR_UIDS[0] && row.uid < OUR_UIDS[1]) cli(["identity", "unbind", row.id]);
  }
}

// ---------------------------------------------------------------------------------------------------------
// (a) managed identity
// ---------------------------------------------------------------------------------------------------------

const noUidSwitch = uidSwitchingUnavailable();

describe("managed identity (dev agent attests the calling process)", { skip: noUidSwitch ?? false }, () => {
  before(() => unbindOurUids());

  for (const source of ["app service", "imds"]) {
    const env = () => (source === "app service" ? devEnv() : imdsEnv());

    test(`${source}: a bound uid reads the secret`, async () => {
      const uid = nextUid++;
      makeIdentity({ uid });
      const { name, value } = await putSecret();
      await withWorkload(env(), { uid }, async (w) => assertRead(await w.get(name), value, "ManagedIdentityCredential"));
    });

    test(`${source}: an unbound uid is refused`, async () => {
      const { name } = await putSecret();
      const result = await withWorkload(env(), { uid: UNBOUND_UID }, (w) => w.get(name));
      assertRefused(result, "ManagedIdentityCredential", NOT_BOUND, `uid ${UNBOUND_UID}`);
      assert.equal(result.status, null, `the vault was reached: ${JSON.stringify(result)}`);
    });
  }

  test("a bound uid + exe reads the secret", async () => {
    const uid = nextUid++;
    makeIdentity({ uid, exe: NODE_EXE });
    const { name, value } = await putSecret();
    await withWorkload(devEnv(), { uid }, async (w) => assertRead(await w.get(name), value, "ManagedIdentityCredential"));
  });

  test("the bound uid running another executable is refused", async () => {
    // The binding says uid AND exe; this process has the uid but runs another executable.
    const uid = nextUid++;
    const otherExe = realpathSync("/bin/true");
    assert.notEqual(otherExe, NODE_EXE);
    makeIdentity({ uid, exe: otherExe });
    const { name } = await putSecret();
    const result = await withWorkload(devEnv(), { uid }, (w) => w.get(name));
    assertRefused(result, "ManagedIdentityCredential", NOT_BOUND, `uid ${uid}`, NODE_EXE);
  });

  test("role removed: the very next call fails with 403 ForbiddenByRbac", async () => {
    const uid = nextUid++;
    const ident = makeIdentity({ uid });
    const { name, value } = await putSecret();
    await withWorkload(devEnv(), { uid }, async (w) => {
      assertRead(await w.get(name), value, "ManagedIdentityCredential");
      cli(["role", "remove", "--principal", ident, "--role", SECRETS_USER, "--scope", `/vaults/${vaultName}`]);
      assertForbiddenByRbac(await w.get(name));
    });
  });

  test("identity disabled: the very next call fails with 401", async () => {
    const uid = nextUid++;
    const ident = makeIdentity({ uid });
    const { name, value } = await putSecret();
    await withWorkload(devEnv(), { uid }, async (w) => {
      assertRead(await w.get(name), value, "ManagedIdentityCredential");
      cli(["identity", "disable", ident]);
      assertPrincipalDisabled(await w.get(name));
    });
  });
});

// ---------------------------------------------------------------------------------------------------------
// (b) CI job with a client secret
// ---------------------------------------------------------------------------------------------------------

function assertForbiddenByRbac(result) {
  assert.ok(!result.ok, "the secret was still readable after the role assignment was removed");
  assert.equal(result.status, 403, JSON.stringify(result));
  assert.equal(result.code, "Forbidden", JSON.stringify(result));
  assert.equal(result.inner, "ForbiddenByRbac", JSON.stringify(result));
}

function assertPrincipalDisabled(result) {
  assert.ok(!result.ok, "the secret was still readable after the principal was disabled");
  assert.equal(result.status, 401, JSON.stringify(result));
  assert.equal(result.type, "RestError", JSON.stringify(result));
}

describe("CI job with a client secret (EnvironmentCredential, tenant adfs)", () => {
  test("the service principal reads the secret", async () => {
    const sp = makeSp();
    const { name, value } = await putSecret();
    await withWorkload(secretEnv(sp), {}, async (w) => assertRead(await w.get(name), value, "EnvironmentCredential"));
  });

  test("a wrong client secret is refused", async () => {
    const sp = makeSp();
    const { name } = await putSecret();
    const result = await withWorkload(secretEnv(sp, `not-the-secret-${randomBytes(8).toString("hex")}`), {}, (w) =>
      w.get(name),
    );
    // EnvironmentCredential's AuthenticationError stops the chain; its statusCode is the token endpoint's 400.
    assertRefused(result, "EnvironmentCredential authentication failed", "AADSTS7000215", "Invalid client secret");
    assert.equal(result.type, "AuthenticationError", JSON.stringify(result));
    assert.equal(result.status, 400, JSON.stringify(result));
  });

  test("role removed: the very next call fails with 403 ForbiddenByRbac", async () => {
    const sp = makeSp();
    const { name, value } = await putSecret();
    await withWorkload(secretEnv(sp), {}, async (w) => {
      assertRead(await w.get(name), value, "EnvironmentCredential");
      cli(["role", "remove", "--principal", sp.name, "--role", SECRETS_USER, "--scope", `/vaults/${vaultName}`]);
      assertForbiddenByRbac(await w.get(name));
    });
  });

  test("service principal disabled: the very next call fails with 401", async () => {
    const sp = makeSp();
    const { name, value } = await putSecret();
    await withWorkload(secretEnv(sp), {}, async (w) => {
      assertRead(await w.get(name), value, "EnvironmentCredential");
      cli(["identity", "disable", sp.name]);
      assertPrincipalDisabled(await w.get(name));
    });
  });
});

// ---------------------------------------------------------------------------------------------------------
// (c) workload identity federation
// ---------------------------------------------------------------------------------------------------------

const b64url = (buf) => Buffer.from(buf).toString("base64url");

/** An outside OIDC issuer (a Kubernetes cluster, a CI system): an RSA key, its JWKS, RS256 tokens. */
class TestIssuer {
  constructor(kid) {
    this.kid = kid;
    const { privateKey, publicKey } = generateKeyPairSync("rsa", { modulusLength: 2048 });
    this.privateKey = privateKey;
    this.publicKey = publicKey;
  }

  jwks() {
    const { n, e } = this.publicKey.export({ format: "jwk" });
    return { keys: [{ kty: "RSA", use: "sig", alg: "RS256", kid: this.kid, n, e }] };
  }

  token({ sub = SUBJECT, iss = ISSUER, aud = AUDIENCE, lifetime = 600 } = {}) {
    const now = Math.floor(Date.now() / 1000);
    const header = { alg: "RS256", typ: "JWT", kid: this.kid };
    const claims = { iss, sub, aud, iat: now, nbf: now - 5, exp: now + lifetime, jti: randomBytes(16).toString("hex") };
    const input = `${b64url(JSON.stringify(header))}.${b64url(JSON.stringify(claims))}`;
    return `${input}.${b64url(sign("sha256", Buffer.from(input), this.privateKey))}`;
  }
}

describe("workload identity federation (WorkloadIdentityCredential, tenant adfs)", () => {
  let dir;
  let issuer;
  let sp;
  before(() => {
    dir = mkdtempSync(join(tmpdir(), "coffer-js-identity-"));
    issuer = new TestIssuer(uniqueName("js-test-issuer"));
    const jwks = join(dir, "jwks.json");
    writeFileSync(jwks, JSON.stringify(issuer.jwks()));
    sp = makeSp();
    cli(["federation", "add", sp.name, "--issuer", ISSUER, "--subject", SUBJECT, "--audience", AUDIENCE,
      "--jwks-file", jwks]);
  });
  after(() => {
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  function tokenFile(token) {
    const path = join(dir, `token-${randomBytes(4).toString("hex")}`);
    writeFileSync(path, token, { mode: 0o600 });
    return path;
  }

  test("a token from the trusted issuer reads the secret", async () => {
    const { name, value } = await putSecret();
    await withWorkload(workloadEnv(sp, tokenFile(issuer.token())), {}, async (w) =>
      assertRead(await w.get(name), value, "WorkloadIdentityCredential"),
    );
  });

  for (const [variant, reason] of [
    ["another subject", "InvalidSubject"],
    ["another signing key", "InvalidSignature"],
  ]) {
    test(`a token with ${variant} is refused (${reason})`, async () => {
      const token =
        variant === "another subject" ? issuer.token({ sub: OTHER_SUBJECT }) : new TestIssuer(issuer.kid).token();
      const { name } = await putSecret();
      const result = await withWorkload(workloadEnv(sp, tokenFile(token)), {}, (w) => w.get(name));
      // The chain goes on after WorkloadIdentityCredential (its failure is AuthenticationRequiredError), and
      // ManagedIdentityCredential's token-exchange path sends the same assertion again: both are refused.
      assertRefused(result, "AADSTS7000215", `The client assertion is not valid: ${reason}`);
      assert.equal(result.type, "AggregateAuthenticationError", JSON.stringify(result));
      assert.equal(result.status, null, `the vault was reached: ${JSON.stringify(result)}`);
    });
  }
});
