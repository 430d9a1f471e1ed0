//! Building Python tool projects with componentize-py.
//!
//! # What a Python project looks like
//!
//! ```text
//! my-tool/
//!   app.py        the entry module: calls keel.plugin(...) and declares tools with @keel.tool
//!   *.py, pkg/    any other pure-Python modules and packages it imports (vendored dependencies too)
//!   keel.toml     optional: [python] module = "app"   (another entry module name)
//! ```
//!
//! The Python SDK (`sdk/python`, package `keel`) and the WIT contract are compiled into this crate,
//! so a build needs only componentize-py ([`COMPONENTIZE_PY_VERSION`], `pip install
//! componentize-py==0.25.1`) on the `PATH`: they are written to a scratch directory, next to a
//! generated entry module that imports the project's module and exports the SDK's `Tools`, and
//! componentize-py bundles CPython, the standard library, the SDK and the project into one component.
//! componentize-py imports the project while pre-initialising the component, so a project that
//! never calls `keel.plugin(...)`, or declares a tool with an unsupported type, fails to build.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::BuildError;

/// The componentize-py release Keel builds with (PyPI). Any 0.25.x is accepted.
pub const COMPONENTIZE_PY_VERSION: &str = "0.25.1";

/// The version prefix accepted from `componentize-py --version`.
const ACCEPTED_SERIES: &str = "0.25.";

/// The SDK's files, as `(path under the SDK root, contents)`.
const SDK_FILES: &[(&str, &str)] = &[
    ("keel/__init__.py", include_str!("../../../sdk/python/keel/__init__.py")),
    ("keel/_schema.py", include_str!("../../../sdk/python/keel/_schema.py")),
    (
        "keel/_docstring.py",
        include_str!("../../../sdk/python/keel/_docstring.py"),
    ),
    ("keel/_export.py", include_str!("../../../sdk/python/keel/_export.py")),
];

/// The WIT contract the component is built against.
const WIT: &str = include_str!("../../../wit/plugin.wit");

/// The WIT world a tool plugin implements.
const WORLD: &str = "tool";

/// Module names the build itself uses: a project module with one of these names would shadow it.
const RESERVED_MODULES: &[&str] = &["keel", "keel_entry", "wit_world", "componentize_py_types", WORLD];

/// The optional `keel.toml` of a Python project.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    #[serde(default)]
    python: PythonSection,
}

/// `[python]` in `keel.toml`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PythonSection {
    /// The entry module (a `NAME.py` file or `NAME/` package in the project directory).
    #[serde(default = "default_module")]
    module: String,
}

impl Default for PythonSection {
    fn default() -> Self {
        Self {
            module: default_module(),
        }
    }
}

fn default_module() -> String {
    "app".into()
}

/// The install hint for a missing or wrong componentize-py.
fn install_hint() -> String {
    format!("pip install componentize-py=={COMPONENTIZE_PY_VERSION}")
}

/// How to run componentize-py: its console script, or its module through a Python interpreter
/// (for a `pip install --user` whose script directory is not on `PATH`).
struct Componentize {
    program: PathBuf,
    args: Vec<&'static str>,
}

/// Runs componentize-py's entry point the way its console script does.
const VIA_PYTHON: &str =
    "import sys; from componentize_py import script; sys.argv[0] = 'componentize-py'; sys.exit(script())";

impl Componentize {
    fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command.args(&self.args);
        command
    }
}

/// Build the Python project in `project` into a component at `out`; returns `out`.
/// Uses `componentize-py` from `PATH`, or else the `componentize_py` module of `python3`.
pub fn build(project: &Path, out: &Path) -> Result<PathBuf, BuildError> {
    let module = entry_module(project)?;
    let script = Componentize {
        program: "componentize-py".into(),
        args: vec![],
    };
    let tool = match check_componentize_py(&script) {
        Ok(()) => script,
        Err(error) => {
            let module = Componentize {
                program: "python3".into(),
                args: vec!["-c", VIA_PYTHON],
            };
            check_componentize_py(&module).map_err(|_| error)?;
            module
        }
    };
    build_using(project, out, &module, &tool)
}

/// [`build`] with an explicit componentize-py executable (a path, or a name looked up on `PATH`).
pub fn build_with(project: &Path, out: &Path, componentize_py: &Path) -> Result<PathBuf, BuildError> {
    let module = entry_module(project)?;
    let tool = Componentize {
        program: componentize_py.into(),
        args: vec![],
    };
    check_componentize_py(&tool)?;
    build_using(project, out, &module, &tool)
}

fn build_using(
    project: &Path,
    out: &Path,
    module: &str,
    componentize_py: &Componentize,
) -> Result<PathBuf, BuildError> {
    let staging = tempfile::Builder::new().prefix("keel-build-python-").tempdir()?;
    let sdk = staging.path().join("sdk");
    for (path, contents) in SDK_FILES {
        let file = sdk.join(path);
        std::fs::create_dir_all(file.parent().expect("SDK files are in a package"))?;
        std::fs::write(file, contents)?;
    }
    std::fs::write(
        sdk.join("keel_entry.py"),
        format!(
            "# Generated by keel-build: declare the tools, then export the SDK's `Tools`.\n\
             import {module}  # noqa: F401\n\
             from keel._export import Tools  # noqa: F401\n"
        ),
    )?;
    // componentize-py imports the project to snapshot it and writes `__pycache__` next to what it
    // imports: build from a copy, so the sources stay untouched.
    let copy = staging.path().join("project");
    copy_tree(project, &copy)?;
    let wit = staging.path().join("wit");
    std::fs::create_dir_all(&wit)?;
    std::fs::write(wit.join("plugin.wit"), WIT)?;

    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    // Build next to `out` and rename, so a failed or interrupted build never leaves half a component.
    let partial = out.with_extension("wasm.partial");
    let output = componentize_py
        .command()
        .arg("--quiet")
        .arg("--wit-path")
        .arg(&wit)
        .args(["--world", WORLD, "componentize"])
        // The SDK first, so a project file can never shadow `keel` or the entry module.
        .arg("--python-path")
        .arg(&sdk)
        .arg("--python-path")
        .arg(&copy)
        .arg("keel_entry")
        .arg("--output")
        .arg(&partial)
        .current_dir(&copy)
        // Its errors are the app's Python traceback; a Rust backtrace after it only adds noise.
        .env("RUST_BACKTRACE", "0")
        .env("RUST_LIB_BACKTRACE", "0")
        .output()
        .map_err(|e| spawn_error(&componentize_py.program, e))?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&partial);
        let mut text = String::from_utf8_lossy(&output.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stdout));
        return Err(BuildError::Failed {
            step: format!("componentize-py (building {})", project.display()),
            output: text.trim().to_string(),
        });
    }
    std::fs::rename(&partial, out)?;
    Ok(out.to_path_buf())
}

/// Copy the project's files (not caches, VCS data or build output; symlinks are not followed)
/// from `from` to `to`.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if matches!(name.to_str(), Some("__pycache__" | ".git" | "target" | "node_modules")) {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &to.join(&name))?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), to.join(&name))?;
        }
    }
    Ok(())
}

/// The project's entry module name, checked: from `keel.toml` or `app`, and present on disk.
fn entry_module(project: &Path) -> Result<String, BuildError> {
    if !project.is_dir() {
        return Err(BuildError::Project(format!(
            "{} is not a directory (a Python project is a directory with an app.py)",
            project.display()
        )));
    }
    let manifest_path = project.join("keel.toml");
    let manifest: Manifest = match std::fs::read_to_string(&manifest_path) {
        Ok(text) => toml::from_str(&text)
            .map_err(|e| BuildError::Project(format!("{}: {}", manifest_path.display(), e.message())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest::default(),
        Err(e) => return Err(e.into()),
    };
    let module = manifest.python.module;
    let valid = !module.is_empty()
        && !module.starts_with(|c: char| c.is_ascii_digit())
        && module.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(BuildError::Project(format!(
            "{}: `module = {module:?}` is not a Python module name",
            manifest_path.display()
        )));
    }
    if RESERVED_MODULES.contains(&module.as_str()) {
        return Err(BuildError::Project(format!(
            "the entry module may not be named `{module}`: the build uses that name (rename {module}.py)"
        )));
    }
    if !project.join(format!("{module}.py")).is_file() && !project.join(&module).join("__init__.py").is_file() {
        return Err(BuildError::Project(format!(
            "{} has no {module}.py (the entry module that declares the tools)",
            project.display()
        )));
    }
    for reserved in RESERVED_MODULES {
        if project.join(format!("{reserved}.py")).exists() || project.join(reserved).join("__init__.py").exists() {
            return Err(BuildError::Project(format!(
                "{} contains a module named `{reserved}`, which the build itself uses; rename it",
                project.display()
            )));
        }
    }
    Ok(module)
}

/// Check that componentize-py runs and is of the supported series.
fn check_componentize_py(tool: &Componentize) -> Result<(), BuildError> {
    let output = tool
        .command()
        .arg("--version")
        .output()
        .map_err(|e| spawn_error(&tool.program, e))?;
    let version = String::from_utf8_lossy(&output.stdout);
    let version = version
        .lines()
        .next()
        .unwrap_or("")
        .trim_start_matches("componentize-py")
        .trim();
    if !output.status.success() || !version.starts_with(ACCEPTED_SERIES) {
        return Err(BuildError::MissingToolchain {
            tool: format!(
                "componentize-py {COMPONENTIZE_PY_VERSION} ({} reports `{}`)",
                tool.program.display(),
                if version.is_empty() { "no version" } else { version }
            ),
            install: install_hint(),
        });
    }
    Ok(())
}

fn spawn_error(program: &Path, error: std::io::Error) -> BuildError {
    if error.kind() == std::io::ErrorKind::NotFound {
        BuildError::MissingToolchain {
            tool: format!("componentize-py ({})", program.display()),
            install: install_hint(),
        }
    } else {
        BuildError::Io(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_componentize_py_names_the_pip_command() {
        let project = tempfile::tempdir().unwrap();
        std::fs::write(project.path().join("app.py"), "import keel\n").unwrap();
        let out = project.path().join("out.wasm");
        let err = build_with(project.path(), &out, Path::new("/nonexistent/componentize-py")).unwrap_err();
        assert!(matches!(err, BuildError::MissingToolchain { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("pip install componentize-py==0.25.1"), "{text}");
        assert!(!out.exists());
    }

    #[test]
    fn a_wrong_componentize_py_version_is_a_missing_toolchain() {
        let project = tempfile::tempdir().unwrap();
        std::fs::write(project.path().join("app.py"), "import keel\n").unwrap();
        // A program that runs but is not componentize-py 0.25 (`true --version`: coreutils' version).
        // An existing binary rather than a script written here: exec'ing a just-written file races
        // with forks in other test threads (ETXTBSY).
        let err = build_with(project.path(), &project.path().join("o.wasm"), Path::new("true")).unwrap_err();
        assert!(matches!(err, BuildError::MissingToolchain { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("true reports") && text.contains("pip install componentize-py==0.25.1"),
            "{text}"
        );
    }

    #[test]
    fn componentize_py_also_runs_as_a_module_of_python3() {
        // Needs componentize-py installed (scripts/setup/python.sh), as every Python build does.
        let module = Componentize {
            program: "python3".into(),
            args: vec!["-c", VIA_PYTHON],
        };
        check_componentize_py(&module).unwrap();
    }

    #[test]
    fn project_shape_is_checked_before_building() {
        let project = tempfile::tempdir().unwrap();
        let out = project.path().join("o.wasm");
        let err = build(project.path(), &out).unwrap_err();
        assert!(err.to_string().contains("has no app.py"), "{err}");

        std::fs::write(project.path().join("keel.toml"), "[python]\nmodule = \"tools\"\n").unwrap();
        let err = build(project.path(), &out).unwrap_err();
        assert!(err.to_string().contains("has no tools.py"), "{err}");

        std::fs::write(project.path().join("keel.toml"), "[python]\nmodule = \"no-dash\"\n").unwrap();
        let err = build(project.path(), &out).unwrap_err();
        assert!(err.to_string().contains("not a Python module name"), "{err}");

        std::fs::write(project.path().join("keel.toml"), "[pyhton]\n").unwrap();
        let err = build(project.path(), &out).unwrap_err();
        assert!(matches!(err, BuildError::Project(_)), "{err}");

        std::fs::remove_file(project.path().join("keel.toml")).unwrap();
        std::fs::write(project.path().join("app.py"), "").unwrap();
        std::fs::write(project.path().join("keel.py"), "").unwrap();
        let err = build(project.path(), &out).unwrap_err();
        assert!(err.to_string().contains("module named `keel`"), "{err}");

        let err = build(&project.path().join("missing"), &out).unwrap_err();
        assert!(err.to_string().contains("is not a directory"), "{err}");
    }
}
