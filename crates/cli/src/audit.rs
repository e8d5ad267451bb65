//! `coffer audit query|verify|public-key`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use coffer_client::Method;
use serde_json::Value;

use crate::output::{self, Format};
use crate::Connection;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Query the audit log (answered from its index), in log order: oldest record first.
    Query {
        /// From this time (RFC 3339 or Unix seconds).
        #[arg(long)]
        since: Option<String>,
        #[arg(long)]
        until: Option<String>,
        /// Principal name or object id.
        #[arg(long)]
        principal: Option<String>,
        #[arg(long)]
        secret: Option<String>,
        #[arg(long)]
        vault: Option<String>,
        /// Operation name, e.g. SecretGet.
        #[arg(long)]
        operation: Option<String>,
        /// allowed, denied or failed.
        #[arg(long)]
        result: Option<String>,
        /// Records per page (max 1000).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Follow every page.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Check the hash chain and the signed checkpoints; names the first bad record.
    Verify {
        /// A log file or the audit directory (default: DATA_DIR/audit).
        #[arg(long)]
        from: Option<PathBuf>,
        #[arg(long, env = "COFFER_DATA_DIR", default_value = "./coffer-data")]
        data_dir: PathBuf,
        /// The exported public key (PEM). Default: the copy in the audit directory — for
        /// evidence against someone who can write that directory, pass a copy kept elsewhere.
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
    /// Print the public key that verifies the audit checkpoints.
    PublicKey {
        #[command(flatten)]
        conn: Connection,
    },
}

pub async fn run(cmd: AuditCommand) -> Result<()> {
    match cmd {
        AuditCommand::Query {
            since,
            until,
            principal,
            secret,
            vault,
            operation,
            result,
            limit,
            all,
            conn,
        } => {
            let client = conn.client()?;
            let mut params: Vec<(&str, String)> = Vec::new();
            for (k, v) in [
                ("since", since),
                ("until", until),
                ("principal", principal),
                ("secret", secret),
                ("vault", vault),
                ("operation", operation),
                ("result", result),
            ] {
                if let Some(v) = v {
                    params.push((k, v));
                }
            }
            params.push(("limit", limit.to_string()));
            let mut records: Vec<Value> = Vec::new();
            let mut after: Option<u64> = None;
            loop {
                let mut query: Vec<(&str, String)> = params.clone();
                if let Some(a) = after {
                    query.push(("after", a.to_string()));
                }
                let qs: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(query).finish();
                let page = client.admin(Method::GET, &format!("audit?{qs}"), None).await?;
                records.extend(page["value"].as_array().cloned().unwrap_or_default());
                after = page["next"].as_u64();
                if !all || after.is_none() {
                    break;
                }
            }
            if conn.output == Format::Json {
                return output::json(&records);
            }
            let rows: Vec<Vec<String>> = records
                .iter()
                .map(|r| {
                    let p = &r["properties"];
                    let target = match (p["vault"].as_str(), p["secret"].as_str()) {
                        (Some(v), Some(s)) => format!("{v}/{s}"),
                        (Some(v), None) => v.to_owned(),
                        _ => String::new(),
                    };
                    vec![
                        r["time"].as_str().unwrap_or_default().to_owned(),
                        r["operationName"].as_str().unwrap_or_default().to_owned(),
                        r["resultType"].as_str().unwrap_or_default().to_owned(),
                        r["statusCode"].to_string(),
                        r["identity"]["displayName"].as_str().unwrap_or_default().to_owned(),
                        target,
                        r["callerIpAddress"].as_str().unwrap_or_default().to_owned(),
                    ]
                })
                .collect();
            output::table(
                &["Time", "Operation", "Result", "Status", "Principal", "Resource", "Caller"],
                &rows,
            );
            if after.is_some() {
                eprintln!("more records match: pass --all, or narrow the query");
            }
            Ok(())
        }
        AuditCommand::Verify { from, data_dir, public_key } => {
            let dir = data_dir.join("audit");
            let target = from.unwrap_or_else(|| dir.clone());
            let key_file = public_key.unwrap_or_else(|| dir.join(coffer_server::AUDIT_PUBLIC_KEY_FILE));
            let pem = std::fs::read_to_string(&key_file).with_context(|| {
                format!("cannot read the public key {} (pass --public-key)", key_file.display())
            })?;
            let report = coffer_audit::verify(&target, &pem);
            eprintln!(
                "{} records, {} checkpoints in {} file(s)",
                report.records,
                report.checkpoints,
                report.files.len()
            );
            // E.g. how far retention or the size bound pruned: what the oldest file starts after.
            for note in &report.notes {
                eprintln!("note: {note}");
            }
            if report.ok {
                println!("audit log verified: OK");
                return Ok(());
            }
            for problem in &report.problems {
                println!("PROBLEM: {problem}");
            }
            bail!(
                "the audit log failed verification ({} problem(s)); the first is listed first",
                report.problems.len()
            )
        }
        AuditCommand::PublicKey { conn } => {
            let out = conn.client()?.admin(Method::GET, "audit/public-key", None).await?;
            print!("{}", out["publicKey"].as_str().unwrap_or_default());
            Ok(())
        }
    }
}
