//! [`JsonText`]: a JSON document kept as its text, serialised once.
//!
//! A job's input and metadata, a journal entry's payload, an event's data and a ledger entry's
//! data are written by the kernel from typed values and stored as text; almost nothing reads them back as a tree. Building a
//! `serde_json::Value` for each (a map node and a `String` per field) and serialising that tree
//! again at the store was the largest part of a governed call's CPU in memory. `JsonText`
//! serialises the typed value straight to text once, shares it (`Arc`: copies of a row do not
//! copy it), hands the same text to the store, and parses only where a reader asks.

use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use serde_json::value::RawValue;

/// One valid JSON document as text (cheap to clone; equal when the documents are equal).
#[derive(Clone)]
pub struct JsonText(Arc<RawValue>);

impl JsonText {
    /// `value` serialised (straight to text, no intermediate tree).
    pub fn of<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        serde_json::value::to_raw_value(value).map(|raw| Self(Arc::from(raw)))
    }

    /// `text` if it is one valid JSON document.
    pub fn from_text(text: String) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text).map(|raw| Self(Arc::from(raw)))
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// The document as a tree.
    pub fn value(&self) -> Value {
        // Valid JSON by construction: parsing it cannot fail.
        serde_json::from_str(self.as_str()).unwrap_or(Value::Null)
    }

    /// The document decoded as a `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.as_str())
    }

    /// The top-level field `key` of an object document (`None` for another document, or when absent).
    pub fn field(&self, key: &str) -> Option<Value> {
        let fields: std::collections::HashMap<String, &RawValue> = serde_json::from_str(self.as_str()).ok()?;
        serde_json::from_str(fields.get(key)?.get()).ok()
    }

    /// `null` (shared: no allocation).
    pub fn null() -> Self {
        static NULL: std::sync::OnceLock<Arc<RawValue>> = std::sync::OnceLock::new();
        Self(
            NULL.get_or_init(|| Arc::from(RawValue::from_string("null".into()).expect("`null` is JSON")))
                .clone(),
        )
    }
}

impl Default for JsonText {
    /// `null`.
    fn default() -> Self {
        Self::null()
    }
}

impl From<Value> for JsonText {
    fn from(value: Value) -> Self {
        Self::from(&value)
    }
}

impl From<&Value> for JsonText {
    fn from(value: &Value) -> Self {
        // A `Value` always serialises (its map keys are strings).
        Self::of(value).expect("a serde_json::Value serialises")
    }
}

impl PartialEq for JsonText {
    /// The same document, however it is spelled (key order, spacing).
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str() || self.value() == other.value()
    }
}

impl PartialEq<Value> for JsonText {
    fn eq(&self, other: &Value) -> bool {
        self.value() == *other
    }
}

impl fmt::Debug for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for JsonText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for JsonText {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for JsonText {
    /// Through a tree, so any deserializer works (a `RawValue` only comes from JSON text).
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Value::deserialize(deserializer).map(Self::from)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn text_serialises_as_the_document_and_compares_by_content() {
        let a = JsonText::of(&json!({"b": 1, "a": [true, null]})).unwrap();
        let b = JsonText::from_text(r#"{ "a": [true, null], "b": 1 }"#.into()).unwrap();
        assert_eq!(a, b, "same document, other spelling");
        assert_ne!(a, JsonText::from(json!({"a": [true]})));
        let row = json!({ "input": a });
        assert_eq!(row, json!({"input": {"a": [true, null], "b": 1}}));
        assert_eq!(serde_json::to_string(&b).unwrap(), b.as_str(), "written as it is");
        let back: JsonText = serde_json::from_value(json!({"x": 1})).unwrap();
        assert_eq!(back.field("x"), Some(json!(1)));
        assert_eq!(back.field("y"), None);
        assert_eq!(JsonText::default().as_str(), "null");
    }

    #[test]
    fn invalid_text_is_refused() {
        assert!(JsonText::from_text("{".into()).is_err());
        assert!(JsonText::from_text("1 2".into()).is_err());
    }
}
