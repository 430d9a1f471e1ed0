//! `textkit-rust`: the shared example tool set (`word-count`, `read-file`) in Rust.
//!
//! Every language's textkit gives byte-identical outputs for identical calls; the rules are in
//! `host/cli/tests/languages.rs`, which checks them.

use keel_sdk::prelude::*;

/// The directory `read-file` reads from (a guest path; the user maps a host directory onto it).
const DATA: &str = "/data";

/// Arguments of `word-count`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct WordCountInput {
    /// The text to count.
    text: String,
}

/// Counts of one text. Field order is the JSON key order.
#[derive(Serialize, JsonSchema)]
struct Counts {
    chars: usize,
    lines: usize,
    words: usize,
}

/// Arguments of `read-file`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct ReadFileInput {
    /// Absolute path of the file, under /data/.
    path: String,
}

/// One text file. Field order is the JSON key order.
#[derive(Serialize, JsonSchema)]
struct FileText {
    bytes: usize,
    path: String,
    text: String,
}

fn word_count(_ctx: &Context, input: WordCountInput) -> Result<Counts, ToolError> {
    let text = input.text;
    // `split_ascii_whitespace` splits on exactly space, \t, \n, \x0c and \r — but not \x0b, which
    // the textkit spec (and C's isspace) counts as whitespace, so split by hand.
    let is_space = |c: char| matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c');
    let words = text.split(is_space).filter(|w| !w.is_empty()).count();
    let lines = text.matches('\n').count() + usize::from(!text.is_empty() && !text.ends_with('\n'));
    Ok(Counts {
        chars: text.chars().count(),
        lines,
        words,
    })
}

fn read_file(_ctx: &Context, input: ReadFileInput) -> Result<FileText, ToolError> {
    let path = input.path;
    let under_data = path.starts_with('/') && !path.split('/').any(|c| c == "..") && path.starts_with("/data/");
    if !under_data {
        return Err(ToolError::denied(
            "filesystem",
            &path,
            format!("`{path}` is not a path under {DATA}/"),
        ));
    }
    // No preopen covers /data when it was not granted: then nothing under it exists for us.
    if !std::fs::metadata(DATA).is_ok_and(|m| m.is_dir()) {
        return Err(ToolError::denied(
            "filesystem",
            &path,
            format!("{DATA} is not granted to this plugin"),
        ));
    }
    let bytes = std::fs::read(&path).map_err(|e| ToolError::failed(format!("cannot read `{path}`: {e}")))?;
    let size = bytes.len();
    let text = String::from_utf8(bytes).map_err(|_| ToolError::failed(format!("`{path}` is not UTF-8 text")))?;
    Ok(FileText {
        bytes: size,
        path,
        text,
    })
}

struct Textkit;

impl Plugin for Textkit {
    fn meta() -> PluginMeta {
        PluginMeta::new(
            "textkit-rust",
            env!("CARGO_PKG_VERSION"),
            "Text utilities: count words, read text files under /data.",
        )
    }

    fn tools() -> Vec<Tool> {
        vec![
            Tool::new(
                "word-count",
                "Count the characters (Unicode scalar values), lines and words of a text.",
                word_count,
            )
            .idempotent(),
            Tool::new("read-file", "Read a UTF-8 text file under /data.", read_file)
                .idempotent()
                .reads(DATA),
        ]
    }
}

keel_sdk::export_plugin!(Textkit);
