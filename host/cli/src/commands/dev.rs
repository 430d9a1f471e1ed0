//! `keel dev [DIR]`: build the tool project, install it (replacing the installed version, keeping
//! its grants), then watch the project's files and rebuild + reinstall on every change until
//! stopped (Ctrl-C).
//!
//! A build or install that fails is printed and changes nothing: the last good version stays
//! installed. Calls in flight are not disturbed: each `keel call` (or worker) has loaded the
//! component it started with, and a reinstall only changes the registry record that the *next*
//! call reads.

use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use keel_app::home::App;
use keel_app::install::InstallRequest;
use keel_build::Lang;
use notify_debouncer_full::notify::RecursiveMode;
use notify_debouncer_full::notify::event::{EventKind, ModifyKind};

use crate::commands::build::{detect, parse_lang};
use crate::output::{CliError, CliResult, sanitize_line};

/// `keel dev`.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// The project directory.
    #[arg(default_value = ".")]
    dir: PathBuf,
    /// The project's language (default: detected, as `keel build` does).
    #[arg(long, value_parser = parse_lang)]
    lang: Option<Lang>,
    /// Wait this long after the last change before rebuilding (milliseconds).
    #[arg(long, value_name = "MS", default_value_t = 300)]
    debounce_ms: u64,
}

/// Run `keel dev` until interrupted.
pub async fn dev(home: &Path, args: DevArgs) -> CliResult {
    if !args.dir.is_dir() {
        return Err(CliError::user(format!("{} is not a directory", args.dir.display())));
    }
    let dir = std::fs::canonicalize(&args.dir)
        .map_err(|e| CliError::user(format!("cannot open {}: {e}", args.dir.display())))?;
    let Some(lang) = args.lang.or_else(|| detect(&dir)) else {
        return Err(CliError::user(format!(
            "cannot tell the language of {} (no Cargo.toml, app.py, package.json or .c file); pass --lang rust|python|js|c",
            dir.display()
        )));
    };
    let app = App::open(home).await?;
    let label = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    // Components are built outside the project, so writing them never looks like a change.
    let work = tempfile::Builder::new()
        .prefix("keel-dev-")
        .tempdir()
        .map_err(|e| CliError::internal(format!("cannot create a build directory: {e}")))?;
    let out = work.path().join(format!("{label}.wasm"));

    // Watch before the first build: a change made while it runs triggers the next one.
    let (changed, mut changes) = tokio::sync::mpsc::unbounded_channel::<PathBuf>();
    let root = dir.clone();
    let mut watcher = notify_debouncer_full::new_debouncer(
        Duration::from_millis(args.debounce_ms),
        None,
        move |result: notify_debouncer_full::DebounceEventResult| {
            let Ok(events) = result else { return };
            // Only writes count: reading the sources (the build does) is an access event, and
            // reacting to it would rebuild forever.
            let relevant = events
                .iter()
                .filter(|e| {
                    matches!(
                        e.kind,
                        EventKind::Create(_)
                            | EventKind::Remove(_)
                            | EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Name(_) | ModifyKind::Any)
                    )
                })
                .flat_map(|e| e.paths.iter())
                .find(|p| is_source(&root, p));
            if let Some(path) = relevant {
                let _ = changed.send(path.clone());
            }
        },
    )
    .map_err(|e| CliError::internal(format!("cannot watch {}: {e}", dir.display())))?;
    watcher
        .watch(&dir, RecursiveMode::Recursive)
        .map_err(|e| CliError::internal(format!("cannot watch {}: {e}", dir.display())))?;

    let mut state = DevState {
        app,
        lang,
        dir: dir.clone(),
        out,
        label,
        installed: None,
    };
    println!("keel dev: {} ({lang:?}); Ctrl-C to stop", dir.display());
    state.round().await;
    println!("watching {} for changes", dir.display());
    loop {
        tokio::select! {
            path = changes.recv() => {
                let Some(path) = path else { break };
                // Everything changed meanwhile is in this build.
                while changes.try_recv().is_ok() {}
                let shown = path.strip_prefix(&dir).unwrap_or(&path);
                println!("changed: {}", sanitize_line(&shown.display().to_string()));
                state.round().await;
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(watcher);
    Ok(ExitCode::SUCCESS)
}

/// Whether a change to `path` should trigger a build: files of the project, not its build output
/// (`target/`, `node_modules/`, `__pycache__/`), hidden files or components.
fn is_source(root: &Path, path: &Path) -> bool {
    let Ok(rel) = path.strip_prefix(root) else {
        return false;
    };
    let ignored_dir = rel.components().any(|c| match c {
        Component::Normal(name) => {
            let name = name.to_string_lossy();
            name.starts_with('.') || matches!(name.as_ref(), "target" | "node_modules" | "__pycache__")
        }
        _ => false,
    });
    let name = rel.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let scratch = name.ends_with('~') || [".wasm", ".partial", ".swp", ".tmp"].iter().any(|x| name.ends_with(x));
    !rel.as_os_str().is_empty() && !ignored_dir && !scratch
}

/// What `keel dev` keeps between rounds.
struct DevState {
    app: App,
    lang: Lang,
    dir: PathBuf,
    out: PathBuf,
    /// The name for a plain component without a name section.
    label: String,
    /// What this session installed last: (plugin name, version, sha256).
    installed: Option<(String, String, String)>,
}

impl DevState {
    /// Build and install once; failures are printed, never fatal.
    async fn round(&mut self) {
        let started = Instant::now();
        let (lang, dir, out) = (self.lang, self.dir.clone(), self.out.clone());
        let built = tokio::task::spawn_blocking(move || keel_build::build(lang, &dir, &out)).await;
        let built = match built {
            Ok(Ok(path)) => path,
            Ok(Err(e)) => return self.failed("build failed", &e.to_string()),
            Err(e) => return self.failed("build failed", &e.to_string()),
        };
        let build_ms = started.elapsed().as_millis();
        let bytes = match std::fs::read(&built) {
            Ok(bytes) => bytes,
            Err(e) => return self.failed("build failed", &format!("cannot read {}: {e}", built.display())),
        };
        let started = Instant::now();
        let mut request = InstallRequest {
            bytes: &bytes,
            label: &self.label,
            replace: true,
            keep_grants: true,
            limits: serde_json::json!({}),
            owner: None,
        };
        let mut result = self.app.install(request.clone(), |_, _| Ok(()), |_, _| Ok(())).await;
        if let Err(e) = &result
            && e.message.starts_with("--keep-grants refused")
        {
            // The new version asks for more than the old one was granted: install it with no
            // grants (never more than the user gave) and say what to grant.
            println!("note: {}", sanitize_line(&e.message));
            request.keep_grants = false;
            result = self.app.install(request, |_, _| Ok(()), |_, _| Ok(())).await;
        }
        let installed = match result {
            Ok(installed) => installed,
            Err(e) => return self.failed("install failed", &e.message),
        };
        let record = &installed.record;
        let unchanged = self.installed.as_ref().is_some_and(|(_, _, sha)| *sha == record.sha256);
        println!(
            "installed {} {} (sha256 {}; built in {build_ms} ms, installed in {} ms){}",
            sanitize_line(&record.name),
            sanitize_line(&record.version),
            &record.sha256[..12],
            started.elapsed().as_millis(),
            if unchanged { ", unchanged" } else { "" }
        );
        for note in &installed.notes {
            println!("note: {}", sanitize_line(note));
        }
        self.installed = Some((record.name.clone(), record.version.clone(), record.sha256.clone()));
    }

    fn failed(&self, what: &str, why: &str) {
        eprintln!("{what}: {}", why.trim_end());
        match &self.installed {
            Some((name, version, sha)) => eprintln!(
                "{} {} (sha256 {}) stays installed; fix the error and save to retry",
                sanitize_line(name),
                sanitize_line(version),
                &sha[..12]
            ),
            None => eprintln!("nothing installed yet; fix the error and save to retry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_project_sources_trigger_a_build() {
        let root = Path::new("/p");
        for source in ["/p/app.py", "/p/src/lib.rs", "/p/plugin.c", "/p/Cargo.toml"] {
            assert!(is_source(root, Path::new(source)), "{source}");
        }
        for other in [
            "/p",
            "/elsewhere/app.py",
            "/p/target/release/x.rlib",
            "/p/node_modules/a/index.js",
            "/p/__pycache__/app.pyc",
            "/p/.git/index",
            "/p/.app.py.swp",
            "/p/out.wasm",
            "/p/app.py~",
        ] {
            assert!(!is_source(root, Path::new(other)), "{other}");
        }
    }
}
