//! `keel keys create|list|revoke`: API keys for `keel serve`.
//!
//! A key is shown once, at creation; only its hash is stored (see `keel_app::keys`).

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use keel_app::keys;
use serde_json::json;

use crate::output::{CliResult, print_json, sanitize_line};
use keel_app::kernel::{DEFAULT_SCOPE, open_db};

/// `keel keys ...`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key for one scope and print it (once: it cannot be shown again).
    Create {
        /// The scope (tenant) the key is confined to.
        #[arg(long, default_value = DEFAULT_SCOPE)]
        scope: String,
        /// What the key may do in its scope: read, write (create and cancel jobs, call tools,
        /// answer approvals) or admin (also plugins and budgets).
        #[arg(long, value_parser = parse_role)]
        role: keel_app::Role,
        /// A name for humans (default: the key's id).
        #[arg(long)]
        name: Option<String>,
        /// Print JSON (`{"key": ..., "id": ...}`).
        #[arg(long)]
        json: bool,
    },
    /// List keys (ids, names, scopes, roles; never the keys themselves).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id: requests with it (and browser sessions opened with it) fail at once.
    Revoke {
        /// The key's id (`keel keys list`).
        id: String,
        /// Print the revoked key as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_role(s: &str) -> Result<keel_app::Role, String> {
    keys::parse_role(s).map_err(|e| e.message)
}

/// Run a `keel keys` command.
pub async fn run(home: &Path, cmd: KeysCommand) -> CliResult {
    let db = open_db(home).await?;
    match cmd {
        KeysCommand::Create {
            scope,
            role,
            name,
            json,
        } => {
            let created = keys::create_key(&db, &scope, role, name.as_deref()).await?;
            if json {
                print_json(&json!({ "key": created.key, "id": created.info.id, "info": created.info }));
            } else {
                println!("{}", created.key);
                eprintln!(
                    "key {} ({:?}, scope {}, role {:?}): shown once, store it now; revoke with `keel keys revoke {}`",
                    created.info.id,
                    sanitize_line(&created.info.name),
                    sanitize_line(&created.info.scope),
                    created.info.role,
                    created.info.id
                );
            }
        }
        KeysCommand::List { json } => {
            let all = keys::list_keys(&db).await?;
            if json {
                print_json(&all);
            } else if all.is_empty() {
                println!("no keys (create one with `keel keys create --scope S --role read|write|admin`)");
            } else {
                println!("{:<12}  {:<20}  {:<16}  {:<5}  STATUS", "ID", "NAME", "SCOPE", "ROLE");
                for k in &all {
                    let role = serde_json::to_value(k.role).ok();
                    println!(
                        "{:<12}  {:<20}  {:<16}  {:<5}  {}",
                        k.id,
                        sanitize_line(&k.name),
                        sanitize_line(&k.scope),
                        role.as_ref().and_then(|r| r.as_str()).unwrap_or("?"),
                        match &k.revoked_at {
                            Some(at) => format!("revoked {at}"),
                            None => "active".into(),
                        }
                    );
                }
            }
        }
        KeysCommand::Revoke { id, json } => {
            let info = keys::revoke_key(&db, &id).await?;
            if json {
                print_json(&info);
            } else {
                println!("revoked key {}", info.id);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
