//! `coffer migrate`: moves secrets out of environment files into a vault.
//!
//! Sources: a `.env` file, `KEY=VALUE` lines (or `env -0` records) on stdin, and the
//! `environment:` blocks of a docker-compose file. Each key becomes a secret named by Key Vault's
//! rules (`REQUIRED_TOKEN` → `required-token`), tagged with where it came from. Re-running is
//! safe: an unchanged value makes no new version. A cleaned copy of the file, without the values,
//! is written beside it.
//!
//! Values are held in `Zeroizing` buffers and never printed: messages name keys, secret names and
//! line numbers only, and a line that cannot be read as `KEY=VALUE` is named by its number.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Read, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args};
use coffer_cli::migrate_parse::{parse_compose, parse_env, parse_stdin, Edit, Found, Item};
use coffer_client::{ClientError, CofferClient, SecretProperties};
use coffer_core::names::{MAX_TAG_VALUE_CHARS, MAX_VALUE_BYTES};
use serde::Serialize;
use zeroize::Zeroizing;

use crate::output::{self, Format};
use crate::Connection;

/// Tag naming where a migrated secret came from.
const SOURCE_TAG: &str = "coffer-source";
/// Tag naming the environment variable a migrated secret came from.
const KEY_TAG: &str = "coffer-env-key";
/// Key Vault's longest secret name.
const MAX_NAME_CHARS: usize = 127;

#[derive(Args)]
#[command(group(ArgGroup::new("source").required(true).args(["env_file", "stdin", "compose"])))]
pub struct MigrateArgs {
    /// Vault to move the secrets into.
    #[arg(long, env = "COFFER_VAULT")]
    vault: Option<String>,
    /// A .env file of KEY=VALUE lines (`export`, comments and quotes allowed).
    #[arg(long, value_name = "FILE")]
    env_file: Option<PathBuf>,
    /// Read KEY=VALUE lines from stdin, e.g. `env`; NUL-separated records (`env -0`) keep
    /// values that span lines intact.
    #[arg(long)]
    stdin: bool,
    /// A docker-compose file: the `environment:` of every service (list and map forms).
    #[arg(long, value_name = "FILE")]
    compose: Option<PathBuf>,
    /// Show what would happen; write nothing (no secret, no cleaned file).
    #[arg(long)]
    dry_run: bool,
    /// Where to write the cleaned copy of the file (default: FILE.cleaned).
    #[arg(long, value_name = "PATH", conflicts_with = "stdin")]
    cleaned_output: Option<PathBuf>,
    /// Overwrite the cleaned copy if it exists.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    conn: Connection,
}

// ---------------------------------------------------------------------------------------------
// What the input holds: parsed by `coffer_cli::migrate_parse`.

/// Where the keys come from; decides the `coffer-source` tag.
enum Origin {
    EnvFile(String),
    Stdin,
    Compose(String),
}

// ---------------------------------------------------------------------------------------------
// Names, plan and results.

/// Maps an environment variable's name to a secret name (`^[0-9a-zA-Z-]{1,127}$`): lowercase,
/// every other character becomes `-`, runs of `-` collapse, and `-` is trimmed from both ends.
fn secret_name(key: &str) -> Result<String, String> {
    let mut name = String::with_capacity(key.len());
    for c in key.chars() {
        if c.is_ascii_alphanumeric() {
            name.push(c.to_ascii_lowercase());
        } else if !name.is_empty() && !name.ends_with('-') {
            name.push('-');
        }
    }
    while name.ends_with('-') {
        name.pop();
    }
    if name.is_empty() {
        return Err(format!("{key} has no letter or digit to name a secret after; rename it and re-run"));
    }
    if name.len() > MAX_NAME_CHARS {
        return Err(format!(
            "{key} maps to a secret name longer than {MAX_NAME_CHARS} characters; shorten it and re-run"
        ));
    }
    Ok(name)
}

/// Equal in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Outcome {
    /// To be migrated (never shown).
    Pending,
    Created,
    Updated,
    Unchanged,
    WouldCreate,
    WouldUpdate,
    Skipped,
    Error,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Created => "created",
            Outcome::Updated => "updated",
            Outcome::Unchanged => "unchanged",
            Outcome::WouldCreate => "would-create",
            Outcome::WouldUpdate => "would-update",
            Outcome::Skipped => "skipped",
            Outcome::Error => "error",
        }
    }

    /// The value is in the vault: the cleaned copy may drop it.
    fn migrated(self) -> bool {
        matches!(self, Outcome::Created | Outcome::Updated | Outcome::Unchanged)
    }
}

/// One line of the result: a secret, or a key or line that was not migrated.
#[derive(Serialize)]
struct Row {
    name: Option<String>,
    key: Option<String>,
    enabled: Option<bool>,
    result: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    source: String,
    location: String,
    #[serde(skip)]
    value: Option<Zeroizing<String>>,
    /// The items this row stands for (several when one key repeats with one value).
    #[serde(skip)]
    items: Vec<usize>,
}

impl Row {
    /// What to call the row: the secret's name, else the key, else where it is.
    fn label(&self) -> String {
        self.name.clone().or_else(|| self.key.clone()).unwrap_or_else(|| format!("({})", self.location))
    }
}

fn source_tag(origin: &Origin, services: &[&str]) -> String {
    let tag = match origin {
        Origin::EnvFile(file) => format!("env-file:{file}"),
        Origin::Stdin => "stdin".to_owned(),
        Origin::Compose(file) => format!("compose:{file}:{}", services.join(",")),
    };
    tag.chars().take(MAX_TAG_VALUE_CHARS).collect()
}

/// Decides what to do with each item, without the server: names, empty values, collisions.
fn plan(items: &mut [Item], origin: &Origin) -> Vec<Row> {
    enum Slot {
        Row(Row),
        Group(usize),
    }
    let mut slots = Vec::new();
    let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let service: Vec<&str> = item.service.as_deref().into_iter().collect();
        let mut row = Row {
            name: None,
            key: item.key.clone(),
            enabled: None,
            result: Outcome::Error,
            message: None,
            source: source_tag(origin, &service),
            location: item.location.clone(),
            value: None,
            items: vec![i],
        };
        let name = item.key.as_deref().map(secret_name);
        if let Some(Ok(name)) = &name {
            row.name = Some(name.clone());
        }
        match (&item.value, name) {
            (Found::Problem(message), _) => row.message = Some(message.clone()),
            (Found::FromHost, _) => {
                row.result = Outcome::Skipped;
                row.message = Some(match &item.key {
                    Some(_) => "no value here (taken from the host environment); left as it is".into(),
                    None => "no '=' on this line: nothing to migrate; left as it is".into(),
                });
            }
            (Found::Value(v), _) if v.is_empty() => {
                row.result = Outcome::Skipped;
                row.message = Some("empty value: nothing secret to move; left as it is".into());
            }
            (Found::Value(_), Some(Err(message))) => row.message = Some(message),
            (Found::Value(v), _) if v.len() > MAX_VALUE_BYTES => {
                row.message = Some(format!(
                    "the value is larger than {} KiB, Key Vault's limit; keep it in a file instead",
                    MAX_VALUE_BYTES / 1024
                ));
            }
            (Found::Value(_), Some(Ok(name))) => {
                match by_name.get(&name) {
                    Some(&g) => groups[g].1.push(i),
                    None => {
                        by_name.insert(name.clone(), groups.len());
                        slots.push(Slot::Group(groups.len()));
                        groups.push((name, vec![i]));
                    }
                }
                continue;
            }
            (Found::Value(_), None) => row.message = Some("no key; fix the line and re-run".into()),
        }
        slots.push(Slot::Row(row));
    }

    let mut rows = Vec::new();
    for slot in slots {
        let (name, members) = match slot {
            Slot::Row(row) => {
                rows.push(row);
                continue;
            }
            Slot::Group(g) => std::mem::take(&mut groups[g]),
        };
        let key_of = |i: usize| items[i].key.clone().unwrap_or_default();
        let mut keys: Vec<String> = members.iter().map(|&i| key_of(i)).collect();
        keys.dedup();
        let value_of = |i: usize| match &items[i].value {
            Found::Value(v) => v.as_bytes(),
            _ => &[],
        };
        let same_values = members.iter().all(|&i| constant_time_eq(value_of(i), value_of(members[0])));
        let mut distinct_keys = keys.clone();
        distinct_keys.sort();
        distinct_keys.dedup();
        if distinct_keys.len() == 1 && same_values {
            let first = members[0];
            let mut services: Vec<&str> = Vec::new();
            for service in members.iter().filter_map(|&i| items[i].service.as_deref()) {
                if !services.contains(&service) {
                    services.push(service);
                }
            }
            let source = source_tag(origin, &services);
            let location = members.iter().map(|&i| items[i].location.as_str()).collect::<Vec<_>>().join("; ");
            let value = match &mut items[first].value {
                Found::Value(v) => std::mem::take(v),
                _ => Zeroizing::default(),
            };
            rows.push(Row {
                name: Some(name),
                key: items[first].key.clone(),
                enabled: None,
                result: Outcome::Pending,
                message: None,
                source,
                location,
                value: Some(value),
                items: members,
            });
            continue;
        }
        let message = if distinct_keys.len() > 1 {
            let (keys, verb) = match distinct_keys.as_slice() {
                [a, b] => (format!("{a} and {b}"), "both map"),
                more => (more.join(", "), "all map"),
            };
            format!("collision: {keys} {verb} to the secret name {name}; rename all but one and re-run")
        } else {
            let places: Vec<&str> = members.iter().map(|&i| items[i].location.as_str()).collect();
            format!(
                "{} is set with different values ({}); keep one (or rename the others) and re-run",
                distinct_keys[0],
                places.join("; ")
            )
        };
        for &i in &members {
            let service: Vec<&str> = items[i].service.as_deref().into_iter().collect();
            rows.push(Row {
                name: Some(name.clone()),
                key: items[i].key.clone(),
                enabled: None,
                result: Outcome::Error,
                message: Some(message.clone()),
                source: source_tag(origin, &service),
                location: items[i].location.clone(),
                value: None,
                items: vec![i],
            });
        }
    }
    rows
}

/// What to tell the user about a failed call, and whether the next calls can succeed at all.
fn explain(e: &ClientError, vault: &str, name: &str) -> (String, bool) {
    match e {
        ClientError::Api { status: 401, .. } => (
            "the server refused the token (401): source DATA_DIR/admin.env again (tokens \
             expire) or pass --token, then re-run"
                .into(),
            true,
        ),
        ClientError::Api { status: 403, message, .. } if message.contains("disabled") => (
            format!(
                "the current version of {name} is disabled: enable it (coffer secret update \
                 {name} --enabled true) or rename the key, then re-run"
            ),
            false,
        ),
        ClientError::Api { status: 403, code, .. } => (
            format!(
                "not allowed (403 {code}): migrating needs get and set on the secrets of vault \
                 {vault} (e.g. the Key Vault Secrets Officer role); ask an administrator, then re-run"
            ),
            false,
        ),
        ClientError::Api { status: 404, .. } => (
            format!(
                "vault {vault} was not found (404): check --vault or COFFER_VAULT (coffer vault \
                 list), then re-run"
            ),
            true,
        ),
        ClientError::Api { status: 409, .. } => (
            format!(
                "a deleted secret named {name} exists (409): recover it (coffer secret recover \
                 {name}) or purge it (coffer secret purge {name}), then re-run"
            ),
            false,
        ),
        ClientError::Api { status, code, message } => {
            (format!("the server refused it ({status} {code}: {message}); fix the cause and re-run"), false)
        }
        ClientError::Transport(m) => (
            format!("cannot reach the server ({m}): check COFFER_URL and that the server runs, then re-run"),
            true,
        ),
        other => (format!("{other}; re-run"), false),
    }
}

/// Moves one value: created when missing, updated when different, unchanged when equal.
async fn migrate_one(
    client: &CofferClient,
    vault: &str,
    row: &Row,
    dry_run: bool,
) -> Result<(Outcome, Option<bool>), ClientError> {
    let name = row.name.as_deref().unwrap_or_default();
    let value = row.value.as_deref().map_or("", String::as_str);
    let current = match client.get_secret(vault, name, None).await {
        Ok(secret) => Some(secret),
        Err(e) if CofferClient::is_not_found(&e) => None,
        Err(e) => return Err(e),
    };
    if let Some(secret) = &current {
        let same =
            secret.value.as_ref().is_some_and(|v| constant_time_eq(v.expose().as_bytes(), value.as_bytes()));
        if same {
            return Ok((Outcome::Unchanged, secret.attributes.enabled));
        }
    }
    if dry_run {
        return Ok((if current.is_some() { Outcome::WouldUpdate } else { Outcome::WouldCreate }, None));
    }
    let mut tags = std::collections::BTreeMap::new();
    tags.insert(SOURCE_TAG.to_owned(), row.source.clone());
    tags.insert(
        KEY_TAG.to_owned(),
        row.key.clone().unwrap_or_default().chars().take(MAX_TAG_VALUE_CHARS).collect(),
    );
    let properties = SecretProperties { tags: Some(tags), ..Default::default() };
    let secret = client.set_secret(vault, name, value, &properties).await?;
    Ok((if current.is_some() { Outcome::Updated } else { Outcome::Created }, secret.attributes.enabled))
}

// ---------------------------------------------------------------------------------------------
// Cleaned copies.

fn secret_note(name: &str, vault_url: &str) -> String {
    format!("moved to vault secret {name} ({vault_url}/secrets/{name}) by coffer migrate")
}

/// The `.env` text with each migrated line replaced by a comment and `KEY=`.
fn clean_env(text: &str, items: &[Item], migrated: &HashMap<usize, String>, vault_url: &str) -> String {
    let mut by_line: HashMap<usize, (usize, &str, &str, &str)> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        if let (Some(name), Edit::EnvLines { first, last, prefix, key }) = (migrated.get(&i), &item.edit) {
            by_line.insert(*first, (*last, prefix, key, name));
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut skip_through: Option<usize> = None;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        if skip_through.is_some_and(|last| n <= last) {
            continue;
        }
        skip_through = None;
        match by_line.get(&n) {
            Some(&(last, prefix, key, name)) => {
                let eol = if line.ends_with("\r\n") { "\r\n" } else { "\n" };
                let indent = &prefix[..prefix.len() - prefix.trim_start().len()];
                let _ = write!(out, "{indent}# {}{eol}{prefix}{key}={eol}", secret_note(name, vault_url));
                skip_through = Some(last);
            }
            None => out.push_str(line),
        }
    }
    out
}

/// The compose text with each migrated value replaced by an empty string and a comment.
fn clean_compose(
    text: &str,
    items: &[Item],
    migrated: &HashMap<usize, String>,
    vault: &str,
    vault_url: &str,
) -> String {
    let mut edits = Vec::new();
    let mut listed = Vec::new();
    for (i, item) in items.iter().enumerate() {
        if let (Some(name), Edit::Yaml { start, end, replacement, block }) = (migrated.get(&i), &item.edit) {
            let mut new = replacement.clone();
            if *block {
                let _ = write!(new, "  # {}", secret_note(name, vault_url));
            } else {
                listed.push(format!(
                    "#   {} ({}) -> secret {name}\n",
                    item.key.as_deref().unwrap_or_default(),
                    item.location
                ));
            }
            edits.push((*start, *end, new));
        }
    }
    edits.sort_by_key(|e| e.0);
    let mut out = String::with_capacity(text.len() + 256);
    let _ = writeln!(
        out,
        "# Cleaned by coffer migrate: the migrated variables' values now live in vault \
         {vault}\n# ({vault_url}) and are empty here."
    );
    for line in listed {
        out.push_str(&line);
    }
    let mut at = 0;
    for (start, end, new) in edits {
        if start < at {
            continue; // overlapping edits cannot come from one document
        }
        out.push_str(&text[at..start]);
        out.push_str(&new);
        at = end;
    }
    out.push_str(&text[at..]);
    out
}

/// Writes the cleaned copy with the source file's permissions; refuses to overwrite unless forced.
fn write_cleaned(path: &Path, text: &str, like: &Path, force: bool) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mode = std::fs::metadata(like).map(|m| m.permissions().mode() & 0o777).unwrap_or(0o600);
        options.mode(mode);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            anyhow::anyhow!(
                "{} exists; pass --force to overwrite it or --cleaned-output PATH",
                path.display()
            )
        } else {
            anyhow::anyhow!("cannot write {}: {e}", path.display())
        }
    })?;
    file.write_all(text.as_bytes()).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The command.

/// Reads everything into a buffer that is zeroed when dropped, including on growth.
fn read_secret_bytes(mut reader: impl Read) -> std::io::Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(Vec::with_capacity(16 * 1024));
    let mut chunk = Zeroizing::new([0u8; 8192]);
    loop {
        let n = match reader.read(&mut chunk[..]) {
            Ok(0) => return Ok(buf),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.len() + n > buf.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity((buf.len() + n) * 2));
            bigger.extend_from_slice(&buf);
            buf = bigger;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn utf8(bytes: &[u8], what: &str) -> Result<Zeroizing<String>> {
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok(Zeroizing::new(s.to_owned())),
        Err(e) => bail!("{what} is not UTF-8 (at byte {}); convert it and re-run", e.valid_up_to()),
    }
}

fn file_name(path: &Path) -> String {
    path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned())
}

fn default_cleaned(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".cleaned");
    PathBuf::from(name)
}

pub async fn run(args: MigrateArgs) -> Result<()> {
    let vault = args.vault.clone().context("no vault: pass --vault NAME or set COFFER_VAULT")?;
    let (origin, path) = match (&args.env_file, &args.compose) {
        (Some(p), _) => (Origin::EnvFile(file_name(p)), Some(p.clone())),
        (_, Some(p)) => (Origin::Compose(file_name(p)), Some(p.clone())),
        _ => (Origin::Stdin, None),
    };
    let text = match &path {
        Some(p) => {
            let file = std::fs::File::open(p).with_context(|| format!("cannot read {}", p.display()))?;
            let bytes = read_secret_bytes(file).with_context(|| format!("cannot read {}", p.display()))?;
            utf8(&bytes, &p.display().to_string())?
        }
        None => {
            if std::io::stdin().is_terminal() {
                eprintln!("Reading KEY=VALUE lines from stdin; end with Ctrl-D.");
            }
            let bytes = read_secret_bytes(std::io::stdin().lock()).context("cannot read stdin")?;
            utf8(&bytes, "stdin")?
        }
    };
    let (mut items, notes) = match &origin {
        Origin::EnvFile(_) => (parse_env(&text), Vec::new()),
        Origin::Stdin => (parse_stdin(&text), Vec::new()),
        Origin::Compose(_) => {
            let p = path.as_deref().unwrap_or(Path::new("compose file"));
            parse_compose(&text).with_context(|| format!("{}", p.display()))?
        }
    };
    let cleaned = path.as_ref().map(|p| args.cleaned_output.clone().unwrap_or_else(|| default_cleaned(p)));
    if let Some(c) = &cleaned {
        if !args.dry_run && !args.force && c.exists() {
            bail!(
                "{} exists; pass --force to overwrite it or --cleaned-output PATH (nothing was migrated)",
                c.display()
            );
        }
    }
    for note in &notes {
        eprintln!("note: {note}");
    }

    let client = args.conn.client()?;
    let vault_url = client.vault_url(&vault);
    let mut rows = plan(&mut items, &origin);
    if rows.is_empty() {
        eprintln!("no KEY=VALUE found: nothing to migrate");
    }
    let total = rows.len();
    // After an error that every later call would repeat (unreachable server, refused token,
    // unknown vault), the remaining keys are not tried.
    let mut stop = false;
    for (n, row) in rows.iter_mut().enumerate() {
        if row.result == Outcome::Pending {
            if stop {
                row.result = Outcome::Error;
                row.message = Some("not tried, after the error above".into());
            } else {
                match migrate_one(&client, &vault, row, args.dry_run).await {
                    Ok((outcome, enabled)) => {
                        row.result = outcome;
                        row.enabled = enabled;
                    }
                    Err(e) => {
                        let (message, fatal) = explain(&e, &vault, row.name.as_deref().unwrap_or_default());
                        stop = fatal;
                        row.result = Outcome::Error;
                        row.message = Some(message);
                    }
                }
            }
            row.value = None;
        }
        let mut line = format!("[{}/{total}] {} … {}", n + 1, row.label(), row.result.as_str());
        if let Some(m) = &row.message {
            let _ = write!(line, ": {m}");
        }
        if row.result == Outcome::Error || row.result == Outcome::Skipped {
            let _ = write!(line, " [{}]", row.location);
        }
        eprintln!("{line}");
    }

    if args.conn.output == Format::Json {
        output::json(&rows)?;
    } else {
        let table: Vec<Vec<String>> = rows
            .iter()
            .map(|r| vec![r.label(), output::boolean(r.enabled), r.result.as_str().to_owned()])
            .collect();
        output::table(&["Name", "Enabled", "Result"], &table);
    }

    let migrated: HashMap<usize, String> = rows
        .iter()
        .filter(|r| r.result.migrated())
        .flat_map(|r| r.items.iter().map(|&i| (i, r.name.clone().unwrap_or_default())))
        .collect();
    let mut failed = rows.iter().filter(|r| r.result == Outcome::Error).count();
    if let (Some(cleaned), Some(source)) = (&cleaned, &path) {
        if args.dry_run {
            eprintln!("dry run: nothing written; the cleaned copy would go to {}", cleaned.display());
        } else if migrated.is_empty() {
            eprintln!("nothing was migrated: no cleaned copy written");
        } else {
            let text = match origin {
                Origin::Compose(_) => clean_compose(&text, &items, &migrated, &vault, &vault_url),
                _ => clean_env(&text, &items, &migrated, &vault_url),
            };
            match write_cleaned(cleaned, &text, source, args.force) {
                Ok(()) if failed > 0 => eprintln!(
                    "wrote {} without the migrated values; it still holds those that were not \
                     migrated: fix them and re-run with --force",
                    cleaned.display()
                ),
                Ok(()) => eprintln!(
                    "wrote {} without the migrated values; review it, then replace {} with it",
                    cleaned.display(),
                    source.display()
                ),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    failed += 1;
                }
            }
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {total} could not be migrated (see the errors above); fix them and re-run: values already migrated are left unchanged"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(items: &[Item]) -> Vec<(Option<&str>, Option<&str>)> {
        items
            .iter()
            .map(|i| {
                let v = match &i.value {
                    Found::Value(v) => Some(v.as_str()),
                    _ => None,
                };
                (i.key.as_deref(), v)
            })
            .collect()
    }

    #[test]
    fn env_lines_quotes_comments_and_export() {
        let text = "\u{feff}# comment\n\nA=1\nexport B = two words # trailing\n  C=\"x\\ny \\\"q\\\" \\$HOME\"  # c\nD='lit\\n $X'\nE=a=b=c\nF=#notcomment\nG=\nH=\"multi\nline\"\nI=after\r\nJ=x\"y\n";
        let items = parse_env(text);
        assert_eq!(
            values(&items),
            vec![
                (Some("A"), Some("1")),
                (Some("B"), Some("two words")),
                (Some("C"), Some("x\ny \"q\" $HOME")),
                (Some("D"), Some("lit\\n $X")),
                (Some("E"), Some("a=b=c")),
                (Some("F"), Some("#notcomment")),
                (Some("G"), Some("")),
                (Some("H"), Some("multi\nline")),
                (Some("I"), Some("after")),
                (Some("J"), Some("x\"y")),
            ]
        );
        assert_eq!(items[8].location, "line 12");
        assert!(matches!(&items[7].edit, Edit::EnvLines { first: 9, last: 10, .. }));
        assert!(matches!(&items[1].edit, Edit::EnvLines { prefix, .. } if prefix == "export "));
    }

    #[test]
    fn env_problems_never_quote_the_line() {
        let text = "GOOD=1\nsecretvalue-on-its-own\nBAD KEY=hunter2\nQ=\"unterminated hunter3\nAFTER=2\nT='x' hunter4\n";
        let items = parse_env(text);
        for item in &items {
            if let Found::Problem(m) = &item.value {
                assert!(!m.contains("hunter") && !m.contains("secretvalue"), "{m}");
            }
            assert!(!item.key.as_deref().unwrap_or_default().contains("secretvalue"));
        }
        assert!(matches!(items[1].value, Found::FromHost) && items[1].key.is_none());
        assert!(matches!(items[2].value, Found::Problem(_)) && items[2].key.is_none());
        assert!(matches!(items[3].value, Found::Problem(_)));
        assert_eq!(values(&items)[4], (Some("AFTER"), Some("2")));
        assert!(matches!(items[5].value, Found::Problem(_)));
    }

    #[test]
    fn stdin_lines_and_nul_records() {
        let items = parse_stdin("PATH=/usr/bin\nX=1\n");
        assert_eq!(values(&items), vec![(Some("PATH"), Some("/usr/bin")), (Some("X"), Some("1"))]);
        assert!(matches!(parse_stdin("CERT=a\nbbb\n")[1].value, Found::Problem(_)));
        let items = parse_stdin("CERT=-----BEGIN\nabc==\n-----END\0Q=\"kept\"\0");
        assert_eq!(
            values(&items),
            vec![(Some("CERT"), Some("-----BEGIN\nabc==\n-----END")), (Some("Q"), Some("\"kept\""))]
        );
    }

    #[test]
    fn names_follow_key_vault_rules() {
        assert_eq!(secret_name("REQUIRED_TOKEN").unwrap(), "required-token");
        assert_eq!(secret_name("EXTERNAL_SERVICE_SECRET").unwrap(), "external-service-secret");
        assert_eq!(secret_name("__a..b__c--").unwrap(), "a-b-c");
        assert_eq!(secret_name("A-B").unwrap(), secret_name("a_b").unwrap());
        assert_eq!(secret_name("Ünïcode_KEY9").unwrap(), "n-code-key9");
        assert!(secret_name("___").is_err());
        assert!(secret_name(&"A".repeat(128)).is_err());
        assert_eq!(secret_name(&"A".repeat(127)).unwrap().len(), 127);
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn plan_reports_collisions_empties_and_merges_repeats() {
        let mut items = parse_env("A_B=1\nA-B=2\nEMPTY=\nSAME=x\nSAME=x\nDIFF=1\nDIFF=2\nOK=v\n___=z\n");
        let rows = plan(&mut items, &Origin::EnvFile(".env".into()));
        let summary: Vec<(String, &str)> = rows.iter().map(|r| (r.label(), r.result.as_str())).collect();
        assert_eq!(
            summary,
            vec![
                ("a-b".into(), "error"),
                ("a-b".into(), "error"),
                ("empty".into(), "skipped"),
                ("same".into(), "pending"),
                ("diff".into(), "error"),
                ("diff".into(), "error"),
                ("ok".into(), "pending"),
                ("___".into(), "error"),
            ]
        );
        assert!(rows[0].message.as_ref().unwrap().contains("A-B and A_B both map to the secret name a-b"));
        assert_eq!(rows[3].items, vec![3, 4]);
        assert_eq!(rows[3].source, "env-file:.env");
        assert!(rows[4].message.as_ref().unwrap().contains("line 6; line 7"));
    }

    const COMPOSE: &str = r#"# top comment
services:
  app:
    image: app:1
    environment:
      - REQUIRED_TOKEN=tok-123   # keep
      - "QUOTED=a b"
      - FROM_HOST
      - SHARED=same
    env_file: .env
  worker:
    environment:
      EXTERNAL_SERVICE_SECRET: "ext-456"
      PLAIN: plain-789
      PORT: 8080
      NULLED:
      SHARED: same
      PEM: |
        line-one
        line-two
      LAST: last-000
  flow:
    environment: [FLOW_A=fa-1, "FLOW_B=fb 2"]
  flowmap:
    environment: {FM: fm-3}
x-other:
  keep: me
"#;

    #[test]
    fn compose_list_and_map_forms() {
        let (items, notes) = parse_compose(COMPOSE).unwrap();
        assert_eq!(
            values(&items),
            vec![
                (Some("REQUIRED_TOKEN"), Some("tok-123")),
                (Some("QUOTED"), Some("a b")),
                (Some("FROM_HOST"), None),
                (Some("SHARED"), Some("same")),
                (Some("EXTERNAL_SERVICE_SECRET"), Some("ext-456")),
                (Some("PLAIN"), Some("plain-789")),
                (Some("PORT"), Some("8080")),
                (Some("NULLED"), None),
                (Some("SHARED"), Some("same")),
                (Some("PEM"), Some("line-one\nline-two\n")),
                (Some("LAST"), Some("last-000")),
                (Some("FLOW_A"), Some("fa-1")),
                (Some("FLOW_B"), Some("fb 2")),
                (Some("FM"), Some("fm-3")),
            ]
        );
        assert_eq!(notes.len(), 1);
        assert_eq!(items[0].service.as_deref(), Some("app"));
        assert_eq!(items[4].location, "service worker, line 13");

        let mut items = items;
        let rows = plan(&mut items, &Origin::Compose("docker-compose.yml".into()));
        let shared = rows.iter().find(|r| r.key.as_deref() == Some("SHARED")).unwrap();
        assert_eq!(shared.source, "compose:docker-compose.yml:app,worker");
        assert_eq!(shared.items.len(), 2);

        let migrated: HashMap<usize, String> = rows
            .iter()
            .filter(|r| r.result == Outcome::Pending)
            .flat_map(|r| r.items.iter().map(|&i| (i, r.name.clone().unwrap())))
            .collect();
        let cleaned = clean_compose(COMPOSE, &items, &migrated, "dev", "https://dev.localhost:8443");
        for secret in [
            "tok-123",
            "a b",
            "ext-456",
            "plain-789",
            "8080",
            "same",
            "line-one",
            "line-two",
            "last-000",
            "fa-1",
            "fb 2",
            "fm-3",
        ] {
            assert!(!cleaned.contains(secret), "{secret} left in:\n{cleaned}");
        }
        assert!(cleaned.contains("- REQUIRED_TOKEN=  # moved to vault secret required-token (https://dev.localhost:8443/secrets/required-token) by coffer migrate   # keep"), "{cleaned}");
        assert!(cleaned.contains("# keep"));
        assert!(cleaned.contains("      PEM: \"\"  # moved to vault secret pem"), "{cleaned}");
        assert!(cleaned.contains("environment: [FLOW_A=, FLOW_B=]"), "{cleaned}");
        assert!(cleaned.contains("environment: {FM: \"\"}"), "{cleaned}");
        assert!(cleaned.contains("#   FM (service flowmap, line 25) -> secret fm"), "{cleaned}");
        // Still valid YAML, with the same shape and empty values.
        let (again, _) = parse_compose(&cleaned).unwrap();
        let vals = values(&again);
        assert_eq!(vals.len(), 14);
        assert_eq!(vals[0], (Some("REQUIRED_TOKEN"), Some("")));
        assert_eq!(vals[9], (Some("PEM"), Some("")));
        assert_eq!(vals[10], (Some("LAST"), Some("")));
    }

    #[test]
    fn compose_problems() {
        assert!(parse_compose("services: [").is_err());
        assert!(parse_compose("- a\n").is_err());
        let err = parse_compose("services:\n  a:\n    environment:\n      K: \"unterminated secret-999\n")
            .err()
            .unwrap();
        assert!(!format!("{err:#}").contains("secret-999"));
        let (items, _) = parse_compose(
            "x: &e {A: 1}\nservices:\n  s:\n    environment:\n      <<: *e\n      B: 2\n  t:\n    environment: *e\n",
        )
        .unwrap();
        assert!(matches!(items[0].value, Found::Problem(_)));
        assert_eq!(values(&items)[1], (Some("B"), Some("2")));
        assert!(matches!(items[2].value, Found::Problem(_)));
    }

    #[test]
    fn cleaned_env_keeps_everything_but_migrated_values() {
        let text = "# head\nexport A=\"one\ntwo\"\nB=keep-me\r\n  C=three # c\r\n";
        let mut items = parse_env(text);
        let _ = plan(&mut items, &Origin::EnvFile(".env".into()));
        let migrated: HashMap<usize, String> = [(0, "a".to_owned()), (2, "c".to_owned())].into();
        let cleaned = clean_env(text, &items, &migrated, "https://dev.localhost:8443");
        assert_eq!(
            cleaned,
            "# head\n# moved to vault secret a (https://dev.localhost:8443/secrets/a) by coffer migrate\nexport A=\nB=keep-me\r\n  # moved to vault secret c (https://dev.localhost:8443/secrets/c) by coffer migrate\r\n  C=\r\n"
        );
    }
}
