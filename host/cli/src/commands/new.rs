//! `keel new NAME --lang L [--dir D]`: scaffold a tool project (source with one example tool, the
//! build file, a README with the build and call commands, a test) that `keel build` builds.

use std::path::PathBuf;
use std::process::ExitCode;

use keel_build::Lang;
use keel_build::new::NewProject;

use crate::commands::build::parse_lang;
use crate::output::{CliError, CliResult, print_json};

/// `keel new`.
#[derive(Debug, clap::Args)]
pub struct NewArgs {
    /// The tool's name (also the plugin's): lowercase letters, digits, `-`, `_`.
    name: String,
    /// The language: rust, python, js or c.
    #[arg(long, value_parser = parse_lang)]
    lang: Lang,
    /// Where to create the project (default: `./NAME`). Must not exist or be empty.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Rust only: the `keel-sdk` crate to depend on (default: `sdk/rust` of the Keel source tree
    /// this keel was built from).
    #[arg(long, value_name = "DIR")]
    sdk_path: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// Run `keel new`.
pub fn new(args: NewArgs) -> CliResult {
    keel_build::new::check_name(&args.name).map_err(|e| CliError::user(e.to_string()))?;
    if args.sdk_path.is_some() && args.lang != Lang::Rust {
        return Err(CliError::user("--sdk-path is for Rust projects only"));
    }
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    let project = NewProject {
        name: args.name.clone(),
        lang: args.lang,
        dir: dir.clone(),
        sdk_path: args.sdk_path,
    };
    let files = keel_build::new::scaffold(&project).map_err(|e| match e {
        keel_build::BuildError::Io(e) => CliError::internal(format!("cannot create {}: {e}", dir.display())),
        other => CliError::user(other.to_string()),
    })?;
    if args.json {
        print_json(&serde_json::json!({"name": args.name, "dir": dir, "files": files}));
        return Ok(ExitCode::SUCCESS);
    }
    println!("created {} ({:?} tool project):", dir.display(), args.lang);
    for file in &files {
        println!("  {}", file.display());
    }
    let name = &args.name;
    println!("next:");
    println!("  cd {}", dir.display());
    println!("  keel build && keel install {name}.wasm");
    println!("  keel call {name}/greet '{{\"name\": \"Ada\"}}'");
    println!("  keel dev    # rebuild and reinstall on every change");
    Ok(ExitCode::SUCCESS)
}
