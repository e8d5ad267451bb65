//! `coffer event …` (webhook subscriptions to secret events), `coffer rotation …` (rotation
//! policies) and `coffer secret rotate`.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use coffer_client::Method;
use serde_json::{json, Value};

use crate::output::{self, Format};
use crate::Connection;

#[derive(Subcommand)]
pub enum EventsCommand {
    /// Webhook subscriptions to secret events (CloudEvents 1.0, signed with HMAC-SHA256).
    #[command(subcommand)]
    Event(EventCommand),
    /// Rotation policies: rotate a secret on a schedule with a built-in generator, or notify only.
    #[command(subcommand)]
    Rotation(RotationCommand),
}

#[derive(Args, Clone)]
pub struct VaultTarget {
    /// Vault name.
    #[arg(long, env = "COFFER_VAULT", global = true)]
    vault: Option<String>,
    #[command(flatten)]
    conn: Connection,
}

impl VaultTarget {
    fn vault(&self) -> Result<&str> {
        self.vault.as_deref().context("no vault: pass --vault NAME or set COFFER_VAULT")
    }
}

/// [`Connection`] for `event subscribe`, whose `--url` is the webhook's: the server URL is
/// `--server` (or COFFER_URL).
#[derive(Args, Clone)]
pub struct ServerArgs {
    /// Server root URL, e.g. https://localhost:8443.
    #[arg(long = "server", env = "COFFER_URL")]
    server_url: Option<String>,
    /// Bearer token. Prefer the environment variable over the flag (flags show in `ps`).
    #[arg(long, env = "COFFER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM file of the CA to trust (the dev CA is DATA_DIR/ca.pem). Falls back to SSL_CERT_FILE.
    #[arg(long, env = "COFFER_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Format::Table)]
    output: Format,
}

impl From<ServerArgs> for Connection {
    fn from(a: ServerArgs) -> Self {
        Connection { url: a.server_url, token: a.token, ca_file: a.ca_file, output: a.output }
    }
}

#[derive(Subcommand)]
pub enum EventCommand {
    /// Send a vault's secret events to a webhook. Prints the subscription id and its signing
    /// secret, once: receivers check `X-Coffer-Signature: sha256=HMAC(secret, TIMESTAMP "." BODY)`
    /// with `X-Coffer-Timestamp`.
    Subscribe {
        /// Where to POST the events (http:// or https://).
        #[arg(long = "url", value_name = "URL")]
        webhook: String,
        /// Only these event types (repeat): SecretNewVersionCreated, SecretNearExpiry, SecretExpired
        /// (the Microsoft.KeyVault. prefix is optional). Default: all.
        #[arg(long = "type", value_name = "TYPE")]
        types: Vec<String>,
        /// Only events about this secret (case-insensitive).
        #[arg(long)]
        secret: Option<String>,
        /// How long before expiry SecretNearExpiry fires, e.g. 30d, 12h, 90s. Default 30d.
        #[arg(long, value_name = "DURATION")]
        near_expiry: Option<String>,
        /// Vault name.
        #[arg(long, env = "COFFER_VAULT")]
        vault: Option<String>,
        #[command(flatten)]
        conn: ServerArgs,
    },
    /// List subscriptions with their delivery state (all vaults you can read, or --vault).
    List {
        /// Only this vault.
        #[arg(long)]
        vault: Option<String>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Show one subscription.
    Show {
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Delete a subscription; its undelivered events are dropped.
    Delete {
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Subcommand)]
pub enum RotationCommand {
    /// Set (replace) a secret's rotation policy. Rotation happens --every DURATION and/or
    /// --before-expiry DURATION before the current version's expiry, whichever comes first.
    Set {
        name: String,
        /// Rotate when the current version is this old, e.g. 30d.
        #[arg(long, value_name = "DURATION")]
        every: Option<String>,
        /// Rotate this long before the current version expires, e.g. 7d.
        #[arg(long, value_name = "DURATION")]
        before_expiry: Option<String>,
        /// password:LEN[:upper,lower,digit,symbol] | bytes:LEN[:base64|hex] | uuid.
        /// Default password:32:upper,lower,digit.
        #[arg(long, value_name = "SPEC")]
        generator: Option<String>,
        /// New versions expire this long after they are made, e.g. 90d.
        #[arg(long, value_name = "DURATION")]
        expires_after: Option<String>,
        /// An outside system rotates the secret: never generate, only send the near-expiry and
        /// expired events to subscribers.
        #[arg(long, conflicts_with_all = ["generator", "expires_after"])]
        notify_only: bool,
        #[command(flatten)]
        target: VaultTarget,
    },
    /// Show a secret's rotation policy and when it is next due.
    Show {
        name: String,
        #[command(flatten)]
        target: VaultTarget,
    },
    /// List the rotation policies of a vault.
    List {
        #[command(flatten)]
        target: VaultTarget,
    },
    /// Remove a secret's rotation policy.
    Remove {
        name: String,
        #[command(flatten)]
        target: VaultTarget,
    },
}

/// Parses `30d`, `12h`, `15m`, `90s`, `2w`, combinations like `1h30m`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<i64> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<i64>() {
        if secs > 0 {
            return Ok(secs);
        }
    }
    let mut total: i64 = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            'w' => 7 * 86_400,
            _ => bail!("'{text}' is not a duration: use e.g. 30d, 12h, 15m, 90s or 1h30m"),
        };
        let n: i64 = number
            .parse()
            .with_context(|| format!("'{text}' is not a duration: a number goes before each unit"))?;
        total = n.checked_mul(unit).and_then(|s| total.checked_add(s)).context("the duration is too long")?;
        number.clear();
    }
    if !number.is_empty() || total <= 0 {
        bail!("'{text}' is not a duration: use e.g. 30d, 12h, 15m, 90s or 1h30m");
    }
    Ok(total)
}

/// Seconds as the largest whole units: `30d`, `1h30m`, `90s`.
pub fn format_duration(secs: i64) -> String {
    if secs <= 0 {
        return format!("{secs}s");
    }
    let mut rest = secs;
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)] {
        if rest >= size {
            out.push_str(&format!("{}{unit}", rest / size));
            rest %= size;
        }
    }
    out
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn duration_field(v: &Value) -> String {
    v.as_i64().map(format_duration).unwrap_or_default()
}

fn short_type(t: &str) -> &str {
    t.strip_prefix("Microsoft.KeyVault.").unwrap_or(t)
}

fn types_text(v: &Value) -> String {
    let types: Vec<&str> =
        v["types"].as_array().into_iter().flatten().filter_map(Value::as_str).map(short_type).collect();
    if types.len() == 3 {
        "all".into()
    } else {
        types.join(",")
    }
}

fn print_fields(fields: &[(&str, String)]) {
    for (k, v) in fields {
        println!("{k:<17} {v}");
    }
}

fn print_subscription(v: &Value) {
    let mut fields = vec![
        ("Id", text(&v["id"])),
        ("Vault", text(&v["vault"])),
        ("Url", text(&v["url"])),
        ("Types", types_text(v)),
        ("Secret", text(&v["secret"])),
        ("NearExpiry", duration_field(&v["nearExpirySecs"])),
        ("Created", output::date(v["created"].as_i64())),
    ];
    if v.get("pending").is_some() {
        fields.push(("Pending", text(&v["pending"])));
        fields.push(("Delivered", text(&v["delivered"])));
        fields.push(("FailedAttempts", text(&v["failedAttempts"])));
        fields.push(("NextAttempt", output::date(v["nextAttempt"].as_i64())));
        fields.push(("LastError", text(&v["lastError"])));
    }
    print_fields(&fields);
}

fn print_policy(v: &Value) {
    print_fields(&[
        ("Name", text(&v["name"])),
        ("Vault", text(&v["vault"])),
        ("Every", duration_field(&v["everySecs"])),
        ("BeforeExpiry", duration_field(&v["beforeExpirySecs"])),
        (
            "Generator",
            if v["notifyOnly"] == json!(true) { "(notify only)".into() } else { text(&v["generator"]) },
        ),
        ("ExpiresAfter", duration_field(&v["expiresAfterSecs"])),
        ("NextDue", output::date(v["nextDue"].as_i64())),
        ("LastRotated", output::date(v["lastRotated"].as_i64())),
    ]);
}

fn show(format: Format, v: &Value, table: impl Fn(&Value)) -> Result<()> {
    if format == Format::Json {
        return output::json(v);
    }
    table(v);
    Ok(())
}

fn segment(name: &str) -> String {
    form_urlencoded::byte_serialize(name.as_bytes()).collect()
}

pub async fn run(cmd: EventsCommand) -> Result<()> {
    match cmd {
        EventsCommand::Event(cmd) => event(cmd).await,
        EventsCommand::Rotation(cmd) => rotation(cmd).await,
    }
}

async fn event(cmd: EventCommand) -> Result<()> {
    match cmd {
        EventCommand::Subscribe { webhook, types, secret, near_expiry, vault, conn } => {
            let conn = Connection::from(conn);
            let vault = vault.context("no vault: pass --vault NAME or set COFFER_VAULT")?;
            let near = near_expiry.as_deref().map(parse_duration).transpose()?;
            let body = json!({
                "vault": vault, "url": webhook, "types": types, "secret": secret, "nearExpirySecs": near,
            });
            let out = conn.client()?.admin(Method::POST, "event-subscriptions", Some(&body)).await?;
            if conn.output == Format::Json {
                return output::json(&out);
            }
            print_subscription(&out);
            println!("{:<17} {}", "SigningSecret", text(&out["signingSecret"]));
            eprintln!(
                "The signing secret is shown only now: give it to the receiver to verify X-Coffer-Signature."
            );
            Ok(())
        }
        EventCommand::List { vault, conn } => {
            let path = match &vault {
                Some(v) => format!("event-subscriptions?vault={}", segment(v)),
                None => "event-subscriptions".into(),
            };
            let out = conn.client()?.admin(Method::GET, &path, None).await?;
            let items = out["value"].as_array().cloned().unwrap_or_default();
            if conn.output == Format::Json {
                return output::json(&items);
            }
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|v| {
                    vec![
                        text(&v["id"]),
                        text(&v["vault"]),
                        text(&v["url"]),
                        types_text(v),
                        text(&v["secret"]),
                        text(&v["pending"]),
                        text(&v["failedAttempts"]),
                        text(&v["lastError"]),
                    ]
                })
                .collect();
            output::table(
                &["Id", "Vault", "Url", "Types", "Secret", "Pending", "Failed", "LastError"],
                &rows,
            );
            Ok(())
        }
        EventCommand::Show { id, conn } => {
            let out = conn
                .client()?
                .admin(Method::GET, &format!("event-subscriptions/{}", segment(&id)), None)
                .await?;
            show(conn.output, &out, print_subscription)
        }
        EventCommand::Delete { id, conn } => {
            conn.client()?
                .admin(Method::DELETE, &format!("event-subscriptions/{}", segment(&id)), None)
                .await?;
            eprintln!("deleted event subscription {id}");
            Ok(())
        }
    }
}

fn policy_path(vault: &str, name: Option<&str>) -> String {
    match name {
        Some(n) => format!("vaults/{}/rotation-policies/{}", segment(vault), segment(n)),
        None => format!("vaults/{}/rotation-policies", segment(vault)),
    }
}

async fn rotation(cmd: RotationCommand) -> Result<()> {
    match cmd {
        RotationCommand::Set {
            name,
            every,
            before_expiry,
            generator,
            expires_after,
            notify_only,
            target,
        } => {
            let secs = |d: &Option<String>| d.as_deref().map(parse_duration).transpose();
            let body = json!({
                "everySecs": secs(&every)?, "beforeExpirySecs": secs(&before_expiry)?, "generator": generator,
                "expiresAfterSecs": secs(&expires_after)?, "notifyOnly": notify_only,
            });
            let path = policy_path(target.vault()?, Some(&name));
            let out = target.conn.client()?.admin(Method::PUT, &path, Some(&body)).await?;
            show(target.conn.output, &out, print_policy)
        }
        RotationCommand::Show { name, target } => {
            let out = target
                .conn
                .client()?
                .admin(Method::GET, &policy_path(target.vault()?, Some(&name)), None)
                .await?;
            show(target.conn.output, &out, print_policy)
        }
        RotationCommand::List { target } => {
            let out =
                target.conn.client()?.admin(Method::GET, &policy_path(target.vault()?, None), None).await?;
            let items = out["value"].as_array().cloned().unwrap_or_default();
            if target.conn.output == Format::Json {
                return output::json(&items);
            }
            let rows: Vec<Vec<String>> = items
                .iter()
                .map(|v| {
                    vec![
                        text(&v["name"]),
                        duration_field(&v["everySecs"]),
                        duration_field(&v["beforeExpirySecs"]),
                        if v["notifyOnly"] == json!(true) {
                            "(notify only)".into()
                        } else {
                            text(&v["generator"])
                        },
                        output::date(v["nextDue"].as_i64()),
                    ]
                })
                .collect();
            output::table(&["Name", "Every", "BeforeExpiry", "Generator", "NextDue"], &rows);
            Ok(())
        }
        RotationCommand::Remove { name, target } => {
            target
                .conn
                .client()?
                .admin(Method::DELETE, &policy_path(target.vault()?, Some(&name)), None)
                .await?;
            eprintln!("removed the rotation policy of {name}");
            Ok(())
        }
    }
}

/// `coffer secret rotate NAME`: a new version now, from the secret's policy (or 32 random
/// letters and digits). Prints the new version, never the value.
pub async fn rotate_secret(conn: &Connection, vault: &str, name: &str) -> Result<()> {
    let path = format!("vaults/{}/secrets/{}/rotate", segment(vault), segment(name));
    let out = conn.client()?.admin(Method::POST, &path, None).await?;
    if conn.output == Format::Json {
        return output::json(&out);
    }
    print_fields(&[
        ("Name", text(&out["name"])),
        ("Version", text(&out["version"])),
        ("Id", text(&out["id"])),
        ("Generator", text(&out["generator"])),
        ("Created", output::date(out["attributes"]["created"].as_i64())),
        ("Expires", output::date(out["attributes"]["exp"].as_i64())),
    ]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d").unwrap(), 30 * 86_400);
        assert_eq!(parse_duration("1h30m").unwrap(), 5_400);
        assert_eq!(parse_duration("90").unwrap(), 90);
        assert_eq!(parse_duration("2w").unwrap(), 14 * 86_400);
        for bad in ["", "0", "-5", "d", "5x", "5d3", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
        assert_eq!(format_duration(5_400), "1h30m");
        assert_eq!(format_duration(30 * 86_400), "30d");
        assert_eq!(format_duration(61), "1m1s");
    }
}
