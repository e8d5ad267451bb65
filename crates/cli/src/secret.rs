//! `coffer secret …`: the Key Vault secrets operations, like `az keyvault secret`.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use coffer_client::{Secret, SecretAttributes, SecretProperties};
use zeroize::Zeroizing;

use crate::output::{self, Format};
use crate::Connection;

#[derive(Args, Clone)]
pub struct Target {
    /// Vault name.
    #[arg(long, env = "COFFER_VAULT", global = true)]
    vault: Option<String>,
    #[command(flatten)]
    conn: Connection,
}

impl Target {
    fn vault(&self) -> Result<&str> {
        self.vault.as_deref().context("no vault: pass --vault NAME or set COFFER_VAULT")
    }
}

#[derive(Args, Clone, Default)]
pub struct PropertyArgs {
    /// Content type, e.g. text/plain.
    #[arg(long)]
    content_type: Option<String>,
    /// A tag as NAME=VALUE; repeat for more. Replaces all tags.
    #[arg(long = "tag", value_name = "NAME=VALUE")]
    tags: Vec<String>,
    /// Expiry (Unix seconds or RFC 3339).
    #[arg(long)]
    expires: Option<String>,
    /// Not valid before (Unix seconds or RFC 3339).
    #[arg(long)]
    not_before: Option<String>,
}

impl PropertyArgs {
    fn to_properties(&self, enabled: Option<bool>) -> Result<SecretProperties> {
        let tags = if self.tags.is_empty() {
            None
        } else {
            let mut map = BTreeMap::new();
            for t in &self.tags {
                let (k, v) = t.split_once('=').with_context(|| format!("tag '{t}' is not NAME=VALUE"))?;
                map.insert(k.to_owned(), v.to_owned());
            }
            Some(map)
        };
        Ok(SecretProperties {
            content_type: self.content_type.clone(),
            tags,
            attributes: SecretAttributes {
                enabled,
                exp: self.expires.as_deref().map(output::parse_time).transpose()?,
                nbf: self.not_before.as_deref().map(output::parse_time).transpose()?,
                ..Default::default()
            },
        })
    }
}

#[derive(Subcommand)]
pub enum SecretCommand {
    /// Set a secret: each set makes a new version. The value comes from --value, --file or stdin.
    Set {
        name: String,
        /// The value (visible in the process list: prefer --file or stdin).
        #[arg(long, conflicts_with = "file")]
        value: Option<String>,
        /// Read the value from a file.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Create the version disabled.
        #[arg(long)]
        disabled: bool,
        #[command(flatten)]
        props: PropertyArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Show a secret's properties; the value only with --reveal.
    Show {
        name: String,
        #[arg(long)]
        version: Option<String>,
        /// Print the value too.
        #[arg(long)]
        reveal: bool,
        #[command(flatten)]
        target: Target,
    },
    /// List secrets (never values).
    List {
        #[command(flatten)]
        target: Target,
    },
    /// List the versions of a secret.
    ListVersions {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Update a version's properties (latest unless --version).
    Update {
        name: String,
        #[arg(long)]
        version: Option<String>,
        /// Enable or disable the version.
        #[arg(long)]
        enabled: Option<bool>,
        #[command(flatten)]
        props: PropertyArgs,
        #[command(flatten)]
        target: Target,
    },
    /// Soft-delete a secret (all versions); recoverable for the vault's retention period.
    Delete {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// List soft-deleted secrets.
    ListDeleted {
        #[command(flatten)]
        target: Target,
    },
    /// Show a soft-deleted secret.
    ShowDeleted {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Recover a soft-deleted secret.
    Recover {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Permanently delete a soft-deleted secret.
    Purge {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Write an encrypted backup of a secret (all versions) to a file.
    Backup {
        name: String,
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Restore a secret from a backup file.
    Restore {
        #[arg(long)]
        file: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Rotate now: a new version with a generated value (from the secret's rotation policy, or
    /// 32 random letters and digits). Prints the new version, never the value.
    Rotate {
        name: String,
        #[command(flatten)]
        target: Target,
    },
}

fn read_value(value: Option<String>, file: Option<PathBuf>) -> Result<Zeroizing<String>> {
    if let Some(v) = value {
        return Ok(Zeroizing::new(v));
    }
    let mut text = Zeroizing::new(String::new());
    match file {
        Some(path) => {
            let bytes = Zeroizing::new(
                std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?,
            );
            text.push_str(std::str::from_utf8(&bytes).context("the value file is not UTF-8")?);
        }
        None => {
            if std::io::stdin().is_terminal() {
                eprintln!("Enter the secret value, then Ctrl-D:");
            }
            std::io::stdin().read_to_string(&mut text).context("cannot read the value from stdin")?;
            // A value piped with `echo` ends in one newline that is not part of it.
            if text.ends_with('\n') {
                text.pop();
                if text.ends_with('\r') {
                    text.pop();
                }
            }
        }
    }
    Ok(text)
}

fn rows(secrets: &[Secret], with_version: bool) -> Vec<Vec<String>> {
    secrets
        .iter()
        .map(|s| {
            let mut row = vec![s.name().to_owned()];
            if with_version {
                row.push(s.version().unwrap_or_default().to_owned());
            }
            row.extend([
                output::boolean(s.attributes.enabled),
                s.content_type.clone().unwrap_or_default(),
                output::date(s.attributes.updated),
                output::date(s.attributes.exp),
            ]);
            row
        })
        .collect()
}

fn print_list(secrets: &[Secret], with_version: bool, format: Format) -> Result<()> {
    if format == Format::Json {
        return output::json(secrets);
    }
    let mut headers = vec!["Name"];
    if with_version {
        headers.push("Version");
    }
    headers.extend(["Enabled", "ContentType", "Updated", "Expires"]);
    output::table(&headers, &rows(secrets, with_version));
    Ok(())
}

fn print_one(secret: &Secret, format: Format, reveal: bool) -> Result<()> {
    let mut shown = secret.clone();
    if !reveal {
        shown.value = None;
    }
    if format == Format::Json {
        return output::json(&shown);
    }
    let a = &shown.attributes;
    let mut fields = vec![
        ("Name", shown.name().to_owned()),
        ("Version", shown.version().unwrap_or_default().to_owned()),
        ("Id", shown.id.clone()),
        ("Enabled", output::boolean(a.enabled)),
        ("ContentType", shown.content_type.clone().unwrap_or_default()),
        ("Created", output::date(a.created)),
        ("Updated", output::date(a.updated)),
        ("NotBefore", output::date(a.nbf)),
        ("Expires", output::date(a.exp)),
        ("RecoveryLevel", a.recovery_level.clone().unwrap_or_default()),
    ];
    if let Some(tags) = &shown.tags {
        let text: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        fields.push(("Tags", text.join(", ")));
    }
    if let Some(d) = shown.deleted_date {
        fields.push(("Deleted", output::date(Some(d))));
        fields.push(("ScheduledPurge", output::date(shown.scheduled_purge_date)));
    }
    for (k, v) in fields {
        println!("{k:<15} {v}");
    }
    match &shown.value {
        Some(v) => println!("{:<15} {}", "Value", v.expose()),
        None if secret.value.is_some() => println!("{:<15} (hidden; pass --reveal to show)", "Value"),
        None => {}
    }
    Ok(())
}

pub async fn run(cmd: SecretCommand) -> Result<()> {
    match cmd {
        SecretCommand::Set { name, value, file, disabled, props, target } => {
            let value = read_value(value, file)?;
            let properties = props.to_properties(disabled.then_some(false))?;
            let secret =
                target.conn.client()?.set_secret(target.vault()?, &name, &value, &properties).await?;
            print_one(&secret, target.conn.output, false)
        }
        SecretCommand::Show { name, version, reveal, target } => {
            let secret = target.conn.client()?.get_secret(target.vault()?, &name, version.as_deref()).await?;
            print_one(&secret, target.conn.output, reveal)
        }
        SecretCommand::List { target } => {
            let list = target.conn.client()?.list_secrets(target.vault()?).await?;
            print_list(&list, false, target.conn.output)
        }
        SecretCommand::ListVersions { name, target } => {
            let list = target.conn.client()?.list_versions(target.vault()?, &name).await?;
            print_list(&list, true, target.conn.output)
        }
        SecretCommand::Update { name, version, enabled, props, target } => {
            let properties = props.to_properties(enabled)?;
            let secret = target
                .conn
                .client()?
                .update_secret(target.vault()?, &name, version.as_deref(), &properties)
                .await?;
            print_one(&secret, target.conn.output, false)
        }
        SecretCommand::Delete { name, target } => {
            let deleted = target.conn.client()?.delete_secret(target.vault()?, &name).await?;
            print_one(&deleted, target.conn.output, false)
        }
        SecretCommand::ListDeleted { target } => {
            let list = target.conn.client()?.list_deleted_secrets(target.vault()?).await?;
            print_list(&list, false, target.conn.output)
        }
        SecretCommand::ShowDeleted { name, target } => {
            let deleted = target.conn.client()?.get_deleted_secret(target.vault()?, &name).await?;
            print_one(&deleted, target.conn.output, false)
        }
        SecretCommand::Recover { name, target } => {
            let secret = target.conn.client()?.recover_secret(target.vault()?, &name).await?;
            print_one(&secret, target.conn.output, false)
        }
        SecretCommand::Purge { name, target } => {
            target.conn.client()?.purge_secret(target.vault()?, &name).await?;
            eprintln!("purged {name}");
            Ok(())
        }
        SecretCommand::Backup { name, file, target } => {
            let blob = target.conn.client()?.backup_secret(target.vault()?, &name).await?;
            if file.exists() {
                bail!("{} exists; choose a new file name", file.display());
            }
            std::fs::write(&file, blob.as_bytes())
                .with_context(|| format!("cannot write {}", file.display()))?;
            eprintln!("wrote the encrypted backup of {name} to {}", file.display());
            Ok(())
        }
        SecretCommand::Restore { file, target } => {
            let blob =
                std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let secret = target.conn.client()?.restore_secret(target.vault()?, blob.trim()).await?;
            print_one(&secret, target.conn.output, false)
        }
        SecretCommand::Rotate { name, target } => {
            crate::events::rotate_secret(&target.conn, target.vault()?, &name).await
        }
    }
}
