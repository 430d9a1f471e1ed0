/*
 * keel.c — the Keel C SDK runtime: the `keel:plugin/tools` exports over the wit-bindgen C
 * bindings (tool.h), a small JSON reader and writer, errors, and file reading under the
 * preopened directories. See keel.h.
 */
#include "keel.h"
#include "tool.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <wasi/libc-find-relpath.h>

/* ------------------------------------------------------------------------------------------ */
/* Growable byte buffer                                                                        */

typedef struct buf {
    char *ptr;
    size_t len, cap;
    bool oom;
} buf;

static void buf_reserve(buf *b, size_t more) {
    if (b->oom || b->len + more + 1 <= b->cap) return;
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + more + 1) cap *= 2;
    char *p = realloc(b->ptr, cap);
    if (!p) {
        b->oom = true;
        return;
    }
    b->ptr = p;
    b->cap = cap;
}

static void buf_put(buf *b, const char *s, size_t n) {
    buf_reserve(b, n);
    if (b->oom) return;
    memcpy(b->ptr + b->len, s, n);
    b->len += n;
    b->ptr[b->len] = 0;
}

static void buf_putc(buf *b, char c) { buf_put(b, &c, 1); }

static void buf_vprintf(buf *b, const char *format, va_list ap) {
    va_list copy;
    va_copy(copy, ap);
    int n = vsnprintf(NULL, 0, format, copy);
    va_end(copy);
    if (n < 0) return;
    buf_reserve(b, (size_t)n);
    if (b->oom) return;
    vsnprintf(b->ptr + b->len, (size_t)n + 1, format, ap);
    b->len += (size_t)n;
}

static void buf_vprintf_s(buf *b, const char *format, ...) __attribute__((format(printf, 2, 3)));
static void buf_vprintf_s(buf *b, const char *format, ...) {
    va_list ap;
    va_start(ap, format);
    buf_vprintf(b, format, ap);
    va_end(ap);
}

/* ------------------------------------------------------------------------------------------ */
/* JSON reader                                                                                 */

struct keel_json {
    keel_json_type type;
    bool boolean;
    double number;
    char *string; /* string value, NUL-terminated */
    size_t length; /* string bytes, or element/member count */
    keel_json *items; /* array elements or object values */
    char **keys; /* object keys */
};

typedef struct parser {
    const char *s, *end;
    int depth;
} parser;

#define KEEL_JSON_MAX_DEPTH 256

static void json_free(keel_json *v) {
    if (!v) return;
    free(v->string);
    for (size_t i = 0; i < v->length && v->items; i++) json_free(&v->items[i]);
    if (v->keys)
        for (size_t i = 0; i < v->length; i++) free(v->keys[i]);
    free(v->items);
    free(v->keys);
}

static void skip_ws(parser *p) {
    while (p->s < p->end && (*p->s == ' ' || *p->s == '\t' || *p->s == '\n' || *p->s == '\r')) p->s++;
}

static int hex4(const char *s) {
    int v = 0;
    for (int i = 0; i < 4; i++) {
        char c = s[i];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= c - '0';
        else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
        else return -1;
    }
    return v;
}

static void put_utf8(buf *b, uint32_t c) {
    char out[4];
    if (c < 0x80) {
        buf_putc(b, (char)c);
    } else if (c < 0x800) {
        out[0] = (char)(0xC0 | (c >> 6));
        out[1] = (char)(0x80 | (c & 0x3F));
        buf_put(b, out, 2);
    } else if (c < 0x10000) {
        out[0] = (char)(0xE0 | (c >> 12));
        out[1] = (char)(0x80 | ((c >> 6) & 0x3F));
        out[2] = (char)(0x80 | (c & 0x3F));
        buf_put(b, out, 3);
    } else {
        out[0] = (char)(0xF0 | (c >> 18));
        out[1] = (char)(0x80 | ((c >> 12) & 0x3F));
        out[2] = (char)(0x80 | ((c >> 6) & 0x3F));
        out[3] = (char)(0x80 | (c & 0x3F));
        buf_put(b, out, 4);
    }
}

/* Parse a string literal (p->s at the opening quote) into `out`. */
static bool parse_string(parser *p, buf *out) {
    p->s++;
    buf_reserve(out, 0);
    while (p->s < p->end) {
        unsigned char c = (unsigned char)*p->s++;
        if (c == '"') return !out->oom;
        if (c < 0x20) return false;
        if (c != '\\') {
            buf_putc(out, (char)c);
            continue;
        }
        if (p->s >= p->end) return false;
        char e = *p->s++;
        switch (e) {
        case '"': buf_putc(out, '"'); break;
        case '\\': buf_putc(out, '\\'); break;
        case '/': buf_putc(out, '/'); break;
        case 'b': buf_putc(out, '\b'); break;
        case 'f': buf_putc(out, '\f'); break;
        case 'n': buf_putc(out, '\n'); break;
        case 'r': buf_putc(out, '\r'); break;
        case 't': buf_putc(out, '\t'); break;
        case 'u': {
            if (p->end - p->s < 4) return false;
            int u = hex4(p->s);
            if (u < 0) return false;
            p->s += 4;
            uint32_t code = (uint32_t)u;
            if (code >= 0xD800 && code <= 0xDBFF && p->end - p->s >= 6 && p->s[0] == '\\' && p->s[1] == 'u') {
                int low = hex4(p->s + 2);
                if (low >= 0xDC00 && low <= 0xDFFF) {
                    code = 0x10000 + ((code - 0xD800) << 10) + ((uint32_t)low - 0xDC00);
                    p->s += 6;
                }
            }
            /* A lone surrogate cannot be UTF-8: use U+FFFD, as a WIT string would. */
            if (code >= 0xD800 && code <= 0xDFFF) code = 0xFFFD;
            put_utf8(out, code);
            break;
        }
        default: return false;
        }
    }
    return false;
}

static bool parse_value(parser *p, keel_json *v);

static bool parse_number(parser *p, keel_json *v) {
    const char *start = p->s;
    if (p->s < p->end && *p->s == '-') p->s++;
    if (p->s >= p->end || *p->s < '0' || *p->s > '9') return false;
    while (p->s < p->end && ((*p->s >= '0' && *p->s <= '9') || *p->s == '.' || *p->s == 'e' || *p->s == 'E' ||
                             *p->s == '+' || *p->s == '-'))
        p->s++;
    size_t n = (size_t)(p->s - start);
    char tmp[64];
    if (n >= sizeof tmp) return false;
    memcpy(tmp, start, n);
    tmp[n] = 0;
    char *endp;
    v->type = KEEL_JSON_NUMBER;
    v->number = strtod(tmp, &endp);
    return *endp == 0;
}

static bool literal(parser *p, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(p->end - p->s) < n || memcmp(p->s, word, n) != 0) return false;
    p->s += n;
    return true;
}

static bool parse_items(parser *p, keel_json *v, bool object) {
    size_t cap = 0;
    p->s++;
    skip_ws(p);
    char close = object ? '}' : ']';
    if (p->s < p->end && *p->s == close) {
        p->s++;
        return true;
    }
    for (;;) {
        if (v->length == cap) {
            cap = cap ? cap * 2 : 4;
            keel_json *items = realloc(v->items, cap * sizeof *items);
            if (!items) return false;
            v->items = items;
            if (object) {
                char **keys = realloc(v->keys, cap * sizeof *keys);
                if (!keys) return false;
                v->keys = keys;
            }
        }
        skip_ws(p);
        if (object) {
            if (p->s >= p->end || *p->s != '"') return false;
            buf key = {0};
            if (!parse_string(p, &key)) {
                free(key.ptr);
                return false;
            }
            v->keys[v->length] = key.ptr;
            skip_ws(p);
            if (p->s >= p->end || *p->s != ':') {
                v->items[v->length] = (keel_json){0};
                v->length++;
                return false;
            }
            p->s++;
        }
        keel_json *item = &v->items[v->length];
        *item = (keel_json){0};
        v->length++;
        if (!parse_value(p, item)) return false;
        skip_ws(p);
        if (p->s < p->end && *p->s == ',') {
            p->s++;
            continue;
        }
        if (p->s < p->end && *p->s == close) {
            p->s++;
            return true;
        }
        return false;
    }
}

static bool parse_value(parser *p, keel_json *v) {
    skip_ws(p);
    if (p->s >= p->end) return false;
    switch (*p->s) {
    case '{':
    case '[': {
        if (++p->depth > KEEL_JSON_MAX_DEPTH) return false;
        bool object = *p->s == '{';
        v->type = object ? KEEL_JSON_OBJECT : KEEL_JSON_ARRAY;
        bool ok = parse_items(p, v, object);
        p->depth--;
        return ok;
    }
    case '"': {
        buf s = {0};
        v->type = KEEL_JSON_STRING;
        bool ok = parse_string(p, &s);
        v->string = s.ptr;
        v->length = s.len;
        return ok;
    }
    case 't': v->type = KEEL_JSON_BOOL; v->boolean = true; return literal(p, "true");
    case 'f': v->type = KEEL_JSON_BOOL; return literal(p, "false");
    case 'n': v->type = KEEL_JSON_NULL; return literal(p, "null");
    default: return parse_number(p, v);
    }
}

/* Parse `len` bytes of JSON text; NULL on a syntax error. */
static keel_json *json_parse(const char *text, size_t len) {
    parser p = {text, text + len, 0};
    keel_json *v = calloc(1, sizeof *v);
    if (!v) return NULL;
    bool ok = parse_value(&p, v);
    skip_ws(&p);
    if (!ok || p.s != p.end) {
        json_free(v);
        free(v);
        return NULL;
    }
    return v;
}

keel_json_type keel_json_type_of(const keel_json *value) { return value ? value->type : KEEL_JSON_NULL; }

const keel_json *keel_json_get(const keel_json *object, const char *key) {
    if (!object || object->type != KEEL_JSON_OBJECT) return NULL;
    const keel_json *found = NULL;
    for (size_t i = 0; i < object->length; i++)
        if (strcmp(object->keys[i], key) == 0) found = &object->items[i]; /* last one wins, as in JS */
    return found;
}

const char *keel_json_string(const keel_json *value, size_t *len) {
    if (!value || value->type != KEEL_JSON_STRING) return NULL;
    if (len) *len = value->length;
    return value->string ? value->string : "";
}

double keel_json_number(const keel_json *value) {
    return value && value->type == KEEL_JSON_NUMBER ? value->number : 0;
}

bool keel_json_bool(const keel_json *value) { return value && value->type == KEEL_JSON_BOOL && value->boolean; }

size_t keel_json_length(const keel_json *value) {
    return value && (value->type == KEEL_JSON_ARRAY || value->type == KEEL_JSON_OBJECT) ? value->length : 0;
}

const keel_json *keel_json_at(const keel_json *value, size_t i) {
    return i < keel_json_length(value) ? &value->items[i] : NULL;
}

const char *keel_json_key_at(const keel_json *value, size_t i) {
    return value && value->type == KEEL_JSON_OBJECT && i < value->length ? value->keys[i] : NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* The call                                                                                    */

struct keel_call {
    exports_keel_plugin_tools_call_context_t *ctx;
    char *call_id, *scope;
    buf out;
    bool need_comma; /* a value was written at this level: the next one needs a comma */
    bool has_error;
    keel_plugin_types_tool_error_t error;
};

const char *keel_call_id(const keel_call *call) { return call->call_id; }
const char *keel_call_scope(const keel_call *call) { return call->scope; }
uint64_t keel_call_deadline_ms(const keel_call *call) { return call->ctx->deadline_ms; }

/* Length of the valid UTF-8 sequence at p (1-4), or 0 if the bytes there are not one. */
static size_t utf8_seq(const unsigned char *p, const unsigned char *end) {
    unsigned char c = *p;
    size_t n;
    uint32_t min, code;
    if (c < 0x80) return 1;
    if ((c & 0xE0) == 0xC0) {
        n = 1, min = 0x80, code = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
        n = 2, min = 0x800, code = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
        n = 3, min = 0x10000, code = c & 0x07;
    } else {
        return 0;
    }
    if ((size_t)(end - p) <= n) return 0;
    for (size_t i = 1; i <= n; i++) {
        if ((p[i] & 0xC0) != 0x80) return 0;
        code = (code << 6) | (p[i] & 0x3F);
    }
    if (code < min || code > 0x10FFFF || (code >= 0xD800 && code <= 0xDFFF)) return 0;
    return n + 1;
}

/* Text for the host, which takes only UTF-8: s with every byte that starts no valid sequence as
   U+FFFD (a latin-1 file name, a stray byte), instead of a call that traps. Caller frees. */
static buf utf8_text(const char *s, size_t len) {
    buf b = {0};
    const unsigned char *p = (const unsigned char *)s, *end = p + len;
    while (p < end) {
        size_t n = utf8_seq(p, end);
        if (n == 0) {
            buf_put(&b, "\xEF\xBF\xBD", 3);
            p++;
        } else {
            buf_put(&b, (const char *)p, n);
            p += n;
        }
    }
    return b;
}

static void to_wit(tool_string_t *ret, const char *s, size_t len) {
    if (len == 0) {
        ret->ptr = NULL;
        ret->len = 0;
        return;
    }
    buf text = utf8_text(s, len);
    tool_string_dup_n(ret, text.ptr, text.len);
    free(text.ptr);
}

static void to_wit_c(tool_string_t *ret, const char *s) { to_wit(ret, s ? s : "", s ? strlen(s) : 0); }

void keel_log(keel_call *call, keel_log_level level, const char *format, ...) {
    (void)call;
    buf b = {0};
    va_list ap;
    va_start(ap, format);
    buf_vprintf(&b, format, ap);
    va_end(ap);
    buf text = utf8_text(b.ptr ? b.ptr : "", b.len);
    free(b.ptr);
    tool_string_t message = {(uint8_t *)(text.ptr ? text.ptr : ""), text.len};
    keel_plugin_host_log((keel_plugin_host_log_level_t)level, &message);
    free(text.ptr);
}

void keel_progress(keel_call *call, float fraction, const char *message) {
    (void)call;
    buf text = utf8_text(message, strlen(message));
    tool_string_t m = {(uint8_t *)(text.ptr ? text.ptr : ""), text.len};
    keel_plugin_host_progress(fraction >= 0 ? &fraction : NULL, &m);
    free(text.ptr);
}

static bool set_error(keel_call *call, uint8_t tag, const char *format, va_list ap) {
    if (call->has_error) return false; /* the first error wins */
    buf b = {0};
    buf_vprintf(&b, format, ap);
    call->has_error = true;
    call->error.tag = tag;
    tool_string_t *slot = tag == KEEL_PLUGIN_TYPES_TOOL_ERROR_INVALID_INPUT ? &call->error.val.invalid_input
                          : tag == KEEL_PLUGIN_TYPES_TOOL_ERROR_TIMED_OUT ? &call->error.val.timed_out
                          : tag == KEEL_PLUGIN_TYPES_TOOL_ERROR_DENIED    ? &call->error.val.denied.message
                                                                          : &call->error.val.failed;
    to_wit(slot, b.ptr ? b.ptr : "", b.len);
    free(b.ptr);
    return false;
}

#define KEEL_ERROR_FN(NAME, TAG)                                                                        \
    bool NAME(keel_call *call, const char *format, ...) {                                              \
        va_list ap;                                                                                     \
        va_start(ap, format);                                                                           \
        set_error(call, TAG, format, ap);                                                               \
        va_end(ap);                                                                                     \
        return false;                                                                                   \
    }

KEEL_ERROR_FN(keel_invalid_input, KEEL_PLUGIN_TYPES_TOOL_ERROR_INVALID_INPUT)
KEEL_ERROR_FN(keel_failed, KEEL_PLUGIN_TYPES_TOOL_ERROR_FAILED)
KEEL_ERROR_FN(keel_timed_out, KEEL_PLUGIN_TYPES_TOOL_ERROR_TIMED_OUT)

bool keel_denied(keel_call *call, const char *capability, const char *target, const char *format, ...) {
    if (call->has_error) return false;
    va_list ap;
    va_start(ap, format);
    set_error(call, KEEL_PLUGIN_TYPES_TOOL_ERROR_DENIED, format, ap);
    va_end(ap);
    to_wit_c(&call->error.val.denied.capability, capability);
    to_wit_c(&call->error.val.denied.target, target);
    return false;
}

const char *keel_arg_string(keel_call *call, const keel_json *args, const char *key, size_t *len) {
    const keel_json *value = keel_json_get(args, key);
    if (!value) {
        keel_invalid_input(call, "arguments are missing `%s`", key);
        return NULL;
    }
    const char *s = keel_json_string(value, len);
    if (!s) keel_invalid_input(call, "`%s` must be a string", key);
    return s;
}

const char *keel_arg_string_opt(keel_call *call, const keel_json *args, const char *key, size_t *len) {
    const keel_json *value = keel_json_get(args, key);
    if (!value || value->type == KEEL_JSON_NULL) return NULL; /* absent: no error, the caller's default */
    return keel_arg_string(call, args, key, len);
}

/* ------------------------------------------------------------------------------------------ */
/* JSON writer                                                                                 */

static void out_sep(keel_call *call) {
    if (call->need_comma) buf_putc(&call->out, ',');
    call->need_comma = true;
}

void keel_out_object_begin(keel_call *call) {
    out_sep(call);
    buf_putc(&call->out, '{');
    call->need_comma = false;
}

void keel_out_object_end(keel_call *call) {
    buf_putc(&call->out, '}');
    call->need_comma = true;
}

void keel_out_array_begin(keel_call *call) {
    out_sep(call);
    buf_putc(&call->out, '[');
    call->need_comma = false;
}

void keel_out_array_end(keel_call *call) {
    buf_putc(&call->out, ']');
    call->need_comma = true;
}

static void put_escaped(buf *b, const char *s, size_t len) {
    static const char hex[] = "0123456789abcdef";
    buf_putc(b, '"');
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '"': buf_put(b, "\\\"", 2); break;
        case '\\': buf_put(b, "\\\\", 2); break;
        case '\b': buf_put(b, "\\b", 2); break;
        case '\f': buf_put(b, "\\f", 2); break;
        case '\n': buf_put(b, "\\n", 2); break;
        case '\r': buf_put(b, "\\r", 2); break;
        case '\t': buf_put(b, "\\t", 2); break;
        default:
            if (c < 0x20) {
                char u[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
                buf_put(b, u, 6);
            } else if (c < 0x80) {
                buf_putc(b, (char)c);
            } else {
                /* JSON text is UTF-8: a byte that starts no valid sequence is U+FFFD. */
                size_t n = utf8_seq((const unsigned char *)s + i, (const unsigned char *)s + len);
                if (n == 0) {
                    buf_put(b, "\xEF\xBF\xBD", 3);
                } else {
                    buf_put(b, s + i, n);
                    i += n - 1;
                }
            }
        }
    }
    buf_putc(b, '"');
}

void keel_out_key(keel_call *call, const char *key) {
    out_sep(call);
    put_escaped(&call->out, key, strlen(key));
    buf_putc(&call->out, ':');
    call->need_comma = false;
}

void keel_out_string(keel_call *call, const char *s, size_t len) {
    out_sep(call);
    put_escaped(&call->out, s, len);
}

void keel_out_cstring(keel_call *call, const char *s) { keel_out_string(call, s, strlen(s)); }

void keel_out_int(keel_call *call, long long value) {
    char tmp[32];
    out_sep(call);
    buf_put(&call->out, tmp, (size_t)snprintf(tmp, sizeof tmp, "%lld", value));
}

void keel_out_number(keel_call *call, double value) {
    char tmp[40];
    out_sep(call);
    if (!isfinite(value)) buf_put(&call->out, "null", 4);
    else buf_put(&call->out, tmp, (size_t)snprintf(tmp, sizeof tmp, "%.17g", value));
}

void keel_out_bool(keel_call *call, bool value) {
    out_sep(call);
    buf_put(&call->out, value ? "true" : "false", value ? 4 : 5);
}

void keel_out_null(keel_call *call) {
    out_sep(call);
    buf_put(&call->out, "null", 4);
}

/* ------------------------------------------------------------------------------------------ */
/* Files                                                                                       */

bool keel_utf8_valid(const char *s, size_t len) {
    const unsigned char *p = (const unsigned char *)s, *end = p + len;
    while (p < end) {
        size_t n = utf8_seq(p, end);
        if (n == 0) return false;
        p += n;
    }
    return true;
}

bool keel_read_file(keel_call *call, const char *path, char **data, size_t *len) {
    *data = NULL;
    *len = 0;
    /* Which granted (preopened) directory holds the path; none → the capability is missing. */
    const char *prefix = NULL;
    char relative_buf[4096];
    char *relative = relative_buf;
    int dir = __wasilibc_find_relpath(path, &prefix, &relative, sizeof relative_buf);
    if (dir < 0) return keel_denied(call, "filesystem", path, "`%s` is not in a directory this tool was granted", path);
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        int e = errno;
        if (e == EACCES || e == EPERM || e == ENOTCAPABLE || e == EROFS)
            return keel_denied(call, "filesystem", path, "no permission to read `%s`", path);
        if (e == ENOENT) return keel_failed(call, "`%s` does not exist", path);
        return keel_failed(call, "cannot open `%s`: %s", path, strerror(e));
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return keel_failed(call, "`%s` is not a regular file", path);
    }
    buf b = {0};
    for (;;) {
        buf_reserve(&b, b.len < (size_t)st.st_size ? (size_t)st.st_size - b.len : 65536);
        if (b.oom) break;
        ssize_t n = read(fd, b.ptr + b.len, b.cap - b.len - 1);
        if (n < 0) {
            int e = errno;
            close(fd);
            free(b.ptr);
            return keel_failed(call, "cannot read `%s`: %s", path, strerror(e));
        }
        if (n == 0) break;
        b.len += (size_t)n;
        b.ptr[b.len] = 0;
    }
    close(fd);
    if (b.oom) {
        free(b.ptr);
        return keel_failed(call, "`%s` does not fit in memory", path);
    }
    if (!b.ptr) {
        b.ptr = calloc(1, 1);
        if (!b.ptr) return keel_failed(call, "out of memory");
    }
    *data = b.ptr;
    *len = b.len;
    return true;
}

/* ------------------------------------------------------------------------------------------ */
/* Checking arguments against the tool's input schema (the subset keel tools use: type,         */
/* required, properties, additionalProperties, items, minimum/maximum, minLength/maxLength).   */

static const char *type_name(const keel_json *v) {
    static const char *names[] = {"null", "boolean", "number", "string", "array", "object"};
    return names[v->type];
}

static bool has_type(const keel_json *v, const char *type) {
    if (strcmp(type, "integer") == 0) return v->type == KEEL_JSON_NUMBER && v->number == floor(v->number);
    return strcmp(type, type_name(v)) == 0;
}

static size_t utf8_chars(const char *s, size_t len) {
    size_t n = 0;
    for (size_t i = 0; i < len; i++) n += ((unsigned char)s[i] & 0xC0) != 0x80;
    return n;
}

/* NULL if `v` matches `schema`; else a malloc'd sentence saying where it does not. */
static char *check(const keel_json *schema, const keel_json *v, const char *where) {
    buf b = {0};
    if (!schema || schema->type == KEEL_JSON_BOOL) {
        if (schema && !schema->boolean) buf_vprintf_s(&b, "%s is not allowed", where);
        return b.ptr;
    }
    const keel_json *type = keel_json_get(schema, "type");
    if (type) {
        bool ok = false;
        if (type->type == KEEL_JSON_STRING) ok = has_type(v, type->string);
        for (size_t i = 0; type->type == KEEL_JSON_ARRAY && i < type->length; i++)
            ok |= type->items[i].type == KEEL_JSON_STRING && has_type(v, type->items[i].string);
        if (!ok) {
            buf_vprintf_s(&b, "%s must be %s, not %s", where,
                          type->type == KEEL_JSON_STRING ? type->string : "of another type", type_name(v));
            return b.ptr;
        }
    }
    if (v->type == KEEL_JSON_NUMBER) {
        const keel_json *min = keel_json_get(schema, "minimum"), *max = keel_json_get(schema, "maximum");
        if (min && v->number < keel_json_number(min)) buf_vprintf_s(&b, "%s is below its minimum", where);
        else if (max && v->number > keel_json_number(max)) buf_vprintf_s(&b, "%s is above its maximum", where);
        if (b.ptr) return b.ptr;
    }
    if (v->type == KEEL_JSON_STRING) {
        size_t n = utf8_chars(v->string ? v->string : "", v->length);
        const keel_json *min = keel_json_get(schema, "minLength"), *max = keel_json_get(schema, "maxLength");
        if (min && (double)n < keel_json_number(min)) buf_vprintf_s(&b, "%s is too short", where);
        else if (max && (double)n > keel_json_number(max)) buf_vprintf_s(&b, "%s is too long", where);
        if (b.ptr) return b.ptr;
    }
    if (v->type == KEEL_JSON_ARRAY) {
        const keel_json *items = keel_json_get(schema, "items");
        for (size_t i = 0; items && i < v->length; i++) {
            buf at = {0};
            buf_vprintf_s(&at, "%s[%zu]", where, i);
            char *problem = check(items, &v->items[i], at.ptr ? at.ptr : where);
            free(at.ptr);
            if (problem) return problem;
        }
    }
    if (v->type == KEEL_JSON_OBJECT) {
        const keel_json *required = keel_json_get(schema, "required");
        for (size_t i = 0; i < keel_json_length(required); i++) {
            const char *key = keel_json_string(&required->items[i], NULL);
            if (key && !keel_json_get(v, key)) {
                buf_vprintf_s(&b, "%s is missing `%s`", where, key);
                return b.ptr;
            }
        }
        const keel_json *properties = keel_json_get(schema, "properties");
        const keel_json *additional = keel_json_get(schema, "additionalProperties");
        for (size_t i = 0; i < v->length; i++) {
            const keel_json *sub = keel_json_get(properties, v->keys[i]);
            if (!sub) sub = additional;
            buf at = {0};
            buf_vprintf_s(&at, "%s.%s", where, v->keys[i]);
            char *problem = sub ? check(sub, &v->items[i], at.ptr ? at.ptr : where) : NULL;
            free(at.ptr);
            if (problem) return problem;
        }
    }
    return NULL;
}

/* ------------------------------------------------------------------------------------------ */
/* The exports                                                                                 */

static void list_of(tool_list_string_t *ret, const char *const *items) {
    size_t n = 0;
    while (items && items[n]) n++;
    ret->len = n;
    ret->ptr = n ? calloc(n, sizeof *ret->ptr) : NULL;
    for (size_t i = 0; i < n && ret->ptr; i++) to_wit_c(&ret->ptr[i], items[i]);
    if (!ret->ptr) ret->len = 0;
}

static void fs_requests(keel_plugin_types_list_fs_request_t *ret, const keel_tool *tool) {
    size_t reads = 0, writes = 0;
    while (tool->reads && tool->reads[reads]) reads++;
    while (tool->writes && tool->writes[writes]) writes++;
    ret->len = reads + writes;
    ret->ptr = ret->len ? calloc(ret->len, sizeof *ret->ptr) : NULL;
    if (!ret->ptr) {
        ret->len = 0;
        return;
    }
    for (size_t i = 0; i < reads; i++) {
        to_wit_c(&ret->ptr[i].path, tool->reads[i]);
        ret->ptr[i].mode = KEEL_PLUGIN_TYPES_FS_MODE_READ;
    }
    for (size_t i = 0; i < writes; i++) {
        to_wit_c(&ret->ptr[reads + i].path, tool->writes[i]);
        ret->ptr[reads + i].mode = KEEL_PLUGIN_TYPES_FS_MODE_READ_WRITE;
    }
}

void exports_keel_plugin_tools_describe(exports_keel_plugin_tools_plugin_info_t *ret) {
    const keel_plugin *plugin = &keel_plugin_definition;
    to_wit_c(&ret->name, plugin->name);
    to_wit_c(&ret->version, plugin->version);
    to_wit_c(&ret->description, plugin->description);
    ret->tools.len = plugin->tool_count;
    ret->tools.ptr = plugin->tool_count ? calloc(plugin->tool_count, sizeof *ret->tools.ptr) : NULL;
    if (!ret->tools.ptr) ret->tools.len = 0;
    for (size_t i = 0; i < ret->tools.len; i++) {
        const keel_tool *tool = &plugin->tools[i];
        keel_plugin_types_tool_info_t *info = &ret->tools.ptr[i];
        to_wit_c(&info->name, tool->name);
        to_wit_c(&info->description, tool->description);
        to_wit_c(&info->input_schema, tool->input_schema ? tool->input_schema : "{\"type\":\"object\"}");
        info->output_schema.is_some = tool->output_schema != NULL;
        if (tool->output_schema) to_wit_c(&info->output_schema.val, tool->output_schema);
        fs_requests(&info->capabilities.filesystem, tool);
        list_of(&info->capabilities.network, tool->connects);
        list_of(&info->capabilities.environment, tool->env);
        info->idempotent = tool->idempotent;
    }
}

static char *cstring(const tool_string_t *s) {
    char *out = malloc(s->len + 1);
    if (!out) return NULL;
    memcpy(out, s->ptr, s->len);
    out[s->len] = 0;
    return out;
}

bool exports_keel_plugin_tools_call(exports_keel_plugin_tools_call_context_t *ctx, tool_string_t *tool_name,
                                    tool_string_t *arguments, exports_keel_plugin_tools_tool_output_t *ret,
                                    exports_keel_plugin_tools_tool_error_t *err) {
    const keel_plugin *plugin = &keel_plugin_definition;
    const keel_tool *tool = NULL;
    for (size_t i = 0; i < plugin->tool_count; i++) {
        const char *name = plugin->tools[i].name;
        if (strlen(name) == tool_name->len && memcmp(name, tool_name->ptr, tool_name->len) == 0) tool = &plugin->tools[i];
    }
    if (!tool) {
        err->tag = KEEL_PLUGIN_TYPES_TOOL_ERROR_UNKNOWN_TOOL;
        err->val.unknown_tool = *tool_name; /* ownership moves to the result */
        tool_string_free(arguments);
        exports_keel_plugin_tools_call_context_free(ctx);
        return false;
    }

    keel_call call = {0};
    call.ctx = ctx;
    call.call_id = cstring(&ctx->call_id);
    call.scope = cstring(&ctx->scope);
    keel_json *args = json_parse((const char *)arguments->ptr, arguments->len);
    bool ok;
    if (!args) ok = keel_invalid_input(&call, "arguments are not valid JSON");
    else if (args->type != KEEL_JSON_OBJECT) ok = keel_invalid_input(&call, "arguments must be a JSON object");
    else {
        keel_json *schema = tool->input_schema ? json_parse(tool->input_schema, strlen(tool->input_schema)) : NULL;
        char *problem = schema ? check(schema, args, "arguments") : NULL;
        if (problem) ok = keel_invalid_input(&call, "arguments do not match the input schema: %s", problem);
        else ok = tool->handler(&call, args);
        free(problem);
        json_free(schema);
        free(schema);
    }
    json_free(args);
    free(args);
    free(call.call_id);
    free(call.scope);
    tool_string_free(tool_name);
    tool_string_free(arguments);
    exports_keel_plugin_tools_call_context_free(ctx);

    if (ok && call.out.oom) ok = keel_failed(&call, "out of memory writing the output");
    if (!ok) {
        free(call.out.ptr);
        if (!call.has_error) keel_failed(&call, "tool `%s` failed", tool->name);
        *err = call.error;
        return false;
    }
    if (call.out.len == 0) buf_put(&call.out, "null", 4);
    ret->json.ptr = (uint8_t *)call.out.ptr;
    ret->json.len = call.out.len;
    return true;
}
