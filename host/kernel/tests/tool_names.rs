//! Model-facing tool names (`plugin/tool` → `plugin__tool`) are injective: one plugin can never
//! shadow another's tool by choosing a name that maps to the same model-facing name (issue 7, item 14).

use std::collections::HashMap;

use keel_kernel::agent::model_tool_name;

fn allowed(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[test]
fn plain_names_stay_readable() {
    assert_eq!(model_tool_name("fs/read"), "fs__read");
    assert_eq!(model_tool_name("hello/greet"), "hello__greet");
    assert_eq!(model_tool_name("http-fetch/get_json"), "http-fetch__get_json");
}

#[test]
fn distinct_tools_never_share_a_model_name() {
    let long_a = format!("{}/{}", "p".repeat(40), "t".repeat(30));
    let long_b = format!("{}/{}x", "p".repeat(40), "t".repeat(30));
    let cases = [
        // Underscores next to the separator.
        "a_/b",
        "a/_b",
        "a/b",
        "a__/b",
        // Characters outside the model alphabet.
        "p/a.b",
        "p/a_b",
        "p/a b",
        // Truncation at 64 characters.
        long_a.as_str(),
        long_b.as_str(),
        // A plain name that looks like a hashed one.
        "p/t__0123456789abcdef",
        "p__t/0123456789abcdef",
        // No separator at all, or two.
        "p__t",
        "p/t/u",
        "p/t__u",
        "p__t/u",
    ];
    let mut seen: HashMap<String, &str> = HashMap::new();
    for qualified in cases {
        let name = model_tool_name(qualified);
        assert!(allowed(&name), "{qualified} -> {name:?} is not a valid model tool name");
        if let Some(other) = seen.insert(name.clone(), qualified) {
            panic!("{other:?} and {qualified:?} both map to {name:?}");
        }
    }
    // Stable: the same tool always gets the same name (journaled jobs resume with it).
    assert_eq!(model_tool_name(&long_a), model_tool_name(&long_a));
}
