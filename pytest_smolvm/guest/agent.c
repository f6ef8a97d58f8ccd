/* The resident guest agent of pytest-smolvm: one static binary (musl), built from this file
 * by pytest_smolvm/images/agentbin.py and shipped in the boot layer as
 * /run/smolvm/smolvm-agent. It serves exec/put/get/setup requests on the virtio-serial port
 * named smolvm.ctl (QEMU) or on AF_VSOCK port 1024 (Firecracker: smolvm.vsock=1 on the kernel
 * command line). It needs nothing from the root filesystem: no Python, no shared library.
 *
 * The wire format is owned by the host (pytest_smolvm/guest/protocol.py):
 *   "SV" | header length (u32 BE) | body length (u32 BE) | UTF-8 JSON object | body
 * Lengths are checked before anything is allocated; a frame that breaks the protocol stops
 * the agent (the stream cannot be resynchronised), and the guest's init powers the VM off.
 *
 * Semantics the host relies on (the same as the Python agent this replaces):
 * - exec returns when the command's own process exits (noticed through a pidfd), not when
 *   its pipes close: background children never hold up the reply. Their later output is
 *   read and discarded, so they never die of SIGPIPE.
 * - Each command runs in its own session; on timeout its whole process group gets SIGKILL.
 * - The agent and its commands share the cgroup smolvm (pids.max, memory.max): commands are
 *   born inside it. The agent keeps priority with nice -20 (its threads carry
 *   SCHED_RESET_ON_FORK, so commands start at 0) and an OOM score of -1000 (commands: 0).
 * - Output is capped per stream at max_output; the rest is read and dropped. An exec with
 *   "stream": true sends its output as it arrives, as {"op": "out", "id", "stream"} frames
 *   (body: the bytes; the cap counts them), before its result; nothing is buffered.
 * - An exec with "spawn": true streams, keeps its stdin pipe open and answers "started"
 *   (with its pid) once it runs; until it exits, "signal" (to its process group) and
 *   "stdin" (data; "close") ops name it by its request id. When the host hangs up (EOF or
 *   a bad frame on a connection), what it spawned is killed.
 * - env arrives over the channel and is only ever held in memory.
 *
 * Test modes (run on a host by tests/unit): --serve-fd N serves the stream on fd N and
 * stops at EOF, with setup a no-op; --listen-unix PATH serves a listening socket as on
 * vsock; --parse-frames reads frames on stdin and prints each header re-encoded.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <net/if.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PORT_NAME "smolvm.ctl"
#define VSOCK_PORT 1024 /* drivers/firecracker.py AGENT_VSOCK_PORT */
#define PROTOCOL_VERSION 2
#define MAX_HEADER (64 * 1024)
#define MAX_REQUEST_BODY (1u << 30)
#define MAX_DEPTH 200
#define CHUNK (1 << 16)
#define STREAM_GATHER (1 << 20) /* a streamed exec sends at most this much in one frame */
#define STREAM_LINGER 0.02       /* and output waits at most this long to join a frame */
#define DEFAULT_MAX_OUTPUT (16 << 20)
#define MAX_OUTPUT_LIMIT (1ull << 30)
#define SPAWN_RETRY_SECONDS 10.0
#define STEP_OUTPUT 2000
#define CGROUP_PROCS "/sys/fs/cgroup/smolvm/cgroup.procs"
#define BASE_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

static const char *const BASE_ENV[][2] = {
    {"PATH", BASE_PATH}, {"HOME", "/root"}, {"LANG", "C.UTF-8"}, {"USER", "root"}, {"LOGNAME", "root"},
};
#define N_BASE_ENV (sizeof BASE_ENV / sizeof BASE_ENV[0])

/* Linux ABI constants and structs not in musl's headers (include/uapi/linux/). */
#define RNDADDENTROPY 0x40085203
#define RNDRESEEDCRNG 0x5207
#define EXT4_IOC_RESIZE_FS 0x40086610
#define VMADDR_CID_ANY 0xFFFFFFFFu

struct vm_addr {
    sa_family_t family;
    unsigned short reserved1;
    unsigned int port;
    unsigned int cid;
    unsigned char zero[4];
};

static int guest_mode; /* the real agent in a VM (not a test mode on a host) */
static int host_test;  /* --serve-fd / --listen-unix: setup does nothing */

static void logmsg(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof buf - 2) n = (int)sizeof buf - 2;
    buf[n++] = '\n';
    dprintf(2, "smolvm-agent: %.*s", n, buf);
}

static double monotonic(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void *xmalloc(size_t n) {
    void *p = malloc(n ? n : 1);
    if (!p) {
        logmsg("out of memory (%zu bytes)", n);
        _exit(4);
    }
    return p;
}

/* ------------------------------------------------------------------ growable buffer */

struct buf {
    char *data;
    size_t len, cap;
    int failed; /* an allocation failed: the content is incomplete */
};

static int buf_reserve(struct buf *b, size_t extra) {
    if (b->failed) return -1;
    if (extra > SIZE_MAX / 2 - b->len) return b->failed = 1, -1;
    if (b->len + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra) cap *= 2;
    char *p = realloc(b->data, cap);
    if (!p) return b->failed = 1, -1;
    b->data = p;
    b->cap = cap;
    return 0;
}

static void buf_add(struct buf *b, const void *data, size_t n) {
    if (buf_reserve(b, n) == 0) {
        memcpy(b->data + b->len, data, n);
        b->len += n;
    }
}

static void buf_str(struct buf *b, const char *s) { buf_add(b, s, strlen(s)); }

static void buf_fmt(struct buf *b, const char *fmt, ...) {
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0) buf_add(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

static void buf_free(struct buf *b) {
    free(b->data);
    memset(b, 0, sizeof *b);
}

/* ------------------------------------------------------------------ JSON (strict, like protocol.py) */

enum jtype { J_NULL, J_BOOL, J_INT, J_FLOAT, J_STR, J_ARR, J_OBJ };

struct jval {
    enum jtype type;
    int boolean;
    long long integer;
    double number;
    char *str; /* J_STR: decoded bytes, NUL-terminated (may contain NULs: see len) */
    size_t len;
    char *key; /* set when this value is an object member */
    size_t keylen;
    struct jval *child, *next;
};

struct jparser {
    const unsigned char *p, *end;
    const char *error;
};

static void jfree(struct jval *v) {
    while (v) {
        struct jval *next = v->next;
        jfree(v->child);
        free(v->str);
        free(v->key);
        free(v);
        v = next;
    }
}

static void skip_ws(struct jparser *jp) {
    while (jp->p < jp->end && (*jp->p == ' ' || *jp->p == '\t' || *jp->p == '\n' || *jp->p == '\r')) jp->p++;
}

static int hex4(const unsigned char *p, unsigned *out) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned c = p[i], d;
        if (c >= '0' && c <= '9') d = c - '0';
        else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
        else return -1;
        v = v * 16 + d;
    }
    *out = v;
    return 0;
}

static void put_utf8(struct buf *b, unsigned cp) {
    unsigned char u[4];
    size_t n;
    if (cp < 0x80) u[0] = (unsigned char)cp, n = 1;
    else if (cp < 0x800) u[0] = (unsigned char)(0xC0 | cp >> 6), u[1] = (unsigned char)(0x80 | (cp & 0x3F)), n = 2;
    else if (cp < 0x10000) {
        u[0] = (unsigned char)(0xE0 | cp >> 12), u[1] = (unsigned char)(0x80 | (cp >> 6 & 0x3F));
        u[2] = (unsigned char)(0x80 | (cp & 0x3F)), n = 3;
    } else {
        u[0] = (unsigned char)(0xF0 | cp >> 18), u[1] = (unsigned char)(0x80 | (cp >> 12 & 0x3F));
        u[2] = (unsigned char)(0x80 | (cp >> 6 & 0x3F)), u[3] = (unsigned char)(0x80 | (cp & 0x3F)), n = 4;
    }
    buf_add(b, u, n);
}

/* One \uXXXX escape (jp->p at the 'u'), joining a surrogate pair as Python's json does. */
static int parse_u_escape(struct jparser *jp, struct buf *out) {
    unsigned cp, lo;
    if (jp->end - jp->p < 5 || hex4(jp->p + 1, &cp)) return jp->error = "invalid \\uXXXX escape", -1;
    jp->p += 5;
    if (cp >= 0xD800 && cp <= 0xDBFF && jp->end - jp->p >= 6 && jp->p[0] == '\\' && jp->p[1] == 'u' &&
        hex4(jp->p + 2, &lo) == 0 && lo >= 0xDC00 && lo <= 0xDFFF) {
        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
        jp->p += 6;
    }
    put_utf8(out, cp); /* a lone surrogate is kept, encoded as its 3 bytes */
    return 0;
}

static int parse_string(struct jparser *jp, char **str, size_t *len) {
    struct buf out = {0};
    jp->p++; /* the opening quote */
    for (;;) {
        if (jp->p >= jp->end) return buf_free(&out), jp->error = "unterminated string", -1;
        unsigned char c = *jp->p;
        if (c == '"') break;
        if (c < 0x20) return buf_free(&out), jp->error = "control character in string", -1;
        if (c != '\\') {
            buf_add(&out, jp->p++, 1);
            continue;
        }
        if (++jp->p >= jp->end) return buf_free(&out), jp->error = "unterminated string", -1;
        const char *simple = strchr("\"\\/bfnrt", *jp->p);
        if (*jp->p == 'u') {
            if (parse_u_escape(jp, &out)) return buf_free(&out), -1;
            continue;
        }
        if (!simple || !*jp->p) return buf_free(&out), jp->error = "invalid escape", -1;
        static const char repl[] = "\"\\/\b\f\n\r\t";
        buf_add(&out, &repl[simple - "\"\\/bfnrt"], 1);
        jp->p++;
    }
    jp->p++;
    buf_add(&out, "", 1);
    if (out.failed) return buf_free(&out), jp->error = "out of memory", -1;
    *str = out.data;
    *len = out.len - 1;
    return 0;
}

static int digits(struct jparser *jp) {
    const unsigned char *s = jp->p;
    while (jp->p < jp->end && *jp->p >= '0' && *jp->p <= '9') jp->p++;
    return jp->p > s;
}

/* -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?: an int if neither fraction nor exponent. */
static int parse_number(struct jparser *jp, struct jval *v) {
    const unsigned char *start = jp->p;
    int is_float = 0;
    if (jp->p < jp->end && *jp->p == '-') jp->p++;
    if (jp->p < jp->end && *jp->p == '0') jp->p++;
    else if (!digits(jp)) return jp->error = "invalid number", -1;
    if (jp->end - jp->p >= 2 && jp->p[0] == '.' && jp->p[1] >= '0' && jp->p[1] <= '9') jp->p++, digits(jp), is_float = 1;
    if (jp->p < jp->end && (*jp->p == 'e' || *jp->p == 'E')) {
        const unsigned char *save = jp->p++;
        if (jp->p < jp->end && (*jp->p == '+' || *jp->p == '-')) jp->p++;
        if (digits(jp)) is_float = 1;
        else jp->p = save; /* "1e" is the number 1 followed by garbage, as in Python */
    }
    char tmp[64];
    size_t n = (size_t)(jp->p - start);
    char *text = n < sizeof tmp ? tmp : xmalloc(n + 1);
    memcpy(text, start, n);
    text[n] = 0;
    errno = 0;
    long long i = is_float ? 0 : strtoll(text, NULL, 10);
    if (is_float || errno == ERANGE) { /* a big integer is kept as a float: it is out of range anyway */
        v->type = J_FLOAT;
        v->number = strtod(text, NULL);
    } else {
        v->type = J_INT;
        v->integer = i;
        v->number = (double)i;
    }
    if (text != tmp) free(text);
    return 0;
}

static struct jval *parse_value(struct jparser *jp, int depth);

static int parse_members(struct jparser *jp, struct jval *v, int depth, int object) {
    struct jval **tail = &v->child;
    char close = object ? '}' : ']';
    skip_ws(jp);
    if (jp->p < jp->end && *jp->p == close) return jp->p++, 0;
    for (;;) {
        char *key = NULL;
        size_t keylen = 0;
        if (object) {
            if (jp->p >= jp->end || *jp->p != '"') return jp->error = "expected a string key", -1;
            if (parse_string(jp, &key, &keylen)) return -1;
            skip_ws(jp);
            if (jp->p >= jp->end || *jp->p != ':') return free(key), jp->error = "expected ':'", -1;
            jp->p++;
            skip_ws(jp);
        }
        struct jval *item = parse_value(jp, depth + 1);
        if (!item) return free(key), -1;
        item->key = key;
        item->keylen = keylen;
        *tail = item;
        tail = &item->next;
        v->len++;
        skip_ws(jp);
        if (jp->p < jp->end && *jp->p == close) return jp->p++, 0;
        if (jp->p >= jp->end || *jp->p != ',') return jp->error = "expected ',' or a closing bracket", -1;
        jp->p++;
        skip_ws(jp);
    }
}

static int match_word(struct jparser *jp, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(jp->end - jp->p) < n || memcmp(jp->p, word, n)) return 0;
    jp->p += n;
    return 1;
}

static struct jval *parse_value(struct jparser *jp, int depth) {
    if (depth > MAX_DEPTH) return jp->error = "nested too deeply", NULL;
    if (jp->p >= jp->end) return jp->error = "expected a value", NULL;
    struct jval *v = calloc(1, sizeof *v);
    if (!v) return jp->error = "out of memory", NULL;
    int rc = 0;
    unsigned char c = *jp->p;
    if (c == '"') v->type = J_STR, rc = parse_string(jp, &v->str, &v->len);
    else if (c == '{' || c == '[') v->type = c == '{' ? J_OBJ : J_ARR, jp->p++, rc = parse_members(jp, v, depth, c == '{');
    else if (c == '-' || (c >= '0' && c <= '9')) rc = parse_number(jp, v);
    else if (match_word(jp, "true")) v->type = J_BOOL, v->boolean = 1;
    else if (match_word(jp, "false")) v->type = J_BOOL;
    else if (match_word(jp, "null")) v->type = J_NULL;
    else rc = -1, jp->error = "expected a value";
    if (rc) {
        jfree(v);
        return NULL;
    }
    return v;
}

/* Strict UTF-8, as Python's bytes.decode(): no overlong forms, no surrogates, <= U+10FFFF. */
static int valid_utf8(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t k;
        unsigned lo = 0x80, hi = 0xBF;
        if (c < 0x80) { i++; continue; }
        if (c >= 0xC2 && c <= 0xDF) k = 1;
        else if (c >= 0xE0 && c <= 0xEF) k = 2, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
        else if (c >= 0xF0 && c <= 0xF4) k = 3, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
        else return 0;
        if (n - i <= k) return 0;
        if (s[i + 1] < lo || s[i + 1] > hi) return 0;
        for (size_t j = 2; j <= k; j++)
            if ((s[i + j] & 0xC0) != 0x80) return 0;
        i += k + 1;
    }
    return 1;
}

/* The whole header: one JSON document, no whitespace around it (protocol.loads). */
static struct jval *parse_header(const char *text, size_t n, const char **error) {
    if (!valid_utf8((const unsigned char *)text, n)) return *error = "header is not UTF-8", NULL;
    struct jparser jp = {(const unsigned char *)text, (const unsigned char *)text + n, NULL};
    struct jval *v = parse_value(&jp, 0);
    if (v && jp.p != jp.end) {
        jfree(v);
        return *error = "extra data after JSON", NULL;
    }
    if (!v) *error = jp.error;
    return v;
}

static struct jval *jget(const struct jval *obj, const char *key) {
    struct jval *found = NULL; /* the last of duplicate keys wins, as in Python */
    if (!obj || obj->type != J_OBJ) return NULL;
    size_t n = strlen(key);
    for (struct jval *m = obj->child; m; m = m->next)
        if (m->keylen == n && memcmp(m->key, key, n) == 0) found = m;
    return found;
}

/* A string field without embedded NULs, or NULL (absent, null, wrong type). */
static const char *jstr(const struct jval *obj, const char *key) {
    struct jval *v = jget(obj, key);
    if (!v || v->type != J_STR || memchr(v->str, 0, v->len)) return NULL;
    return v->str;
}

static int truthy(const struct jval *v) {
    if (!v) return 0;
    switch (v->type) {
    case J_NULL: return 0;
    case J_BOOL: return v->boolean;
    case J_INT: return v->integer != 0;
    case J_FLOAT: return v->number != 0;
    default: return v->len != 0;
    }
}

/* ------------------------------------------------------------------ JSON output (ASCII, like json.dumps) */

static void json_string(struct buf *b, const char *s, size_t n) {
    buf_add(b, "\"", 1);
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        unsigned cp = c;
        size_t k = 1;
        if (c >= 0x80) { /* decode leniently: an invalid byte becomes U+FFFD */
            k = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 0;
            cp = k == 4 ? c & 7 : k == 3 ? c & 15 : c & 31;
            for (size_t j = 1; j < k; j++) {
                if (i + j >= n || ((unsigned char)s[i + j] & 0xC0) != 0x80) { k = 0; break; }
                cp = cp << 6 | ((unsigned char)s[i + j] & 0x3F);
            }
            if (k == 0 || cp > 0x10FFFF || (k == 2 && cp < 0x80) || (k == 3 && cp < 0x800) || (k == 4 && cp < 0x10000))
                cp = 0xFFFD, k = 1;
        }
        i += k;
        if (cp == '"' || cp == '\\') buf_fmt(b, "\\%c", (int)cp);
        else if (cp == '\n') buf_str(b, "\\n");
        else if (cp == '\r') buf_str(b, "\\r");
        else if (cp == '\t') buf_str(b, "\\t");
        else if (cp >= 0x20 && cp < 0x7F) buf_add(b, &c, 1);
        else if (cp < 0x10000) buf_fmt(b, "\\u%04x", cp);
        else buf_fmt(b, "\\u%04x\\u%04x", 0xD800 + ((cp - 0x10000) >> 10), 0xDC00 + ((cp - 0x10000) & 0x3FF));
    }
    buf_add(b, "\"", 1);
}

static void json_value(struct buf *b, const struct jval *v) {
    switch (v->type) {
    case J_NULL: buf_str(b, "null"); break;
    case J_BOOL: buf_str(b, v->boolean ? "true" : "false"); break;
    case J_INT: buf_fmt(b, "%lld", v->integer); break;
    case J_FLOAT:
        if (v->number != v->number || v->number > 1.7976931348623157e308 || v->number < -1.7976931348623157e308)
            buf_str(b, v->number > 0 ? "1e999" : v->number < 0 ? "-1e999" : "null");
        else buf_fmt(b, "%.17g", v->number);
        break;
    case J_STR: json_string(b, v->str, v->len); break;
    case J_ARR:
    case J_OBJ:
        buf_add(b, v->type == J_OBJ ? "{" : "[", 1);
        for (const struct jval *m = v->child; m; m = m->next) {
            if (m != v->child) buf_add(b, ",", 1);
            if (v->type == J_OBJ) json_string(b, m->key, m->keylen), buf_add(b, ":", 1);
            json_value(b, m);
        }
        buf_add(b, v->type == J_OBJ ? "}" : "]", 1);
        break;
    }
}

/* A reply header under construction: {"op":OP,"id":ID ... } */
static void reply_start(struct buf *b, const char *op, const struct jval *id) {
    buf_str(b, "{\"op\":");
    json_string(b, op, strlen(op));
    buf_str(b, ",\"id\":");
    if (id) json_value(b, id);
    else buf_str(b, "null");
}

static void field_str(struct buf *b, const char *key, const char *s, size_t n) {
    buf_fmt(b, ",\"%s\":", key);
    json_string(b, s, n);
}

static void field_int(struct buf *b, const char *key, long long v) { buf_fmt(b, ",\"%s\":%lld", key, v); }
static void field_bool(struct buf *b, const char *key, int v) { buf_fmt(b, ",\"%s\":%s", key, v ? "true" : "false"); }
static void field_float(struct buf *b, const char *key, double v) { buf_fmt(b, ",\"%s\":%.6f", key, v); }

/* ------------------------------------------------------------------ the channel */

struct chan {
    int fd;
    int wait_on_eof; /* the virtio port: a host disconnect reads as EOF and is waited out */
    int refs;         /* the serving loop + each exec thread; the fd closes with the last */
    pthread_mutex_t lock;
};

static struct chan *chan_new(int fd, int wait_on_eof) {
    struct chan *c = xmalloc(sizeof *c);
    c->fd = fd;
    c->wait_on_eof = wait_on_eof;
    c->refs = 1;
    pthread_mutex_init(&c->lock, NULL);
    return c;
}

static void chan_ref(struct chan *c) { __atomic_add_fetch(&c->refs, 1, __ATOMIC_SEQ_CST); }

static void chan_unref(struct chan *c) {
    if (__atomic_sub_fetch(&c->refs, 1, __ATOMIC_SEQ_CST) == 0) {
        close(c->fd);
        pthread_mutex_destroy(&c->lock);
        free(c);
    }
}

/* 0, or -1 at EOF (only when not waiting it out) or on a read error. */
static int read_exact(struct chan *c, void *dst, size_t n) {
    char *p = dst;
    while (n) {
        ssize_t r = read(c->fd, p, n > (1u << 20) ? (1u << 20) : n);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno != EAGAIN) return -1;
        if (r <= 0) {
            if (!c->wait_on_eof && r == 0) return -1;
            usleep(5000);
            continue;
        }
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0 && errno == EAGAIN) {
            usleep(1000);
            continue;
        }
        if (w < 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Send one frame: header (finished with '}') and up to two body parts. */
static void chan_send(struct chan *c, struct buf *hdr, const char *b1, size_t n1, const char *b2, size_t n2) {
    buf_add(hdr, "}", 1);
    if (hdr->failed || hdr->len > MAX_HEADER) {
        logmsg("reply header too large or out of memory; reply dropped");
        return;
    }
    unsigned char prefix[10] = {'S', 'V'};
    uint32_t h = htonl((uint32_t)hdr->len), b = htonl((uint32_t)(n1 + n2));
    memcpy(prefix + 2, &h, 4);
    memcpy(prefix + 6, &b, 4);
    pthread_mutex_lock(&c->lock);
    int rc = write_all(c->fd, (char *)prefix, 10) || write_all(c->fd, hdr->data, hdr->len) ||
             write_all(c->fd, b1, n1) || write_all(c->fd, b2, n2);
    pthread_mutex_unlock(&c->lock);
    if (rc) logmsg("reply lost: %s", strerror(errno));
}

static void send_error(struct chan *c, const struct jval *id, int err, const char *msg, const char *path) {
    struct buf b = {0};
    reply_start(&b, "error", id);
    field_str(&b, "error", msg, strlen(msg));
    field_int(&b, "errno", err);
    if (path) field_str(&b, "path", path, strlen(path));
    chan_send(c, &b, NULL, 0, NULL, 0);
    buf_free(&b);
}

/* ------------------------------------------------------------------ frames */

struct frame {
    struct jval *header;
    char *body;
    size_t body_len;
};

enum { FRAME_OK, FRAME_EOF, FRAME_BAD, FRAME_NOMEM };

/* Read one frame. FRAME_BAD: *why says how it broke the protocol. FRAME_NOMEM: the body was
 * read and dropped (the stream stays in step); the request is answered with an error. */
static int read_frame(struct chan *c, struct frame *f, char *why, size_t whylen) {
    unsigned char prefix[10];
    memset(f, 0, sizeof *f);
    if (read_exact(c, prefix, sizeof prefix)) return FRAME_EOF;
    uint32_t hlen, blen;
    memcpy(&hlen, prefix + 2, 4);
    memcpy(&blen, prefix + 6, 4);
    hlen = ntohl(hlen), blen = ntohl(blen);
    if (prefix[0] != 'S' || prefix[1] != 'V')
        return snprintf(why, whylen, "bad frame magic %02x%02x", prefix[0], prefix[1]), FRAME_BAD;
    if (hlen == 0 || hlen > MAX_HEADER)
        return snprintf(why, whylen, "header length %u outside 1..%d", hlen, MAX_HEADER), FRAME_BAD;
    if (blen > MAX_REQUEST_BODY)
        return snprintf(why, whylen, "body length %u exceeds the limit of %u bytes", blen, MAX_REQUEST_BODY), FRAME_BAD;
    char *text = xmalloc(hlen);
    if (read_exact(c, text, hlen)) return free(text), FRAME_EOF;
    const char *error = NULL;
    f->header = parse_header(text, hlen, &error);
    free(text);
    if (!f->header) return snprintf(why, whylen, "header is not JSON: %s", error), FRAME_BAD;
    struct jval *op = jget(f->header, "op");
    if (f->header->type != J_OBJ || !op || op->type != J_STR) {
        jfree(f->header);
        f->header = NULL;
        return snprintf(why, whylen, "header must be a JSON object with a string 'op'"), FRAME_BAD;
    }
    f->body_len = blen;
    f->body = malloc(blen ? blen : 1);
    if (f->body) return read_exact(c, f->body, blen) ? FRAME_EOF : FRAME_OK;
    char *sink = xmalloc(CHUNK);
    for (size_t left = blen; left;) {
        size_t n = left < CHUNK ? left : CHUNK;
        if (read_exact(c, sink, n)) return free(sink), FRAME_EOF;
        left -= n;
    }
    free(sink);
    return FRAME_NOMEM;
}

static void frame_free(struct frame *f) {
    jfree(f->header);
    free(f->body);
    memset(f, 0, sizeof *f);
}

/* ------------------------------------------------------------------ processes */

static void set_oom_score_adj(const char *value) {
    int fd = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t ignored = write(fd, value, strlen(value));
        (void)ignored;
        close(fd);
    }
}

/* Priority over commands (nice -20) without passing it on: with SCHED_RESET_ON_FORK whatever
 * this thread starts begins at nice 0. Per thread: a new thread starts without the flag. */
static void protect_thread(void) {
    struct sched_param sp = {0};
    /* The raw syscall: musl's sched_setscheduler() is a stub that fails with ENOSYS. */
    syscall(SYS_sched_setscheduler, 0, SCHED_OTHER | SCHED_RESET_ON_FORK, &sp);
    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), -20);
}

/* Resolve name on the command's own PATH (not the agent's); NULL with errno ENOENT if absent. */
static char *which(const char *name, const char *path) {
    if (strchr(name, '/')) return strdup(name);
    const char *p = path;
    for (;;) {
        const char *colon = strchr(p, ':');
        size_t dl = colon ? (size_t)(colon - p) : strlen(p);
        size_t n = (dl ? dl : 1) + strlen(name) + 2;
        char *cand = xmalloc(n);
        snprintf(cand, n, "%.*s/%s", (int)(dl ? dl : 1), dl ? p : ".", name);
        struct stat st;
        if (access(cand, X_OK) == 0 && stat(cand, &st) == 0 && !S_ISDIR(st.st_mode)) return cand;
        free(cand);
        if (!colon) break;
        p = colon + 1;
    }
    errno = ENOENT;
    return NULL;
}

struct child_ctx {
    const char *exe, *cwd;
    char **argv, **envp;
    int fds[3];
    int report; /* write end of a close-on-exec pipe: the child's exec failure, if any */
};

/* What a child that could not exec writes to its report pipe. */
struct exec_failure {
    int err;
    int cwd_failed;
};

/* Runs in the child (after vfork, which is a plain fork on some libcs: musl's aarch64
 * vfork() shares no memory), so it reports a failure through the pipe, never through
 * memory: syscalls only. */
static __attribute__((noinline, noreturn)) void child_exec(const struct child_ctx *c) {
    struct exec_failure f = {0, 0};
    sigset_t all;
    sigemptyset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    setsid();
    if (chdir(c->cwd)) {
        f.err = errno;
        f.cwd_failed = 1;
    } else {
        for (int i = 0; i < 3; i++) {
            if (c->fds[i] == i) fcntl(i, F_SETFD, 0);
            else dup2(c->fds[i], i);
        }
        if (guest_mode) set_oom_score_adj("0"); /* the agent's -1000 is inherited: hand it back */
        execve(c->exe, c->argv, c->envp);
        f.err = errno;
    }
    ssize_t ignored = write(c->report, &f, sizeof f);
    (void)ignored;
    _exit(127);
}

static pid_t start_child(const struct child_ctx *c) {
    pid_t pid = vfork();
    if (pid == 0) child_exec(c);
    return pid;
}

/* Wait until the child has exec'd (its end of the report pipe closes: EOF) or has written
 * why it could not. So the child has called setsid() before its pid is answered, and a
 * group kill always finds its group. 0 on success; else the child is reaped. */
static int await_exec(pid_t pid, int report, int *cwd_failed) {
    struct exec_failure f;
    ssize_t n;
    while ((n = read(report, &f, sizeof f)) < 0 && errno == EINTR) {}
    if (n != (ssize_t)sizeof f) return 0;
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {}
    *cwd_failed = f.cwd_failed;
    return f.err ? f.err : EIO;
}

/* Start argv in a new session on fds; retries while the guest is out of process slots (a
 * fork bomb's dying processes count against pids.max for a moment). -1 and errno on
 * failure; *cwd_failed says the working directory was the problem. */
static pid_t spawn(char **argv, char **envp, const char *path, const char *cwd, const int fds[3], int *cwd_failed) {
    *cwd_failed = 0;
    char *exe = which(argv[0], path);
    if (!exe) return -1;
    int report[2];
    if (pipe2(report, O_CLOEXEC)) {
        int err = errno;
        free(exe);
        errno = err;
        return -1;
    }
    struct child_ctx c = {.exe = exe, .cwd = cwd, .argv = argv, .envp = envp, .fds = {fds[0], fds[1], fds[2]},
                          .report = report[1]};
    double deadline = monotonic() + SPAWN_RETRY_SECONDS;
    useconds_t delay = 10000;
    pid_t pid;
    while ((pid = start_child(&c)) < 0 && errno == EAGAIN && monotonic() < deadline) {
        usleep(delay);
        delay = delay * 2 > 500000 ? 500000 : delay * 2;
    }
    int err = errno;
    close(report[1]);
    free(exe);
    if (pid > 0 && (err = await_exec(pid, report[0], cwd_failed)) != 0) pid = -1;
    close(report[0]);
    errno = err;
    return pid;
}

static int exit_code(int status) {
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return -WTERMSIG(status);
    return 255;
}

/* ------------------------------------------------------------------ exec */

struct stream {
    int fd; /* -1 once at EOF */
    struct buf data;
    size_t kept; /* bytes kept (buffered or streamed) of the cap */
    int truncated;
};

struct execution {
    struct chan *chan;
    struct frame req;
    const struct jval *id;
    char **argv, **envp;
    const char *cwd, *path;
    size_t cap;
    double start, deadline; /* deadline 0: none */
    const char *stdin_data;
    size_t stdin_left;
    int in_w, pidfd, timed_out, exited;
    pid_t pid;
    struct stream out, err;
    char *chunk;
    double gather_since; /* a streamed exec: when the output not yet sent began */
    int stream;  /* output goes out as "out" frames as it arrives (nothing is buffered) */
    int spawned;    /* stdin stays open for "stdin" ops; answers "started" */
    int registered; /* a spawn, or a streamed exec with an integer id: "signal" reaches it */
    long long target;       /* a registered exec's request id, as "signal"/"stdin" name it */
    int wake[2];            /* the serving loop -> this thread: a stdin op arrived */
    /* Under reg_lock: a queued "stdin" op (its frame) and whether stdin is closed. */
    struct frame stdin_op;
    int stdin_closed;
    /* The stdin op being written now (owned by the exec thread). */
    struct frame feeding;
    int close_after;
    struct execution *next;
};

/* Spawned executions that are still running, by connection and id (under reg_lock). */
static pthread_mutex_t reg_lock = PTHREAD_MUTEX_INITIALIZER;
static struct execution *registry;

/* The registered execution of c with request id target; call with reg_lock held. */
static struct execution *reg_find(struct chan *c, long long target) {
    for (struct execution *x = registry; x; x = x->next)
        if (x->chan == c && x->target == target) return x;
    return NULL;
}

static void reg_remove(struct execution *x) {
    pthread_mutex_lock(&reg_lock);
    for (struct execution **p = &registry; *p; p = &(*p)->next)
        if (*p == x) {
            *p = x->next;
            break;
        }
    pthread_mutex_unlock(&reg_lock);
}

/* The request's argv/env/cwd/limits; NULL, or what is wrong with them. */
static const char *exec_parse(struct execution *x) {
    const struct jval *h = x->req.header, *v;
    v = jget(h, "argv");
    if (!v || v->type != J_ARR || v->len == 0) return "exec: argv must be a non-empty list of strings";
    x->argv = calloc(v->len + 1, sizeof(char *));
    if (!x->argv) return "exec: out of memory";
    size_t i = 0;
    for (const struct jval *a = v->child; a; a = a->next, i++) {
        if (a->type != J_STR || memchr(a->str, 0, a->len)) return "exec: argv must be a list of strings without NUL bytes";
        x->argv[i] = a->str;
    }
    const struct jval *env = jget(h, "env");
    if (env && env->type != J_OBJ && env->type != J_NULL) return "exec: env must be an object of strings";
    size_t n_env = N_BASE_ENV + (env && env->type == J_OBJ ? env->len : 0);
    x->envp = calloc(n_env + 1, sizeof(char *));
    if (!x->envp) return "exec: out of memory";
    struct buf kv = {0};
    size_t k = 0;
    for (size_t j = 0; j < N_BASE_ENV; j++) {
        const struct jval *over = env && env->type == J_OBJ ? jget(env, BASE_ENV[j][0]) : NULL;
        if (over) continue; /* set below, from the request */
        buf_fmt(&kv, "%s=%s", BASE_ENV[j][0], BASE_ENV[j][1]);
        x->envp[k++] = strndup(kv.data, kv.len), kv.len = 0;
    }
    for (const struct jval *e = env && env->type == J_OBJ ? env->child : NULL; e; e = e->next) {
        if (e->type != J_STR || memchr(e->str, 0, e->len) || !e->keylen || memchr(e->key, '=', e->keylen) ||
            memchr(e->key, 0, e->keylen))
            return buf_free(&kv), "exec: env must map names (no '=' or NUL) to strings without NUL";
        if (jget(env, e->key) != e) continue; /* a duplicate key: the last one wins */
        buf_add(&kv, e->key, e->keylen), buf_add(&kv, "=", 1), buf_add(&kv, e->str, e->len);
        x->envp[k++] = strndup(kv.data, kv.len), kv.len = 0;
    }
    buf_free(&kv);
    x->path = BASE_PATH;
    for (size_t j = 0; j < k; j++)
        if (x->envp[j] && strncmp(x->envp[j], "PATH=", 5) == 0) x->path = x->envp[j] + 5;
    x->cwd = truthy(jget(h, "cwd")) ? jstr(h, "cwd") : "/root";
    if (!x->cwd) return "exec: cwd must be a string";
    v = jget(h, "max_output");
    x->cap = DEFAULT_MAX_OUTPUT;
    if (v && (v->type != J_INT || v->integer < 0 || (unsigned long long)v->integer > MAX_OUTPUT_LIMIT))
        return "exec: max_output must be an integer in 0..2**30";
    if (v) x->cap = (size_t)v->integer;
    v = jget(h, "timeout");
    if (truthy(v) && ((v->type != J_INT && v->type != J_FLOAT) || !(v->number > 0) || v->number > 1e9))
        return "exec: timeout must be a positive number of seconds";
    x->deadline = truthy(v) ? x->start + v->number : 0;
    x->spawned = truthy(jget(h, "spawn"));
    x->stream = x->spawned || truthy(jget(h, "stream"));
    if (x->spawned && (!x->id || x->id->type != J_INT)) return "exec: a spawn needs an integer id";
    x->registered = x->spawned || (x->stream && x->id && x->id->type == J_INT);
    if (x->registered) x->target = x->id->integer;
    return NULL;
}

static void exec_fail(struct execution *x, int err, int cwd_failed) {
    char msg[600];
    const char *where = cwd_failed ? x->cwd : x->argv[0];
    const char *why = err == ENOENT && !cwd_failed && !strchr(x->argv[0], '/') ? "command not found" : strerror(err);
    snprintf(msg, sizeof msg, "smolvm: cannot execute %s%.256s: %s%s\n", cwd_failed ? "cwd " : "", where, why,
             !cwd_failed && err == ENOENT && strcmp(x->argv[0], "/bin/sh") == 0
                 ? " (this image has no /bin/sh: run an argv list instead of a shell string)" : "");
    struct buf b = {0};
    reply_start(&b, "result", x->id);
    field_int(&b, "exit_code", err == ENOENT ? 127 : 126);
    field_int(&b, "stdout_len", 0);
    field_float(&b, "duration", monotonic() - x->start);
    chan_send(x->chan, &b, msg, strlen(msg), NULL, 0);
    buf_free(&b);
}

static int exec_spawn(struct execution *x) {
    int out[2], err[2], in[2] = {-1, -1};
    if (pipe2(out, O_CLOEXEC)) return -1;
    if (pipe2(err, O_CLOEXEC)) return close(out[0]), close(out[1]), -1;
    if (x->stdin_left || x->spawned) {
        if (pipe2(in, O_CLOEXEC)) in[0] = -1;
    } else in[0] = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (in[0] < 0) {
        close(out[0]), close(out[1]), close(err[0]), close(err[1]);
        return -1;
    }
    int fds[3] = {in[0], out[1], err[1]}, cwd_failed;
    x->pid = spawn(x->argv, x->envp, x->path, x->cwd, fds, &cwd_failed);
    int saved = errno;
    close(in[0]), close(out[1]), close(err[1]);
    x->in_w = in[1];
    x->out.fd = out[0];
    x->err.fd = err[0];
    if (x->pid > 0) return 0;
    close(out[0]), close(err[0]);
    if (in[1] >= 0) close(in[1]);
    x->out.fd = x->err.fd = x->in_w = -1;
    exec_fail(x, saved, cwd_failed);
    return 1;
}

/* A streamed exec: send what the stream has gathered as one "out" frame. Output is gathered
 * for up to STREAM_LINGER seconds (or STREAM_GATHER bytes), so a burst goes out in few frames:
 * each write to the virtio port waits for the host to take it, which under TCG costs
 * milliseconds; a frame per pipe read made streaming 8 MiB 2.5x slower than buffering it. */
static void flush_stream(struct execution *x, struct stream *s) {
    if (!s->data.len) return;
    struct buf b = {0};
    reply_start(&b, "out", x->id);
    field_str(&b, "stream", s == &x->out ? "stdout" : "stderr", 6);
    chan_send(x->chan, &b, s->data.data, s->data.len, NULL, 0);
    buf_free(&b);
    s->data.len = 0;
}

/* Read one chunk, keeping up to the cap: 1 data, 0 nothing now, -1 EOF. */
static int read_stream(struct execution *x, struct stream *s) {
    ssize_t n = read(s->fd, x->chunk, CHUNK);
    if (n < 0) return errno == EAGAIN || errno == EINTR ? 0 : (close(s->fd), s->fd = -1, -1);
    if (n == 0) {
        close(s->fd);
        s->fd = -1;
        return -1;
    }
    size_t room = x->cap > s->kept ? x->cap - s->kept : 0;
    size_t keep = (size_t)n < room ? (size_t)n : room;
    s->kept += keep;
    if ((size_t)n > room) s->truncated = 1;
    if (keep && x->stream && !x->out.data.len && !x->err.data.len) x->gather_since = monotonic();
    buf_add(&s->data, x->chunk, keep);
    if (s->data.failed) s->truncated = 1;
    if (x->stream && s->data.len >= STREAM_GATHER) flush_stream(x, s);
    return 1;
}

static void close_stdin(struct execution *x) {
    pthread_mutex_lock(&reg_lock);
    x->stdin_closed = 1;
    pthread_mutex_unlock(&reg_lock);
    close(x->in_w);
    x->in_w = -1;
}

/* Answer the stdin op being fed (err 0: all written) and forget it. */
static void stdin_done(struct execution *x, int err, const char *msg) {
    const struct jval *id = jget(x->feeding.header, "id");
    if (err) send_error(x->chan, id, err, msg, NULL);
    else {
        struct buf b = {0};
        reply_start(&b, "ok", id);
        chan_send(x->chan, &b, NULL, 0, NULL, 0);
        buf_free(&b);
    }
    frame_free(&x->feeding);
    x->close_after = 0;
}

static void take_stdin_op(struct execution *x);

static void feed_stdin(struct execution *x) {
    size_t n = x->stdin_left < CHUNK ? x->stdin_left : CHUNK;
    ssize_t w = n ? write(x->in_w, x->stdin_data, n) : 0;
    if (w < 0 && (errno == EAGAIN || errno == EINTR)) return;
    int failed = w < 0;
    if (failed) x->stdin_left = 0; /* the command closed its stdin */
    else x->stdin_data += w, x->stdin_left -= (size_t)w;
    if (x->stdin_left) return;
    int close_now = !x->spawned || failed || x->close_after;
    if (x->feeding.header) stdin_done(x, failed ? EPIPE : 0, "the process closed its stdin");
    if (close_now) close_stdin(x);
    else take_stdin_op(x); /* the next queued write, if any */
}

/* The serving loop queued a stdin op: start writing it once the previous data is out. */
static void take_stdin_op(struct execution *x) {
    char drain[64];
    while (read(x->wake[0], drain, sizeof drain) > 0) {}
    if (x->stdin_left || x->feeding.header || x->in_w < 0) return;
    pthread_mutex_lock(&reg_lock);
    x->feeding = x->stdin_op;
    memset(&x->stdin_op, 0, sizeof x->stdin_op);
    pthread_mutex_unlock(&reg_lock);
    if (!x->feeding.header) return;
    x->close_after = truthy(jget(x->feeding.header, "close"));
    x->stdin_data = x->feeding.body;
    x->stdin_left = x->feeding.body_len;
    if (!x->stdin_left) feed_stdin(x); /* nothing to write: answer (and close) now */
}

/* One poll and the events it returned: the exit, stdin room, output, the deadline. */
static void exec_wait(struct execution *x) {
    struct pollfd p[5] = {
        {x->pidfd, POLLIN, 0}, {x->out.fd, POLLIN, 0}, {x->err.fd, POLLIN, 0},
        {x->stdin_left ? x->in_w : -1, POLLOUT, 0}, {x->wake[0], POLLIN, 0},
    };
    int ms = -1;
    if (x->deadline) {
        double left = x->deadline - monotonic();
        ms = left <= 0 ? 0 : left > 1e6 ? 1000000000 : (int)(left * 1000) + 1;
    }
    if (x->stream && (x->out.data.len || x->err.data.len)) {
        double left = x->gather_since + STREAM_LINGER - monotonic();
        if (left <= 0) {
            flush_stream(x, &x->out);
            flush_stream(x, &x->err);
        } else if (ms < 0 || (int)(left * 1000) + 1 < ms) ms = (int)(left * 1000) + 1;
    }
    int n = poll(p, 5, ms);
    if (n < 0) return;
    if (n == 0 && x->deadline && monotonic() >= x->deadline) {
        x->timed_out = 1;
        x->deadline = 0;
        kill(-x->pid, SIGKILL);
        return;
    }
    if (p[0].revents) x->exited = 1; /* noticed through the pidfd, not the pipes */
    if (p[3].revents && x->in_w >= 0) feed_stdin(x);
    if (p[4].revents) take_stdin_op(x);
    if (p[1].revents && x->out.fd >= 0) read_stream(x, &x->out);
    if (p[2].revents && x->err.fd >= 0) read_stream(x, &x->err);
}

static void exec_reply(struct execution *x) {
    if (x->registered) { /* no op reaches it from now on; one queued or in flight fails */
        reg_remove(x);
        if (x->feeding.header) stdin_done(x, EPIPE, "the process exited");
        x->feeding = x->stdin_op; /* reg_remove made it final: no op is queued from now on */
        memset(&x->stdin_op, 0, sizeof x->stdin_op);
        if (x->feeding.header) stdin_done(x, EPIPE, "the process exited");
    }
    /* What is already in the pipes (bounded: a background child may keep writing). */
    for (int i = 0; i < 1024 && x->out.fd >= 0 && read_stream(x, &x->out) == 1; i++) {}
    for (int i = 0; i < 1024 && x->err.fd >= 0 && read_stream(x, &x->err) == 1; i++) {}
    if (x->stream) {
        flush_stream(x, &x->out);
        flush_stream(x, &x->err);
    }
    int status = 0;
    struct rusage ru = {0}; /* the command and every descendant it waited for */
    while (wait4(x->pid, &status, 0, &ru) < 0 && errno == EINTR) {}
    struct buf b = {0};
    reply_start(&b, "result", x->id);
    field_int(&b, "exit_code", exit_code(status));
    field_int(&b, "cpu_user_us", (long long)ru.ru_utime.tv_sec * 1000000 + ru.ru_utime.tv_usec);
    field_int(&b, "cpu_system_us", (long long)ru.ru_stime.tv_sec * 1000000 + ru.ru_stime.tv_usec);
    field_int(&b, "peak_rss_kib", (long long)ru.ru_maxrss);
    field_bool(&b, "timed_out", x->timed_out);
    field_int(&b, "stdout_len", (long long)x->out.data.len);
    field_bool(&b, "stdout_truncated", x->out.truncated);
    field_bool(&b, "stderr_truncated", x->err.truncated);
    field_float(&b, "duration", monotonic() - x->start);
    chan_send(x->chan, &b, x->out.data.data, x->out.data.len, x->err.data.data, x->err.data.len);
    buf_free(&b);
}

/* Read and discard from pipes background children still hold, until they close. */
static void drain_background(struct execution *x) {
    while (x->out.fd >= 0 || x->err.fd >= 0) {
        struct pollfd p[2] = {{x->out.fd, POLLIN, 0}, {x->err.fd, POLLIN, 0}};
        if (poll(p, 2, -1) < 0) continue;
        x->cap = 0;
        if (p[0].revents && x->out.fd >= 0) read_stream(x, &x->out);
        if (p[1].revents && x->err.fd >= 0) read_stream(x, &x->err);
    }
}

static void exec_run(struct execution *x) {
    const char *bad = exec_parse(x);
    if (bad) return send_error(x->chan, x->id, EINVAL, bad, NULL);
    if (x->registered) {
        pthread_mutex_lock(&reg_lock);
        int taken = reg_find(x->chan, x->target) != NULL;
        pthread_mutex_unlock(&reg_lock);
        if (taken) return send_error(x->chan, x->id, EEXIST, "exec: a process with this id runs already", NULL);
    }
    int rc = exec_spawn(x);
    if (rc < 0) return send_error(x->chan, x->id, errno, strerror(errno), NULL);
    if (rc > 0) return;
    x->pidfd = (int)syscall(SYS_pidfd_open, x->pid, 0);
    if (x->pidfd < 0) {
        int e = errno;
        kill(-x->pid, SIGKILL);
        while (waitpid(x->pid, NULL, 0) < 0 && errno == EINTR) {}
        return send_error(x->chan, x->id, e, "pidfd_open failed (the guest kernel needs Linux >= 5.3)", NULL);
    }
    fcntl(x->out.fd, F_SETFL, O_NONBLOCK);
    fcntl(x->err.fd, F_SETFL, O_NONBLOCK);
    if (x->in_w >= 0) fcntl(x->in_w, F_SETFL, O_NONBLOCK);
    if (x->registered) { /* registered once it runs: the host's "signal"/"stdin" ops find it */
        pthread_mutex_lock(&reg_lock);
        x->stdin_closed = x->in_w < 0;
        x->next = registry;
        registry = x;
        pthread_mutex_unlock(&reg_lock);
    }
    if (x->spawned) {
        struct buf b = {0};
        reply_start(&b, "started", x->id);
        field_int(&b, "pid", x->pid);
        chan_send(x->chan, &b, NULL, 0, NULL, 0);
        buf_free(&b);
    }
    while (!x->exited) exec_wait(x);
    exec_reply(x);
    close(x->pidfd);
    if (x->in_w >= 0) close(x->in_w);
    x->in_w = -1;
    buf_free(&x->out.data);
    buf_free(&x->err.data);
    drain_background(x);
}

static void *exec_thread(void *arg) {
    struct execution *x = arg;
    protect_thread();
    x->chunk = xmalloc(CHUNK);
    exec_run(x);
    if (x->envp)
        for (char **e = x->envp; *e; e++) free(*e);
    free(x->envp);
    free(x->argv);
    free(x->chunk);
    buf_free(&x->out.data);
    buf_free(&x->err.data);
    frame_free(&x->feeding);
    frame_free(&x->stdin_op);
    close(x->wake[0]);
    close(x->wake[1]);
    frame_free(&x->req);
    chan_unref(x->chan);
    free(x);
    return NULL;
}

static void start_exec(struct chan *c, struct frame *f) {
    struct execution *x = calloc(1, sizeof *x);
    if (!x) return send_error(c, jget(f->header, "id"), ENOMEM, "out of memory", NULL), frame_free(f);
    x->chan = c;
    x->req = *f;
    x->id = jget(f->header, "id");
    x->start = monotonic();
    x->stdin_data = f->body;
    x->stdin_left = f->body_len;
    x->in_w = x->out.fd = x->err.fd = x->pidfd = -1;
    if (pipe2(x->wake, O_CLOEXEC | O_NONBLOCK)) {
        send_error(c, x->id, errno, "cannot create a pipe for the command", NULL);
        frame_free(f);
        free(x);
        return;
    }
    memset(f, 0, sizeof *f);
    chan_ref(c);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);
    pthread_t t;
    int rc = pthread_create(&t, &attr, exec_thread, x);
    pthread_attr_destroy(&attr);
    if (rc) {
        send_error(c, x->id, rc, "cannot start a thread for the command", NULL);
        close(x->wake[0]);
        close(x->wake[1]);
        frame_free(&x->req);
        chan_unref(c);
        free(x);
    }
}

/* ------------------------------------------------------------------ files */

/* mkdir -p of path's parent directories. */
static int make_parents(const char *path) {
    char *p = strdup(path);
    if (!p) return -1;
    for (char *s = strchr(p + 1, '/'); s; s = strchr(s + 1, '/')) {
        *s = 0;
        if (mkdir(p, 0777) && errno != EEXIST) return free(p), -1;
        *s = '/';
    }
    free(p);
    return 0;
}

static void do_put(struct chan *c, struct frame *f, const struct jval *id) {
    const char *path = jstr(f->header, "path");
    const struct jval *mode = jget(f->header, "mode");
    if (!path || !*path) return send_error(c, id, EINVAL, "put: path must be a non-empty string", NULL);
    if (mode && (mode->type != J_INT || mode->integer < 0 || mode->integer > 07777))
        return send_error(c, id, EINVAL, "put: mode must be an integer in 0..0o7777", path);
    if (make_parents(path)) return send_error(c, id, errno, strerror(errno), path);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode ? (mode_t)mode->integer : 0644);
    if (fd < 0) return send_error(c, id, errno, strerror(errno), path);
    int rc = write_all(fd, f->body, f->body_len);
    if (!rc && mode) rc = fchmod(fd, (mode_t)mode->integer);
    int e = errno;
    if (close(fd) && !rc) rc = -1, e = errno;
    if (rc) return send_error(c, id, e, strerror(e), path);
    struct buf b = {0};
    reply_start(&b, "ok", id);
    field_int(&b, "size", (long long)f->body_len);
    chan_send(c, &b, NULL, 0, NULL, 0);
    buf_free(&b);
}

static void do_get(struct chan *c, struct frame *f, const struct jval *id) {
    const char *path = jstr(f->header, "path");
    const struct jval *maxv = jget(f->header, "max");
    if (!path) return send_error(c, id, EINVAL, "get: path must be a string", NULL);
    if (maxv && (maxv->type != J_INT || maxv->integer < 0)) return send_error(c, id, EINVAL, "get: max must be an integer >= 0", path);
    unsigned long long limit = maxv ? (unsigned long long)maxv->integer : 1ull << 30;
    if (limit > MAX_REQUEST_BODY) limit = MAX_REQUEST_BODY;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return send_error(c, id, errno, strerror(errno), path);
    struct stat st;
    char msg[160];
    if (fstat(fd, &st) == 0 && (unsigned long long)st.st_size > limit) {
        close(fd);
        snprintf(msg, sizeof msg, "file is %lld bytes, over the limit of %llu", (long long)st.st_size, limit);
        return send_error(c, id, EFBIG, msg, path);
    }
    struct buf data = {0};
    for (;;) { /* chunked: st_size may lie (procfs) and must not size an allocation */
        size_t want = limit + 1 - data.len < (1u << 20) ? (size_t)(limit + 1 - data.len) : (1u << 20);
        if (buf_reserve(&data, want)) break;
        ssize_t n = read(fd, data.data + data.len, want);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            if (n < 0) data.failed = errno;
            break;
        }
        data.len += (size_t)n;
        if (data.len > limit) break;
    }
    close(fd);
    if (data.failed) {
        int e = data.failed == 1 ? ENOMEM : data.failed;
        buf_free(&data);
        return send_error(c, id, e, strerror(e), path);
    }
    if (data.len > limit) {
        buf_free(&data);
        snprintf(msg, sizeof msg, "file is over the limit of %llu bytes", limit);
        return send_error(c, id, EFBIG, msg, path);
    }
    struct buf b = {0};
    reply_start(&b, "ok", id);
    field_int(&b, "size", (long long)data.len);
    chan_send(c, &b, data.data, data.len, NULL, 0);
    buf_free(&b);
    buf_free(&data);
}

static int write_file(const char *path, const char *data, size_t n, int flags) {
    int fd = open(path, O_WRONLY | O_CLOEXEC | flags, 0644);
    if (fd < 0) return -1;
    int rc = write_all(fd, data, n);
    int e = errno;
    close(fd);
    errno = e;
    return rc;
}

/* ------------------------------------------------------------------ setup: NIC via netlink */

struct nl_req {
    struct {
        uint32_t len;
        uint16_t type, flags;
        uint32_t seq, pid;
    } h;
    unsigned char payload[256];
};

enum { NLMSG_ERR = 2, F_REQUEST = 1, F_ACK = 4, F_REPLACE = 0x100, F_CREATE = 0x400 };
enum { NEWLINK = 16, NEWADDR = 20, NEWROUTE = 24, IFLA_ADDR = 1, IFA_ADDR = 1, IFA_LOC = 2, RTA_OIF_ = 4, RTA_GW = 5 };

static void nl_put(struct nl_req *r, const void *data, size_t n) {
    memcpy((char *)r + r->h.len, data, n);
    r->h.len += (uint32_t)((n + 3) & ~3u);
}

static void nl_attr(struct nl_req *r, uint16_t type, const void *data, uint16_t n) {
    uint16_t hdr[2] = {(uint16_t)(4 + n), type};
    memcpy((char *)r + r->h.len, hdr, 4);
    memcpy((char *)r + r->h.len + 4, data, n);
    r->h.len += (uint32_t)((4 + n + 3) & ~3u);
}

/* Send one request and wait for its acknowledgement: 0, or -1 with errno. */
static int nl_talk(int sock, struct nl_req *r, uint32_t seq) {
    r->h.seq = seq;
    r->h.flags |= F_REQUEST | F_ACK;
    if (send(sock, r, r->h.len, 0) < 0) return -1;
    unsigned char reply[1024];
    for (;;) {
        ssize_t n = recv(sock, reply, sizeof reply, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return -1;
        for (size_t off = 0; off + 16 <= (size_t)n;) {
            uint32_t len, rseq;
            uint16_t type;
            memcpy(&len, reply + off, 4);
            memcpy(&type, reply + off + 4, 2);
            memcpy(&rseq, reply + off + 8, 4);
            if (len < 16 || off + len > (size_t)n) break;
            if (type == NLMSG_ERR && rseq == seq && len >= 20) {
                int32_t err;
                memcpy(&err, reply + off + 16, 4);
                if (err) return errno = -err, -1;
                return 0;
            }
            off += (len + 3) & ~3u;
        }
    }
}

static int parse_mac(const char *s, unsigned char mac[6]) {
    unsigned v[6];
    char extra;
    if (sscanf(s, "%2x:%2x:%2x:%2x:%2x:%2x%c", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &extra) != 6) return -1;
    for (int i = 0; i < 6; i++) mac[i] = (unsigned char)v[i];
    return 0;
}

static int parse_cidr(const char *s, struct in_addr *addr, int *prefix) {
    char ip[64];
    const char *slash = strchr(s, '/');
    char *end;
    if (!slash || (size_t)(slash - s) >= sizeof ip) return -1;
    memcpy(ip, s, (size_t)(slash - s));
    ip[slash - s] = 0;
    long p = strtol(slash + 1, &end, 10);
    if (*end || end == slash + 1 || p < 0 || p > 32 || inet_pton(AF_INET, ip, addr) != 1) return -1;
    *prefix = (int)p;
    return 0;
}

static int first_nic(char *name, size_t n) {
    DIR *d = opendir("/sys/class/net");
    if (!d) return -1;
    struct dirent *e;
    name[0] = 0;
    while ((e = readdir(d))) { /* the first by name, as sorted() */
        if (e->d_name[0] == '.' || strcmp(e->d_name, "lo") == 0 || strlen(e->d_name) >= n) continue;
        if (!name[0] || strcmp(e->d_name, name) < 0) memcpy(name, e->d_name, strlen(e->d_name) + 1);
    }
    closedir(d);
    return name[0] ? 0 : -1;
}

/* The four steps of `ip link set address; ip addr add; ip link set up; ip route replace
 * default`, as netlink requests. */
static int nic_requests(int sock, int index, const unsigned char mac[6], struct in_addr addr, int prefix,
                        struct in_addr gw, const char **step) {
    struct nl_req r;
    unsigned char ifi[16] = {0}; /* struct ifinfomsg: family, pad, type, index, flags, change */
    memcpy(ifi + 4, &index, 4);
    memset(&r, 0, sizeof r), r.h.len = 16, r.h.type = NEWLINK, nl_put(&r, ifi, 16), nl_attr(&r, IFLA_ADDR, mac, 6);
    if ((*step = "set its MAC address", nl_talk(sock, &r, 1))) return -1;
    unsigned char ifa[8] = {AF_INET, (unsigned char)prefix, 0, 0}; /* struct ifaddrmsg */
    memcpy(ifa + 4, &index, 4);
    memset(&r, 0, sizeof r), r.h.len = 16, r.h.type = NEWADDR, r.h.flags = F_CREATE | F_REPLACE;
    nl_put(&r, ifa, 8), nl_attr(&r, IFA_LOC, &addr, 4), nl_attr(&r, IFA_ADDR, &addr, 4);
    if ((*step = "add its address", nl_talk(sock, &r, 2))) return -1;
    unsigned up = IFF_UP;
    memcpy(ifi + 8, &up, 4), memcpy(ifi + 12, &up, 4);
    memset(&r, 0, sizeof r), r.h.len = 16, r.h.type = NEWLINK, nl_put(&r, ifi, 16);
    if ((*step = "bring it up", nl_talk(sock, &r, 3))) return -1;
    unsigned char rtm[12] = {AF_INET, 0, 0, 0, 254 /* main */, 3 /* boot */, 0 /* universe */, 1 /* unicast */};
    memset(&r, 0, sizeof r), r.h.len = 16, r.h.type = NEWROUTE, r.h.flags = F_CREATE | F_REPLACE;
    nl_put(&r, rtm, 12), nl_attr(&r, RTA_GW, &gw, 4), nl_attr(&r, RTA_OIF_, &index, 4);
    return (*step = "set the default route", nl_talk(sock, &r, 4));
}

/* /etc/resolv.conf naming the run's resolver (the image has none of its own: the build drops
 * the build host's). A symlink there (systemd's stub) is replaced, not followed. */
static int write_resolv_conf(const char *ns_s, char *out, size_t outlen) {
    struct in_addr ns;
    char line[64];
    if (!ns_s) return 0;
    if (inet_pton(AF_INET, ns_s, &ns) != 1) return snprintf(out, outlen, "bad nameserver %.60s", ns_s), 1;
    int n = snprintf(line, sizeof line, "nameserver %s\noptions edns0\n", inet_ntoa(ns));
    if ((unlink("/etc/resolv.conf") && errno != ENOENT) ||
        write_file("/etc/resolv.conf", line, (size_t)n, O_CREAT | O_TRUNC | O_EXCL | O_NOFOLLOW))
        return snprintf(out, outlen, "writing /etc/resolv.conf: %s", strerror(errno)), 1;
    return 0;
}

static int configure_nic(const struct jval *net, char *out, size_t outlen) {
    const char *mac_s = jstr(net, "mac"), *addr_s = jstr(net, "address"), *gw_s = jstr(net, "gateway");
    unsigned char mac[6];
    struct in_addr addr, gw;
    int prefix;
    char ifname[IF_NAMESIZE + 1];
    if (!mac_s || parse_mac(mac_s, mac)) return snprintf(out, outlen, "bad mac %.40s", mac_s ? mac_s : "(none)"), 1;
    if (!addr_s || parse_cidr(addr_s, &addr, &prefix))
        return snprintf(out, outlen, "bad address %.60s (expected IPv4/prefix)", addr_s ? addr_s : "(none)"), 1;
    if (!gw_s || inet_pton(AF_INET, gw_s, &gw) != 1) return snprintf(out, outlen, "bad gateway %.60s", gw_s ? gw_s : "(none)"), 1;
    if (first_nic(ifname, sizeof ifname)) return snprintf(out, outlen, "no network interface in the guest"), 1;
    int index = (int)if_nametoindex(ifname);
    int sock = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, 0 /* NETLINK_ROUTE */);
    if (!index || sock < 0) {
        if (sock >= 0) close(sock);
        return snprintf(out, outlen, "netlink on %s: %s", ifname, strerror(errno)), 1;
    }
    const char *step = "";
    int rc = nic_requests(sock, index, mac, addr, prefix, gw, &step);
    int e = errno;
    close(sock);
    if (rc) return snprintf(out, outlen, "%s: could not %s: %s", ifname, step, strerror(e)), 1;
    return write_resolv_conf(jstr(net, "nameserver"), out, outlen);
}

/* ------------------------------------------------------------------ setup: root and volumes */

/* Grow the mounted root filesystem to its disk, as resize2fs does online (the same ioctl). */
static int grow_root(const char *device, char *out, size_t outlen) {
    int dev = open(device, O_RDONLY | O_CLOEXEC), root = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    unsigned long long bytes = 0;
    struct statfs sf;
    int rc = -1;
    const char *what = device;
    if (dev >= 0 && root >= 0 && ioctl(dev, BLKGETSIZE64, &bytes) == 0 && fstatfs(root, &sf) == 0 && sf.f_bsize > 0) {
        unsigned long long blocks = bytes / (unsigned long long)sf.f_bsize;
        what = "EXT4_IOC_RESIZE_FS on /";
        rc = blocks > (unsigned long long)sf.f_blocks ? ioctl(root, EXT4_IOC_RESIZE_FS, &blocks) : 0;
    }
    int e = errno;
    if (dev >= 0) close(dev);
    if (root >= 0) close(root);
    if (rc) return snprintf(out, outlen, "growing the root filesystem: %s: %s", what, strerror(e)), 1;
    return 0;
}

/* The entry of sysfs directory `dir` whose attribute file `attr` reads `want` (trailing
 * characters of `strip` dropped), as "/dev/<entry>" in `dev`: 0, or -1 if none. */
static int find_sysfs_dev(const char *dir, const char *attr, const char *want, const char *strip, char *dev,
                          size_t n) {
    DIR *d = opendir(dir);
    struct dirent *e;
    int found = -1;
    while (d && found && (e = readdir(d))) {
        char path[300], got[128];
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s/%s", dir, e->d_name, attr);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t len = read(fd, got, sizeof got - 1);
        close(fd);
        while (len > 0 && got[len - 1] && strchr(strip, got[len - 1])) len--;
        if (len >= 0 && (got[len] = 0, strcmp(got, want) == 0)) found = snprintf(dev, n, "/dev/%s", e->d_name) < 0;
    }
    if (d) closedir(d);
    return found;
}

static int find_disk(const char *serial, char *dev, size_t n) {
    return find_sysfs_dev("/sys/block", "serial", serial, "\n ", dev, n);
}

/* Mount options as mount(8) splits them: flags, and the rest for the filesystem. */
static unsigned long mount_flags(const char *options, char *data, size_t n) {
    static const struct { const char *name; unsigned long flag; } known[] = {
        {"ro", MS_RDONLY}, {"nosuid", MS_NOSUID}, {"nodev", MS_NODEV}, {"noexec", MS_NOEXEC},
        {"noatime", MS_NOATIME}, {"nodiratime", MS_NODIRATIME}, {"relatime", MS_RELATIME}, {"sync", MS_SYNCHRONOUS},
    };
    unsigned long flags = 0;
    char opts[256];
    snprintf(opts, sizeof opts, "%s", options);
    data[0] = 0;
    for (char *save = NULL, *o = strtok_r(opts, ",", &save); o; o = strtok_r(NULL, ",", &save)) {
        size_t i;
        for (i = 0; i < sizeof known / sizeof known[0] && strcmp(o, known[i].name); i++) {}
        if (i < sizeof known / sizeof known[0]) flags |= known[i].flag;
        else if (strcmp(o, "rw") && strcmp(o, "defaults"))
            snprintf(data + strlen(data), n - strlen(data), "%s%s", data[0] ? "," : "", o);
    }
    return flags;
}

/* Mount each read-only volume, found by its virtio serial, at its target. First drop what the
 * kernel cached of the device: a snapshot clone's volume may differ from its template's. */
static int mount_volumes(const struct jval *vols, char *out, size_t outlen) {
    if (vols->type != J_ARR) return snprintf(out, outlen, "volumes must be a list"), 1;
    for (const struct jval *v = vols->child; v; v = v->next) {
        const char *serial = jstr(v, "serial"), *target = jstr(v, "target"), *options = jstr(v, "options");
        char dev[300], data[256];
        if (!serial || !target || !options || target[0] != '/')
            return snprintf(out, outlen, "a volume needs a serial, an absolute target and options"), 1;
        if (find_disk(serial, dev, sizeof dev))
            return snprintf(out, outlen, "no disk with serial %.64s for %.200s", serial, target), 1;
        int fd = open(dev, O_RDONLY | O_CLOEXEC);
        if (fd >= 0) {
            ioctl(fd, BLKFLSBUF, 0);
            ioctl(fd, BLKRRPART, 0); /* EINVAL on an unpartitioned disk: nothing to re-read */
            close(fd);
        }
        size_t tl = strlen(target);
        char *dir = xmalloc(tl + 2);
        snprintf(dir, tl + 2, "%s/", target);
        int rc = make_parents(dir);
        free(dir);
        unsigned long flags = mount_flags(options, data, sizeof data);
        if (rc == 0) rc = mount(dev, target, "ext4", flags, data[0] ? data : NULL);
        if (rc) return snprintf(out, outlen, "mount %s at %.200s: %s", dev, target, strerror(errno)), 1;
    }
    return 0;
}

/* ------------------------------------------------------------------ setup */

static void step_field(struct buf *b, const char *name, int code, const char *output) {
    size_t n = strlen(output);
    buf_fmt(b, ",\"%s\":{\"exit_code\":%d", name, code);
    field_str(b, "output", n > STEP_OUTPUT ? output + n - STEP_OUTPUT : output, n > STEP_OUTPUT ? STEP_OUTPUT : n);
    buf_add(b, "}", 1);
}

static void seed_rng(const char *seed, size_t n) {
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return;
    struct { int count, size; unsigned char data[512]; } e;
    if (n > sizeof e.data) n = sizeof e.data;
    e.count = (int)n * 8, e.size = (int)n;
    memcpy(e.data, seed, n);
    /* credit the entropy and force a reseed, so clones diverge at once */
    if (ioctl(fd, RNDADDENTROPY, &e) || ioctl(fd, RNDRESEEDCRNG)) write_all(fd, seed, n);
    close(fd);
}

/* Clock, RNG, machine-id, hostname: -1 with errno and *path on failure. */
static int setup_identity(const struct jval *h, const struct frame *f, const char **path) {
    const struct jval *t = jget(h, "time_ns");
    *path = NULL;
    if (t && t->type == J_INT && t->integer > 0) {
        struct timespec ts = {(time_t)(t->integer / 1000000000), (long)(t->integer % 1000000000)};
        if (clock_settime(CLOCK_REALTIME, &ts)) return -1;
    }
    if (f->body_len) seed_rng(f->body, f->body_len);
    const char *mid = jstr(h, "machine_id"), *host = jstr(h, "hostname");
    char line[300];
    if (mid && *mid) {
        int n = snprintf(line, sizeof line, "%.200s\n", mid);
        if (write_file(*path = "/etc/machine-id", line, (size_t)n, O_CREAT | O_TRUNC)) return -1;
    }
    if (host && *host) {
        logmsg("setup: hostname %.64s", host);
        if (sethostname(host, strlen(host) > 64 ? 64 : strlen(host))) return *path = "/proc/sys/kernel/hostname", -1;
        int n = snprintf(line, sizeof line, "%.64s\n", host);
        if (write_file(*path = "/etc/hostname", line, (size_t)n, O_CREAT | O_TRUNC)) return -1;
    }
    return 0;
}

static void do_setup(struct chan *c, struct frame *f, const struct jval *id) {
    const struct jval *h = f->header;
    struct buf b = {0};
    reply_start(&b, "ok", id);
    if (host_test) return chan_send(c, &b, NULL, 0, NULL, 0), buf_free(&b);
    const char *path;
    if (setup_identity(h, f, &path)) return buf_free(&b), send_error(c, id, errno, strerror(errno), path);
    char out[STEP_OUTPUT + 1];
    const struct jval *net = jget(h, "net"), *vols = jget(h, "volumes");
    if (truthy(net)) {
        out[0] = 0;
        int code = net->type == J_OBJ ? configure_nic(net, out, sizeof out) : (snprintf(out, sizeof out, "net must be an object"), 1);
        step_field(&b, "net", code, out);
    }
    if (truthy(jget(h, "grow_root"))) {
        out[0] = 0;
        const char *dev = jstr(h, "root_device");
        step_field(&b, "resize", grow_root(dev ? dev : "/dev/vda", out, sizeof out), out);
    }
    if (truthy(vols)) {
        out[0] = 0;
        step_field(&b, "volumes", mount_volumes(vols, out, sizeof out), out);
    }
    chan_send(c, &b, NULL, 0, NULL, 0);
    buf_free(&b);
}

/* ------------------------------------------------------------------ requests */

static double uptime(void) {
    struct timespec ts;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Whether the op is exactly name (an op with a NUL byte inside matches none). */
static int op_is(const struct jval *op, const char *name) { return op->len == strlen(name) && !memcmp(op->str, name, op->len); }

static int to_spawned(struct chan *c, struct frame *f, const struct jval *id, int is_signal);

static void handle(struct chan *c, struct frame *f) {
    const struct jval *op = jget(f->header, "op"), *id = jget(f->header, "id");
    struct buf b = {0};
    if (op_is(op, "exec")) return start_exec(c, f); /* takes the frame */
    if (op_is(op, "hello")) {
        reply_start(&b, "hello", id);
        field_int(&b, "version", PROTOCOL_VERSION);
        field_float(&b, "uptime", uptime());
        field_int(&b, "pid", getpid());
        chan_send(c, &b, NULL, 0, NULL, 0);
    } else if (op_is(op, "ping")) {
        reply_start(&b, "pong", id);
        chan_send(c, &b, NULL, 0, NULL, 0);
    } else if (op_is(op, "signal") || op_is(op, "stdin")) {
        if (to_spawned(c, f, id, op_is(op, "signal"))) return; /* the stdin op was queued */
    } else if (op_is(op, "put")) do_put(c, f, id);
    else if (op_is(op, "get")) do_get(c, f, id);
    else if (op_is(op, "setup")) do_setup(c, f, id);
    else if (op_is(op, "sync")) {
        sync();
        reply_start(&b, "ok", id);
        chan_send(c, &b, NULL, 0, NULL, 0);
    } else {
        struct buf msg = {0};
        buf_str(&msg, "unknown op ");
        json_string(&msg, op->str, op->len > 100 ? 100 : op->len);
        buf_add(&msg, "", 1);
        send_error(c, id, 0, msg.failed ? "unknown op" : msg.data, NULL);
        buf_free(&msg);
    }
    buf_free(&b);
    frame_free(f);
}

/* A "signal" ({"target": spawn id, "signal": n}: sent to its process group at once) or a
 * "stdin" op ({"target", "close": bool}, body = data: queued for the exec thread, which
 * answers once the data is written). 1 if the frame was taken. */
static int to_spawned(struct chan *c, struct frame *f, const struct jval *id, int is_signal) {
    const struct jval *t = jget(f->header, "target"), *sig = jget(f->header, "signal");
    if (!t || t->type != J_INT) return send_error(c, id, EINVAL, "target must be the integer id of a spawn", NULL), 0;
    if (is_signal && (!sig || sig->type != J_INT || sig->integer < 1 || sig->integer > 64))
        return send_error(c, id, EINVAL, "signal must be an integer in 1..64", NULL), 0;
    pthread_mutex_lock(&reg_lock);
    struct execution *x = reg_find(c, t->integer);
    int err = !x ? ESRCH : 0, taken = 0;
    if (x && is_signal && kill(-x->pid, (int)sig->integer) && kill(x->pid, (int)sig->integer)) err = errno;
    if (x && !is_signal) {
        if (x->stdin_closed) err = EPIPE;
        else if (x->stdin_op.header) err = EBUSY;
        else {
            x->stdin_op = *f;
            memset(f, 0, sizeof *f);
            taken = 1;
            ssize_t ignored = write(x->wake[1], "", 1);
            (void)ignored;
        }
    }
    pthread_mutex_unlock(&reg_lock);
    if (err) {
        const char *msg = err == ESRCH ? "no such process (it exited)" : err == EPIPE ? "stdin is closed"
                          : err == EBUSY ? "a stdin write to this process is in progress" : strerror(err);
        send_error(c, id, err, msg, NULL);
    } else if (is_signal) {
        struct buf b = {0};
        reply_start(&b, "ok", id);
        chan_send(c, &b, NULL, 0, NULL, 0);
        buf_free(&b);
    }
    return taken;
}

/* Kill what c spawned: the host hung up, so nothing can wait for them any more. */
static void kill_spawned(struct chan *c) {
    pthread_mutex_lock(&reg_lock);
    for (struct execution *x = registry; x; x = x->next)
        if (x->chan == c) kill(-x->pid, SIGKILL);
    pthread_mutex_unlock(&reg_lock);
}

/* Answer requests until EOF (0) or a frame that breaks the protocol (3): the stream cannot
 * be resynchronised after one (the rejected frame's bytes would be read as requests). */
static int serve(struct chan *c) {
    char why[200];
    for (;;) {
        struct frame f;
        int rc = read_frame(c, &f, why, sizeof why);
        if (rc == FRAME_EOF) return frame_free(&f), kill_spawned(c), 0;
        if (rc == FRAME_BAD) return kill_spawned(c), logmsg("malformed request, stopping: %s", why), 3;
        if (rc == FRAME_NOMEM) {
            char msg[100];
            snprintf(msg, sizeof msg, "cannot allocate %zu bytes for the request body", f.body_len);
            send_error(c, jget(f.header, "id"), ENOMEM, msg, NULL);
            frame_free(&f);
            continue;
        }
        handle(c, &f);
    }
}

/* Serve one connection at a time; when the host disconnects, wait for it to come back. */
static int serve_listener(int listener) {
    for (;;) {
        int fd = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            logmsg("accept: %s", strerror(errno));
            return 1;
        }
        struct chan *c = chan_new(fd, 0);
        int rc = serve(c);
        shutdown(fd, SHUT_RDWR); /* a late exec reply fails here instead of reaching the next host */
        chan_unref(c);
        if (rc) return rc;
    }
}

/* --parse-frames: each frame's header re-encoded on stdout, for the tests. */
static int parse_frames(void) {
    struct chan *c = chan_new(0, 0);
    char why[200];
    for (;;) {
        struct frame f;
        int rc = read_frame(c, &f, why, sizeof why);
        if (rc == FRAME_EOF || rc == FRAME_BAD) {
            frame_free(&f);
            chan_unref(c);
            if (rc == FRAME_EOF) return 0;
            return printf("error %s\n", why), 3;
        }
        struct buf b = {0};
        json_value(&b, f.header);
        printf("ok %zu %.*s\n", f.body_len, (int)b.len, b.data);
        fflush(stdout);
        buf_free(&b);
        frame_free(&f);
    }
}

/* ------------------------------------------------------------------ start-up */

static int find_port(void) {
    char dev[300];
    for (int tries = 0; tries < 1000; tries++, usleep(10000))
        if (find_sysfs_dev("/sys/class/virtio-ports", "name", PORT_NAME, "\n", dev, sizeof dev) == 0)
            return open(dev, O_RDWR | O_CLOEXEC);
    errno = ENODEV;
    return -1;
}

static int cmdline_has(const char *word) {
    char buf[4096 + 2] = " ";
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd >= 0 ? read(fd, buf + 1, sizeof buf - 3) : -1;
    if (fd >= 0) close(fd);
    if (n <= 0) return 0;
    buf[n + 1] = 0;
    for (char *p = buf; *p; p++)
        if (*p == '\n' || *p == '\t') *p = ' ';
    strcat(buf, " ");
    char needle[64];
    snprintf(needle, sizeof needle, " %s ", word);
    return strstr(buf, needle) != NULL;
}

static int listen_on(int family, const struct sockaddr *addr, socklen_t len) {
    int s = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0 || bind(s, addr, len) || listen(s, 1)) {
        logmsg("cannot listen: %s", strerror(errno));
        if (s >= 0) close(s);
        return -1;
    }
    return s;
}

static void noop(int sig) { (void)sig; }

static void process_setup(void) {
    /* Writes to a closed pipe or past a file size limit fail with an error instead of
     * killing the agent. A handler, not SIG_IGN: execve resets it for commands. */
    struct sigaction sa = {0};
    sa.sa_handler = noop;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGPIPE, &sa, NULL);
    sigaction(SIGXFSZ, &sa, NULL);
    for (int fd = 0; fd < 3; fd++) /* children's fds 0-2 are dup2'd from pipes above 2 */
        if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) < 0) _exit(5);
    if (chdir("/")) _exit(5);
}

static int guest_main(void) {
    double started = uptime();
    guest_mode = 1;
    /* A memory hog or fork bomb in a test must never take the agent with it. */
    protect_thread();
    set_oom_score_adj("-1000");
    int cg = open(CGROUP_PROCS, O_WRONLY | O_CLOEXEC);
    if (cg >= 0) {
        ssize_t ignored = write(cg, "0", 1); /* 0: the writing process */
        (void)ignored;
        close(cg);
    }
    if (cmdline_has("smolvm.vsock=1")) { /* Firecracker: the host reaches it via hybrid vsock */
        struct vm_addr a = {.family = AF_VSOCK, .port = VSOCK_PORT, .cid = VMADDR_CID_ANY};
        int s = listen_on(AF_VSOCK, (struct sockaddr *)&a, sizeof a);
        if (s < 0) return 1;
        logmsg("ready at %.2fs on vsock port %d (started %.2fs)", uptime(), VSOCK_PORT, started);
        return serve_listener(s);
    }
    int fd = find_port();
    if (fd < 0) return logmsg("no virtio port named %s", PORT_NAME), 1;
    logmsg("ready at %.2fs (started %.2fs)", uptime(), started);
    return serve(chan_new(fd, 1));
}

int main(int argc, char **argv) {
    process_setup();
    if (argc == 1) return guest_main();
    if (argc == 2 && strcmp(argv[1], "--parse-frames") == 0) return parse_frames();
    host_test = 1;
    if (argc == 3 && strcmp(argv[1], "--serve-fd") == 0) {
        struct chan *c = chan_new(atoi(argv[2]), 0);
        int rc = serve(c);
        chan_unref(c);
        return rc;
    }
    if (argc == 3 && strcmp(argv[1], "--listen-unix") == 0) {
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        if (strlen(argv[2]) >= sizeof a.sun_path) return logmsg("socket path too long"), 2;
        strcpy(a.sun_path, argv[2]);
        int s = listen_on(AF_UNIX, (struct sockaddr *)&a, sizeof a);
        return s < 0 ? 1 : serve_listener(s);
    }
    dprintf(2, "usage: %s [--serve-fd N | --listen-unix PATH | --parse-frames]\n", argv[0]);
    return 2;
}
