//! `keel build [DIR]`: build a tool project (Rust, Python, JavaScript or C) into a component that
//! `keel install` takes. The language is detected from the project's files unless `--lang` says.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use keel_build::{BuildError, Lang};

use crate::output::{CliError, CliResult, print_json};

/// `keel build`.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// The project directory.
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// The project's language (default: detected: `Cargo.toml` → rust, `app.py` → python,
    /// `package.json` → js, `*.c` → c).
    #[arg(long, value_parser = parse_lang)]
    lang: Option<Lang>,
    /// Where to write the component (default: `<project name>.wasm` in the current directory).
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn parse_lang(s: &str) -> Result<Lang, String> {
    match s {
        "rust" => Ok(Lang::Rust),
        "python" | "py" => Ok(Lang::Python),
        "js" | "javascript" | "ts" | "typescript" => Ok(Lang::Js),
        "c" => Ok(Lang::C),
        other => Err(format!("unknown language {other:?} (rust, python, js, c)")),
    }
}

/// The language of the project in `dir`, from its files.
pub(crate) fn detect(dir: &Path) -> Option<Lang> {
    if dir.join("Cargo.toml").is_file() {
        return Some(Lang::Rust);
    }
    if dir.join("app.py").is_file() || dir.join("keel.toml").is_file() {
        return Some(Lang::Python);
    }
    if dir.join("package.json").is_file() {
        return Some(Lang::Js);
    }
    let has_c = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .any(|e| e.path().extension().is_some_and(|x| x == "c"));
    has_c.then_some(Lang::C)
}

/// Run `keel build`.
pub fn build(args: BuildArgs) -> CliResult {
    if !args.dir.is_dir() {
        return Err(CliError::user(format!("{} is not a directory", args.dir.display())));
    }
    let lang = match args.lang.or_else(|| detect(&args.dir)) {
        Some(lang) => lang,
        None => {
            return Err(CliError::user(format!(
                "cannot tell the language of {} (no Cargo.toml, app.py, package.json or .c file); pass --lang rust|python|js|c",
                args.dir.display()
            )));
        }
    };
    let name = std::path::absolute(&args.dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "plugin".into());
    let out = args.out.unwrap_or_else(|| PathBuf::from(format!("{name}.wasm")));
    let started = Instant::now();
    let built = keel_build::build(lang, &args.dir, &out).map_err(|e| match e {
        // One line naming what to install.
        BuildError::MissingToolchain { .. } | BuildError::Project(_) | BuildError::Unsupported(_) => {
            CliError::user(e.to_string())
        }
        // The compiler's own lines, as it wrote them (escaped for the terminal), then one line.
        BuildError::Failed { step, output } => {
            if args.json {
                print_json(&serde_json::json!({ "ok": false, "step": step, "output": output }));
            } else {
                eprintln!("{}", crate::output::sanitize(output.trim_end()));
            }
            CliError::plugin(format!("{step} failed (its output is above)"))
        }
        BuildError::Io(_) => CliError::internal(e.to_string()),
    })?;
    let bytes = std::fs::metadata(&built).map(|m| m.len()).unwrap_or(0);
    let ms = started.elapsed().as_secs_f64() * 1e3;
    if args.json {
        print_json(
            &serde_json::json!({ "component": built, "bytes": bytes, "build_ms": ms, "lang": format!("{lang:?}").to_lowercase() }),
        );
    } else {
        println!(
            "built {} ({bytes} bytes in {ms:.0} ms); install it with `keel install {}`",
            built.display(),
            built.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}
