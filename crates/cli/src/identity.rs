//! Identity and access commands: `coffer identity|sp|user|group|role|federation|agent`.
//! They speak Coffer's admin API; principals are named by name, object id or client id.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use coffer_client::Method;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::output::{self, Format};
use crate::Connection;

#[derive(Subcommand)]
pub enum IdentityCommand {
    /// Create a managed identity (a workload's passwordless identity).
    Create {
        name: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// List principals of every kind.
    List {
        #[command(flatten)]
        conn: Connection,
    },
    /// Show a principal.
    Show {
        name: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Disable a principal: its tokens stop working on the next request.
    Disable {
        name: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Enable a disabled principal.
    Enable {
        name: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Delete a principal with its credentials, bindings and role assignments.
    Delete {
        name: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Bind a managed identity to processes on an agent's host (selectors combine with AND).
    Bind {
        name: String,
        #[arg(long)]
        uid: Option<u32>,
        #[arg(long)]
        exe: Option<String>,
        #[arg(long)]
        unit: Option<String>,
        /// cgroup path prefix, e.g. /system.slice/app.service
        #[arg(long)]
        cgroup: Option<String>,
        /// Also match processes in another user or mount namespace than the agent's (containers,
        /// `unshare`). Their uid and cgroup are still checked; an --exe never matches a file that
        /// differs from the one at that path on the host.
        #[arg(long)]
        allow_namespaced: bool,
        /// The agent whose host runs the workload (the dev server's is `dev-agent`).
        #[arg(long, default_value = coffer_server::DEV_AGENT_NAME)]
        agent: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// List bindings.
    Bindings {
        #[command(flatten)]
        conn: Connection,
    },
    /// Remove a binding by id.
    Unbind {
        binding_id: String,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Subcommand)]
pub enum SpCommand {
    /// Create a service principal (for CI and automation); prints its client secret once, or
    /// registers a certificate (PEM) whose key signs client assertions.
    Create {
        name: String,
        #[arg(long)]
        cert: Option<PathBuf>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Add a new client secret (printed once).
    NewSecret {
        name: String,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Subcommand)]
pub enum UserCommand {
    /// Create a user; the password comes from --password-file, stdin, or a prompt.
    Create {
        name: String,
        #[arg(long)]
        password_file: Option<PathBuf>,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Subcommand)]
pub enum GroupCommand {
    Create {
        name: String,
        #[command(flatten)]
        conn: Connection,
    },
    AddMember {
        group: String,
        member: String,
        #[command(flatten)]
        conn: Connection,
    },
    RemoveMember {
        group: String,
        member: String,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Subcommand)]
pub enum RoleCommand {
    /// Assign a role to a principal or group at a scope: /, /vaults/NAME, /vaults/NAME/secrets/SECRET.
    Assign {
        #[arg(long)]
        principal: String,
        #[arg(long)]
        role: String,
        #[arg(long, default_value = "/")]
        scope: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// Remove a role assignment, by id or by principal + role + scope.
    Remove {
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        principal: Option<String>,
        #[arg(long)]
        role: Option<String>,
        #[arg(long)]
        scope: Option<String>,
        #[command(flatten)]
        conn: Connection,
    },
    /// List role assignments.
    List {
        #[arg(long)]
        principal: Option<String>,
        #[command(flatten)]
        conn: Connection,
    },
    /// List role definitions (built-in and custom).
    Definitions {
        #[command(flatten)]
        conn: Connection,
    },
    /// Define a custom role by its actions (patterns with `*`).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        description: Option<String>,
        #[arg(long = "action")]
        actions: Vec<String>,
        #[arg(long = "data-action")]
        data_actions: Vec<String>,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Subcommand)]
pub enum FederationCommand {
    /// Trust tokens from an outside OIDC issuer (issuer + subject + audience) for a principal.
    Add {
        principal: String,
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        subject: String,
        #[arg(long)]
        audience: Option<String>,
        /// The issuer's JWKS document, from a file.
        #[arg(long, conflicts_with = "jwks_url")]
        jwks_file: Option<PathBuf>,
        /// Or where to fetch it.
        #[arg(long)]
        jwks_url: Option<String>,
        #[command(flatten)]
        conn: Connection,
    },
    List {
        #[command(flatten)]
        conn: Connection,
    },
    Remove {
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Subcommand)]
pub enum AgentCommand {
    /// Create an agent and print a one-time join token (valid one hour).
    Create {
        name: String,
        #[command(flatten)]
        conn: Connection,
    },
    /// On the agent's host: redeem a join token for the node credential.
    Join {
        /// Server root URL, e.g. https://vault.example.com
        #[arg(long, env = "COFFER_URL")]
        server: String,
        #[arg(long, env = "COFFER_JOIN_TOKEN", hide_env_values = true)]
        join_token: String,
        /// Where to write the node credential (0600; must not exist).
        #[arg(long)]
        credential_file: PathBuf,
        #[arg(long, env = "COFFER_CA_FILE")]
        ca_file: Option<PathBuf>,
    },
    /// Serve the managed-identity endpoint for this host's workloads.
    Run {
        #[arg(long)]
        credential_file: PathBuf,
        /// Loopback address for IDENTITY_ENDPOINT / AZURE_POD_IDENTITY_AUTHORITY_HOST.
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// The IDENTITY_HEADER value workloads send (an anti-SSRF marker, not a credential).
        /// Random per start when not given; the ready line prints it.
        #[arg(long)]
        identity_header: Option<String>,
        #[arg(long, env = "COFFER_CA_FILE")]
        ca_file: Option<PathBuf>,
    },
}

fn print_value(value: &Value, format: Format, columns: &[(&str, &str)]) -> Result<()> {
    if format == Format::Json {
        return output::json(value);
    }
    let items: Vec<&Value> = match value.get("value").and_then(Value::as_array) {
        Some(list) => list.iter().collect(),
        None => vec![value],
    };
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Bool(b) => output::boolean(Some(*b)),
        other => other.to_string(),
    };
    let rows: Vec<Vec<String>> =
        items.iter().map(|item| columns.iter().map(|(_, key)| text(&item[*key])).collect()).collect();
    output::table(&columns.iter().map(|(h, _)| *h).collect::<Vec<_>>(), &rows);
    Ok(())
}

const PRINCIPAL_COLUMNS: [(&str, &str); 5] = [
    ("Name", "name"),
    ("Type", "type"),
    ("Enabled", "enabled"),
    ("ClientId", "clientId"),
    ("ObjectId", "objectId"),
];

pub async fn identity(cmd: IdentityCommand) -> Result<()> {
    match cmd {
        IdentityCommand::Create { name, conn } => {
            let out = conn
                .client()?
                .admin(Method::POST, "principals", Some(&json!({"name": name, "type": "managed-identity"})))
                .await?;
            print_value(&out, conn.output, &PRINCIPAL_COLUMNS)
        }
        IdentityCommand::List { conn } => {
            let out = conn.client()?.admin(Method::GET, "principals", None).await?;
            print_value(&out, conn.output, &PRINCIPAL_COLUMNS)
        }
        IdentityCommand::Show { name, conn } => {
            let out = conn.client()?.admin(Method::GET, &format!("principals/{name}"), None).await?;
            print_value(&out, conn.output, &PRINCIPAL_COLUMNS)
        }
        IdentityCommand::Disable { name, conn } => set_enabled(&conn, &name, false).await,
        IdentityCommand::Enable { name, conn } => set_enabled(&conn, &name, true).await,
        IdentityCommand::Delete { name, conn } => {
            conn.client()?.admin(Method::DELETE, &format!("principals/{name}"), None).await?;
            eprintln!("deleted {name}");
            Ok(())
        }
        IdentityCommand::Bind { name, uid, exe, unit, cgroup, allow_namespaced, agent, conn } => {
            if uid.is_none() && exe.is_none() && unit.is_none() && cgroup.is_none() {
                bail!("give at least one selector: --uid, --exe, --unit or --cgroup");
            }
            let body = json!({"identity": name, "agent": agent, "uid": uid, "exe": exe, "unit": unit, "cgroupPrefix": cgroup,
                "allowNamespaced": allow_namespaced});
            let out = conn.client()?.admin(Method::POST, "bindings", Some(&body)).await?;
            print_value(&out, conn.output, &BINDING_COLUMNS)
        }
        IdentityCommand::Bindings { conn } => {
            let out = conn.client()?.admin(Method::GET, "bindings", None).await?;
            print_value(&out, conn.output, &BINDING_COLUMNS)
        }
        IdentityCommand::Unbind { binding_id, conn } => {
            conn.client()?.admin(Method::DELETE, &format!("bindings/{binding_id}"), None).await?;
            eprintln!("removed binding {binding_id}");
            Ok(())
        }
    }
}

const BINDING_COLUMNS: [(&str, &str); 8] = [
    ("Id", "id"),
    ("Identity", "identity_id"),
    ("Agent", "agent_id"),
    ("Uid", "uid"),
    ("Exe", "exe"),
    ("Unit", "unit"),
    ("CgroupPrefix", "cgroup_prefix"),
    ("AllowNamespaced", "allow_namespaced"),
];

async fn set_enabled(conn: &Connection, name: &str, enabled: bool) -> Result<()> {
    let out = conn
        .client()?
        .admin(Method::PATCH, &format!("principals/{name}"), Some(&json!({"enabled": enabled})))
        .await?;
    print_value(&out, conn.output, &PRINCIPAL_COLUMNS)
}

fn print_secret(out: &Value, format: Format) -> Result<()> {
    if format == Format::Json {
        return output::json(out);
    }
    println!("ClientId      {}", out["clientId"].as_str().unwrap_or_default());
    println!("ClientSecret  {}", out["clientSecret"].as_str().unwrap_or_default());
    eprintln!("The client secret is shown only now; store it in your CI's secret store.");
    Ok(())
}

pub async fn sp(cmd: SpCommand) -> Result<()> {
    match cmd {
        SpCommand::Create { name, cert, conn } => {
            let certificate = cert
                .map(|p| std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display())))
                .transpose()?;
            let body = json!({"name": name, "type": "service-principal", "certificate": certificate});
            let out = conn.client()?.admin(Method::POST, "principals", Some(&body)).await?;
            if out.get("certificateId").is_some() {
                return print_value(&out, conn.output, &PRINCIPAL_COLUMNS);
            }
            print_secret(&out, conn.output)
        }
        SpCommand::NewSecret { name, conn } => {
            let out = conn.client()?.admin(Method::POST, &format!("principals/{name}/secrets"), None).await?;
            print_secret(&out, conn.output)
        }
    }
}

pub async fn user(cmd: UserCommand) -> Result<()> {
    match cmd {
        UserCommand::Create { name, password_file, conn } => {
            let password = match password_file {
                Some(path) => Zeroizing::new(
                    std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?
                        .trim_end()
                        .to_owned(),
                ),
                None if std::io::stdin().is_terminal() => {
                    Zeroizing::new(rpassword::prompt_password("Password: ")?)
                }
                None => {
                    let mut text = Zeroizing::new(String::new());
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)?;
                    Zeroizing::new(text.trim_end().to_owned())
                }
            };
            let body = json!({"name": name, "type": "user", "password": password.as_str()});
            let out = conn.client()?.admin(Method::POST, "principals", Some(&body)).await?;
            print_value(&out, conn.output, &PRINCIPAL_COLUMNS)
        }
    }
}

pub async fn group(cmd: GroupCommand) -> Result<()> {
    match cmd {
        GroupCommand::Create { name, conn } => {
            let out = conn
                .client()?
                .admin(Method::POST, "principals", Some(&json!({"name": name, "type": "group"})))
                .await?;
            print_value(&out, conn.output, &PRINCIPAL_COLUMNS)
        }
        GroupCommand::AddMember { group, member, conn } => {
            conn.client()?
                .admin(Method::POST, &format!("principals/{group}/members"), Some(&json!({"member": member})))
                .await?;
            eprintln!("added {member} to {group}");
            Ok(())
        }
        GroupCommand::RemoveMember { group, member, conn } => {
            conn.client()?
                .admin(Method::DELETE, &format!("principals/{group}/members/{member}"), None)
                .await?;
            eprintln!("removed {member} from {group}");
            Ok(())
        }
    }
}

const ASSIGNMENT_COLUMNS: [(&str, &str); 4] =
    [("Principal", "principalName"), ("Role", "roleName"), ("Scope", "scope"), ("Id", "id")];

pub async fn role(cmd: RoleCommand) -> Result<()> {
    match cmd {
        RoleCommand::Assign { principal, role, scope, conn } => {
            let body = json!({"principal": principal, "role": role, "scope": scope});
            let out = conn.client()?.admin(Method::POST, "role-assignments", Some(&body)).await?;
            print_value(&out, conn.output, &ASSIGNMENT_COLUMNS)
        }
        RoleCommand::Remove { id, principal, role, scope, conn } => {
            let client = conn.client()?;
            let id = match id {
                Some(id) => id,
                None => {
                    let (Some(p), Some(r), Some(s)) = (principal, role, scope) else {
                        bail!("give --id, or --principal, --role and --scope");
                    };
                    let all = client.admin(Method::GET, "role-assignments", None).await?;
                    let shown = client.admin(Method::GET, &format!("principals/{p}"), None).await?;
                    let oid = shown["objectId"].as_str().unwrap_or_default().to_owned();
                    all["value"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|a| {
                            a["principalId"] == oid.as_str()
                                && (a["roleName"].as_str().is_some_and(|n| n.eq_ignore_ascii_case(&r))
                                    || a["roleDefinitionId"] == r.as_str())
                                && a["scope"].as_str().map(|x| x.trim_end_matches('/').to_ascii_lowercase())
                                    == Some(s.trim_end_matches('/').to_ascii_lowercase())
                        })
                        .and_then(|a| a["id"].as_str().map(str::to_owned))
                        .with_context(|| format!("no assignment of '{r}' to '{p}' at '{s}'"))?
                }
            };
            client.admin(Method::DELETE, &format!("role-assignments/{id}"), None).await?;
            eprintln!("removed role assignment {id}");
            Ok(())
        }
        RoleCommand::List { principal, conn } => {
            let mut out = conn.client()?.admin(Method::GET, "role-assignments", None).await?;
            if let (Some(p), Some(list)) = (principal, out.get_mut("value").and_then(Value::as_array_mut)) {
                list.retain(|a| {
                    a["principalName"].as_str() == Some(p.as_str())
                        || a["principalId"].as_str() == Some(p.as_str())
                });
            }
            print_value(&out, conn.output, &ASSIGNMENT_COLUMNS)
        }
        RoleCommand::Definitions { conn } => {
            let out = conn.client()?.admin(Method::GET, "role-definitions", None).await?;
            print_value(
                &out,
                conn.output,
                &[("RoleName", "roleName"), ("Type", "type"), ("Id", "id"), ("Description", "description")],
            )
        }
        RoleCommand::Create { name, description, actions, data_actions, conn } => {
            let body = json!({"roleName": name, "description": description, "actions": actions, "dataActions": data_actions});
            let out = conn.client()?.admin(Method::POST, "role-definitions", Some(&body)).await?;
            print_value(&out, conn.output, &[("RoleName", "roleName"), ("Type", "type"), ("Id", "id")])
        }
    }
}

const FEDERATION_COLUMNS: [(&str, &str); 5] = [
    ("Id", "id"),
    ("Issuer", "issuer"),
    ("Subject", "subject"),
    ("Audience", "audience"),
    ("JwksUrl", "jwks_url"),
];

pub async fn federation(cmd: FederationCommand) -> Result<()> {
    match cmd {
        FederationCommand::Add { principal, issuer, subject, audience, jwks_file, jwks_url, conn } => {
            let jwks = jwks_file
                .map(|path| -> Result<Value> {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
                })
                .transpose()?;
            let body = json!({"principal": principal, "issuer": issuer, "subject": subject, "audience": audience, "jwksUrl": jwks_url, "jwks": jwks});
            let out = conn.client()?.admin(Method::POST, "federated-credentials", Some(&body)).await?;
            print_value(&out, conn.output, &FEDERATION_COLUMNS)
        }
        FederationCommand::List { conn } => {
            let out = conn.client()?.admin(Method::GET, "federated-credentials", None).await?;
            print_value(&out, conn.output, &FEDERATION_COLUMNS)
        }
        FederationCommand::Remove { id, conn } => {
            conn.client()?.admin(Method::DELETE, &format!("federated-credentials/{id}"), None).await?;
            eprintln!("removed federated credential {id}");
            Ok(())
        }
    }
}

pub async fn agent(cmd: AgentCommand) -> Result<()> {
    match cmd {
        AgentCommand::Create { name, conn } => {
            let out = conn.client()?.admin(Method::POST, "agents", Some(&json!({"name": name}))).await?;
            if conn.output == Format::Json {
                return output::json(&out);
            }
            println!("Agent      {}", out["name"].as_str().unwrap_or_default());
            println!("JoinToken  {}", out["joinToken"].as_str().unwrap_or_default());
            eprintln!("On the agent's host, within an hour: coffer agent join --server URL --join-token TOKEN --credential-file FILE");
            Ok(())
        }
        AgentCommand::Join { server, join_token, credential_file, ca_file } => {
            if credential_file.exists() {
                bail!(
                    "{} exists; the agent has a credential already (delete it to re-join)",
                    credential_file.display()
                );
            }
            let ca = ca_file
                .map(|p| std::fs::read(&p).with_context(|| format!("cannot read {}", p.display())))
                .transpose()?;
            let http =
                coffer_agent::remote::http_client(&server, ca.as_deref()).map_err(anyhow::Error::msg)?;
            let credential =
                coffer_agent::remote::join(&server, &join_token, &http).await.map_err(anyhow::Error::msg)?;
            credential
                .save_new(&credential_file)
                .with_context(|| format!("cannot write {}", credential_file.display()))?;
            eprintln!(
                "joined as agent {}; credential written to {}",
                credential.agent_id,
                credential_file.display()
            );
            Ok(())
        }
        AgentCommand::Run { credential_file, listen, identity_header, ca_file } => {
            if !listen.ip().is_loopback() {
                bail!("the managed-identity endpoint must listen on a loopback address");
            }
            let credential =
                coffer_agent::remote::NodeCredential::load(&credential_file).with_context(|| {
                    format!(
                        "cannot read the node credential {} (run `coffer agent join`)",
                        credential_file.display()
                    )
                })?;
            let ca = ca_file
                .map(|p| std::fs::read(&p).with_context(|| format!("cannot read {}", p.display())))
                .transpose()?;
            let http = coffer_agent::remote::http_client(&credential.server_url, ca.as_deref())
                .map_err(anyhow::Error::msg)?;
            let broker = Arc::new(coffer_agent::remote::RemoteBroker::new(credential, http));
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let local = listener.local_addr()?;
            let identity_header =
                identity_header.unwrap_or_else(coffer_agent::endpoint::random_identity_header);
            println!(
                "coffer agent ready: IDENTITY_ENDPOINT=http://{local}{} IDENTITY_HEADER={identity_header}",
                coffer_agent::endpoint::APP_SERVICE_PATH
            );
            let stop = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            coffer_agent::endpoint::serve(listener, identity_header, broker, stop).await?;
            Ok(())
        }
    }
}
