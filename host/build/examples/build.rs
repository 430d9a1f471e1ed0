//! Build a tool project into a component from the command line, until `keel build` exists:
//!
//! ```sh
//! cargo run -p keel-build --example build -- LANG PROJECT_DIR OUT.wasm   # LANG: rust, python, js, c
//! ```

use std::path::Path;
use std::process::ExitCode;

use keel_build::Lang;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [lang, project, out] = args.as_slice() else {
        eprintln!("usage: build LANG PROJECT_DIR OUT.wasm   (LANG: rust, python, js, c)");
        return ExitCode::from(2);
    };
    let lang = match lang.as_str() {
        "rust" => Lang::Rust,
        "python" => Lang::Python,
        "js" | "javascript" => Lang::Js,
        "c" => Lang::C,
        other => {
            eprintln!("error: unknown language `{other}` (rust, python, js, c)");
            return ExitCode::from(2);
        }
    };
    let started = std::time::Instant::now();
    match keel_build::build(lang, Path::new(project), Path::new(out)) {
        Ok(path) => {
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            println!(
                "built {} ({size} bytes) in {:.1} s",
                path.display(),
                started.elapsed().as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
