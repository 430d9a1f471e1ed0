//! Building C tool projects with `sdk/c` (clang + wasi-libc), componentized in-process.
//!
//! A C project is a directory of `.c` files (its root and, when present, `src/`), each compiled
//! with the project root, `include/` and the SDK header `keel.h` on the include path. One of them
//! declares the plugin with `KEEL_EXPORT_PLUGIN(...)` (see `sdk/c/README.md`).
//!
//! Steps, all but the compiler in this process:
//! 1. `wit-bindgen-c` bindings of `wit/plugin.wit`, world `tool` (`tool.h`, `tool.c`, and the
//!    object file carrying the component type);
//! 2. clang (`--target=wasm32-wasi -mexec-model=reactor`, Debian's preview1 wasi-libc) compiles
//!    and links the project, the SDK runtime (`sdk/c/keel.c`) and the bindings into a core module;
//! 3. `wit-component` turns the module into a component, adapting WASI preview1 imports with the
//!    preview1 adapter of the wasmtime release Keel runs on.
//!
//! The SDK sources and the WIT are compiled into this crate, so only clang, lld and wasi-libc
//! need to be installed (`apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32`).

use std::path::{Path, PathBuf};
use std::process::Command;

use wasi_preview1_component_adapter_provider::{
    WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME, WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
};

use crate::BuildError;

/// Keel's WIT package (`wit/plugin.wit`), as compiled into this crate.
pub const PLUGIN_WIT: &str = include_str!("../../../wit/plugin.wit");

/// The SDK header, `sdk/c/keel.h`.
pub const KEEL_H: &str = include_str!("../../../sdk/c/keel.h");

/// The SDK runtime, `sdk/c/keel.c`.
pub const KEEL_C: &str = include_str!("../../../sdk/c/keel.c");

/// How to install the toolchain on Debian/Ubuntu.
pub const APT_INSTALL: &str = "apt-get install clang lld wasi-libc libclang-rt-14-dev-wasm32";

fn missing(tool: &str) -> BuildError {
    BuildError::MissingToolchain {
        tool: tool.into(),
        install: APT_INSTALL.into(),
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The clang to use: `$KEEL_CLANG`, else `clang` or a versioned `clang-NN` on `PATH`.
fn find_clang() -> Result<PathBuf, BuildError> {
    if let Some(clang) = std::env::var_os("KEEL_CLANG") {
        return Ok(PathBuf::from(clang));
    }
    [
        "clang", "clang-19", "clang-18", "clang-17", "clang-16", "clang-15", "clang-14",
    ]
    .into_iter()
    .find(|c| on_path(c))
    .map(PathBuf::from)
    .ok_or_else(|| missing("clang"))
}

/// The wasi-libc sysroot: `$KEEL_WASI_SYSROOT`, else Debian's (`/usr`) or the upstream layout.
fn find_sysroot() -> Result<PathBuf, BuildError> {
    if let Some(root) = std::env::var_os("KEEL_WASI_SYSROOT") {
        return Ok(PathBuf::from(root));
    }
    ["/usr", "/usr/share/wasi-sysroot", "/opt/wasi-sdk/share/wasi-sysroot"]
        .into_iter()
        .map(PathBuf::from)
        .find(|root| root.join("lib/wasm32-wasi/libc.a").is_file())
        .ok_or_else(|| missing("wasi-libc"))
}

/// The project's C sources, sorted: `*.c` in its root and in `src/`.
fn sources(project: &Path) -> Result<Vec<PathBuf>, BuildError> {
    let mut found = Vec::new();
    for dir in [project.to_path_buf(), project.join("src")] {
        if !dir.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "c") && path.is_file() {
                found.push(path);
            }
        }
    }
    found.sort();
    if found.is_empty() {
        return Err(BuildError::Project(format!(
            "{}: no .c files (a C project has its sources in its root or src/)",
            project.display()
        )));
    }
    Ok(found)
}

fn failed(step: &str, error: impl std::fmt::Display) -> BuildError {
    BuildError::Failed {
        step: step.into(),
        output: format!("{error:#}"),
    }
}

/// Write the `wit-bindgen c` bindings of world `tool` into `dir`.
pub fn write_bindings(dir: &Path) -> Result<(), BuildError> {
    let mut resolve = wit_parser::Resolve::default();
    let package = resolve
        .push_str("plugin.wit", PLUGIN_WIT)
        .map_err(|e| failed("parsing wit/plugin.wit", e))?;
    let world = resolve
        .select_world(&[package], Some("tool"))
        .map_err(|e| failed("parsing wit/plugin.wit", e))?;
    let mut files = wit_bindgen_core::Files::default();
    wit_bindgen_c::Opts::default()
        .build()
        .generate(&mut resolve, world, &mut files)
        .map_err(|e| failed("wit-bindgen c", e))?;
    for (name, contents) in files.iter() {
        std::fs::write(dir.join(name), contents)?;
    }
    Ok(())
}

/// Turn a core module (with its component-type custom section) into a component.
pub fn componentize(module: &[u8]) -> Result<Vec<u8>, BuildError> {
    wit_component::ComponentEncoder::default()
        .validate(true)
        .module(module)
        .and_then(|e| {
            e.adapter(
                WASI_SNAPSHOT_PREVIEW1_ADAPTER_NAME,
                WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
            )
        })
        .and_then(|e| e.encode())
        .map_err(|e| failed("making the component (wit-component)", e))
}

/// The C toolchain a build uses.
#[derive(Debug, Clone)]
pub struct Toolchain {
    /// The clang binary.
    pub clang: PathBuf,
    /// The wasi-libc sysroot (holds `lib/wasm32-wasi/libc.a`).
    pub sysroot: PathBuf,
}

impl Toolchain {
    /// Find clang, wasm-ld and wasi-libc (see [`APT_INSTALL`]); `$KEEL_CLANG` and
    /// `$KEEL_WASI_SYSROOT` override the search.
    pub fn find() -> Result<Self, BuildError> {
        let clang = find_clang()?;
        let sysroot = find_sysroot()?;
        if !on_path("wasm-ld") && std::env::var_os("KEEL_CLANG").is_none() {
            return Err(missing("wasm-ld (lld)"));
        }
        Ok(Self { clang, sysroot })
    }
}

/// Build the project in `project` into a component at `out`.
pub fn build(project: &Path, out: &Path) -> Result<PathBuf, BuildError> {
    build_with(&Toolchain::find()?, project, out)
}

/// [`build`] with a given toolchain.
pub fn build_with(toolchain: &Toolchain, project: &Path, out: &Path) -> Result<PathBuf, BuildError> {
    let sources = sources(project)?;
    let Toolchain { clang, sysroot } = toolchain;
    if !sysroot.join("lib/wasm32-wasi/libc.a").is_file() {
        return Err(missing("wasi-libc"));
    }

    let work = tempfile::tempdir()?;
    let gen_dir = work.path();
    write_bindings(gen_dir)?;
    std::fs::write(gen_dir.join("keel.h"), KEEL_H)?;
    std::fs::write(gen_dir.join("keel.c"), KEEL_C)?;
    let core = gen_dir.join("core.wasm");

    let mut command = Command::new(clang);
    command
        .arg("--target=wasm32-wasi")
        .arg(format!("--sysroot={}", sysroot.display()))
        .args(["-mexec-model=reactor", "-Os", "-std=c11", "-Wall"])
        .arg("-I")
        .arg(gen_dir)
        .arg("-I")
        .arg(project)
        .arg("-I")
        .arg(project.join("include"))
        .args(&sources)
        .arg(gen_dir.join("keel.c"))
        .arg(gen_dir.join("tool.c"))
        .arg(gen_dir.join("tool_component_type.o"))
        .args(["-Wl,--strip-debug", "-Wl,-z,stack-size=1048576", "-o"])
        .arg(&core);
    let output = command.output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => missing(&clang.display().to_string()),
        _ => BuildError::Io(e),
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        // clang without the wasm32 runtime library or linker says so on stderr.
        if stderr.contains("libclang_rt.builtins-wasm32") {
            return Err(missing("libclang-rt-14-dev-wasm32 (compiler-rt for wasm32)"));
        }
        if stderr.contains("wasm-ld") && stderr.contains("not found") {
            return Err(missing("wasm-ld (lld)"));
        }
        return Err(BuildError::Failed {
            step: "clang".into(),
            output: stderr,
        });
    }
    let component = componentize(&std::fs::read(&core)?)?;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(out, component)?;
    Ok(out.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_name_the_exports_the_sdk_implements() {
        let dir = tempfile::tempdir().unwrap();
        write_bindings(dir.path()).unwrap();
        let header = std::fs::read_to_string(dir.path().join("tool.h")).unwrap();
        for name in ["exports_keel_plugin_tools_call", "exports_keel_plugin_tools_describe"] {
            assert!(header.contains(name) && KEEL_C.contains(name), "{name}");
        }
        assert!(dir.path().join("tool_component_type.o").is_file());
    }

    #[test]
    fn a_missing_compiler_or_libc_names_the_apt_packages() {
        let project = tempfile::tempdir().unwrap();
        std::fs::write(project.path().join("tool.c"), "int x;\n").unwrap();
        let out = project.path().join("out.wasm");
        let no_clang = Toolchain {
            clang: "/nonexistent/clang".into(),
            sysroot: "/nonexistent".into(),
        };
        for toolchain in [
            no_clang.clone(),
            Toolchain {
                sysroot: "/usr".into(),
                ..no_clang
            },
        ] {
            if !toolchain.sysroot.join("lib/wasm32-wasi/libc.a").is_file()
                && toolchain.sysroot != Path::new("/nonexistent")
            {
                continue; // wasi-libc not installed here: the first case covers it
            }
            match build_with(&toolchain, project.path(), &out) {
                Err(BuildError::MissingToolchain { install, .. }) => assert_eq!(install, APT_INSTALL),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn a_project_without_c_files_is_refused() {
        let project = tempfile::tempdir().unwrap();
        let error = sources(project.path()).unwrap_err();
        assert!(error.to_string().contains("no .c files"), "{error}");
    }
}
