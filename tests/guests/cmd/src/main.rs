//! A WASI command for `keel exec`: `cat PATH` prints a file, `write PATH TEXT` writes one,
//! `env VAR` prints a variable, `exit N` exits with N (WASI 0.2 reports only success/failure),
//! anything else echoes its arguments.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["cat", path] => match std::fs::read_to_string(path) {
            Ok(text) => print!("{text}"),
            Err(e) => {
                eprintln!("cat {path}: {e}");
                std::process::exit(3);
            }
        },
        ["write", path, text] => {
            if let Err(e) = std::fs::write(path, text) {
                eprintln!("write {path}: {e}");
                std::process::exit(4);
            }
        }
        ["env", var] => println!("{}", std::env::var(var).unwrap_or_else(|_| "<unset>".into())),
        ["exit", code] => std::process::exit(code.parse().unwrap_or(1)),
        other => println!("args: {}", other.join(" ")),
    }
}
