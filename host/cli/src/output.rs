//! Errors and exit codes at the CLI edge: one clear sentence, no backtraces.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::process::ExitCode;

pub use keel_app::AppError as CliError;

/// Print `error` on stderr (one terminal-safe line) and return its exit code.
pub fn report(error: CliError) -> ExitCode {
    eprintln!("error: {}", sanitize_line(&error.message));
    ExitCode::from(error.exit_code())
}

/// Print `value` as pretty JSON on stdout (terminal-safe, see [`json_text`]).
pub fn print_json(value: &impl serde::Serialize) {
    println!("{}", json_text(value, true));
}

/// `value` as JSON text that is also safe on a terminal: serde_json escapes C0 controls in
/// strings but writes DEL, C1 controls (U+009B is a one-character CSI) and bidi overrides raw;
/// those can only occur inside strings, so they become `\uXXXX` escapes (the same JSON value).
pub fn json_text(value: &impl serde::Serialize, pretty: bool) -> String {
    let text = if pretty {
        serde_json::to_string_pretty(value)
    } else {
        serde_json::to_string(value)
    }
    .expect("CLI values serialize");
    if !text.chars().any(|c| c.is_control() || is_bidi_control(c)) {
        return text;
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        // Pretty output's own newlines and indentation are the only C0 characters outside strings.
        if (c.is_control() && !matches!(c, '\n' | ' ')) || is_bidi_control(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// Result of a command.
pub type CliResult = Result<ExitCode, CliError>;

/// Escape terminal control characters in text a plugin (or a model) produced, so printing it cannot
/// move the cursor, rewrite earlier lines, set the window title or write the clipboard.
///
/// C0 controls (U+0000–U+001F) other than `\n` and `\t`, DEL (U+007F) and C1 controls
/// (U+0080–U+009F, e.g. the one-character CSI U+009B) are shown as `\xNN` / `\u{NN}`; a `\r` is
/// escaped too (it would let the text overwrite its own line), and so are bidi overrides (U+202E
/// ...). Text without any is borrowed as is.
/// Use [`sanitize_line`] for a field printed on one line.
pub fn sanitize(text: &str) -> Cow<'_, str> {
    escape(text, |c| c == '\n' || c == '\t')
}

/// Like [`sanitize`], for one-line fields (a name, a version, a path, an error message): newlines
/// and tabs are escaped too, so the text cannot forge the lines printed after it.
pub fn sanitize_line(text: &str) -> Cow<'_, str> {
    escape(text, |_| false)
}

/// A tool call's `arguments` as one escaped line, cut past `max` characters with a note saying
/// so, how many bytes there are in all and `where_all` they can be read: an approval prompt or
/// an action list shows what the call is about without a multi-megabyte argument flooding the
/// terminal (or scrolling the start of the question away); the cut is never silent.
pub fn arguments_line(arguments: &serde_json::Value, max: usize, where_all: &str) -> String {
    let text = serde_json::to_string(arguments).unwrap_or_default();
    let shown = sanitize_line(&text);
    if shown.chars().count() <= max {
        return shown.into_owned();
    }
    let cut: String = shown.chars().take(max).collect();
    format!("{cut}… ({} bytes in all; {where_all})", text.len())
}

fn escape(text: &str, keep: impl Fn(char) -> bool) -> Cow<'_, str> {
    // `is_control` is exactly C0, DEL and C1; bidi overrides could reorder what the line appears to say.
    let bad = |c: char| (c.is_control() || is_bidi_control(c)) && !keep(c);
    if !text.chars().any(bad) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if !bad(c) {
            out.push(c);
            continue;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x80 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
        }
    }
    Cow::Owned(out)
}

/// Unicode bidirectional formatting characters (the "Trojan Source" set).
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// Let a write to a closed pipe end the process quietly, as other command-line tools do
/// (`keel plugins list | head -1`): Rust ignores `SIGPIPE`, so `println!` would panic instead.
/// Called first thing in `main`; everything the command stored before is already committed.
pub fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called once at startup before any other thread exists; SIG_DFL is a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Undo [`default_sigpipe`] for a long-running server (`keel mcp`, `serve`, `worker`): a write to
/// a closed pipe fails with `EPIPE`, which ends that one session. Called before any other thread
/// exists.
pub fn ignore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: as in `default_sigpipe`: one thread, a valid disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
}

/// The exit status of a command interrupted by Ctrl-C (128 + SIGINT), as shells report it.
pub const INTERRUPTED: u8 = 130;

/// A token the first Ctrl-C (SIGINT) from now on cancels, for a command that stops its call
/// cleanly (`keel call`, `keel exec --lang`: the guest stops, the job ends CANCELLED and the
/// attempt is charged) instead of dying with the call in flight. A second Ctrl-C exits at once.
pub fn cancel_on_interrupt() -> Result<keel_kernel::context::CancellationToken, CliError> {
    let mut interrupts = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| CliError::internal(format!("cannot watch for Ctrl-C: {e}")))?;
    let token = keel_kernel::context::CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        if interrupts.recv().await.is_some() {
            cancel.cancel();
            if interrupts.recv().await.is_some() {
                std::process::exit(i32::from(INTERRUPTED));
            }
        }
    });
    Ok(token)
}

/// A writer for what sandboxed code prints, bound for a terminal: the bytes are written with
/// control characters escaped as [`sanitize`] does (newlines and tabs kept), and bytes that are
/// not UTF-8 shown as `\xNN`, so the code cannot set the window title, write the clipboard or
/// rewrite the screen. A character split across two writes is completed before it is judged.
pub struct TerminalSafe<W> {
    inner: W,
    /// The start of a character whose remaining bytes have not been written yet.
    carry: Vec<u8>,
    /// Escaped text not yet taken by `inner`, from `at`.
    pending: Vec<u8>,
    at: usize,
}

impl<W> TerminalSafe<W> {
    /// Escape what is written before it reaches `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            carry: Vec::new(),
            pending: Vec::new(),
            at: 0,
        }
    }

    /// Escape `bytes` (after the carried start of a character) into `pending`; at the `end`, an
    /// unfinished character is shown as its bytes.
    fn escape(&mut self, bytes: &[u8], end: bool) {
        let mut all = std::mem::take(&mut self.carry);
        all.extend_from_slice(bytes);
        let keep = if end { 0 } else { unfinished_tail(&all) };
        let (body, tail) = all.split_at(all.len() - keep);
        for chunk in body.utf8_chunks() {
            self.pending.extend_from_slice(sanitize(chunk.valid()).as_bytes());
            for byte in chunk.invalid() {
                self.pending.extend_from_slice(format!("\\x{byte:02x}").as_bytes());
            }
        }
        self.carry = tail.to_vec();
    }
}

impl<W: tokio::io::AsyncWrite + Unpin> TerminalSafe<W> {
    /// Write out `pending`; ready when it is all written.
    fn poll_pending(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        use std::task::{Poll, ready};
        while self.at < self.pending.len() {
            let n = ready!(std::pin::Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.at..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.at += n;
        }
        self.pending.clear();
        self.at = 0;
        Poll::Ready(Ok(()))
    }
}

/// How many bytes at the end of `bytes` start a character that is not finished yet.
fn unfinished_tail(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        if byte & 0xc0 == 0x80 {
            continue;
        }
        let needs = match byte {
            0xf0..=0xf7 => 4,
            0xe0..=0xef => 3,
            0xc0..=0xdf => 2,
            _ => 1,
        };
        return if needs > back { back } else { 0 };
    }
    0
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for TerminalSafe<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        std::task::ready!(this.poll_pending(cx))?;
        this.escape(buf, false);
        // Taken: what `inner` cannot take now is written by the next write or flush.
        if let std::task::Poll::Ready(Err(e)) = this.poll_pending(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_pending(cx))?;
        std::pin::Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.carry.is_empty() {
            std::task::ready!(this.poll_pending(cx))?;
            this.escape(&[], true);
        }
        std::task::ready!(this.poll_pending(cx))?;
        std::pin::Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A multi-megabyte argument neither floods an approval prompt nor is cut silently; the
    /// line stays one line whatever the arguments hold.
    #[test]
    fn long_arguments_are_cut_and_say_so() {
        let short = serde_json::json!({"path": "/tmp/a"});
        assert_eq!(arguments_line(&short, 300, "x"), r#"{"path":"/tmp/a"}"#);
        let big = serde_json::json!({"content": "A".repeat(2 << 20), "path": "/etc/passwd"});
        let line = arguments_line(&big, 2_000, "`keel actions list --json` shows them all");
        assert!(line.chars().count() < 2_100, "{} characters", line.chars().count());
        assert!(
            line.ends_with(&format!(
                "… ({} bytes in all; `keel actions list --json` shows them all)",
                serde_json::to_string(&big).unwrap().len()
            )),
            "{}",
            &line[line.len() - 120..]
        );
        let forged = serde_json::json!({"a": "x\n\rAllow? y\u{1b}[2J"});
        let line = arguments_line(&forged, 300, "x");
        assert!(!line.contains(['\n', '\r', '\u{1b}']), "{line}");
    }

    #[tokio::test]
    async fn printed_bytes_reach_a_terminal_escaped_even_split_across_writes() {
        use tokio::io::AsyncWriteExt as _;
        let mut out = TerminalSafe::new(Vec::new());
        // "é" (c3 a9) and "✓" (e2 9c 93) split across writes; an invalid byte; controls.
        for part in [
            &b"a\xc3"[..],
            b"\xa9 \xe2\x9c",
            b"\x93\x1b]0;t\x07\xff\n\tx\r",
            b"\xc2\x9b",
        ] {
            out.write_all(part).await.unwrap();
        }
        out.shutdown().await.unwrap();
        assert_eq!(
            String::from_utf8(out.inner).unwrap(),
            "a\u{e9} \u{2713}\\x1b]0;t\\x07\\xff\n\tx\\r\\u{9b}"
        );
        // A character cut off by the end is shown as its bytes.
        let mut out = TerminalSafe::new(Vec::new());
        out.write_all(b"z\xe2\x9c").await.unwrap();
        out.shutdown().await.unwrap();
        assert_eq!(String::from_utf8(out.inner).unwrap(), "z\\xe2\\x9c");
    }

    #[test]
    fn control_characters_are_escaped_visibly() {
        assert!(matches!(sanitize("plain text é ✓\n\tnext"), Cow::Borrowed(_)));
        assert_eq!(sanitize("a\x1b[2Jb"), "a\\x1b[2Jb");
        assert_eq!(sanitize("\x1b]0;title\x07"), "\\x1b]0;title\\x07");
        assert_eq!(sanitize("\u{9b}31m\u{7f}\r"), "\\u{9b}31m\\x7f\\r");
        assert_eq!(sanitize("one\ntwo"), "one\ntwo");
        assert_eq!(sanitize_line("one\ntwo\tthree\r"), "one\\ntwo\\tthree\\r");
        assert_eq!(sanitize_line("\u{85}next line"), "\\u{85}next line");
        assert_eq!(sanitize("x\u{202e}y"), "x\\u{202e}y");
        let json = json_text(&serde_json::json!({"a": "\x1b[0m\u{9b}\u{7f}\u{202e}"}), true);
        assert!(!json.chars().any(|c| c.is_control() && c != '\n'), "{json}");
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back["a"], "\x1b[0m\u{9b}\u{7f}\u{202e}");
        for s in [
            sanitize_line("\x00\x1b\u{7f}\u{80}\u{9f}"),
            sanitize("\x00\x1b\u{7f}\u{80}\u{9f}"),
        ] {
            assert!(!s.chars().any(|c| c.is_control()), "{s:?}");
        }
    }
}
