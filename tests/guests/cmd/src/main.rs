//! A WASI command for `keel exec`: `cat PATH` prints a file, `write PATH TEXT` writes one,
//! `env VAR` prints a variable, `exit N` exits with N (WASI 0.2 reports only success/failure),
//! `spew N` writes N bytes to stdout (`spew N err`: to stderr) in 64 KiB writes, `line-sleep MS`
//! prints a line, sleeps MS milliseconds and prints another; anything else echoes its arguments.

use std::io::Write;

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
        ["spew", bytes, rest @ ..] => {
            let mut left: u64 = bytes.parse().expect("spew BYTES");
            let chunk: Vec<u8> = (0..64 * 1024).map(|i| b'a' + (i % 26) as u8).collect();
            let mut out: Box<dyn Write> = match rest {
                ["err"] => Box::new(std::io::stderr().lock()),
                _ => Box::new(std::io::stdout().lock()),
            };
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                out.write_all(&chunk[..n]).expect("write");
                left -= n as u64;
            }
            out.flush().expect("flush");
        }
        ["line-sleep", ms] => {
            println!("first line");
            std::io::stdout().flush().expect("flush");
            std::thread::sleep(std::time::Duration::from_millis(ms.parse().expect("line-sleep MS")));
            println!("last line");
        }
        ["exit", code] => std::process::exit(code.parse().unwrap_or(1)),
        other => println!("args: {}", other.join(" ")),
    }
}
