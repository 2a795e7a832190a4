/*
 * nullrelay: the least a before-queue SMTP relay can do for the load
 * bench/smtp-vs-postfix.sh sends, and so the floor of what `greyhook smtp`
 * can cost on this machine. It is written by hand because it must be
 * nothing more than the dialogue: one thread, one epoll loop, no filter, no
 * store, no parsing past a command's first four letters, no limits and no
 * checks (a bench tool, never a server). It makes the same exchanges, in
 * the same number of writes and reads, as `greyhook smtp` does with a
 * next hop that offers PIPELINING and CHUNKING:
 *
 *   - the greeting, and a reply to each of the client's commands;
 *   - at RCPT, XFORWARD, MAIL and RCPT to the next hop in one write, and
 *     the client's reply once the next hop's three have come;
 *   - at the end of the data, `BDAT <size> LAST` with a Received line and
 *     the message (dot-stuffing undone) in one write, and the next hop's
 *     reply passed on to the client;
 *   - next-hop connections kept in a pool between sessions (each opened
 *     with a blocking connect, greeting and EHLO: a handful a run).
 *
 * Usage: nullrelay LISTEN_PORT NEXT_HOP_PORT   (both on 127.0.0.1)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "nullserver.h"

#define BUF 8192 /* greyhook's read buffer too */
#define MAX_MSG (1 << 20)

/* What epoll's data points to: a client or a next-hop connection. */
struct head {
  int fd;
  int is_hop;
};

struct hop {
  struct head h;
  char in[BUF];
  size_t inlen;
  struct client *owner; /* the session it works for; NULL in the pool */
  int tx;               /* a transaction is open (MAIL sent, no BDAT reply yet) */
  struct hop *next;     /* the pool's list */
};

enum mode { CMD, DATA, WAIT_HOP };

struct client {
  struct head h;
  enum mode mode;
  char in[BUF];
  size_t inlen;
  char mail[1024], rcpt[1024], helo[256];
  char *msg;
  size_t msglen, msgcap;
  struct hop *hop;
  int want; /* next-hop replies still awaited */
  int stage; /* what they answer: 1 the envelope, 2 the message */
  char last[512]; /* the next hop's last reply line */
  int failed;     /* one of the envelope's replies was not 2xx */
};

static int ep, hop_port;
static struct hop *pool;
static unsigned long ids;

/* The whole buffer, or the connection is treated as gone (bench tool:
 * replies are small and the peers read them). */
static int put(int fd, const char *s, size_t n) {
  while (n > 0) {
    ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return -1;
    s += w;
    n -= (size_t)w;
  }
  return 0;
}

static int puts_fd(int fd, const char *s) { return put(fd, s, strlen(s)); }

/* Reads one whole reply (blocking), for the next hop's greeting and EHLO. */
static int read_reply_blocking(int fd) {
  char b[4096];
  size_t n = 0;
  for (;;) {
    ssize_t r = recv(fd, b + n, sizeof b - 1 - n, 0);
    if (r <= 0) return -1;
    n += (size_t)r;
    b[n] = 0;
    /* the last line: "ddd " at a line start, ended with CRLF */
    char *p = b;
    for (;;) {
      char *e = strstr(p, "\r\n");
      if (!e) break;
      if (e - p >= 4 && p[3] == ' ') return p[0] == '2' ? 0 : -1;
      p = e + 2;
    }
    if (n == sizeof b - 1) return -1;
  }
}

static struct hop *hop_get(void) {
  if (pool) {
    struct hop *h = pool;
    pool = h->next;
    return h;
  }
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return NULL;
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(hop_port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0 || read_reply_blocking(fd) < 0 ||
      puts_fd(fd, "EHLO nullrelay.bench.test\r\n") < 0 || read_reply_blocking(fd) < 0) {
    close(fd);
    return NULL;
  }
  struct hop *h = calloc(1, sizeof *h);
  if (!h) die("calloc");
  h->h.fd = fd;
  h->h.is_hop = 1;
  struct epoll_event ev = {.events = EPOLLIN, .data.ptr = h};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) die("epoll_ctl");
  return h;
}

static void hop_drop(struct hop *h) {
  close(h->h.fd);
  free(h);
}

static void client_close(struct client *c) {
  if (c->hop) {
    if (c->mode == WAIT_HOP || c->hop->tx) {
      hop_drop(c->hop); /* mid-exchange or mid-transaction: not reusable */
    } else {
      c->hop->owner = NULL;
      c->hop->inlen = 0;
      c->hop->next = pool;
      pool = c->hop;
    }
  }
  close(c->h.fd);
  free(c->msg);
  free(c);
}

/* Copies LINE (CRLF-ended, LEN bytes with it) into DST as a C string. */
static void keep(char *dst, size_t cap, const char *line, size_t len) {
  if (len >= cap) len = cap - 1;
  memcpy(dst, line, len);
  dst[len] = 0;
}

/* The client's reply now waits for WANT next-hop replies, answering STAGE
 * (1 the envelope, 2 the message). */
static void await_hop(struct client *c, int want, int stage) {
  c->mode = WAIT_HOP;
  c->want = want;
  c->stage = stage;
  c->failed = 0;
}

/* One command line from the client; returns -1 to close. */
static int command(struct client *c, const char *line, size_t len) {
  char verb[5] = {0};
  for (int i = 0; i < 4 && i < (int)len; i++) verb[i] = (char)(line[i] & ~0x20);
  if (!strcmp(verb, "EHLO") || !strcmp(verb, "HELO")) {
    keep(c->helo, sizeof c->helo, line + 5, len > 7 ? len - 7 : 0);
    return puts_fd(c->h.fd, verb[0] == 'E' ? "250-nullrelay.bench.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250 8BITMIME\r\n"
                                          : "250 nullrelay.bench.test\r\n");
  }
  if (!strcmp(verb, "MAIL")) {
    keep(c->mail, sizeof c->mail, line, len);
    return puts_fd(c->h.fd, "250 2.1.0 Ok\r\n");
  }
  if (!strcmp(verb, "RCPT")) {
    keep(c->rcpt, sizeof c->rcpt, line, len);
    if (!c->hop && !(c->hop = hop_get())) return puts_fd(c->h.fd, "451 4.4.1 next hop unavailable\r\n");
    c->hop->owner = c;
    if (c->hop->tx) { /* a further recipient of the same message */
      await_hop(c, 1, 1);
      return put(c->hop->h.fd, c->rcpt, strlen(c->rcpt));
    }
    char out[4096];
    int n = snprintf(out, sizeof out, "XFORWARD NAME=localhost ADDR=127.0.0.1 PROTO=ESMTP HELO=%s\r\n%s%s", c->helo[0] ? c->helo : "unknown",
                     c->mail, c->rcpt);
    if (n < 0 || (size_t)n >= sizeof out) return -1;
    await_hop(c, 3, 1);
    c->hop->tx = 1;
    return put(c->hop->h.fd, out, (size_t)n);
  }
  if (!strcmp(verb, "DATA")) {
    c->mode = DATA;
    c->msglen = 0;
    return puts_fd(c->h.fd, "354 End data with <CR><LF>.<CR><LF>\r\n");
  }
  if (!strcmp(verb, "QUIT")) {
    puts_fd(c->h.fd, "221 2.0.0 Bye\r\n");
    return -1;
  }
  if (!strcmp(verb, "RSET") && c->hop && c->hop->tx) {
    hop_drop(c->hop); /* the transaction is abandoned with its connection */
    c->hop = NULL;
  }
  if (!strcmp(verb, "RSET") || !strcmp(verb, "NOOP")) return puts_fd(c->h.fd, "250 2.0.0 Ok\r\n");
  return puts_fd(c->h.fd, "502 5.5.2 Error: command not recognized\r\n");
}

/* The end of the data: one BDAT LAST with the Received line and the
 * message to the next hop. */
static int relay_message(struct client *c) {
  char received[512];
  int rn = snprintf(received, sizeof received,
                    "Received: from %s (localhost [127.0.0.1])\r\n\tby nullrelay.bench.test with ESMTP id %lu\r\n", c->helo,
                    ++ids);
  if (rn < 0 || (size_t)rn >= sizeof received) return -1;
  char bdat[64];
  int bn = snprintf(bdat, sizeof bdat, "BDAT %zu LAST\r\n", (size_t)rn + c->msglen);
  struct iovec iov[3] = {{bdat, (size_t)bn}, {received, (size_t)rn}, {c->msg, c->msglen}};
  struct msghdr mh = {.msg_iov = iov, .msg_iovlen = 3};
  ssize_t w = sendmsg(c->hop->h.fd, &mh, MSG_NOSIGNAL);
  if (w < 0) return -1;
  /* rare (a large message): what the one write left of each part */
  for (int i = 0; i < 3; i++) {
    size_t sent = (size_t)w < iov[i].iov_len ? (size_t)w : iov[i].iov_len;
    w -= (ssize_t)sent;
    if (sent < iov[i].iov_len && put(c->hop->h.fd, (char *)iov[i].iov_base + sent, iov[i].iov_len - sent) < 0) return -1;
  }
  await_hop(c, 1, 2);
  return 0;
}

/* One data line (CRLF-ended); returns -1 to close. */
static int data_line(struct client *c, const char *line, size_t len) {
  if (len == 3 && line[0] == '.') return relay_message(c);
  if (line[0] == '.') line++, len--;
  if (c->msglen + len > MAX_MSG) return -1;
  if (c->msglen + len > c->msgcap) {
    size_t cap = c->msgcap ? c->msgcap * 2 : 16384;
    while (cap < c->msglen + len) cap *= 2;
    char *m = realloc(c->msg, cap);
    if (!m) return -1;
    c->msg = m;
    c->msgcap = cap;
  }
  memcpy(c->msg + c->msglen, line, len);
  c->msglen += len;
  return 0;
}

static int client_readable(struct client *c) {
  ssize_t r = recv(c->h.fd, c->in + c->inlen, BUF - c->inlen, 0);
  if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
  if (r <= 0) return -1;
  c->inlen += (size_t)r;
  size_t at = 0;
  while (c->mode != WAIT_HOP) {
    char *e = memchr(c->in + at, '\n', c->inlen - at);
    if (!e) break;
    size_t len = (size_t)(e - (c->in + at)) + 1;
    int rc = c->mode == CMD ? command(c, c->in + at, len) : data_line(c, c->in + at, len);
    at += len;
    if (rc < 0) return -1;
  }
  memmove(c->in, c->in + at, c->inlen - at);
  c->inlen -= at;
  if (c->inlen == BUF) return -1;
  return 0;
}

static void hop_readable(struct hop *h) {
  ssize_t r = recv(h->h.fd, h->in + h->inlen, BUF - h->inlen, 0);
  if (r < 0 && (errno == EAGAIN || errno == EINTR)) return;
  struct client *c = h->owner;
  if (r <= 0 || !c || c->mode != WAIT_HOP) {
    /* closed, or talking out of turn: drop it (from the pool too) */
    if (!c) {
      for (struct hop **p = &pool; *p; p = &(*p)->next)
        if (*p == h) {
          *p = h->next;
          break;
        }
      hop_drop(h);
    } else {
      c->hop = NULL;
      hop_drop(h);
      client_close(c);
    }
    return;
  }
  h->inlen += (size_t)r;
  size_t at = 0;
  for (;;) {
    char *e = memchr(h->in + at, '\n', h->inlen - at);
    if (!e) break;
    size_t len = (size_t)(e - (h->in + at)) + 1;
    const char *line = h->in + at;
    if (len >= 4 && line[3] == ' ') {
      /* the client hears the first refusal, or else the last reply */
      if (!c->failed) keep(c->last, sizeof c->last, line, len);
      if (line[0] != '2') c->failed = 1;
      c->want--;
    }
    at += len;
  }
  memmove(h->in, h->in + at, h->inlen - at);
  h->inlen -= at;
  if (c->want == 0) {
    c->mode = CMD;
    if (c->stage == 2) h->tx = 0; /* the message's reply ends the transaction */
    if (put(c->h.fd, c->last, strlen(c->last)) < 0) {
      client_close(c);
      return;
    }
    /* the client does not pipeline, but a command may already wait */
    if (c->inlen > 0 && client_readable(c) < 0) client_close(c);
  }
}

int main(int argc, char **argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: nullrelay LISTEN_PORT NEXT_HOP_PORT\n");
    return 2;
  }
  hop_port = atoi(argv[2]);
  int l = listen_loopback(argv[1], &ep);
  struct epoll_event evs[64];
  for (;;) {
    int n = next_events(ep, evs, 64);
    for (int i = 0; i < n; i++) {
      if (!evs[i].data.ptr) {
        int fd;
        while ((fd = accept4(l, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
          struct client *c = calloc(1, sizeof *c);
          if (!c) die("calloc");
          c->h.fd = fd;
          struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
          if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0 || puts_fd(fd, "220 nullrelay.bench.test ESMTP\r\n") < 0) client_close(c);
        }
        continue;
      }
      if (((struct head *)evs[i].data.ptr)->is_hop) {
        hop_readable(evs[i].data.ptr);
      } else {
        struct client *c = evs[i].data.ptr;
        if (client_readable(c) < 0) client_close(c);
      }
    }
  }
}
