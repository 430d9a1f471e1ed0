/* {{name}}: a Keel tool plugin in C (keel.h). `keel build` compiles every .c file here with the
 * SDK runtime and the WIT bindings, then makes a component. */
#include <ctype.h>
#include <stdio.h>

#include "keel.h"

static bool greet(keel_call *call, const keel_json *args) {
    size_t len;
    const char *name = keel_arg_string(call, args, "name", &len); /* missing → invalid-input */
    if (!name) return false;
    while (len > 0 && isspace((unsigned char)*name)) name++, len--;
    while (len > 0 && isspace((unsigned char)name[len - 1])) len--;
    if (len == 0) return keel_invalid_input(call, "`name` must not be empty");
    char greeting[256];
    int n = snprintf(greeting, sizeof greeting, "Hello, %.*s!", (int)(len > 200 ? 200 : len), name);
    keel_out_object_begin(call);
    keel_out_key(call, "greeting");
    keel_out_string(call, greeting, (size_t)n);
    keel_out_object_end(call);
    return true;
}

static const keel_tool tools[] = {{
    .name = "greet",
    .description = "Greet someone by name.",
    .input_schema = "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\","
                    "\"description\":\"Who to greet.\"}},\"required\":[\"name\"],"
                    "\"additionalProperties\":false}",
    .output_schema = "{\"type\":\"object\",\"properties\":{\"greeting\":{\"type\":\"string\"}},"
                     "\"required\":[\"greeting\"],\"additionalProperties\":false}",
    .handler = greet,
    .idempotent = true,
}};

KEEL_EXPORT_PLUGIN("{{name}}", "0.1.0", "{{name}}: greets people.", tools);
