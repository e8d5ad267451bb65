//! `coffer migrate` against a real dev server: `.env` files, stdin and compose files; dry runs,
//! idempotence (no new version for an unchanged value), collisions, tags, cleaned copies, and
//! no value in any output. Every value in the fixtures carries the word in `MARKER`.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{cli, free_port, TestServer, BIN};
use serde_json::Value;

const MARKER: &str = "SEEKRIT";

fn fixture(name: &str, dir: &Path) -> PathBuf {
    // `.env` fixtures are stored as `*.env.fixture` so no real-looking env file is tracked.
    let stored = if name.ends_with(".env") { format!("{name}.fixture") } else { name.to_owned() };
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/migrate").join(stored);
    let to = dir.join(name);
    std::fs::copy(&from, &to).unwrap();
    to
}

struct Run {
    ok: bool,
    out: String,
    err: String,
}

/// Runs the CLI with the server's admin environment; fails the test if any output has a value.
fn run(server: &TestServer, args: &[&str], stdin: Option<&[u8]>) -> Run {
    let mut child = Command::new(BIN)
        .args(args)
        .envs(server.admin_env())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let run = Run {
        ok: out.status.success(),
        out: String::from_utf8_lossy(&out.stdout).into(),
        err: String::from_utf8_lossy(&out.stderr).into(),
    };
    assert!(
        !run.out.contains(MARKER) && !run.err.contains(MARKER),
        "{args:?} printed a value:\n{}\n{}",
        run.out,
        run.err
    );
    run
}

fn migrate(server: &TestServer, source: &[&str], extra: &[&str]) -> Run {
    let mut args = vec!["migrate", "--vault", "dev"];
    args.extend(source);
    args.extend(extra);
    run(server, &args, None)
}

/// The `-o json` rows as (name or key, result).
fn results(out: &str) -> Vec<(String, String)> {
    let rows: Value = serde_json::from_str(out).unwrap_or_else(|e| panic!("{e}: {out}"));
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let label = r["name"].as_str().or(r["key"].as_str()).unwrap_or_default().to_owned();
            (label, r["result"].as_str().unwrap().to_owned())
        })
        .collect()
}

/// True when the table has the row `name enabled result`.
fn has_row(table: &str, cells: &[&str]) -> bool {
    table.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == cells)
}

async fn value(server: &TestServer, name: &str) -> Option<String> {
    match server.client().get_secret("dev", name, None).await {
        Ok(s) => Some(s.value.unwrap().expose().to_owned()),
        Err(e) if e.status() == Some(404) => None,
        Err(e) => panic!("{e}"),
    }
}

fn versions(server: &TestServer, name: &str) -> usize {
    let (ok, out, err) = cli(server, &["secret", "list-versions", name, "-o", "json"]);
    assert!(ok, "{err}");
    serde_json::from_str::<Value>(&out).unwrap().as_array().unwrap().len()
}

fn tags(server: &TestServer, name: &str) -> Value {
    let (ok, out, err) = cli(server, &["secret", "show", name, "-o", "json"]);
    assert!(ok, "{err}");
    serde_json::from_str::<Value>(&out).unwrap()["tags"].clone()
}

#[tokio::test]
async fn env_file_is_migrated_idempotently_and_cleaned() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), &[]);
    let env = fixture("seed.env", dir.path());
    let source = ["--env-file", env.to_str().unwrap()];
    let cleaned = dir.path().join("seed.env.cleaned");
    let expected = [
        ("required-token", "tok-SEEKRIT-a1"),
        ("external-service-secret", "ext \"quoted\" SEEKRIT-b2"),
        ("db-password", "single # not a comment SEEKRIT-c3"),
        ("api-url", "https://api.example.com/v1?key=SEEKRIT-d4"),
        ("tls-key", "-----BEGIN KEY-----\nSEEKRIT-e5\n-----END KEY-----"),
        ("log-level", "debug-SEEKRIT-f6"),
    ];

    // A dry run tells what would happen and writes nothing.
    let r = migrate(&server, &source, &["--dry-run"]);
    assert!(r.ok, "{}", r.err);
    assert!(r.err.contains("[1/7] required-token … would-create"), "{}", r.err);
    assert!(has_row(&r.out, &["required-token", "would-create"]), "{}", r.out);
    assert!(!cleaned.exists());
    for (name, _) in expected {
        assert_eq!(value(&server, name).await, None, "{name} was written by a dry run");
    }

    // The real run: created, tagged, and a cleaned copy without the values.
    let r = migrate(&server, &source, &[]);
    assert!(r.ok, "{}", r.err);
    let mut lines = r.out.lines();
    assert_eq!(lines.next().unwrap().split_whitespace().collect::<Vec<_>>(), ["Name", "Enabled", "Result"]);
    assert!(lines.next().unwrap().starts_with("----"));
    for (name, _) in expected {
        assert!(has_row(&r.out, &[name, "True", "created"]), "{name}:\n{}", r.out);
    }
    assert!(has_row(&r.out, &["empty-one", "skipped"]), "{}", r.out);
    assert!(r.err.contains("[1/7] required-token … created"), "{}", r.err);
    assert!(r.err.contains("empty-one … skipped: empty value"), "{}", r.err);
    for (name, v) in expected {
        assert_eq!(value(&server, name).await.as_deref(), Some(v), "{name}");
        assert_eq!(versions(&server, name), 1);
    }
    assert_eq!(value(&server, "empty-one").await, None);
    let t = tags(&server, "required-token");
    assert_eq!(t["coffer-source"], "env-file:seed.env");
    assert_eq!(t["coffer-env-key"], "REQUIRED_TOKEN");
    assert_eq!(tags(&server, "external-service-secret")["coffer-env-key"], "EXTERNAL_SERVICE_SECRET");

    let text = std::fs::read_to_string(&cleaned).unwrap();
    assert!(!text.contains(MARKER), "{text}");
    let url = format!("https://dev.localhost:{}", server.port);
    for line in [
        format!("# moved to vault secret required-token ({url}/secrets/required-token) by coffer migrate"),
        "REQUIRED_TOKEN=".into(),
        "export EXTERNAL_SERVICE_SECRET=".into(),
        "  DB_PASSWORD=".into(),
        "TLS_KEY=".into(),
        "EMPTY_ONE=".into(),
        "LOG_LEVEL=".into(),
        "# which must never show up in any output or in the cleaned copy.".into(),
    ] {
        assert!(text.lines().any(|l| l == line), "{line:?} missing from:\n{text}");
    }
    assert!(std::fs::read_to_string(&env).unwrap().contains(MARKER), "the original file is left alone");

    // The cleaned copy is never overwritten without --force, and nothing is done then.
    let r = migrate(&server, &source, &[]);
    assert!(!r.ok);
    assert!(r.err.contains("exists; pass --force"), "{}", r.err);

    // Re-running changes nothing: every value is unchanged, no new version.
    let r = migrate(&server, &source, &["--force", "-o", "json"]);
    assert!(r.ok, "{}", r.err);
    let rows = results(&r.out);
    assert_eq!(rows.len(), 7);
    for (name, _) in expected {
        assert!(rows.contains(&(name.into(), "unchanged".into())), "{rows:?}");
        assert_eq!(versions(&server, name), 1, "{name}");
    }

    // A changed value makes exactly one new version.
    let original = std::fs::read_to_string(&env).unwrap();
    std::fs::write(&env, original.replace("tok-SEEKRIT-a1", "tok-SEEKRIT-a1-rotated")).unwrap();
    let r = migrate(&server, &source, &["--force"]);
    assert!(r.ok, "{}", r.err);
    assert!(has_row(&r.out, &["required-token", "True", "updated"]), "{}", r.out);
    assert!(has_row(&r.out, &["db-password", "True", "unchanged"]), "{}", r.out);
    assert_eq!(versions(&server, "required-token"), 2);
    assert_eq!(versions(&server, "db-password"), 1);
    assert_eq!(value(&server, "required-token").await.as_deref(), Some("tok-SEEKRIT-a1-rotated"));

    // --cleaned-output chooses where the copy goes.
    let other = dir.path().join("other.env");
    let r = migrate(&server, &source, &["--cleaned-output", other.to_str().unwrap()]);
    assert!(r.ok, "{}", r.err);
    assert!(!std::fs::read_to_string(&other).unwrap().contains(MARKER));
}

#[tokio::test]
async fn collisions_disabled_secrets_and_unreachable_servers_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), &[]);
    let env = fixture("collide.env", dir.path());
    let r = migrate(&server, &["--env-file", env.to_str().unwrap()], &[]);
    assert!(!r.ok, "a collision fails the run");
    assert!(
        r.err.contains(
            "collision: A-B and A_B both map to the secret name a-b; rename all but one and re-run"
        ),
        "{}",
        r.err
    );
    assert!(r.err.contains("2 of 3 could not be migrated"), "{}", r.err);
    assert!(has_row(&r.out, &["a-b", "error"]), "{}", r.out);
    assert!(has_row(&r.out, &["fine", "True", "created"]), "{}", r.out);
    assert_eq!(value(&server, "a-b").await, None);
    assert_eq!(value(&server, "fine").await.as_deref(), Some("SEEKRIT-x3"));
    assert_eq!(versions(&server, "fine"), 1, "a key repeated with one value is one secret");

    // The cleaned copy keeps what was not migrated and drops what was.
    let text = std::fs::read_to_string(dir.path().join("collide.env.cleaned")).unwrap();
    assert!(text.contains("A_B=SEEKRIT-x1\nA-B=SEEKRIT-x2\n"), "{text}");
    assert!(!text.contains("SEEKRIT-x3"), "{text}");
    assert_eq!(text.matches("\nFINE=\n").count(), 2, "{text}");

    // A disabled current version is neither read nor overwritten; the error says what to do.
    let (ok, _, err) = cli(&server, &["secret", "update", "fine", "--enabled", "false"]);
    assert!(ok, "{err}");
    let r = migrate(&server, &["--env-file", env.to_str().unwrap()], &["--force"]);
    assert!(!r.ok);
    assert!(
        r.err.contains("fine … error: the current version of fine is disabled: enable it (coffer secret update fine --enabled true)"),
        "{}",
        r.err
    );
    assert_eq!(versions(&server, "fine"), 1);

    // An unreachable server: the first key says so, the others are not tried.
    let out = Command::new(BIN)
        .args(["migrate", "--vault", "dev", "--stdin"])
        .envs(server.admin_env())
        .env("COFFER_URL", format!("https://localhost:{}", free_port()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child.stdin.take().unwrap().write_all(b"ONE=SEEKRIT-u1\nTWO=SEEKRIT-u2\n")?;
            child.wait_with_output()
        })
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!err.contains(MARKER), "{err}");
    assert!(err.contains("[1/2] one … error: cannot reach the server"), "{err}");
    assert!(err.contains("[2/2] two … error: not tried, after the error above"), "{err}");
}

#[tokio::test]
async fn stdin_lines_and_nul_records() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), &[]);
    let args = ["migrate", "--vault", "dev", "--stdin"];

    let r = run(&server, &args, Some(b"STDIN_ONE=SEEKRIT-s1\nexport STDIN_TWO=\"two SEEKRIT-s2\"\n"));
    assert!(r.ok, "{}", r.err);
    assert!(has_row(&r.out, &["stdin-one", "True", "created"]), "{}", r.out);
    assert_eq!(value(&server, "stdin-two").await.as_deref(), Some("two SEEKRIT-s2"));
    assert_eq!(tags(&server, "stdin-one")["coffer-source"], "stdin");
    assert_eq!(tags(&server, "stdin-two")["coffer-env-key"], "STDIN_TWO");

    // `env -0` output: values may span lines.
    let r = run(&server, &args, Some(b"MULTI=a SEEKRIT\nb==\0STDIN_ONE=SEEKRIT-s1\0"));
    assert!(r.ok, "{}", r.err);
    assert!(has_row(&r.out, &["multi", "True", "created"]), "{}", r.out);
    assert!(has_row(&r.out, &["stdin-one", "True", "unchanged"]), "{}", r.out);
    assert_eq!(value(&server, "multi").await.as_deref(), Some("a SEEKRIT\nb=="));
    assert_eq!(versions(&server, "stdin-one"), 1);

    // A line that is not KEY=VALUE (a value spanning lines in plain `env` output) is an error
    // that names the line, never its text.
    let r = run(&server, &args, Some(b"CERT=first SEEKRIT\nSEEKRIT-continued\n"));
    assert!(!r.ok);
    assert!(r.err.contains("(line 2) … error") && r.err.contains("env -0"), "{}", r.err);

    // Nothing to clean with stdin.
    let r = run(&server, &["migrate", "--vault", "dev", "--stdin", "--cleaned-output", "x"], Some(b""));
    assert!(!r.ok && r.err.contains("cannot be used with"), "{}", r.err);
}

#[tokio::test]
async fn compose_environment_blocks_of_every_service() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&dir.path().join("data"), free_port(), &[]);
    let compose = fixture("docker-compose.yml", dir.path());
    let source = ["--compose", compose.to_str().unwrap()];
    let expected = [
        ("required-token", "web-SEEKRIT-1", "web"),
        ("session-key", "with spaces SEEKRIT-2", "web"),
        ("shared-salt", "SEEKRIT-3", "web,worker"),
        ("external-service-secret", "SEEKRIT-4", "worker"),
        ("queue-password", "plain-SEEKRIT-5", "worker"),
        ("cert", "-----BEGIN-----\nSEEKRIT-6\n-----END-----\n", "worker"),
    ];

    let r = migrate(&server, &source, &[]);
    assert!(r.ok, "{}", r.err);
    for (name, v, services) in expected {
        assert!(has_row(&r.out, &[name, "True", "created"]), "{name}:\n{}", r.out);
        assert_eq!(value(&server, name).await.as_deref(), Some(v), "{name}");
        assert_eq!(tags(&server, name)["coffer-source"], format!("compose:docker-compose.yml:{services}"));
    }
    assert!(has_row(&r.out, &["home-dir", "skipped"]), "{}", r.out);
    assert!(has_row(&r.out, &["from-host", "skipped"]), "{}", r.out);
    assert!(r.err.contains("taken from the host environment"), "{}", r.err);

    let cleaned = dir.path().join("docker-compose.yml.cleaned");
    let text = std::fs::read_to_string(&cleaned).unwrap();
    assert!(!text.contains(MARKER), "{text}");
    for part in [
        "      - REQUIRED_TOKEN=  # moved to vault secret required-token (",
        "      - SESSION_KEY=  # moved to vault secret session-key (",
        "      - HOME_DIR                       # taken from the host\n",
        "      QUEUE_PASSWORD: \"\"  # moved to vault secret queue-password (",
        "      CERT: \"\"  # moved to vault secret cert (",
        "      FROM_HOST:\n    command: [\"run\", \"--fast\"]\n",
        "      - \"8080:8080\"\n",
    ] {
        assert!(text.contains(part), "{part:?} missing from:\n{text}");
    }
    // The cleaned copy is still a compose file, with every migrated value empty.
    let r = migrate(&server, &["--compose", cleaned.to_str().unwrap()], &["--dry-run", "-o", "json"]);
    assert!(r.ok, "{}", r.err);
    let rows = results(&r.out);
    assert_eq!(rows.len(), 9, "{rows:?}");
    assert!(rows.iter().all(|(_, result)| result == "skipped"), "{rows:?}");

    // Idempotent.
    let r = migrate(&server, &source, &["--force", "-o", "json"]);
    assert!(r.ok, "{}", r.err);
    for (name, _, _) in expected {
        assert!(results(&r.out).contains(&(name.into(), "unchanged".into())), "{}", r.out);
        assert_eq!(versions(&server, name), 1);
    }
}
