"""Identity scenarios with the official azure-identity library and NO custom credential class.

Every scenario runs the same tiny application, identity_client.py:

    SecretClient(vault_url=os.environ["AZURE_KEYVAULT_URL"], credential=DefaultAzureCredential())

as a child process with an explicit, minimal environment (nothing inherited from the test process), so the
only thing that decides how DefaultAzureCredential authenticates is the set of variables each scenario passes.
Managed-identity scenarios run the child under another uid (`setpriv --reuid U --regid U --clear-groups`),
which the dev agent attests through /proc.

(a) managed identity: only dev.env's variables (App Service: IDENTITY_ENDPOINT + IDENTITY_HEADER; IMDS:
    AZURE_POD_IDENTITY_AUTHORITY_HOST alone), bound uid (and uid + exe) succeeds, unbound uid is refused;
(b) CI job: AZURE_CLIENT_ID / AZURE_CLIENT_SECRET / AZURE_TENANT_ID=adfs / AZURE_AUTHORITY_HOST of a service
    principal made with `coffer sp create`; a wrong secret is refused;
(c) workload identity: AZURE_FEDERATED_TOKEN_FILE holding a JWT signed by a test issuer trusted with
    `coffer federation add`; another subject or another signing key is refused;
(d) revocation: after `coffer role remove` / `coffer identity disable`, the very next call of the same client
    (same credential, cached token) fails with 403 / 401.

The exact environment of each scenario is listed in tests/compat/README.md. Secret values and tokens are never
printed: the child reports a value's SHA-256 only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

CLIENT = Path(__file__).resolve().with_name("identity_client.py")
# The venv's interpreter (its path selects the venv's site-packages); /proc/PID/exe shows the real file.
PYTHON = sys.executable
PYTHON_EXE = os.path.realpath(sys.executable)
SETPRIV = shutil.which("setpriv")
SECRETS_USER = "Key Vault Secrets User"
ISSUER = "https://issuer.test"
# (issuer, subject, audience) is unique per server: the namespace part is unique per run (the JS and Rust
# suites trust the same issuer with their own keys and subjects).
NAMESPACE = f"py-{uuid.uuid4().hex[:8]}"
SUBJECT = f"system:serviceaccount:{NAMESPACE}:app"
OTHER_SUBJECT = f"system:serviceaccount:{NAMESPACE}:other"
AUDIENCE = "api://AzureADTokenExchange"
# Uids this suite binds or runs children under (the JS and Rust suites use 42xxx and 43xxx).
OUR_UIDS = range(41000, 42000)
UNBOUND_UID = 41999
_next_uid = iter(range(41001, 41900))
# Variables dev.env provides to a workload (the only ones the managed-identity children get, plus PATH/HOME).
DEV_ENV_VARS = (
    "AZURE_KEYVAULT_URL",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
)
CA_VARS = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")
NOT_BOUND = "No managed identity is bound to this process"


# ---------------------------------------------------------------------------------------------------------
# The coffer CLI (admin.env is sourced by the runner: COFFER_URL, COFFER_TOKEN, COFFER_CA_FILE)
# ---------------------------------------------------------------------------------------------------------


def coffer_bin() -> str:
    path = os.environ.get("COFFER_BIN")
    if not path or not os.access(path, os.X_OK):
        pytest.fail("COFFER_BIN is not set or not executable: run the suite through tests/compat/run.sh")
    return path


def cli(*args: str, sensitive: bool = False) -> Any:
    """Run `coffer ARGS -o json`; return the parsed JSON (or the text). `sensitive`: never show stdout."""
    proc = subprocess.run(
        [coffer_bin(), *args, "-o", "json"], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
    )
    if proc.returncode != 0:
        shown = "" if sensitive else f"\nstdout: {proc.stdout[-2000:]}"
        raise AssertionError(f"coffer {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr[-2000:]}{shown}")
    try:
        return json.loads(proc.stdout)
    except ValueError:
        return proc.stdout


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------------------------------
# The workload child process
# ---------------------------------------------------------------------------------------------------------


class Workload:
    """identity_client.py as a child process: one DefaultAzureCredential + one SecretClient for its lifetime."""

    def __init__(self, env: Dict[str, str], uid: Optional[int] = None, start_timeout: float = 60):
        cmd: List[str] = [PYTHON, str(CLIENT)]
        if uid is not None:
            cmd = [SETPRIV, "--reuid", str(uid), "--regid", str(uid), "--clear-groups", *cmd]
        self.uid = uid
        self.env_names = sorted(env)
        self.proc = subprocess.Popen(
            cmd, env=env, cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, bufsize=1,
        )
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self._stderr: List[str] = []
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()
        ready = self._read(start_timeout)
        assert ready.get("ready"), f"workload did not start: {ready}"

    def _pump_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)
            del self._stderr[:-40]

    def _read(self, timeout: float) -> Dict[str, Any]:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"workload gave no answer within {timeout}s; stderr tail:\n{self.stderr_tail()}")
        if line is None:
            raise AssertionError(
                f"workload exited (code {self.proc.poll()}); stderr tail:\n{self.stderr_tail()}"
            )
        return json.loads(line)

    def stderr_tail(self) -> str:
        return "".join(self._stderr[-20:])

    def get(self, name: str, timeout: float = 120) -> Dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": "get", "name": name}) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write('{"op": "exit"}\n')
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)

    def __enter__(self) -> "Workload":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def sha256(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8")).hexdigest()


def assert_read(result: Dict[str, Any], value: str, credential: str) -> None:
    assert result.get("ok"), f"the workload could not read the secret: {result}"
    assert result["sha256"] == sha256(value), "the workload read a different value"
    assert result["credential"] == credential, f"DefaultAzureCredential settled on {result['credential']}"


def assert_refused(result: Dict[str, Any], *fragments: str) -> None:
    assert not result.get("ok"), "the workload read the secret, but it should have been refused"
    for fragment in fragments:
        assert fragment in result["message"], f"{fragment!r} not in the error: {result}"


# ---------------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------------


def _unbind_our_uids() -> None:
    """Remove bindings left on this suite's uids by an earlier run against the same server."""
    listing = cli("identity", "bindings")
    rows = listing.get("value", []) if isinstance(listing, dict) else listing
    for row in rows or []:
        if isinstance(row, dict) and row.get("uid") in OUR_UIDS:
            cli("identity", "unbind", row["id"])


@pytest.fixture(scope="module")
def uid_switching() -> None:
    """Skip the managed-identity scenarios where this process cannot run children under other uids."""
    if SETPRIV is None:
        pytest.skip("setpriv (util-linux) is not installed")
    if os.geteuid() != 0:
        pytest.skip("running children under other uids needs root")
    probe = subprocess.run(
        [SETPRIV, "--reuid", str(UNBOUND_UID), "--regid", str(UNBOUND_UID), "--clear-groups", "true"],
        capture_output=True, text=True, timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip(f"setpriv cannot switch uid here (user namespace?): {probe.stderr.strip()}")
    _unbind_our_uids()


@pytest.fixture(scope="module")
def base_env() -> Dict[str, str]:
    # PATH and HOME only; HOME points nowhere so no developer-tool credential finds a login.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/nonexistent"}


@pytest.fixture(scope="module")
def dev_env(coffer, vault_url, base_env) -> Dict[str, str]:
    """dev.env's variables verbatim, except AZURE_KEYVAULT_URL, which names this suite's vault."""
    missing = [k for k in DEV_ENV_VARS if k != "AZURE_KEYVAULT_URL" and not coffer.dev.get(k)]
    assert not missing, f"dev.env lacks {missing}"
    env = dict(base_env)
    env.update({k: coffer.dev[k] for k in DEV_ENV_VARS})
    env["AZURE_KEYVAULT_URL"] = vault_url
    return env


@pytest.fixture(scope="module")
def imds_env(dev_env) -> Dict[str, str]:
    env = dict(dev_env)
    del env["IDENTITY_ENDPOINT"], env["IDENTITY_HEADER"]
    return env


@pytest.fixture(scope="module")
def entra_env(coffer, vault_url, base_env) -> Dict[str, str]:
    """What a CI job has besides its credential: CA trust, the vault URL, the tenant and the authority host."""
    env = dict(base_env)
    env.update({k: coffer.dev.get(k) or coffer.ca_file for k in CA_VARS})
    env["AZURE_KEYVAULT_URL"] = vault_url
    env["AZURE_TENANT_ID"] = coffer.admin.get("AZURE_TENANT_ID") or "adfs"
    port = "" if coffer.port == 443 else f":{coffer.port}"
    env["AZURE_AUTHORITY_HOST"] = coffer.admin.get("AZURE_AUTHORITY_HOST") or f"https://login.{coffer.zone}{port}"
    return env


@pytest.fixture
def put_secret(client):
    """Set a fresh secret with a random value through the admin client; returns (name, value)."""

    def make(prefix: str = "py-id"):
        name, value = unique(prefix), f"value-{uuid.uuid4().hex}"
        client.set_secret(name, value)
        return name, value

    return make


def make_identity(vault_name: str, *, uid: int, exe: Optional[str] = None, role: bool = True) -> str:
    name = unique("py-mi")
    cli("identity", "create", name)
    bind = ["identity", "bind", name, "--uid", str(uid)]
    if exe:
        bind += ["--exe", exe]
    cli(*bind)
    if role:
        cli("role", "assign", "--principal", name, "--role", SECRETS_USER, "--scope", f"/vaults/{vault_name}")
    return name


def make_sp(vault_name: str) -> Dict[str, Any]:
    name = unique("py-sp")
    sp = cli("sp", "create", name, sensitive=True)
    assert sp.get("clientId") and sp.get("clientSecret"), f"sp create answered keys {sorted(sp)}"
    sp["name"] = name
    cli("role", "assign", "--principal", name, "--role", SECRETS_USER, "--scope", f"/vaults/{vault_name}")
    return sp


# ---------------------------------------------------------------------------------------------------------
# (a) managed identity
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("uid_switching")
class TestManagedIdentity:
    @pytest.mark.parametrize("source", ["app_service", "imds"])
    def test_bound_uid_reads_secret(self, source, vault_name, dev_env, imds_env, put_secret):
        uid = next(_next_uid)
        make_identity(vault_name, uid=uid)
        name, value = put_secret()
        env = dev_env if source == "app_service" else imds_env
        with Workload(env, uid=uid) as w:
            assert_read(w.get(name), value, "ManagedIdentityCredential")

    @pytest.mark.parametrize("source", ["app_service", "imds"])
    def test_unbound_uid_is_refused(self, source, dev_env, imds_env, put_secret):
        name, _ = put_secret()
        env = dev_env if source == "app_service" else imds_env
        with Workload(env, uid=UNBOUND_UID) as w:
            result = w.get(name)
        assert_refused(result, "ManagedIdentityCredential", NOT_BOUND, f"uid {UNBOUND_UID}")
        assert result["type"] == "ClientAuthenticationError", result
        assert result["status"] is None, f"the vault was reached: {result}"

    def test_bound_uid_and_exe_reads_secret(self, vault_name, dev_env, put_secret):
        uid = next(_next_uid)
        make_identity(vault_name, uid=uid, exe=PYTHON_EXE)
        name, value = put_secret()
        with Workload(dev_env, uid=uid) as w:
            assert_read(w.get(name), value, "ManagedIdentityCredential")

    def test_bound_uid_with_another_exe_is_refused(self, vault_name, dev_env, put_secret):
        # The binding says uid AND exe; this process has the uid but runs another executable.
        uid = next(_next_uid)
        other_exe = os.path.realpath(shutil.which("true") or "/bin/true")
        assert other_exe != PYTHON_EXE
        make_identity(vault_name, uid=uid, exe=other_exe)
        name, _ = put_secret()
        with Workload(dev_env, uid=uid) as w:
            result = w.get(name)
        assert_refused(result, "ManagedIdentityCredential", NOT_BOUND, f"uid {uid}", PYTHON_EXE)


# ---------------------------------------------------------------------------------------------------------
# (b) CI job with a client secret
# ---------------------------------------------------------------------------------------------------------


def secret_env(entra_env: Dict[str, str], sp: Dict[str, Any], secret: Optional[str] = None) -> Dict[str, str]:
    env = dict(entra_env)
    env["AZURE_CLIENT_ID"] = sp["clientId"]
    env["AZURE_CLIENT_SECRET"] = sp["clientSecret"] if secret is None else secret
    return env


def test_client_secret_reads_secret(vault_name, entra_env, put_secret):
    sp = make_sp(vault_name)
    name, value = put_secret()
    with Workload(secret_env(entra_env, sp)) as w:
        assert_read(w.get(name), value, "EnvironmentCredential")


def test_client_secret_wrong_secret_is_refused(vault_name, entra_env, put_secret):
    sp = make_sp(vault_name)
    name, _ = put_secret()
    with Workload(secret_env(entra_env, sp, secret="not-the-secret-" + uuid.uuid4().hex)) as w:
        result = w.get(name)
    assert_refused(result, "EnvironmentCredential", "AADSTS7000215", "Invalid client secret")
    assert result["type"] == "ClientAuthenticationError", result
    assert result["status"] is None, f"the vault was reached: {result}"


# ---------------------------------------------------------------------------------------------------------
# (c) workload identity federation
# ---------------------------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _uint(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


class TestIssuer:
    """An outside OIDC issuer (a Kubernetes cluster, a CI system): an RSA key, its JWKS, RS256 tokens."""

    __test__ = False  # not a pytest class

    def __init__(self, kid: str):
        self.kid = kid
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> Dict[str, Any]:
        pub = self.key.public_key().public_numbers()
        return {"keys": [{"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid,
                          "n": _b64url(_uint(pub.n)), "e": _b64url(_uint(pub.e))}]}

    def token(self, *, sub: str = SUBJECT, iss: str = ISSUER, aud: str = AUDIENCE, lifetime: int = 600) -> str:
        now = int(time.time())
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        claims = {"iss": iss, "sub": sub, "aud": aud, "iat": now, "nbf": now - 5, "exp": now + lifetime,
                  "jti": uuid.uuid4().hex}
        signing_input = ".".join(
            _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        )
        sig = self.key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(sig)}"


@pytest.fixture(scope="module")
def issuer() -> TestIssuer:
    return TestIssuer(kid=unique("py-test-issuer"))


@pytest.fixture(scope="module")
def federated_sp(vault_name, issuer, tmp_path_factory) -> Dict[str, Any]:
    """A service principal with no usable secret in the workload, trusting ISSUER's SUBJECT tokens."""
    sp = make_sp(vault_name)
    jwks = tmp_path_factory.mktemp("issuer") / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    cli("federation", "add", sp["name"], "--issuer", ISSUER, "--subject", SUBJECT, "--audience", AUDIENCE,
        "--jwks-file", str(jwks))
    return sp


def workload_env(entra_env: Dict[str, str], sp: Dict[str, Any], token_file: Path) -> Dict[str, str]:
    env = dict(entra_env)
    env["AZURE_CLIENT_ID"] = sp["clientId"]
    env["AZURE_FEDERATED_TOKEN_FILE"] = str(token_file)
    return env


def test_workload_identity_reads_secret(entra_env, federated_sp, issuer, put_secret, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(issuer.token())
    name, value = put_secret()
    with Workload(workload_env(entra_env, federated_sp, token_file)) as w:
        assert_read(w.get(name), value, "WorkloadIdentityCredential")


@pytest.mark.parametrize("variant,reason", [("other_subject", "InvalidSubject"), ("other_key", "InvalidSignature")])
def test_workload_identity_untrusted_token_is_refused(variant, reason, entra_env, federated_sp, issuer, put_secret,
                                                      tmp_path):
    if variant == "other_subject":
        token = issuer.token(sub=OTHER_SUBJECT)
    else:
        token = TestIssuer(kid=issuer.kid).token()  # same kid and claims, another key
    token_file = tmp_path / "token"
    token_file.write_text(token)
    name, _ = put_secret()
    with Workload(workload_env(entra_env, federated_sp, token_file)) as w:
        result = w.get(name)
    assert_refused(result, "WorkloadIdentityCredential", "invalid_client", reason)
    assert result["type"] == "ClientAuthenticationError", result
    assert result["status"] is None, f"the vault was reached: {result}"


# ---------------------------------------------------------------------------------------------------------
# (d) revocation takes effect on the very next request (same credential object, cached token)
# ---------------------------------------------------------------------------------------------------------


def assert_forbidden_by_rbac(result: Dict[str, Any]) -> None:
    assert not result.get("ok"), "the secret was still readable after the role assignment was removed"
    assert result["status"] == 403, result
    assert result["code"] == "Forbidden" and result["inner"] == "ForbiddenByRbac", result


def assert_principal_disabled(result: Dict[str, Any]) -> None:
    assert not result.get("ok"), "the secret was still readable after the principal was disabled"
    assert result["status"] == 401, result
    assert result["type"] == "ClientAuthenticationError", result


@pytest.mark.usefixtures("uid_switching")
def test_managed_identity_role_removed_next_call_403(vault_name, dev_env, put_secret):
    uid = next(_next_uid)
    ident = make_identity(vault_name, uid=uid)
    name, value = put_secret()
    with Workload(dev_env, uid=uid) as w:
        assert_read(w.get(name), value, "ManagedIdentityCredential")
        cli("role", "remove", "--principal", ident, "--role", SECRETS_USER, "--scope", f"/vaults/{vault_name}")
        assert_forbidden_by_rbac(w.get(name))


@pytest.mark.usefixtures("uid_switching")
def test_managed_identity_disabled_next_call_401(vault_name, dev_env, put_secret):
    uid = next(_next_uid)
    ident = make_identity(vault_name, uid=uid)
    name, value = put_secret()
    with Workload(dev_env, uid=uid) as w:
        assert_read(w.get(name), value, "ManagedIdentityCredential")
        cli("identity", "disable", ident)
        assert_principal_disabled(w.get(name))


def test_client_secret_role_removed_next_call_403(vault_name, entra_env, put_secret):
    sp = make_sp(vault_name)
    name, value = put_secret()
    with Workload(secret_env(entra_env, sp)) as w:
        assert_read(w.get(name), value, "EnvironmentCredential")
        cli("role", "remove", "--principal", sp["name"], "--role", SECRETS_USER, "--scope", f"/vaults/{vault_name}")
        assert_forbidden_by_rbac(w.get(name))


def test_client_secret_disabled_next_call_401(vault_name, entra_env, put_secret):
    sp = make_sp(vault_name)
    name, value = put_secret()
    with Workload(secret_env(entra_env, sp)) as w:
        assert_read(w.get(name), value, "EnvironmentCredential")
        cli("identity", "disable", sp["name"])
        assert_principal_disabled(w.get(name))
