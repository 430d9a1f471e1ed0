//! Canonical JSON and call digests.
//!
//! An approval authorises one exact tool call. Two argument objects that differ only in key order
//! or whitespace are the same call, so both approvals and session approvals key on the digest of
//! the tool name plus the canonical form of its arguments.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// Serialize `value` canonically: object keys sorted (by UTF-16 code units would be RFC 8785;
/// byte order is used here and is stable), no insignificant whitespace. Independent of whether
/// serde_json's `preserve_order` feature is enabled somewhere in the build.
pub fn canonical_json(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Hex sha256 digest identifying one exact tool call: `tool` + NUL + canonical arguments.
pub fn call_digest(tool: &str, arguments: &Value) -> String {
    let mut hasher = Sha256::new();
    hasher.update(tool.as_bytes());
    hasher.update([0u8]);
    hasher.update(canonical_json(arguments).as_bytes());
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let a: Value = serde_json::from_str(r#"{"b": 1, "a": {"y": [1, 2], "x": null}}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":{"x":null,"y":[1,2]},"b":1}"#).unwrap();
        assert_eq!(canonical_json(&a), r#"{"a":{"x":null,"y":[1,2]},"b":1}"#);
        assert_eq!(call_digest("fs/write", &a), call_digest("fs/write", &b));
    }

    #[test]
    fn different_tool_or_arguments_differ() {
        let args = json!({"path": "/tmp/a"});
        assert_ne!(call_digest("fs/write", &args), call_digest("fs/read", &args));
        assert_ne!(
            call_digest("fs/write", &args),
            call_digest("fs/write", &json!({"path": "/tmp/b"}))
        );
        assert_ne!(canonical_json(&json!([1, 2])), canonical_json(&json!([2, 1])));
    }
}
