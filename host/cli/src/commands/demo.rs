//! `keel demo`: a complete agent job with no API key and no network.
//!
//! The Keel home named by `--home` / `KEEL_HOME` (else a fresh temporary one) gets the example plugins (`hello`, `fs` with one read-only and one
//! read-write directory), a scripted model (`examples/demo/script.json`, embedded), the demo policy
//! (`examples/policies/demo.toml`, embedded: writes need approval) and its SQLite database; then the
//! job runs exactly as `keel run --auto-approve` would.

use std::path::{Path, PathBuf};

use clap::Parser;

use crate::commands::plugins::InstallArgs;
use crate::commands::run::{AgentArgs, RunArgs};
use crate::output::{CliError, CliResult};

const SCRIPT: &str = include_str!("../../../../examples/demo/script.json");
const POLICY: &str = include_str!("../../../../examples/policies/demo.toml");
const PROMPT: &str = "Greet Ada, read /data/notes.txt and save a one-line summary to /out/summary.txt.";
const NOTES: &str = "Keel keeps its notes in SQLite; plugins see only what they were granted.\n";
const CONFIG: &str = r#"# Written by `keel demo`.
[models.providers.scripted]
kind = "scripted"
script = "demo-script.json"

# Prices are made up, so the ledger has something to show.
[models.providers.scripted.prices.demo]
input_per_mtok = "0.15"
output_per_mtok = "0.60"
"#;

/// `keel demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Directory holding the built plugins (`hello.wasm`, `keel_plugin_fs.wasm` or `fs.wasm`).
    #[arg(long, value_name = "DIR", default_value = "target/wasm/wasm32-wasip2/guest")]
    plugins: PathBuf,
    /// Print events as JSON lines.
    #[arg(long)]
    json: bool,
}

/// Parses `keel install` arguments, so the demo installs exactly as a user would.
#[derive(Debug, Parser)]
struct Install {
    #[command(flatten)]
    args: InstallArgs,
}

fn find(dir: &Path, names: &[&str]) -> Result<PathBuf, CliError> {
    names.iter().map(|n| dir.join(n)).find(|p| p.is_file()).ok_or_else(|| {
        CliError::user(format!(
            "{} not found in {}: build the example plugins with `scripts/build-guests` (or pass --plugins DIR)",
            names.join(" or "),
            dir.display()
        ))
    })
}

/// Write `text` to `path` (owner-only, 0600, in owner-only directories, whatever the umask: the
/// home is private).
fn write(path: &Path, text: &str) -> Result<(), CliError> {
    use std::io::Write as _;
    if let Some(parent) = path.parent() {
        private_dirs(parent)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .and_then(|mut file| file.write_all(text.as_bytes()))
        .map_err(|e| CliError::internal(format!("cannot write {}: {e}", path.display())))
}

/// Create `dir` and its missing parents owner-only (0700).
fn private_dirs(dir: &Path) -> Result<(), CliError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
        .create(dir)
        .map_err(|e| CliError::internal(format!("cannot create {}: {e}", dir.display())))
}

/// Refuse a home whose `config.toml`, `policy.toml` or `demo-script.json` is not the demo's own:
/// the demo writes them, and must not overwrite a user's configuration or policy.
fn check_home_is_free(home: &Path) -> Result<(), CliError> {
    // A home in use (a database the demo did not make) has the user's plugins and grants, which
    // the demo's installs would replace.
    if home.join("keel.db").exists() && !home.join("demo-script.json").exists() {
        return Err(CliError::user(format!(
            "{} is a Keel home in use (its plugins and grants would be replaced); run the demo in an empty Keel home (--home DIR) or in a temporary one (no --home and no KEEL_HOME)",
            home.display()
        )));
    }
    for (name, text) in [
        ("config.toml", CONFIG),
        ("policy.toml", POLICY),
        ("demo-script.json", SCRIPT),
    ] {
        let path = home.join(name);
        match std::fs::read_to_string(&path) {
            Ok(existing) if existing == text => {}
            Ok(_) => {
                return Err(CliError::user(format!(
                    "{} exists and is not the demo's; run the demo in an empty Keel home (--home DIR) or in a temporary one (no --home and no KEEL_HOME)",
                    path.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CliError::user(format!("cannot read {}: {e}", path.display()))),
        }
    }
    Ok(())
}

/// Run `keel demo` in `home` (from `--home` / `KEEL_HOME`), or in a fresh temporary home when none
/// was named.
pub async fn demo(home: Option<&Path>, args: DemoArgs) -> CliResult {
    let hello = find(&args.plugins, &["hello.wasm"])?;
    let fs = find(&args.plugins, &["keel_plugin_fs.wasm", "fs.wasm"])?;
    let home = match home {
        Some(home) => {
            check_home_is_free(home)?;
            home.to_path_buf()
        }
        None => std::env::temp_dir().join(format!("keel-demo-{}", uuid::Uuid::now_v7().simple())),
    };
    keel_app::home::prepare_home(&home)?;
    let home = std::fs::canonicalize(&home)
        .map_err(|e| CliError::user(format!("cannot open Keel home {}: {e}", home.display())))?;
    let work = home.join("work");
    write(&work.join("data/notes.txt"), NOTES)?;
    private_dirs(&work.join("out"))?;
    write(&home.join("config.toml"), CONFIG)?;
    write(&home.join("demo-script.json"), SCRIPT)?;
    write(&home.join("policy.toml"), POLICY)?;
    eprintln!("Keel home: {} (SQLite database keel.db)", home.display());

    let data = format!("{}::/data", work.join("data").display());
    let out = format!("{}::/out", work.join("out").display());
    let installs: [Vec<String>; 2] = [
        vec![hello.display().to_string()],
        vec![
            fs.display().to_string(),
            "--allow-read".into(),
            data,
            "--allow-write".into(),
            out,
        ],
    ];
    for argv in installs {
        println!("\n$ keel install {}", argv.join(" "));
        let parsed = Install::try_parse_from(std::iter::once("install".to_string()).chain(argv))
            .map_err(|e| CliError::internal(format!("demo install arguments: {e}")))?;
        crate::commands::plugins::install(&home, parsed.args).await?;
    }

    println!(
        "\n$ keel run {PROMPT:?} --tools hello,fs --model scripted:demo --auto-approve   (policy: writes need approval)\n"
    );
    let run = RunArgs {
        prompt: PROMPT.into(),
        tools: vec!["hello".into(), "fs".into()],
        model: "scripted:demo".into(),
        max_turns: Some(10),
        timeout: None,
        max_cost: None,
        max_tool_calls: None,
        degrade_model: None,
        idempotency_key: None,
        session: None,
        principal: Some("demo".into()),
        detach: false,
        common: AgentArgs {
            scope: keel_app::kernel::DEFAULT_SCOPE.into(),
            policy: None,
            auto_approve: true,
            json: args.json,
        },
    };
    let code = crate::commands::run::run(&home, run).await?;
    if !args.json {
        let summary = std::fs::read_to_string(work.join("out/summary.txt")).unwrap_or_default();
        println!(
            "\n{}/out/summary.txt (written inside the sandbox):\n  {}",
            work.display(),
            summary.trim_end()
        );
        println!(
            "\nLook around: export KEEL_HOME={}; keel jobs list; keel jobs show JOB; keel ledger usage",
            home.display()
        );
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_script_and_policy_parse() {
        let script: keel_models::Script = serde_json::from_str(super::SCRIPT).expect("script");
        assert_eq!(script.turns.len(), 3);
        keel_kernel::policy::Policy::from_toml_str(super::POLICY, "demo.toml").expect("policy");
    }
}
