/*
 * nullpolicy: the least a Postfix policy server can do for the load
 * bench/policy-vs-postgrey.sh sends, and so the floor of what `greyhook
 * serve` can cost a request on this machine. Written by hand because it
 * must be nothing more than the exchange: one thread, one epoll loop; each
 * request is read up to its empty line and answered with the deferral
 * greyhook gives a first sighting, no parsing, no decision, no store, no
 * log, no limits (a bench tool, never a server).
 *
 * Usage: nullpolicy LISTEN_PORT   (on 127.0.0.1)
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
#include <unistd.h>

#include "nullserver.h"

#define BUF 8192

static const char ANSWER[] = "action=451 4.7.1 Greylisted, please try again later retry=00:05:00\n\n";

struct conn {
  int fd;
  size_t len;
  char in[BUF];
};

/* Answers every whole request in the buffer; -1 to close. */
static int readable(struct conn *c) {
  ssize_t r = recv(c->fd, c->in + c->len, BUF - c->len, 0);
  if (r < 0 && (errno == EAGAIN || errno == EINTR)) return 0;
  if (r <= 0) return -1;
  c->len += (size_t)r;
  size_t at = 0;
  int answers = 0;
  for (;;) {
    /* a request ends with an empty line: "\n\n" */
    char *e = memmem(c->in + at, c->len - at, "\n\n", 2);
    if (!e) break;
    at = (size_t)(e - c->in) + 2;
    answers++;
  }
  for (int i = 0; i < answers; i++)
    if (send(c->fd, ANSWER, sizeof ANSWER - 1, MSG_NOSIGNAL) != (ssize_t)(sizeof ANSWER - 1)) return -1;
  memmove(c->in, c->in + at, c->len - at);
  c->len -= at;
  return c->len == BUF ? -1 : 0;
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: nullpolicy LISTEN_PORT\n");
    return 2;
  }
  int ep;
  int l = listen_loopback(argv[1], &ep);
  struct epoll_event evs[64];
  for (;;) {
    int n = next_events(ep, evs, 64);
    for (int i = 0; i < n; i++) {
      struct conn *c = evs[i].data.ptr;
      if (!c) {
        int fd;
        while ((fd = accept4(l, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
          struct conn *nc = malloc(sizeof *nc);
          if (!nc) die("malloc");
          nc->fd = fd;
          nc->len = 0;
          struct epoll_event ev = {.events = EPOLLIN, .data.ptr = nc};
          if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            close(fd);
            free(nc);
          }
        }
        continue;
      }
      if (readable(c) < 0) {
        close(c->fd);
        free(c);
      }
    }
  }
}
