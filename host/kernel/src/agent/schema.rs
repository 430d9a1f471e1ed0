//! JSON Schema validation of tool arguments, with the `jsonschema` crate.
//!
//! Tool schemas come from plugins (schemars in the Rust SDK, hand-written elsewhere), so the whole
//! of JSON Schema applies: `$ref`/`$defs`, `pattern`, `if`/`then`, `dependentRequired`, ... — not
//! a hand-picked subset. The crate is used with its default features off: no HTTP client, no file
//! access. A schema that `$ref`s anything outside itself cannot be compiled, and then every call
//! is refused with that reason (failing closed) rather than validated against part of the schema.
//!
//! Each schema is compiled once and kept in a small cache keyed by the schema itself (its JSON
//! value, hashed and compared structurally: no serialisation per call; bounded: see
//! [`CACHE_CAPACITY`]); validating a call is then a lookup and a walk over the arguments.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::Value;

/// Compiled schemas kept at most. Past it the cache starts over: a host serves a bounded set of
/// tools, so this is only reached when something feeds it an unbounded stream of schemas.
pub const CACHE_CAPACITY: usize = 256;
/// Errors reported per validation at most (the rest are counted in one last line).
pub const MAX_ERRORS: usize = 16;
/// Characters of one error line at most: a message may quote the offending value.
pub const MAX_ERROR_CHARS: usize = 300;

/// A compiled schema, or why the schema cannot be compiled.
type Compiled = Arc<Result<jsonschema::Validator, String>>;

static CACHE: LazyLock<Mutex<HashMap<Value, Compiled>>> = LazyLock::new(Default::default);

/// Validate `value` against `schema`; every violation as one line `"<json pointer>: <problem>"`
/// (the pointer is `/` for the value itself). A schema that cannot be compiled fails every value,
/// with one line saying why.
pub fn validate(schema: &Value, value: &Value) -> Result<(), Vec<String>> {
    let compiled = compiled(schema);
    let validator = match compiled.as_ref() {
        Ok(validator) => validator,
        Err(why) => return Err(vec![one_line(&format!("/: the tool's input schema is invalid: {why}"))]),
    };
    let mut errors = Vec::new();
    let mut more = 0usize;
    for error in validator.iter_errors(value) {
        if errors.len() == MAX_ERRORS {
            more += 1;
            continue;
        }
        let pointer = error.instance_path().as_str();
        let at = if pointer.is_empty() { "/" } else { pointer };
        errors.push(one_line(&format!("{at}: {error}")));
    }
    if more > 0 {
        errors.push(format!("... and {more} more"));
    }
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

/// Why `schema` is not a JSON Schema arguments could be validated against (one line), if it is
/// not: checked when a plugin is installed, so a broken schema is the plugin's error there, not
/// every caller's `invalid_input` later. Not cached (an install may bring a thousand schemas).
pub fn check(schema: &Value) -> Result<(), String> {
    jsonschema::validator_for(schema)
        .map(drop)
        .map_err(|e| one_line(&e.to_string()))
}

/// The compiled form of `schema`, from the cache or compiled now (outside the lock).
fn compiled(schema: &Value) -> Compiled {
    if let Some(hit) = lock().get(schema) {
        return hit.clone();
    }
    let compiled: Compiled = Arc::new(jsonschema::validator_for(schema).map_err(|e| e.to_string()));
    let mut cache = lock();
    if cache.len() >= CACHE_CAPACITY {
        cache.clear();
    }
    cache.entry(schema.clone()).or_insert(compiled).clone()
}

fn lock() -> std::sync::MutexGuard<'static, HashMap<Value, Compiled>> {
    // A panic while holding the lock leaves a map that is still consistent.
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// `text` on one line (line breaks as spaces), cut at [`MAX_ERROR_CHARS`] characters.
fn one_line(text: &str) -> String {
    let flat: String = text.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    match flat.char_indices().nth(MAX_ERROR_CHARS) {
        Some((cut, _)) => format!("{}...", &flat[..cut]),
        None => flat,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{CACHE_CAPACITY, MAX_ERRORS, compiled, lock, validate};

    #[test]
    fn schemars_style_objects() {
        let schema = json!({
            "type": "object",
            "properties": {
                "path": { "type": "string", "minLength": 1 },
                "mode": { "enum": ["r", "w"] },
                "count": { "type": ["integer", "null"], "minimum": 0 },
                "tags": { "type": "array", "items": { "type": "string" }, "maxItems": 2 }
            },
            "required": ["path"],
            "additionalProperties": false
        });
        assert!(validate(&schema, &json!({"path": "/tmp/a", "mode": "r", "count": 3})).is_ok());
        assert!(validate(&schema, &json!({"path": "/tmp/a", "count": null})).is_ok());
        let errs = validate(&schema, &json!({"mode": "x", "count": -1, "tags": [1], "extra": true})).unwrap_err();
        let text = errs.join("\n");
        assert_eq!(errs.len(), 5, "{text}");
        assert!(text.contains("/: \"path\" is a required property"), "{text}");
        assert!(text.contains("/mode: \"x\" is not one of"), "{text}");
        assert!(text.contains("/count: -1 is less than the minimum of 0"), "{text}");
        assert!(text.contains("/tags/0: 1 is not of type \"string\""), "{text}");
        assert!(
            text.contains("/: Additional properties are not allowed ('extra' was unexpected)"),
            "{text}"
        );
        assert!(validate(&schema, &json!("not an object")).is_err());
        assert!(validate(&json!({}), &json!({"anything": 1})).is_ok());
        assert!(
            validate(
                &json!({"oneOf": [{"type": "string"}, {"type": "integer"}]}),
                &json!(1.5)
            )
            .is_err()
        );
        assert!(validate(&json!({"type": "number"}), &json!(2)).is_ok());
    }

    /// What the old hand-written subset skipped is checked now: `$ref`, `pattern`, conditionals.
    #[test]
    fn the_whole_of_json_schema_applies() {
        let schema = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object",
            "properties": { "target": { "$ref": "#/$defs/Target" } },
            "required": ["target"],
            "$defs": {
                "Target": {
                    "type": "object",
                    "properties": { "host": { "type": "string", "pattern": "^[a-z.]+$" } },
                    "required": ["host"],
                    "if": { "properties": { "host": { "const": "localhost" } } },
                    "then": { "required": ["port"] }
                }
            }
        });
        assert!(validate(&schema, &json!({"target": {"host": "example.org"}})).is_ok());
        let errs = validate(&schema, &json!({"target": {"host": "Bad Host!"}})).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("/target/host: \"Bad Host!\" does not match"),
            "{errs:?}"
        );
        let errs = validate(&schema, &json!({"target": {"host": "localhost"}})).unwrap_err();
        assert_eq!(errs, ["/target: \"port\" is a required property"]);
        // Formats are annotations (2020-12), and unknown ones (schemars' `uint64`) are fine.
        assert!(validate(&json!({"type": "integer", "format": "uint64"}), &json!(3)).is_ok());
    }

    /// No network, no files: a schema pointing outside itself is refused, and so is every call.
    #[test]
    fn remote_refs_and_broken_schemas_fail_closed() {
        for schema in [
            json!({"$ref": "https://example.invalid/schema.json"}),
            json!({"$ref": "file:///etc/passwd"}),
            json!({"type": "string", "pattern": "(unclosed"}),
            json!({"type": 17}),
        ] {
            let errs = validate(&schema, &json!("anything")).unwrap_err();
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert!(
                errs[0].starts_with("/: the tool's input schema is invalid: "),
                "{errs:?}"
            );
        }
    }

    #[test]
    fn errors_are_single_bounded_lines() {
        let schema = json!({"type": "array", "items": {"type": "integer"}});
        let long = "x\n".repeat(5000);
        let errs = validate(&schema, &json!(vec![long.clone(); 40])).unwrap_err();
        assert_eq!(errs.len(), MAX_ERRORS + 1, "{errs:?}");
        assert_eq!(errs.last().unwrap(), &format!("... and {} more", 40 - MAX_ERRORS));
        for e in &errs {
            assert!(
                !e.contains('\n') && e.chars().count() <= super::MAX_ERROR_CHARS + 3,
                "{e}"
            );
        }
        assert!(errs[0].starts_with("/0: "), "{errs:?}");
    }

    #[test]
    fn a_schema_is_compiled_once_and_the_cache_is_bounded() {
        let schema = json!({"type": "object", "properties": {"cache-probe": {"type": "string"}}});
        let first = compiled(&schema);
        assert!(
            std::sync::Arc::ptr_eq(&first, &compiled(&schema)),
            "the second use reuses the first compile"
        );
        assert!(validate(&schema, &json!({"cache-probe": 1})).is_err());
        for i in 0..CACHE_CAPACITY + 10 {
            compiled(&json!({"const": i}));
            assert!(lock().len() <= CACHE_CAPACITY);
        }
    }
}
