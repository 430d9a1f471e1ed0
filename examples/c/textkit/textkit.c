/* textkit in C: the shared example tool set (word-count, read-file). See sdk/c/README.md. */
#include <stdlib.h>
#include <string.h>

#include "keel.h"

static bool ascii_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == 0x0b || c == 0x0c;
}

static bool word_count(keel_call *call, const keel_json *args) {
    size_t len;
    const char *text = keel_arg_string(call, args, "text", &len);
    if (!text) return false;
    long long chars = 0, newlines = 0, words = 0;
    bool in_word = false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)text[i];
        if ((c & 0xC0) != 0x80) chars++; /* count UTF-8 lead bytes: one per scalar value */
        if (c == '\n') newlines++;
        if (ascii_space(c)) {
            in_word = false;
        } else if (!in_word) {
            in_word = true;
            words++;
        }
    }
    long long lines = newlines + (len > 0 && text[len - 1] != '\n' ? 1 : 0);
    keel_out_object_begin(call);
    keel_out_key(call, "chars");
    keel_out_int(call, chars);
    keel_out_key(call, "lines");
    keel_out_int(call, lines);
    keel_out_key(call, "words");
    keel_out_int(call, words);
    keel_out_object_end(call);
    return true;
}

/* True if `path` is absolute, under /data/, and has no `..` component. */
static bool under_data(const char *path) {
    if (strncmp(path, "/data/", 6) != 0) return false;
    for (const char *p = path; (p = strstr(p, "..")) != NULL; p += 2) {
        bool starts = p == path || p[-1] == '/';
        bool ends = p[2] == '\0' || p[2] == '/';
        if (starts && ends) return false;
    }
    return true;
}

static bool read_file(keel_call *call, const keel_json *args) {
    size_t path_len;
    const char *path = keel_arg_string(call, args, "path", &path_len);
    if (!path) return false;
    if (strlen(path) != path_len || !under_data(path))
        return keel_denied(call, "filesystem", path, "`%s` is not a file under /data", path);
    char *data;
    size_t len;
    if (!keel_read_file(call, path, &data, &len)) return false;
    if (!keel_utf8_valid(data, len)) {
        free(data);
        return keel_failed(call, "`%s` is not valid UTF-8", path);
    }
    keel_out_object_begin(call);
    keel_out_key(call, "bytes");
    keel_out_int(call, (long long)len);
    keel_out_key(call, "path");
    keel_out_string(call, path, path_len);
    keel_out_key(call, "text");
    keel_out_string(call, data, len);
    keel_out_object_end(call);
    free(data);
    return true;
}

static const keel_tool tools[] = {
    {
        .name = "word-count",
        .description = "Count the characters (Unicode scalar values), lines and words of a text.",
        .input_schema = "{\"type\":\"object\",\"properties\":{\"text\":{\"type\":\"string\","
                        "\"description\":\"The text to count.\"}},\"required\":[\"text\"],"
                        "\"additionalProperties\":false}",
        .output_schema = "{\"type\":\"object\",\"properties\":{\"chars\":{\"type\":\"integer\"},"
                         "\"lines\":{\"type\":\"integer\"},\"words\":{\"type\":\"integer\"}},"
                         "\"required\":[\"chars\",\"lines\",\"words\"],\"additionalProperties\":false}",
        .handler = word_count,
        .idempotent = true,
    },
    {
        .name = "read-file",
        .description = "Read a UTF-8 text file under /data.",
        .input_schema = "{\"type\":\"object\",\"properties\":{\"path\":{\"type\":\"string\","
                        "\"description\":\"Absolute path of a file under /data.\"}},\"required\":[\"path\"],"
                        "\"additionalProperties\":false}",
        .output_schema = "{\"type\":\"object\",\"properties\":{\"bytes\":{\"type\":\"integer\"},"
                         "\"path\":{\"type\":\"string\"},\"text\":{\"type\":\"string\"}},"
                         "\"required\":[\"bytes\",\"path\",\"text\"],\"additionalProperties\":false}",
        .handler = read_file,
        .idempotent = true,
        .reads = KEEL_LIST("/data"),
    },
};

KEEL_EXPORT_PLUGIN("textkit-c", "0.1.0", "Text utilities: count words, read a text file under /data.", tools);
