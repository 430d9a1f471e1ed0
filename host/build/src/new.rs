//! Scaffolding a tool project (`keel new NAME --lang L`): the source with one example tool using
//! the language's SDK, the build file `keel build` expects, a README with the build and call
//! commands, and a test (a Rust unit test; for Python, JavaScript and C a `test.sh` that builds,
//! installs into a scratch Keel home and calls the tool).
//!
//! The templates live in `host/build/templates/<lang>/` and are compiled in, so a `keel` binary
//! scaffolds without its source tree. `{{name}}` in them is the tool's name; the Rust template also
//! takes the path of the `keel-sdk` crate (`{{sdk_path}}`), since the SDK is not on crates.io.

use std::path::{Path, PathBuf};

use crate::{BuildError, Lang};

/// `(path in the project, template)` for each language. `gitignore` is written as `.gitignore`
/// (a dot file would be skipped by some packaging of the templates).
fn templates(lang: Lang) -> &'static [(&'static str, &'static str)] {
    const TEST_SH: &str = include_str!("../templates/test.sh");
    const GITIGNORE: &str = include_str!("../templates/gitignore");
    match lang {
        Lang::Rust => &[
            ("Cargo.toml", include_str!("../templates/rust/Cargo.toml")),
            ("src/lib.rs", include_str!("../templates/rust/src/lib.rs")),
            ("README.md", include_str!("../templates/rust/README.md")),
            (".gitignore", include_str!("../templates/rust/gitignore")),
        ],
        Lang::Python => &[
            ("app.py", include_str!("../templates/python/app.py")),
            ("README.md", include_str!("../templates/python/README.md")),
            ("test.sh", TEST_SH),
            (".gitignore", GITIGNORE),
        ],
        Lang::Js => &[
            ("package.json", include_str!("../templates/js/package.json")),
            ("tool.js", include_str!("../templates/js/tool.js")),
            ("README.md", include_str!("../templates/js/README.md")),
            ("test.sh", TEST_SH),
            (".gitignore", GITIGNORE),
        ],
        Lang::C => &[
            ("plugin.c", include_str!("../templates/c/plugin.c")),
            ("README.md", include_str!("../templates/c/README.md")),
            ("test.sh", TEST_SH),
            (".gitignore", GITIGNORE),
        ],
    }
}

/// The `keel-sdk` crate in the source tree this crate was built from (`sdk/rust`), if it is
/// still there: the default SDK of a Rust scaffold.
pub fn default_rust_sdk() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../sdk/rust");
    let dir = std::fs::canonicalize(dir).ok()?;
    dir.join("Cargo.toml").is_file().then_some(dir)
}

/// Check `name` as a tool project (and plugin) name: `[a-z][a-z0-9_-]{0,63}` without `__`
/// (plugin names cannot hold `__`; a leading letter keeps it a valid cargo package and npm name).
pub fn check_name(name: &str) -> Result<(), BuildError> {
    let valid = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && !name.contains("__")
        && !name.ends_with(['-', '_']);
    if valid {
        Ok(())
    } else {
        Err(BuildError::Project(format!(
            "`{name}` is not a valid tool name: use lowercase letters, digits, `-` and `_` (at most 64, starting with a letter, no `__`), e.g. `my-tool`"
        )))
    }
}

/// What to scaffold.
#[derive(Debug, Clone)]
pub struct NewProject {
    /// The tool's (and plugin's) name.
    pub name: String,
    /// Its language.
    pub lang: Lang,
    /// Where to create it (must not exist, or be an empty directory).
    pub dir: PathBuf,
    /// Rust only: the `keel-sdk` crate to depend on (default [`default_rust_sdk`]).
    pub sdk_path: Option<PathBuf>,
}

/// Create the project; returns the files written (relative to `project.dir`).
pub fn scaffold(project: &NewProject) -> Result<Vec<PathBuf>, BuildError> {
    check_name(&project.name)?;
    let dir = &project.dir;
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BuildError::Project(format!(
                    "{} already exists and is not empty; choose another --dir or name",
                    dir.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            return Err(BuildError::Project(format!(
                "{} exists and is not a directory",
                dir.display()
            )));
        }
        Err(e) => return Err(e.into()),
    }
    let (sdk_path, sdk_note) = match project.lang {
        Lang::Rust => rust_sdk(project.sdk_path.as_deref())?,
        _ => (String::new(), String::new()),
    };
    let render = |template: &str| {
        template
            .replace("{{name}}", &project.name)
            .replace("{{sdk_path}}", &sdk_path)
            .replace("{{sdk_note}}", &sdk_note)
    };
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for (path, template) in templates(project.lang) {
        let file = dir.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, render(template))?;
        if path.ends_with(".sh") {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))?;
        }
        written.push(PathBuf::from(path));
    }
    Ok(written)
}

/// The SDK path written into a Rust scaffold's `Cargo.toml`, and a note saying where it is from.
fn rust_sdk(given: Option<&Path>) -> Result<(String, String), BuildError> {
    let (dir, note) = match given {
        Some(dir) => {
            let dir = std::fs::canonicalize(dir)
                .map_err(|e| BuildError::Project(format!("--sdk-path {}: {e}", dir.display())))?;
            (dir, "the path given to `keel new --sdk-path`.")
        }
        None => (
            default_rust_sdk().ok_or_else(|| {
                BuildError::Project(
                    "cannot find the Rust SDK (keel-sdk is not on crates.io): pass --sdk-path DIR, the `sdk/rust` directory of a Keel checkout".into(),
                )
            })?,
            "sdk/rust of the Keel source tree this keel was built from.",
        ),
    };
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap_or_default();
    if !manifest.contains("name = \"keel-sdk\"") {
        return Err(BuildError::Project(format!(
            "{} is not the keel-sdk crate (no Cargo.toml naming keel-sdk)",
            dir.display()
        )));
    }
    let text = dir
        .to_str()
        .ok_or_else(|| BuildError::Project(format!("{} is not a UTF-8 path", dir.display())))?;
    // A TOML basic string: escape what would end or break it.
    Ok((text.replace('\\', "\\\\").replace('"', "\\\""), note.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["a", "my-tool", "tool_2", &"x".repeat(64)] {
            check_name(good).unwrap();
        }
        for bad in [
            "",
            "My",
            "2tool",
            "a b",
            "a/b",
            "a__b",
            "-a",
            "a-",
            "ü",
            &"x".repeat(65),
            "../x",
        ] {
            let error = check_name(bad).unwrap_err();
            assert!(error.to_string().contains("not a valid tool name"), "{bad}: {error}");
        }
    }

    #[test]
    fn every_language_scaffolds_its_files_with_the_name_filled_in() {
        let root = tempfile::tempdir().unwrap();
        for (lang, entry) in [
            (Lang::Rust, "src/lib.rs"),
            (Lang::Python, "app.py"),
            (Lang::Js, "tool.js"),
            (Lang::C, "plugin.c"),
        ] {
            let dir = root.path().join(format!("{lang:?}"));
            let files = scaffold(&NewProject {
                name: "my-tool".into(),
                lang,
                dir: dir.clone(),
                sdk_path: None,
            })
            .unwrap();
            assert!(files.contains(&PathBuf::from(entry)), "{files:?}");
            assert!(files.contains(&PathBuf::from("README.md")), "{files:?}");
            for file in &files {
                let text = std::fs::read_to_string(dir.join(file)).unwrap();
                for placeholder in ["{{name}}", "{{sdk_path}}", "{{sdk_note}}"] {
                    assert!(
                        !text.contains(placeholder),
                        "{lang:?} {}: {placeholder} is left",
                        file.display()
                    );
                }
            }
            let readme = std::fs::read_to_string(dir.join("README.md")).unwrap();
            assert!(readme.contains("keel call my-tool/greet"), "{readme}");
            if lang == Lang::Rust {
                let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
                let sdk = default_rust_sdk().unwrap();
                assert!(
                    manifest.contains(&format!("path = \"{}\"", sdk.display())),
                    "{manifest}"
                );
            } else {
                let mode = std::os::unix::fs::PermissionsExt::mode(
                    &std::fs::metadata(dir.join("test.sh")).unwrap().permissions(),
                );
                assert_eq!(mode & 0o111, 0o111);
            }
        }
    }

    #[test]
    fn an_existing_non_empty_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let project = NewProject {
            name: "x".into(),
            lang: Lang::C,
            dir: dir.path().to_path_buf(),
            sdk_path: None,
        };
        // Empty: fine.
        scaffold(&project).unwrap();
        let before = std::fs::read_to_string(dir.path().join("plugin.c")).unwrap();
        let error = scaffold(&NewProject {
            name: "y".into(),
            ..project.clone()
        })
        .unwrap_err();
        assert!(error.to_string().contains("not empty"), "{error}");
        // Nothing was overwritten.
        assert_eq!(std::fs::read_to_string(dir.path().join("plugin.c")).unwrap(), before);
        let file = dir.path().join("plugin.c");
        let error = scaffold(&NewProject { dir: file, ..project }).unwrap_err();
        assert!(error.to_string().contains("not a directory"), "{error}");
    }

    #[test]
    fn a_wrong_sdk_path_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let error = scaffold(&NewProject {
            name: "x".into(),
            lang: Lang::Rust,
            dir: dir.path().join("x"),
            sdk_path: Some(dir.path().to_path_buf()),
        })
        .unwrap_err();
        assert!(error.to_string().contains("not the keel-sdk crate"), "{error}");
        assert!(!dir.path().join("x").exists());
    }
}
