//! Building JavaScript (and TypeScript) tool projects with `sdk/js` and componentize-js.
//!
//! A JavaScript project is a directory with a `package.json` whose `main` names the entry file
//! (default `index.js`; `.ts` works too). The entry imports the SDK as `@keel/sdk` and ends with
//! `export const tools = plugin.exports();`. No `npm install` is needed in the project: the SDK
//! and its build tools (componentize-js, rolldown) live in `sdk/js/node_modules`, installed by
//! `scripts/setup/js-c.sh` (`npm ci` there).
//!
//! Steps (in `node sdk/js/build.mjs PROJECT OUT --plugin-wit FILE`, given the `wit/plugin.wit`
//! compiled into this crate): bundle the entry with the SDK (rolldown), assemble the WIT (the
//! `tool` world plus `wasi:filesystem`, `sdk/js/wit`), and componentize with componentize-js.
//! The component gets no `wasi:http` (no `fetch`) unless the project's `package.json` says
//! `"keel": {"http": true}`.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::BuildError;
use crate::c::PLUGIN_WIT;

/// The world JavaScript tools are built against (in `sdk/js/wit/keel-js.wit`).
pub const WORLD: &str = "keel:js-sdk/tool";

/// Where `sdk/js` is: `$KEEL_SDK_JS`, else the copy in this source tree.
pub fn sdk_dir() -> PathBuf {
    match std::env::var_os("KEEL_SDK_JS") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk/js"),
    }
}

fn missing_sdk(sdk: &Path) -> BuildError {
    BuildError::MissingToolchain {
        tool: format!("componentize-js (in {})", sdk.display()),
        install: format!(
            "run `scripts/setup/js-c.sh`, or `npm ci` in {} (needs Node.js 20.19+ and npm)",
            sdk.display()
        ),
    }
}

/// Check the project has a `package.json` and the entry file it names.
fn read_project(project: &Path) -> Result<(), BuildError> {
    let manifest = project.join("package.json");
    let text = std::fs::read_to_string(&manifest).map_err(|e| {
        BuildError::Project(format!(
            "{}: {e} (a JS project needs a package.json)",
            manifest.display()
        ))
    })?;
    let package: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| BuildError::Project(format!("{}: not JSON: {e}", manifest.display())))?;
    let main = package["main"].as_str().unwrap_or("index.js");
    let entry = project.join(main);
    if !entry.is_file() {
        return Err(BuildError::Project(format!(
            "{}: entry file `{main}` (package.json `main`) does not exist",
            project.display()
        )));
    }
    Ok(())
}

/// Build the project in `project` into a component at `out`.
pub fn build(project: &Path, out: &Path) -> Result<PathBuf, BuildError> {
    read_project(project)?;
    let sdk = sdk_dir();
    if !sdk
        .join("node_modules/@bytecodealliance/componentize-js/package.json")
        .is_file()
    {
        return Err(missing_sdk(&sdk));
    }
    let work = tempfile::tempdir()?;
    let plugin_wit = work.path().join("plugin.wit");
    std::fs::write(&plugin_wit, PLUGIN_WIT)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let mut command = Command::new("node");
    command
        .arg(sdk.join("build.mjs"))
        .arg(project)
        .arg(out)
        .arg("--plugin-wit")
        .arg(&plugin_wit);
    let output = command.output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => BuildError::MissingToolchain {
            tool: "node".into(),
            install: "install Node.js 20.19+ and npm (Debian: apt-get install nodejs npm)".into(),
        },
        _ => BuildError::Io(e),
    })?;
    if !output.status.success() || !out.is_file() {
        return Err(BuildError::Failed {
            step: "componentize-js".into(),
            output: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(out.to_path_buf())
}
