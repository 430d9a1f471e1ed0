/*
 * keel.h — write Keel tool plugins in C.
 *
 * A tool is a function `bool handler(keel_call *call, const keel_json *args)` plus a name, a
 * description, the JSON Schema of its arguments and the capabilities it needs. The SDK runtime
 * (keel.c) implements the `keel:plugin/tools` exports of the WIT `tool` world over the
 * `wit-bindgen c` bindings: it describes the plugin, parses the arguments (which must be a JSON
 * object), runs the handler, and returns what it wrote with the keel_out_* functions, or the
 * error it reported with keel_invalid_input / keel_denied / keel_failed / keel_timed_out.
 *
 * Build with `keel_build::c::build(project, out)` (clang --target=wasm32-wasi, Debian's
 * wasi-libc, the WASI preview1 adapter): see sdk/c/README.md.
 */
#ifndef KEEL_H
#define KEEL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ---- JSON values (the parsed arguments; read-only, freed by the SDK after the call) ---- */

/** A parsed JSON value. */
typedef struct keel_json keel_json;

/** The type of a JSON value. */
typedef enum keel_json_type {
    KEEL_JSON_NULL,
    KEEL_JSON_BOOL,
    KEEL_JSON_NUMBER,
    KEEL_JSON_STRING,
    KEEL_JSON_ARRAY,
    KEEL_JSON_OBJECT,
} keel_json_type;

/** The type of `value` (KEEL_JSON_NULL for a NULL pointer). */
keel_json_type keel_json_type_of(const keel_json *value);
/** The member `key` of an object, or NULL (absent, or `object` is not an object). */
const keel_json *keel_json_get(const keel_json *object, const char *key);
/** A string's UTF-8 bytes, NUL-terminated (it may contain NULs: use `len`); NULL if not a string. */
const char *keel_json_string(const keel_json *value, size_t *len);
/** A number's value (0 if not a number). */
double keel_json_number(const keel_json *value);
/** A boolean's value (false if not a boolean). */
bool keel_json_bool(const keel_json *value);
/** Number of elements of an array or members of an object (0 otherwise). */
size_t keel_json_length(const keel_json *value);
/** Element `i` of an array, or value of member `i` of an object; NULL when out of range. */
const keel_json *keel_json_at(const keel_json *value, size_t i);
/** Key of member `i` of an object; NULL when out of range. */
const char *keel_json_key_at(const keel_json *value, size_t i);

/* ---- The call ---- */

/** One tool call: its context, its output and its error. */
typedef struct keel_call keel_call;

/** Id of this call (a call re-run after an interruption keeps its id). */
const char *keel_call_id(const keel_call *call);
/** Tenant scope of the call. */
const char *keel_call_scope(const keel_call *call);
/** Milliseconds left when the call started. */
uint64_t keel_call_deadline_ms(const keel_call *call);

/** Log levels for keel_log. */
typedef enum keel_log_level {
    KEEL_TRACE,
    KEEL_DEBUG,
    KEEL_INFO,
    KEEL_WARN,
    KEEL_ERROR,
} keel_log_level;

/** Write a line (printf format) to the host log. */
void keel_log(keel_call *call, keel_log_level level, const char *format, ...)
    __attribute__((format(printf, 3, 4)));
/** Report progress: `fraction` in 0..1, or negative when unknown. */
void keel_progress(keel_call *call, float fraction, const char *message);

/* ---- Errors: each records the error and returns false, so `return keel_failed(...)` ---- */

/** The arguments were unusable → WIT `invalid-input`. */
bool keel_invalid_input(keel_call *call, const char *format, ...) __attribute__((format(printf, 2, 3)));
/** The tool ran and failed → `failed`. */
bool keel_failed(keel_call *call, const char *format, ...) __attribute__((format(printf, 2, 3)));
/** The tool gave up because its deadline passed → `timed-out`. */
bool keel_timed_out(keel_call *call, const char *format, ...) __attribute__((format(printf, 2, 3)));
/** A capability was missing → `denied`: `capability` is "filesystem", "network" or "environment". */
bool keel_denied(keel_call *call, const char *capability, const char *target, const char *format, ...)
    __attribute__((format(printf, 4, 5)));

/* ---- Arguments ---- */

/**
 * The string member `key` of `args`, with its length in `*len` (may be NULL). When it is missing
 * or not a string, records `invalid-input` and returns NULL.
 */
const char *keel_arg_string(keel_call *call, const keel_json *args, const char *key, size_t *len);

/**
 * An optional string member: NULL, recording nothing, when `key` is missing or null (use your
 * default); like keel_arg_string when it is there (not a string records `invalid-input`). Reading
 * an optional argument with keel_arg_string records an error that the call's real error, if any,
 * cannot replace (the first error wins).
 */
const char *keel_arg_string_opt(keel_call *call, const keel_json *args, const char *key, size_t *len);

/* ---- Output: the JSON result, written in order (commas and quoting are done for you) ---- */

/** Begin a JSON object. */
void keel_out_object_begin(keel_call *call);
/** End the current object. */
void keel_out_object_end(keel_call *call);
/** Begin a JSON array. */
void keel_out_array_begin(keel_call *call);
/** End the current array. */
void keel_out_array_end(keel_call *call);
/** The key of the next member of the current object. */
void keel_out_key(keel_call *call, const char *key);
/** A string of `len` UTF-8 bytes, escaped as JSON. */
void keel_out_string(keel_call *call, const char *s, size_t len);
/** A NUL-terminated string. */
void keel_out_cstring(keel_call *call, const char *s);
/** An integer. */
void keel_out_int(keel_call *call, long long value);
/** A number (non-finite values become null). */
void keel_out_number(keel_call *call, double value);
/** true or false. */
void keel_out_bool(keel_call *call, bool value);
/** null. */
void keel_out_null(keel_call *call);

/* ---- Files (under the directories the host granted; guest paths such as "/data/a.txt") ---- */

/**
 * Read a whole file into a malloc'd buffer (`*data`, NUL-terminated, `*len` bytes; free it).
 * Outside every granted directory or not permitted → `denied` (capability "filesystem", target
 * `path`); missing or unreadable → `failed`. Returns false with the error recorded.
 */
bool keel_read_file(keel_call *call, const char *path, char **data, size_t *len);

/** True if `s[0..len)` is well-formed UTF-8. */
bool keel_utf8_valid(const char *s, size_t len);

/* ---- Declaring the plugin ---- */

/** A tool handler: write the output and return true, or return the result of a keel_* error. */
typedef bool (*keel_handler)(keel_call *call, const keel_json *args);

/** One tool. The capability lists are NULL-terminated arrays (see KEEL_LIST) or NULL. */
typedef struct keel_tool {
    /** Name, `[a-z0-9_-]+`. */
    const char *name;
    /** What it does, for a model choosing tools and a human granting them. */
    const char *description;
    /** JSON Schema of the arguments object (JSON text). */
    const char *input_schema;
    /** JSON Schema of the output (JSON text), or NULL. */
    const char *output_schema;
    /** The function that runs it. */
    keel_handler handler;
    /** Calling twice with the same arguments has the effect of calling once. */
    bool idempotent;
    /** Guest paths it reads. */
    const char *const *reads;
    /** Guest paths it reads and writes. */
    const char *const *writes;
    /** Hosts it connects to (unavailable from C with Debian's wasi-libc, which is preview1 only). */
    const char *const *connects;
    /** Environment variables it reads. */
    const char *const *env;
} keel_tool;

/** A plugin: name, version, description and its tools. */
typedef struct keel_plugin {
    /** Name, `[a-z0-9_-]+`. */
    const char *name;
    /** Version (semver). */
    const char *version;
    /** One paragraph. */
    const char *description;
    /** The tools. */
    const keel_tool *tools;
    /** How many. */
    size_t tool_count;
} keel_plugin;

/** A NULL-terminated list of strings, for keel_tool's capability fields. */
#define KEEL_LIST(...) ((const char *const[]){__VA_ARGS__, NULL})

/** Declare the plugin (once, at file scope): KEEL_EXPORT_PLUGIN("name", "0.1.0", "desc", tools); */
#define KEEL_EXPORT_PLUGIN(NAME, VERSION, DESCRIPTION, TOOLS)                                           \
    const keel_plugin keel_plugin_definition = {NAME, VERSION, DESCRIPTION, TOOLS,                      \
                                                sizeof(TOOLS) / sizeof((TOOLS)[0])}

/** The plugin the SDK exports (defined by KEEL_EXPORT_PLUGIN). */
extern const keel_plugin keel_plugin_definition;

#ifdef __cplusplus
}
#endif

#endif
