"""A workload for the identity tests (test_identity.py): unmodified `DefaultAzureCredential()` + `SecretClient`.

This is the whole "application": it builds ONE credential and ONE client, exactly as an app would,

    SecretClient(vault_url=os.environ["AZURE_KEYVAULT_URL"], credential=DefaultAzureCredential())

and then serves commands from its parent (the test), one JSON object per line on stdin:

    {"op": "get", "name": "<secret name>"}

answering one JSON line each on stdout:

    {"ok": true,  "sha256": "<hex of the value>", "credential": "<class DefaultAzureCredential settled on>"}
    {"ok": false, "type": "<exception class>", "status": <HTTP status or null>, "code": "<error code or null>",
     "inner": "<inner error code or null>", "message": "<str(exception), truncated>"}

The value itself is never printed (only its SHA-256), and tokens never are. Because the same credential and
client serve every command, a test can check that a change on the server (role removed, principal disabled)
takes effect on the very next request although the credential still holds a cached token.

It reads nothing but its environment: which credential DefaultAzureCredential picks is decided by the
variables the test passed (see tests/compat/README.md for each scenario's exact environment).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys


def main() -> int:
    # Imported here so that an import failure is reported as a JSON line, like every other failure.
    try:
        from azure.identity import DefaultAzureCredential
        from azure.keyvault.secrets import SecretClient
    except Exception as exc:  # pragma: no cover - environment problem
        print(json.dumps({"ok": False, "type": type(exc).__name__, "status": None, "code": None,
                          "message": f"import failed: {exc}"}), flush=True)
        return 2

    credential = DefaultAzureCredential()
    client = SecretClient(vault_url=os.environ["AZURE_KEYVAULT_URL"], credential=credential,
                          connection_timeout=10, read_timeout=30, retry_total=1)
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        cmd = json.loads(line)
        if cmd.get("op") == "exit":
            break
        if cmd.get("op") != "get":
            print(json.dumps({"ok": False, "type": "BadCommand", "status": None, "code": None,
                              "message": f"unknown op {cmd.get('op')!r}"}), flush=True)
            continue
        try:
            secret = client.get_secret(cmd["name"])
            value = secret.value or ""
            out = {
                "ok": True,
                "sha256": hashlib.sha256(value.encode("utf-8")).hexdigest(),
                # Diagnostic only (a private attribute): which credential of the chain produced the token.
                "credential": type(getattr(credential, "_successful_credential", None)).__name__,
            }
        except Exception as exc:
            status = getattr(exc, "status_code", None)
            code = inner = None
            err = getattr(exc, "error", None)
            if err is not None:
                code = getattr(err, "code", None)
                inner = (getattr(err, "innererror", None) or {}).get("code")
            out = {"ok": False, "type": type(exc).__name__, "status": status, "code": code, "inner": inner,
                   "message": str(exc)[:4000]}
        print(json.dumps(out), flush=True)
    credential.close()
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
