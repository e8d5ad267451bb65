// A workload for the identity tests (test/identity.test.mjs): unmodified `new DefaultAzureCredential()` +
// `new SecretClient(process.env.AZURE_KEYVAULT_URL, credential)`.
//
// It builds ONE credential and ONE client, exactly as an app would, then serves commands from its parent (the
// test), one JSON object per line on stdin:
//
//     {"op": "get", "name": "<secret name>"}
//
// answering one JSON line each on stdout:
//
//     {"ok": true,  "sha256": "<hex of the value>", "credential": "<credential the chain settled on>"}
//     {"ok": false, "type": "<error name>", "status": <HTTP status or null>, "code": "<error code or null>",
//      "inner": "<inner error code or null>", "message": "<error message, truncated>"}
//
// The value itself is never printed (only its SHA-256), and tokens never are. Because the same credential and
// client serve every command, a test can check that a change on the server (role removed, principal
// disabled) takes effect on the very next request although the credential still holds a cached token.
//
// It reads nothing but its environment: which credential DefaultAzureCredential picks is decided by the
// variables the test passed (see tests/compat/README.md for each scenario's exact environment).
import { createHash } from "node:crypto";
import { createInterface } from "node:readline";
import { DefaultAzureCredential } from "@azure/identity";
import { SecretClient } from "@azure/keyvault-secrets";
// Diagnostic only: the identity library logs "Result for <CredentialClass>: SUCCESS…" at info level when the
// chain succeeds; keep just that class name (nothing is printed from the log).
import { AzureLogger, setLogLevel } from "@azure/logger";

let settledOn = null;
setLogLevel("info");
AzureLogger.log = (...args) => {
  const line = args.map(String).join(" ");
  const m = /Result for (\w+): SUCCESS/.exec(line);
  if (m) settledOn = m[1];
};

const credential = new DefaultAzureCredential();
const client = new SecretClient(process.env.AZURE_KEYVAULT_URL, credential, { retryOptions: { maxRetries: 1 } });

function reply(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

reply({ ready: true, pid: process.pid });
const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const raw of rl) {
  const line = raw.trim();
  if (!line) continue;
  const cmd = JSON.parse(line);
  if (cmd.op === "exit") break;
  if (cmd.op !== "get") {
    reply({ ok: false, type: "BadCommand", status: null, code: null, message: `unknown op ${cmd.op}` });
    continue;
  }
  try {
    const secret = await client.getSecret(cmd.name);
    reply({
      ok: true,
      sha256: createHash("sha256").update(secret.value ?? "", "utf8").digest("hex"),
      credential: settledOn,
    });
  } catch (err) {
    reply({
      ok: false,
      type: err?.name ?? typeof err,
      status: err?.statusCode ?? null,
      code: err?.code ?? null,
      inner: err?.details?.error?.innerError?.code ?? err?.details?.error?.innererror?.code ?? null,
      message: String(err?.message ?? err).slice(0, 4000),
    });
  }
}
rl.close();
process.exit(0);
