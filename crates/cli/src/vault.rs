//! `coffer vault create|list|show|delete`.

use anyhow::Result;
use clap::Subcommand;
use coffer_client::VaultInfo;

use crate::output::{self, Format};
use crate::Connection;

#[derive(Subcommand)]
pub enum VaultCommand {
    /// Create a vault. Retention and purge protection are fixed at creation, as in Key Vault.
    Create {
        name: String,
        /// Days a deleted secret stays recoverable (7-90).
        #[arg(long, default_value_t = 90)]
        retention_days: i64,
        /// Forbid purging deleted secrets before their retention ends.
        #[arg(long)]
        purge_protection: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// List vaults.
    List {
        #[command(flatten)]
        conn: Connection,
    },
    /// Show one vault.
    Show {
        name: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Delete a vault (it must be empty unless --force).
    Delete {
        name: String,
        /// Delete even if it holds secrets (they are destroyed).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        conn: Connection,
    },
}

fn print(vaults: &[VaultInfo], format: Format) -> Result<()> {
    if format == Format::Json {
        return output::json(vaults);
    }
    let rows: Vec<Vec<String>> = vaults
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.url.clone(),
                v.retention_days.to_string(),
                output::boolean(Some(v.purge_protection)),
                v.secrets.map(|n| n.to_string()).unwrap_or_default(),
            ]
        })
        .collect();
    output::table(&["Name", "URL", "RetentionDays", "PurgeProtection", "Secrets"], &rows);
    Ok(())
}

pub async fn run(cmd: VaultCommand) -> Result<()> {
    match cmd {
        VaultCommand::Create { name, retention_days, purge_protection, conn } => {
            let v = conn.client()?.create_vault(&name, Some(retention_days), purge_protection).await?;
            if conn.output == Format::Json {
                return output::json(&v);
            }
            print(&[v], conn.output)
        }
        VaultCommand::List { conn } => print(&conn.client()?.list_vaults().await?, conn.output),
        VaultCommand::Show { name, conn } => {
            let v = conn.client()?.get_vault(&name).await?;
            if conn.output == Format::Json {
                return output::json(&v);
            }
            print(&[v], conn.output)
        }
        VaultCommand::Delete { name, force, conn } => {
            conn.client()?.delete_vault(&name, force).await?;
            eprintln!("deleted vault {name}");
            Ok(())
        }
    }
}
