/* The capacity benchmark's load generator in C: what bench/media_load.py does, for a fraction
 * of its CPU.
 *
 * The generator runs on the same two cores as the server it measures. The Python one costs
 * about a third of a core at 500 calls (a write per frame per call, plus the replies), CPU the
 * server under test does not get; Twilio's media servers are not on the bot's machine. This one
 * speaks the same protocol the same way (hand-written upgrade, all-zero client mask, media
 * messages laid out as Twilio sends them, marks echoed once the audio before them has played,
 * `clear` honoured), keeps the same counts and prints the same JSON summary, so
 * bench/capacity_media.py --generator c can use it in place of the Python one.
 *
 *   cc -O2 -o build/media_load_c bench/media_load.c -lm
 *   build/media_load_c HOST PORT PATH CALLS DURATION_S RAMP_S SETTLE_S PAYLOADS STATS_DIR|-
 *
 * PAYLOADS: a file with one base64 frame per line, one call's cycle (bench/media_load.py
 * script_payloads); each call starts at a random place in it. STATS_DIR: where the bench
 * server's workers look for `reset` (the window starts) and `end` (it ends), or "-".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define FRAME_S 0.020
#define REPLY_GAP_S 0.5
#define MAX_MARKS 256
#define IN_CAP (1 << 20)

enum { CONNECTING, UPGRADING, OPEN, CLOSED };

typedef struct {
    double due;
    char name[24];
} Mark;

typedef struct {
    int fd, state, refused, closed_early, stopped;
    double t0;
    long frame;
    int offset;
    char stream_sid[40], call_sid[40];
    unsigned char *in;
    size_t in_len;
    char *out;
    size_t out_len, out_cap;
    double play_until, last_arrival, prev_duration, greeting_s;
    long chunk_in_reply;
    Mark marks[MAX_MARKS];
    int n_marks;
    long sent, late_sends, media_in, replies, marks_echoed, clears, underruns, ramp_underruns;
    double send_lag_max_ms, underrun_max_ms;
} Call;

static Call *calls;
static int n_calls, opened, epfd, in_window, window_over, connect_failures;
static char **payloads;
static int n_payloads;
static double *jitter;
static size_t n_jitter, cap_jitter;
static struct sockaddr_in addr;
static const char *host, *path, *stats_dir;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void mark_file(const char *name) {
    if (strcmp(stats_dir, "-") == 0) return;
    char file[4096];
    snprintf(file, sizeof file, "%s/%s", stats_dir, name);
    FILE *f = fopen(file, "w");
    if (!f) return;
    fprintf(f, "%ld-%d", (long)(now_s() * 1e6), rand());
    fclose(f);
}

static void flush_out(Call *c) {
    while (c->out_len) {
        ssize_t n = write(c->fd, c->out, c->out_len);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) break;
            c->out_len = 0;
            return;
        }
        memmove(c->out, c->out + n, c->out_len - (size_t)n);
        c->out_len -= (size_t)n;
    }
    struct epoll_event ev = {.events = EPOLLIN | (c->out_len ? EPOLLOUT : 0), .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void send_bytes(Call *c, const char *data, size_t n) {
    if (c->state == CLOSED) return;
    if (!c->out_len) {
        ssize_t w = write(c->fd, data, n);
        if (w == (ssize_t)n) return;
        if (w < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) return;
            w = 0;
        }
        data += w;
        n -= (size_t)w;
    }
    if (c->out_len + n > c->out_cap) {
        c->out_cap = (c->out_len + n) * 2;
        c->out = realloc(c->out, c->out_cap);
    }
    memcpy(c->out + c->out_len, data, n);
    c->out_len += n;
    flush_out(c);
}

/* A client text frame: FIN + text, masked with an all-zero key (the payload goes as it is). */
static void send_text(Call *c, const char *text, size_t n) {
    char frame[8192];
    size_t head;
    frame[0] = (char)0x81;
    if (n < 126) {
        frame[1] = (char)(0x80 | n);
        head = 2;
    } else {
        frame[1] = (char)(0x80 | 126);
        frame[2] = (char)(n >> 8);
        frame[3] = (char)(n & 0xFF);
        head = 4;
    }
    memset(frame + head, 0, 4);
    head += 4;
    if (head + n > sizeof frame) return;
    memcpy(frame + head, text, n);
    send_bytes(c, frame, head + n);
}

static void echo_mark(Call *c, const char *name) {
    char text[256];
    int n = snprintf(text, sizeof text, "{\"event\":\"mark\",\"streamSid\":\"%s\",\"mark\":{\"name\":\"%s\"}}",
                     c->stream_sid, name);
    c->marks_echoed++;
    send_text(c, text, (size_t)n);
}

static void echo_due(Call *c, double now) {
    int kept = 0;
    for (int i = 0; i < c->n_marks; i++) {
        if (c->marks[i].due <= now)
            echo_mark(c, c->marks[i].name);
        else
            c->marks[kept++] = c->marks[i];
    }
    c->n_marks = kept;
}

static void start_call(Call *c) {
    static const char connected[] = "{\"event\":\"connected\",\"protocol\":\"Call\",\"version\":\"1.0.0\"}";
    send_text(c, connected, sizeof connected - 1);
    c->t0 = now_s();
    char text[1024];
    int n = snprintf(text, sizeof text,
                     "{\"event\": \"start\", \"sequenceNumber\": \"1\", \"streamSid\": \"%s\", \"start\": "
                     "{\"streamSid\": \"%s\", \"callSid\": \"%s\", \"accountSid\": \"AC00000000000000000000000000000000\", "
                     "\"tracks\": [\"inbound\"], \"customParameters\": {\"direction\": \"simulated\", "
                     "\"from\": \"+15550100001\"}, \"mediaFormat\": {\"encoding\": \"audio/x-mulaw\", "
                     "\"sampleRate\": 8000, \"channels\": 1}}}",
                     c->stream_sid, c->stream_sid, c->call_sid);
    send_text(c, text, (size_t)n);
}

static void send_frame(Call *c, double now) {
    long k = c->frame++;
    double due = c->t0 + k * FRAME_S;
    if (now - due > 0.010) {
        c->late_sends++;
        if (in_window && (now - due) * 1000 > c->send_lag_max_ms) c->send_lag_max_ms = (now - due) * 1000;
    }
    char text[2048];
    int n = snprintf(text, sizeof text,
                     "{\"event\":\"media\",\"sequenceNumber\":\"%ld\",\"media\":{\"track\":\"inbound\","
                     "\"chunk\":\"%ld\",\"timestamp\":\"%ld\",\"payload\":\"%s\"},\"streamSid\":\"%s\"}",
                     k + 2, k + 1, k * 20, payloads[(k + c->offset) % n_payloads], c->stream_sid);
    send_text(c, text, (size_t)n);
    c->sent++;
    if (c->n_marks) echo_due(c, now);
}

static void on_media(Call *c, double now, double duration) {
    c->media_in++;
    if (c->greeting_s < 0) c->greeting_s = now - c->t0;
    double dry_for = now - c->play_until;
    if (c->chunk_in_reply == 0 || dry_for > REPLY_GAP_S) {
        c->replies++;
        c->chunk_in_reply = 1;
    } else {
        c->chunk_in_reply++;
        if (!in_window) { /* the ramp-up: counted apart; after the window, not at all */
            c->ramp_underruns += dry_for > 0.005 && !window_over;
        } else if (dry_for > 0.005) {
            c->underruns++;
            if (dry_for * 1000 > c->underrun_max_ms) c->underrun_max_ms = dry_for * 1000;
        }
        if (c->chunk_in_reply > 2 && in_window) {
            if (n_jitter == cap_jitter) {
                cap_jitter = cap_jitter ? cap_jitter * 2 : 65536;
                jitter = realloc(jitter, cap_jitter * sizeof *jitter);
            }
            jitter[n_jitter++] = fabs((now - c->last_arrival) - c->prev_duration) * 1000;
        }
    }
    c->last_arrival = now;
    c->prev_duration = duration;
    c->play_until = (c->play_until > now ? c->play_until : now) + duration;
}

/* The string value of `"key"` in a JSON text (with or without spaces around the colon, as
 * json.dumps and f-strings write it): its start, and its length in *len; NULL if absent. */
static const char *string_value(const char *p, size_t n, const char *key, size_t *len) {
    const char *end = p + n, *k = memmem(p, n, key, strlen(key));
    if (!k) return NULL;
    const char *v = k + strlen(key);
    while (v < end && (*v == ' ' || *v == ':')) v++;
    if (v >= end || *v != '"') return NULL;
    v++;
    const char *q = memchr(v, '"', (size_t)(end - v));
    if (!q) return NULL;
    *len = (size_t)(q - v);
    return v;
}

static void on_text(Call *c, const char *p, size_t n) {
    double now = now_s();
    size_t len;
    const char *ev = string_value(p, n, "\"event\"", &len);
    if (!ev) return;
    if (len == 5 && memcmp(ev, "media", 5) == 0) {
        const char *b64 = string_value(p, n, "\"payload\"", &len);
        if (!b64) return;
        long pad = (len >= 1 && b64[len - 1] == '=') + (len >= 2 && b64[len - 2] == '=');
        on_media(c, now, ((long)len * 3 / 4 - pad) / 8000.0);
    } else if (len == 4 && memcmp(ev, "mark", 4) == 0) {
        const char *s = string_value(p, n, "\"name\"", &len);
        if (!s || len >= 24) return;
        char name[24];
        memcpy(name, s, len);
        name[len] = 0;
        if (c->play_until <= now || c->n_marks == MAX_MARKS) {
            echo_mark(c, name);
        } else {
            c->marks[c->n_marks].due = c->play_until;
            strcpy(c->marks[c->n_marks].name, name);
            c->n_marks++;
        }
    } else if (len == 5 && memcmp(ev, "clear", 5) == 0) {
        c->clears++;
        c->play_until = now;
        c->chunk_in_reply = 0;
        for (int i = 0; i < c->n_marks; i++) echo_mark(c, c->marks[i].name);
        c->n_marks = 0;
    }
}

static void close_call(Call *c) {
    if (c->state == CLOSED) return;
    if (c->state == OPEN && !c->stopped) c->closed_early = 1;
    c->state = CLOSED;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
}

static void on_readable(Call *c) {
    for (;;) {
        if (c->in_len == IN_CAP) c->in_len = 0; /* a runaway frame: drop it */
        ssize_t n = read(c->fd, c->in + c->in_len, IN_CAP - c->in_len);
        if (n == 0) {
            close_call(c);
            return;
        }
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK) close_call(c);
            break;
        }
        c->in_len += (size_t)n;
    }
    size_t pos = 0;
    if (c->state == UPGRADING) {
        unsigned char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
        if (!end) return;
        int ok = c->in_len >= 12 && memcmp(c->in, "HTTP/1.1 101", 12) == 0;
        pos = (size_t)(end - c->in) + 4;
        if (!ok) {
            c->refused = 1;
            c->stopped = 1;
            close_call(c);
            return;
        }
        c->state = OPEN;
        start_call(c);
    }
    while (c->in_len - pos >= 2) {
        unsigned char *b = c->in + pos;
        int opcode = b[0] & 0x0F;
        size_t len = b[1] & 0x7F, head = 2;
        if (len == 126) {
            if (c->in_len - pos < 4) break;
            len = ((size_t)b[2] << 8) | b[3];
            head = 4;
        } else if (len == 127) {
            if (c->in_len - pos < 10) break;
            len = 0;
            for (int i = 2; i < 10; i++) len = (len << 8) | b[i];
            head = 10;
        }
        if (c->in_len - pos < head + len) break;
        if (opcode == 0x1) {
            on_text(c, (const char *)b + head, len);
        } else if (opcode == 0x9) {
            char pong[256];
            if (len < 126) {
                pong[0] = (char)0x8A;
                pong[1] = (char)(0x80 | len);
                memset(pong + 2, 0, 4);
                memcpy(pong + 6, b + head, len);
                send_bytes(c, pong, 6 + len);
            }
        } else if (opcode == 0x8) {
            if (c->state == OPEN && !c->stopped) c->closed_early = 1;
            c->stopped = 1;
        }
        pos += head + len;
    }
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
}

/* Not connected: counted as a refusal (like the Python generator's connect failures). */
static void connect_failed(Call *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->state = CLOSED;
    c->stopped = 1;
    connect_failures++;
}

static void open_call(int index) {
    Call *c = &calls[index];
    c->in = malloc(IN_CAP);
    c->greeting_s = -1;
    c->offset = rand() % n_payloads;
    snprintf(c->call_sid, sizeof c->call_sid, "CA%016lx%016lx", (unsigned long)rand() * 7919UL + index,
             (unsigned long)rand());
    snprintf(c->stream_sid, sizeof c->stream_sid, "MZ%016lx%016lx", (unsigned long)rand() * 104729UL + index,
             (unsigned long)rand());
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->state = CONNECTING;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS)
        connect_failed(c);
}

static void on_connected(Call *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        connect_failed(c);
        return;
    }
    c->state = UPGRADING;
    char request[1024];
    int n = snprintf(request, sizeof request,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     path, host, ntohs(addr.sin_port));
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
    send_bytes(c, request, (size_t)n);
}

static void poll_once(int timeout_ms) {
    struct epoll_event events[512];
    int n = epoll_wait(epfd, events, 512, timeout_ms);
    for (int i = 0; i < n; i++) {
        Call *c = events[i].data.ptr;
        if (c->state == CLOSED) continue;
        if (c->state == CONNECTING) {
            if (events[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) on_connected(c);
            continue;
        }
        if (events[i].events & EPOLLOUT) flush_out(c);
        if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c);
    }
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double pct(double *v, size_t n, double q) {
    size_t i = (size_t)(q * (double)(n - 1) + 0.5);
    return v[i < n - 1 ? i : n - 1];
}

static void load_payloads(const char *file) {
    FILE *f = fopen(file, "r");
    if (!f) {
        perror(file);
        exit(2);
    }
    size_t cap = 1024;
    payloads = malloc(cap * sizeof *payloads);
    char *line = NULL;
    size_t len = 0;
    ssize_t got;
    while ((got = getline(&line, &len, f)) > 0) {
        while (got && (line[got - 1] == '\n' || line[got - 1] == '\r')) line[--got] = 0;
        if (!got) continue;
        if ((size_t)n_payloads == cap) payloads = realloc(payloads, (cap *= 2) * sizeof *payloads);
        payloads[n_payloads++] = strdup(line);
    }
    free(line);
    fclose(f);
    if (!n_payloads) {
        fprintf(stderr, "%s: no payloads\n", file);
        exit(2);
    }
}

int main(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr, "usage: %s HOST PORT PATH CALLS DURATION_S RAMP_S SETTLE_S PAYLOADS STATS_DIR|-\n", argv[0]);
        return 2;
    }
    host = argv[1];
    int port = atoi(argv[2]);
    path = argv[3];
    n_calls = atoi(argv[4]);
    double duration = atof(argv[5]), ramp = atof(argv[6]), settle = atof(argv[7]);
    load_payloads(argv[8]);
    stats_dir = argv[9];
    srand((unsigned)(now_s() * 1e6) ^ (unsigned)getpid());
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "HOST must be an IPv4 address: %s\n", host);
        return 2;
    }
    calls = calloc((size_t)(n_calls ? n_calls : 1), sizeof *calls);
    epfd = epoll_create1(0);

    double begin = now_s(), window_start = 0, window_end = 0;
    double end = begin + ramp + settle + duration;
    for (;;) {
        double now = now_s();
        while (opened < n_calls && now >= begin + opened * ramp / n_calls) open_call(opened++);
        if (!window_start && now >= begin + ramp + settle) {
            window_start = now_s();
            in_window = 1;
            mark_file("reset");
        }
        if (now >= end) {
            window_end = now_s();
            in_window = 0;
            window_over = 1;
            mark_file("end");
            break;
        }
        /* Every open call sends what is due (a call that fell behind catches up, 5 frames
         * at most per pass), then the sockets are read until the next millisecond. */
        for (int i = 0; i < opened; i++) {
            Call *c = &calls[i];
            for (int sent = 0; c->state == OPEN && !c->stopped && sent < 5 &&
                               now >= c->t0 + c->frame * FRAME_S - 0.001;
                 sent++)
                send_frame(c, now);
        }
        poll_once(1);
    }
    for (int i = 0; i < opened; i++) {
        Call *c = &calls[i];
        if (c->state != OPEN) continue;
        char text[256];
        int n = snprintf(text, sizeof text, "{\"event\":\"stop\",\"streamSid\":\"%s\",\"stop\":{\"callSid\":\"%s\"}}",
                         c->stream_sid, c->call_sid);
        c->stopped = 1;
        send_text(c, text, (size_t)n);
        static const char close_frame[] = {(char)0x88, (char)0x82, 0, 0, 0, 0, 0x03, (char)0xE8};
        send_bytes(c, close_frame, sizeof close_frame);
    }
    for (double until = now_s() + 1.0; now_s() < until;) poll_once(10);
    for (int i = 0; i < opened; i++) {
        calls[i].stopped = 1;
        close_call(&calls[i]);
    }

    long refused = connect_failures, closed_early = 0, sent = 0, late = 0, media_in = 0, replies = 0, marks = 0,
         clears = 0, underruns = 0, ramp_underruns = 0;
    double send_lag_max = 0, underrun_max = 0;
    double *greetings = malloc(sizeof(double) * ((size_t)opened + 1));
    size_t n_greetings = 0;
    for (int i = 0; i < opened; i++) {
        Call *c = &calls[i];
        refused += c->refused;
        closed_early += c->closed_early;
        sent += c->sent;
        late += c->late_sends;
        media_in += c->media_in;
        replies += c->replies;
        marks += c->marks_echoed;
        clears += c->clears;
        underruns += c->underruns;
        ramp_underruns += c->ramp_underruns;
        if (c->send_lag_max_ms > send_lag_max) send_lag_max = c->send_lag_max_ms;
        if (c->underrun_max_ms > underrun_max) underrun_max = c->underrun_max_ms;
        if (c->greeting_s > 0) greetings[n_greetings++] = c->greeting_s;
    }
    qsort(jitter, n_jitter, sizeof *jitter, cmp_double);
    qsort(greetings, n_greetings, sizeof *greetings, cmp_double);
    struct rusage usage;
    getrusage(RUSAGE_SELF, &usage);
    double cpu = usage.ru_utime.tv_sec + usage.ru_utime.tv_usec * 1e-6 + usage.ru_stime.tv_sec +
                 usage.ru_stime.tv_usec * 1e-6;
    printf("{\"generator\": \"c\", \"generator_cpu_s\": %.2f, \"calls\": %d, \"refused\": %ld, "
           "\"closed_early\": %ld, \"frames_sent\": %ld, \"late_sends\": %ld, \"send_lag_max_ms\": %.1f, "
           "\"media_in\": %ld, \"replies\": %ld, \"marks_echoed\": %ld, \"clears\": %ld, "
           "\"underruns\": %ld, \"ramp_underruns\": %ld, \"underrun_max_ms\": %.1f, ",
           cpu, opened, refused, closed_early, sent, late, send_lag_max, media_in, replies, marks, clears,
           underruns, ramp_underruns, underrun_max);
    if (n_jitter)
        printf("\"jitter_p50_ms\": %.3f, \"jitter_p99_ms\": %.3f, \"jitter_max_ms\": %.3f, ",
               pct(jitter, n_jitter, 0.5), pct(jitter, n_jitter, 0.99), jitter[n_jitter - 1]);
    else
        printf("\"jitter_p50_ms\": null, \"jitter_p99_ms\": null, \"jitter_max_ms\": null, ");
    if (n_greetings)
        printf("\"greeting_p99_s\": %.3f, ", pct(greetings, n_greetings, 0.99));
    else
        printf("\"greeting_p99_s\": null, ");
    printf("\"window_s\": %.2f}\n", window_start ? window_end - window_start : 0.0);
    return 0;
}
