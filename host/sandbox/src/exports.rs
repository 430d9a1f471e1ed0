//! Any component's exported functions as tools: a component that does not implement the
//! `keel:plugin/tool` world but exports ordinary WIT functions (at world level or inside exported
//! interfaces) is offered as one tool per function.
//!
//! The JSON mapping of WIT types is documented in the crate README ("Plain components"). Schemas
//! are derived from wasmtime's component type reflection; arguments are converted JSON → [`Val`]
//! and results [`Val`] → JSON. Everything here bounds its own work: a component's types are
//! hostile too (a type graph that shares sub-types can describe exponentially large values), so
//! schema derivation has a depth and a node budget, and a function over that budget is skipped
//! with a reason instead of hanging or overflowing the host's stack.

use std::collections::HashSet;

use serde_json::{Map, Value, json};
use wasmtime::Engine;
use wasmtime::component::types::{ComponentFunc, ComponentItem, Type};
use wasmtime::component::{Component, ComponentExportIndex, Val};

use crate::config::DescribeLimits;
use crate::info::{Capabilities, NAME_RULE, PluginInfo, ToolInfo, check_version, valid_name};

/// Deepest type nesting offered (records in lists in options ... count one level each).
const MAX_TYPE_DEPTH: usize = 32;
/// Schema nodes one function's input and output schemas may have together: bounds the work per
/// function before the byte size of its schemas can be checked.
const MAX_SCHEMA_NODES: usize = 2_048;
/// Functions not offered that the description lists by name (the rest are counted).
const MAX_SKIPPED_LISTED: usize = 32;
/// A custom section Keel reads a plugin's name or version from, longest accepted.
const MAX_METADATA_BYTES: usize = 4_096;

/// One exported function offered as a tool.
#[derive(Debug, Clone)]
pub(crate) struct ExportedFunc {
    /// Where to find it in an instance.
    pub index: ComponentExportIndex,
    /// Parameter names and types, in order.
    pub params: Vec<(String, Type)>,
    /// The result type, if any.
    pub result: Option<Type>,
}

/// What [`discover`] found: the tools and, per tool name, the function behind it.
#[derive(Debug, Default)]
pub(crate) struct Discovered {
    /// Tool descriptions, in export order.
    pub tools: Vec<ToolInfo>,
    /// The function behind each tool, same order as `tools`.
    pub funcs: Vec<ExportedFunc>,
    /// `name: reason` for every exported function not offered.
    pub skipped: Vec<String>,
}

/// Metadata a component carries about itself in custom sections (as written by
/// `wasm-tools metadata add`): the `component-name` section's component name and the `version`
/// and `description` sections. Only the outer component's sections count, not nested modules'.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Metadata {
    pub name: Option<String>,
    pub version: Option<String>,
    pub description: Option<String>,
}

impl Metadata {
    /// As kept in the artifact cache (a verified note).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("metadata serializes")
    }

    /// What [`Metadata::encode`] wrote.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }
}

/// Read [`Metadata`] from the top level of a component binary. Malformed sections are ignored.
pub(crate) fn read_metadata(wasm: &[u8]) -> Metadata {
    use wasmparser::{ComponentName, KnownCustom, Parser, Payload};
    let mut meta = Metadata::default();
    let mut depth = 0usize;
    for payload in Parser::new(0).parse_all(wasm) {
        let Ok(payload) = payload else { break };
        match &payload {
            Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
            Payload::End(_) => {
                if depth == 0 {
                    break;
                }
                depth -= 1;
                continue;
            }
            _ => {}
        }
        let Payload::CustomSection(section) = payload else {
            continue;
        };
        if depth != 0 || section.data().len() > MAX_METADATA_BYTES {
            continue;
        }
        match section.as_known() {
            KnownCustom::ComponentName(reader) => {
                for name in reader.into_iter().flatten() {
                    if let ComponentName::Component { name, .. } = name {
                        meta.name = Some(name.to_string());
                    }
                }
            }
            _ if section.name() == "version" => {
                meta.version = std::str::from_utf8(section.data()).ok().map(str::to_string);
            }
            _ if section.name() == "description" => {
                meta.description = std::str::from_utf8(section.data()).ok().map(str::to_string);
            }
            _ => {}
        }
    }
    meta
}

/// Turn an arbitrary label (a file stem, a name section's name) into a plugin name:
/// lowercase ASCII, every other character `-`, no `__`, no leading/trailing `-`, at most 64 bytes.
/// `None` when nothing usable is left.
pub fn plugin_name_from(label: &str) -> Option<String> {
    let mut name = String::with_capacity(label.len().min(64));
    for c in label.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-' {
            c
        } else {
            '-'
        };
        // `__` separates plugin and tool in model-facing names.
        if c == '_' && name.ends_with('_') {
            continue;
        }
        if c == '-' && name.ends_with('-') {
            continue;
        }
        name.push(c);
        if name.len() >= 64 {
            break;
        }
    }
    let name = name.trim_matches(['-', '_']).to_string();
    valid_name(&name).then_some(name)
}

/// Cut `text` to at most `max` bytes on a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut at = max;
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
    }
    text
}

/// The tool name of a function: `func` at world level, `iface-func` for an interface's function,
/// where `iface` is the interface name without package and version (`test:plain/shapes@0.1.0`
/// → `shapes`). WIT names are kebab-case (words may be upper-case acronyms): lowercased.
fn tool_name(instance: Option<&str>, func: &str) -> String {
    match instance {
        None => func.to_ascii_lowercase(),
        Some(instance) => {
            let iface = instance.rsplit('/').next().unwrap_or(instance);
            let iface = iface.split('@').next().unwrap_or(iface);
            format!("{iface}-{func}").to_ascii_lowercase()
        }
    }
}

/// Find every exported function, derive its tool description and decide what is offered.
/// Fails (one line) only when the component offers nothing usable.
pub(crate) fn discover(engine: &Engine, component: &Component, limits: &DescribeLimits) -> Result<Discovered, String> {
    let ty = component.component_type();
    let mut found = Discovered::default();
    let mut names = HashSet::new();
    let mut consider = |found: &mut Discovered, instance: Option<&str>, func: &str, f: &ComponentFunc| {
        let label = match instance {
            Some(i) => format!("{i}#{func}"),
            None => func.to_string(),
        };
        let offered = if found.tools.len() >= limits.max_tools {
            Err(format!("more than {} tools", limits.max_tools))
        } else {
            offer(component, instance, func, &label, f, limits).and_then(|(tool, exported)| {
                if names.insert(tool.name.clone()) {
                    Ok((tool, exported))
                } else {
                    Err(format!("another export already has the tool name `{}`", tool.name))
                }
            })
        };
        match offered {
            Ok((tool, exported)) => {
                found.tools.push(tool);
                found.funcs.push(exported);
            }
            Err(reason) => found.skipped.push(format!("{label} ({reason})")),
        }
    };
    for (export, item) in ty.exports(engine) {
        match item.ty {
            ComponentItem::ComponentFunc(f) => consider(&mut found, None, export, &f),
            ComponentItem::ComponentInstance(instance) => {
                // WASI interfaces a component exports (`wasi:cli/run`, `wasi:http/incoming-handler`)
                // are entry points for other hosts, not tools.
                if export.starts_with("wasi:") {
                    found
                        .skipped
                        .push(format!("{export} (a WASI interface; run a command with `keel exec`)"));
                    continue;
                }
                for (func, item) in instance.exports(engine) {
                    if let ComponentItem::ComponentFunc(f) = item.ty {
                        consider(&mut found, Some(export), func, &f);
                    }
                }
            }
            _ => {}
        }
    }
    if found.tools.is_empty() {
        let why = if found.skipped.is_empty() {
            "it exports no functions".to_string()
        } else {
            let listed = &found.skipped[..found.skipped.len().min(MAX_SKIPPED_LISTED)];
            format!("none of its exported functions can be a tool: {}", listed.join("; "))
        };
        return Err(cut(why, 1_000));
    }
    Ok(found)
}

/// The tool for one exported function, or why it is not offered.
fn offer(
    component: &Component,
    instance: Option<&str>,
    func: &str,
    label: &str,
    f: &ComponentFunc,
    limits: &DescribeLimits,
) -> Result<(ToolInfo, ExportedFunc), String> {
    if func.starts_with('[') {
        return Err("a resource's constructor or method; resources are not supported".into());
    }
    if f.async_() {
        return Err("an async function; only synchronous functions are supported".into());
    }
    let name = tool_name(instance, func);
    if !valid_name(&name) {
        return Err(format!("`{name}` is not a valid tool name ({NAME_RULE})"));
    }
    let index = match instance {
        Some(instance) => component
            .get_export_index(None, instance)
            .and_then(|root| component.get_export_index(Some(&root), func)),
        None => component.get_export_index(None, func),
    }
    .ok_or("not found in the component")?;
    let params: Vec<(String, Type)> = f.params().map(|(n, t)| (n.to_string(), t)).collect();
    let result = f.results().next();
    let mut budget = MAX_SCHEMA_NODES;
    let input_schema = input_schema(&params, &mut budget)?;
    let output_schema = match &result {
        None => json!({"type": "null"}),
        // A top-level `result` is unwrapped: `ok` is the output, `err` a tool error.
        Some(Type::Result(r)) => {
            if let Some(err) = r.err() {
                schema(&err, 0, &mut budget)?; // refuse an error that could not be shown
            }
            match r.ok() {
                Some(ok) => schema(&ok, 0, &mut budget)?,
                None => json!({"type": "null"}),
            }
        }
        Some(t) => schema(t, 0, &mut budget)?,
    };
    let size = input_schema.to_string().len().max(output_schema.to_string().len());
    if size > limits.max_schema_bytes {
        return Err(format!(
            "its JSON Schema is {size} bytes, more than the limit of {}",
            limits.max_schema_bytes
        ));
    }
    let param_names: Vec<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    let description = cut(
        format!(
            "Exported function `{label}` of a WebAssembly component (parameters: {}).",
            if param_names.is_empty() {
                "none".to_string()
            } else {
                param_names.join(", ")
            }
        ),
        limits.max_description_bytes,
    );
    Ok((
        ToolInfo {
            name,
            description,
            input_schema,
            output_schema: Some(output_schema),
            capabilities: Capabilities::default(),
            idempotent: false,
        },
        ExportedFunc { index, params, result },
    ))
}

/// The `PluginInfo` of a plain component: name from its name section, else `fallback` (the
/// install file name or the registry's record), version from its `version` section (semver), else
/// `0.0.0`; the description lists the functions not offered and why.
pub(crate) fn plugin_info(
    meta: &Metadata,
    fallback: Option<&str>,
    found: &Discovered,
    limits: &DescribeLimits,
) -> Result<PluginInfo, String> {
    let name = meta
        .name
        .as_deref()
        .and_then(plugin_name_from)
        .or_else(|| fallback.and_then(plugin_name_from))
        .ok_or_else(|| {
            "it has no usable name: install it from a file whose name starts with a letter or digit, or name it with `wasm-tools metadata add --name NAME`".to_string()
        })?;
    let version = meta
        .version
        .as_deref()
        .map(str::trim)
        .filter(|v| check_version(v, limits.max_version_bytes).is_ok())
        .unwrap_or("0.0.0")
        .to_string();
    let mut description = meta.description.clone().unwrap_or_else(|| {
        format!(
            "A WebAssembly component's exported functions ({} offered as tools).",
            found.tools.len()
        )
    });
    if !found.skipped.is_empty() {
        description.push_str(" Not offered: ");
        description.push_str(&found.skipped[..found.skipped.len().min(MAX_SKIPPED_LISTED)].join("; "));
        if found.skipped.len() > MAX_SKIPPED_LISTED {
            description.push_str(&format!(" and {} more", found.skipped.len() - MAX_SKIPPED_LISTED));
        }
    }
    Ok(PluginInfo {
        name,
        version,
        description: cut(description, limits.max_description_bytes),
        tools: found.tools.clone(),
    })
}

fn input_schema(params: &[(String, Type)], budget: &mut usize) -> Result<Value, String> {
    let mut properties = Map::new();
    let mut required = Vec::new();
    for (name, ty) in params {
        properties.insert(name.clone(), schema(ty, 0, budget)?);
        if !matches!(ty, Type::Option(_)) {
            required.push(Value::String(name.clone()));
        }
    }
    Ok(json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    }))
}

/// Exact bounds: serde_json numbers hold i64/u64 exactly (an f64 would round `u64::MAX`).
fn integer(min: i128, max: i128) -> Value {
    json!({"type": "integer", "minimum": exact(min), "maximum": exact(max)})
}

fn exact(n: i128) -> Value {
    if n < 0 {
        Value::from(n as i64)
    } else {
        Value::from(n as u64)
    }
}

/// The JSON Schema of `ty`. Spends one unit of `budget` per node; fails with the reason a type
/// cannot be offered.
fn schema(ty: &Type, depth: usize, budget: &mut usize) -> Result<Value, String> {
    if depth > MAX_TYPE_DEPTH {
        return Err(format!("its types nest deeper than {MAX_TYPE_DEPTH} levels"));
    }
    if *budget == 0 {
        return Err(format!("its types have more than {MAX_SCHEMA_NODES} parts"));
    }
    *budget -= 1;
    let next = depth + 1;
    Ok(match ty {
        Type::Bool => json!({"type": "boolean"}),
        Type::S8 => integer(i8::MIN.into(), i8::MAX.into()),
        Type::U8 => integer(0, u8::MAX.into()),
        Type::S16 => integer(i16::MIN.into(), i16::MAX.into()),
        Type::U16 => integer(0, u16::MAX.into()),
        Type::S32 => integer(i32::MIN.into(), i32::MAX.into()),
        Type::U32 => integer(0, u32::MAX.into()),
        Type::S64 => integer(i64::MIN.into(), i64::MAX.into()),
        Type::U64 => integer(0, u64::MAX.into()),
        Type::Float32 | Type::Float64 => json!({
            "anyOf": [{"type": "number"}, {"type": "string", "enum": ["NaN", "Infinity", "-Infinity"]}]
        }),
        Type::Char => json!({"type": "string", "minLength": 1, "maxLength": 1}),
        Type::String => json!({"type": "string"}),
        Type::List(list) => json!({"type": "array", "items": schema(&list.ty(), next, budget)?}),
        Type::FixedLengthList(list) => json!({
            "type": "array",
            "items": schema(&list.ty(), next, budget)?,
            "minItems": list.len(),
            "maxItems": list.len(),
        }),
        Type::Record(record) => {
            let mut properties = Map::new();
            let mut required = Vec::new();
            for field in record.fields() {
                properties.insert(field.name.to_string(), schema(&field.ty, next, budget)?);
                if !matches!(field.ty, Type::Option(_)) {
                    required.push(Value::String(field.name.to_string()));
                }
            }
            json!({"type": "object", "properties": properties, "required": required, "additionalProperties": false})
        }
        Type::Tuple(tuple) => {
            let items = tuple
                .types()
                .map(|t| schema(&t, next, budget))
                .collect::<Result<Vec<_>, _>>()?;
            let n = items.len();
            // `prefixItems` (JSON Schema 2020-12) plus exact bounds on the length.
            json!({"type": "array", "prefixItems": items, "minItems": n, "maxItems": n})
        }
        Type::Variant(variant) => {
            let cases = variant
                .cases()
                .map(|case| {
                    let payload = match &case.ty {
                        Some(t) => schema(t, next, budget)?,
                        None => json!({"type": "null"}),
                    };
                    Ok(one_key(case.name, payload))
                })
                .collect::<Result<Vec<_>, String>>()?;
            json!({"oneOf": cases})
        }
        Type::Enum(e) => json!({"type": "string", "enum": e.names().collect::<Vec<_>>()}),
        Type::Option(option) => {
            let inner = option.ty();
            if matches!(inner, Type::Option(_)) {
                return Err("it uses option<option<..>>, which JSON null cannot tell apart".into());
            }
            json!({"anyOf": [{"type": "null"}, schema(&inner, next, budget)?]})
        }
        Type::Result(result) => {
            let side = |t: Option<Type>, budget: &mut usize| match t {
                Some(t) => schema(&t, next, budget),
                None => Ok(json!({"type": "null"})),
            };
            let ok = side(result.ok(), budget)?;
            let err = side(result.err(), budget)?;
            json!({"oneOf": [one_key("ok", ok), one_key("err", err)]})
        }
        Type::Flags(flags) => json!({
            "type": "array",
            "items": {"type": "string", "enum": flags.names().collect::<Vec<_>>()},
            "uniqueItems": true,
        }),
        Type::Own(_) | Type::Borrow(_) => return Err("it passes a resource handle".into()),
        Type::Future(_) | Type::Stream(_) => return Err("it passes a future or stream".into()),
        Type::ErrorContext => return Err("it passes an error-context".into()),
        Type::Map(_) => return Err("it passes a map, which is not supported yet".into()),
    })
}

/// `{"type": "object", "properties": {key: value}, "required": [key], "additionalProperties": false}`.
fn one_key(key: &str, value: Value) -> Value {
    json!({"type": "object", "properties": {key: value}, "required": [key], "additionalProperties": false})
}

// ------------------------------------------------------------------------------------------------
// JSON → Val

/// Convert a tool's JSON arguments (an object, one property per parameter) into the parameters.
/// The error says where and what, e.g. "`p.x`: expected an integer from 0 to 255, got -1".
pub(crate) fn arguments(func: &ExportedFunc, arguments: &Value) -> Result<Vec<Val>, String> {
    let empty = Map::new();
    let object = match arguments {
        Value::Object(o) => o,
        Value::Null if func.params.is_empty() => &empty,
        other => return Err(format!("the arguments must be a JSON object, got {}", kind(other))),
    };
    for key in object.keys() {
        if !func.params.iter().any(|(n, _)| n == key) {
            return Err(format!("unknown argument `{}`", short(key)));
        }
    }
    func.params
        .iter()
        .map(|(name, ty)| match object.get(name) {
            Some(value) => to_val(ty, value, name),
            None if matches!(ty, Type::Option(_)) => Ok(Val::Option(None)),
            None => Err(format!("missing argument `{name}`")),
        })
        .collect()
}

/// A caller-supplied name cut to 64 bytes for an error message (the arguments can be large).
fn short(name: &str) -> String {
    let cut = cut(name.to_string(), 64);
    if cut.len() < name.len() {
        format!("{cut}…")
    } else {
        cut
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Describe `value` briefly for an error message (never echo a whole argument back).
fn brief(value: &Value) -> String {
    match value {
        Value::Number(n) => n.to_string(),
        other => kind(other).to_string(),
    }
}

fn int(value: &Value, min: i128, max: i128, at: &str) -> Result<i128, String> {
    let bad = || format!("`{at}`: expected an integer from {min} to {max}, got {}", brief(value));
    let Value::Number(n) = value else { return Err(bad()) };
    let exact = if let Some(i) = n.as_i64() {
        i128::from(i)
    } else if let Some(u) = n.as_u64() {
        i128::from(u)
    } else {
        // `3.0` is an integer in JSON Schema; anything with a fraction or beyond ±2^64 is not.
        let f = n.as_f64().ok_or_else(bad)?;
        if f.fract() != 0.0 || !(-1.9e19..=1.9e19).contains(&f) {
            return Err(bad());
        }
        f as i128
    };
    if exact < min || exact > max {
        return Err(bad());
    }
    Ok(exact)
}

fn float(value: &Value, at: &str) -> Result<f64, String> {
    match value {
        Value::Number(n) => n.as_f64().ok_or_else(|| format!("`{at}`: not a number")),
        Value::String(s) if s == "NaN" => Ok(f64::NAN),
        Value::String(s) if s == "Infinity" => Ok(f64::INFINITY),
        Value::String(s) if s == "-Infinity" => Ok(f64::NEG_INFINITY),
        other => Err(format!(
            "`{at}`: expected a number (or \"NaN\", \"Infinity\", \"-Infinity\"), got {}",
            brief(other)
        )),
    }
}

/// The single `{"case": payload}` entry of a variant or result object.
fn single_entry<'a>(value: &'a Value, at: &str, what: &str) -> Result<(&'a String, &'a Value), String> {
    match value {
        Value::Object(o) if o.len() == 1 => Ok(o.iter().next().expect("one entry")),
        other => Err(format!(
            "`{at}`: expected an object with exactly one key (the {what}), got {}",
            brief(other)
        )),
    }
}

fn to_val(ty: &Type, value: &Value, at: &str) -> Result<Val, String> {
    let expected = |what: &str| format!("`{at}`: expected {what}, got {}", brief(value));
    Ok(match ty {
        Type::Bool => Val::Bool(value.as_bool().ok_or_else(|| expected("a boolean"))?),
        Type::S8 => Val::S8(int(value, i8::MIN.into(), i8::MAX.into(), at)? as i8),
        Type::U8 => Val::U8(int(value, 0, u8::MAX.into(), at)? as u8),
        Type::S16 => Val::S16(int(value, i16::MIN.into(), i16::MAX.into(), at)? as i16),
        Type::U16 => Val::U16(int(value, 0, u16::MAX.into(), at)? as u16),
        Type::S32 => Val::S32(int(value, i32::MIN.into(), i32::MAX.into(), at)? as i32),
        Type::U32 => Val::U32(int(value, 0, u32::MAX.into(), at)? as u32),
        Type::S64 => Val::S64(int(value, i64::MIN.into(), i64::MAX.into(), at)? as i64),
        Type::U64 => Val::U64(int(value, 0, u64::MAX.into(), at)? as u64),
        Type::Float32 => {
            let f = float(value, at)?;
            let narrowed = f as f32;
            if f.is_finite() && !narrowed.is_finite() {
                return Err(format!("`{at}`: {f} is out of range for a 32-bit float"));
            }
            Val::Float32(narrowed)
        }
        Type::Float64 => Val::Float64(float(value, at)?),
        Type::Char => {
            let s = value.as_str().ok_or_else(|| expected("a one-character string"))?;
            let mut chars = s.chars();
            match (chars.next(), chars.next()) {
                (Some(c), None) => Val::Char(c),
                _ => return Err(expected("a one-character string")),
            }
        }
        Type::String => Val::String(value.as_str().ok_or_else(|| expected("a string"))?.to_string()),
        Type::List(list) => {
            let items = value.as_array().ok_or_else(|| expected("an array"))?;
            let inner = list.ty();
            Val::List(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| to_val(&inner, v, &format!("{at}[{i}]")))
                    .collect::<Result<_, _>>()?,
            )
        }
        Type::FixedLengthList(list) => {
            let items = value.as_array().ok_or_else(|| expected("an array"))?;
            if items.len() != list.len() as usize {
                return Err(expected(&format!("an array of exactly {} items", list.len())));
            }
            let inner = list.ty();
            Val::FixedLengthList(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| to_val(&inner, v, &format!("{at}[{i}]")))
                    .collect::<Result<_, _>>()?,
            )
        }
        Type::Record(record) => {
            let object = value.as_object().ok_or_else(|| expected("an object"))?;
            for key in object.keys() {
                if !record.fields().any(|f| f.name == key) {
                    return Err(format!("`{at}`: unknown field `{}`", short(key)));
                }
            }
            let mut fields = Vec::with_capacity(record.fields().len());
            for field in record.fields() {
                let path = format!("{at}.{}", field.name);
                let val = match object.get(field.name) {
                    Some(v) => to_val(&field.ty, v, &path)?,
                    None if matches!(field.ty, Type::Option(_)) => Val::Option(None),
                    None => return Err(format!("`{at}`: missing field `{}`", field.name)),
                };
                fields.push((field.name.to_string(), val));
            }
            Val::Record(fields)
        }
        Type::Tuple(tuple) => {
            let items = value.as_array().ok_or_else(|| expected("an array"))?;
            if items.len() != tuple.types().len() {
                return Err(expected(&format!("an array of exactly {} items", tuple.types().len())));
            }
            Val::Tuple(
                tuple
                    .types()
                    .zip(items)
                    .enumerate()
                    .map(|(i, (t, v))| to_val(&t, v, &format!("{at}[{i}]")))
                    .collect::<Result<_, _>>()?,
            )
        }
        Type::Variant(variant) => {
            let (name, payload) = single_entry(value, at, "case")?;
            let Some(case) = variant.cases().find(|c| c.name == name) else {
                let cases: Vec<&str> = variant.cases().map(|c| c.name).collect();
                return Err(format!(
                    "`{at}`: unknown case `{}` (cases: {})",
                    short(name),
                    cases.join(", ")
                ));
            };
            let path = format!("{at}.{name}");
            let payload = match &case.ty {
                Some(t) => Some(Box::new(to_val(t, payload, &path)?)),
                None if payload.is_null() => None,
                None => return Err(format!("`{path}`: this case has no value; use null")),
            };
            Val::Variant(name.clone(), payload)
        }
        Type::Enum(e) => {
            let name = value.as_str().ok_or_else(|| expected("a string"))?;
            if !e.names().any(|n| n == name) {
                let names: Vec<&str> = e.names().collect();
                return Err(format!(
                    "`{at}`: unknown case {:?} (cases: {})",
                    short(name),
                    names.join(", ")
                ));
            }
            Val::Enum(name.to_string())
        }
        Type::Option(option) => match value {
            Value::Null => Val::Option(None),
            v => Val::Option(Some(Box::new(to_val(&option.ty(), v, at)?))),
        },
        Type::Result(result) => {
            let (side, payload) = single_entry(value, at, "`ok` or `err`")?;
            let ty = match side.as_str() {
                "ok" => result.ok(),
                "err" => result.err(),
                other => return Err(format!("`{at}`: expected `ok` or `err`, got `{}`", short(other))),
            };
            let path = format!("{at}.{side}");
            let payload = match ty {
                Some(t) => Some(Box::new(to_val(&t, payload, &path)?)),
                None if payload.is_null() => None,
                None => return Err(format!("`{path}`: this side has no value; use null")),
            };
            Val::Result(if side == "ok" { Ok(payload) } else { Err(payload) })
        }
        Type::Flags(flags) => {
            let items = value.as_array().ok_or_else(|| expected("an array of flag names"))?;
            let mut set = Vec::new();
            for item in items {
                let name = item.as_str().ok_or_else(|| expected("an array of flag names"))?;
                if !flags.names().any(|n| n == name) {
                    let names: Vec<&str> = flags.names().collect();
                    return Err(format!(
                        "`{at}`: unknown flag {:?} (flags: {})",
                        short(name),
                        names.join(", ")
                    ));
                }
                if !set.iter().any(|s: &String| s == name) {
                    set.push(name.to_string());
                }
            }
            Val::Flags(set)
        }
        // Refused when the tool was derived; unreachable for an offered function.
        Type::Own(_) | Type::Borrow(_) | Type::Future(_) | Type::Stream(_) | Type::ErrorContext | Type::Map(_) => {
            return Err(format!("`{at}`: this type is not supported"));
        }
    })
}

// ------------------------------------------------------------------------------------------------
// Val → JSON

/// A float as JSON: a number, or `"NaN"`/`"Infinity"`/`"-Infinity"`, which JSON numbers cannot be.
fn float_json(f: f64) -> Value {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "Infinity" } else { "-Infinity" }.into()
    } else {
        Value::from(f)
    }
}

/// Convert a returned value to JSON (shape per the README's mapping). Strings are kept as the
/// guest returned them: they are data, escaped where they are printed.
pub(crate) fn to_json(val: &Val) -> Value {
    match val {
        Val::Bool(b) => Value::Bool(*b),
        Val::S8(n) => (*n).into(),
        Val::U8(n) => (*n).into(),
        Val::S16(n) => (*n).into(),
        Val::U16(n) => (*n).into(),
        Val::S32(n) => (*n).into(),
        Val::U32(n) => (*n).into(),
        Val::S64(n) => (*n).into(),
        Val::U64(n) => (*n).into(),
        // Shortest decimal that round-trips as f32 (`0.1`, not `0.10000000149011612`).
        Val::Float32(f) => float_json(f.to_string().parse::<f64>().unwrap_or(f64::from(*f))),
        Val::Float64(f) => float_json(*f),
        Val::Char(c) => Value::String(c.to_string()),
        Val::String(s) => Value::String(s.clone()),
        Val::List(items) | Val::Tuple(items) | Val::FixedLengthList(items) => {
            Value::Array(items.iter().map(to_json).collect())
        }
        Val::Record(fields) => Value::Object(fields.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
        Val::Variant(case, payload) => {
            json!({ case.as_str(): payload.as_deref().map_or(Value::Null, to_json) })
        }
        Val::Enum(case) => Value::String(case.clone()),
        Val::Option(inner) => inner.as_deref().map_or(Value::Null, to_json),
        Val::Result(Ok(v)) => json!({"ok": v.as_deref().map_or(Value::Null, to_json)}),
        Val::Result(Err(v)) => json!({"err": v.as_deref().map_or(Value::Null, to_json)}),
        Val::Flags(names) => Value::Array(names.iter().map(|n| Value::String(n.clone())).collect()),
        Val::Map(entries) => Value::Array(entries.iter().map(|(k, v)| json!([to_json(k), to_json(v)])).collect()),
        // Never produced by an offered function (their types are refused).
        Val::Resource(_) | Val::Future(_) | Val::Stream(_) | Val::ErrorContext(_) => Value::Null,
    }
}

/// What a call returned: the tool output, or the `err` of a top-level `result` as JSON text.
pub(crate) fn output(func: &ExportedFunc, results: &[Val]) -> Result<Value, String> {
    match (results.first(), &func.result) {
        (None, _) => Ok(Value::Null),
        (Some(Val::Result(Ok(v))), Some(Type::Result(_))) => Ok(v.as_deref().map_or(Value::Null, to_json)),
        (Some(Val::Result(Err(e))), Some(Type::Result(_))) => {
            Err(e.as_deref().map_or(Value::Null, to_json).to_string())
        }
        (Some(v), _) => Ok(to_json(v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_names_from_labels() {
        assert_eq!(plugin_name_from("greeter").as_deref(), Some("greeter"));
        assert_eq!(plugin_name_from("My Greeter.v2").as_deref(), Some("my-greeter-v2"));
        assert_eq!(plugin_name_from("keel_test__x").as_deref(), Some("keel_test_x"));
        assert_eq!(plugin_name_from("--x--").as_deref(), Some("x"));
        assert_eq!(plugin_name_from("\u{1b}[2J"), Some("2j".into()));
        assert_eq!(plugin_name_from("..."), None);
        assert_eq!(plugin_name_from(""), None);
        assert_eq!(plugin_name_from(&"a".repeat(100)).unwrap().len(), 64);
    }

    #[test]
    fn tool_names() {
        assert_eq!(tool_name(None, "greet"), "greet");
        assert_eq!(
            tool_name(Some("test:plain/shapes@0.1.0"), "echo-point"),
            "shapes-echo-point"
        );
        assert_eq!(tool_name(Some("local"), "f"), "local-f");
        assert_eq!(tool_name(None, "get-HTTP"), "get-http");
    }

    #[test]
    fn floats_map_to_json() {
        assert_eq!(to_json(&Val::Float32(0.1)), json!(0.1));
        assert_eq!(to_json(&Val::Float64(f64::NAN)), json!("NaN"));
        assert_eq!(to_json(&Val::Float64(f64::NEG_INFINITY)), json!("-Infinity"));
    }
}
