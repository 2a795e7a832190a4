/*
 * What bench/nullrelay.c and bench/nullpolicy.c share: the listening socket
 * on 127.0.0.1, set up as greyhook's listener is, in a new epoll set.
 */
#ifndef NULLSERVER_H
#define NULLSERVER_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>

static void die(const char *what) {
  perror(what);
  exit(1);
}

/* A non-blocking listener on 127.0.0.1:PORT, added to a new epoll set
 * (*EP) with a NULL data pointer; SIGPIPE ignored. Exits on failure. */
static int listen_loopback(const char *port, int *ep) {
  signal(SIGPIPE, SIG_IGN);
  int l = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  if (l < 0) die("socket");
  int one = 1;
  setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  /* accepted sockets inherit it, as greyhook's listener has it */
  setsockopt(l, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(port))};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 1024) < 0) die("listen");
  *ep = epoll_create1(0);
  if (*ep < 0) die("epoll_create1");
  struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
  if (epoll_ctl(*ep, EPOLL_CTL_ADD, l, &lev) < 0) die("epoll_ctl");
  return l;
}

/* The next events of EP into EVS (at most N), waiting as long as it takes. */
static int next_events(int ep, struct epoll_event *evs, int n) {
  for (;;) {
    int got = epoll_wait(ep, evs, n, -1);
    if (got >= 0) return got;
    if (errno != EINTR) die("epoll_wait");
  }
}

#endif
