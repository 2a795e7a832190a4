/* A slow disk for benchmarks and tests: every fsync and fdatasync takes
 * SLOW_SYNC_MS milliseconds (default 1000) longer. Build and use:
 *   cc -shared -fPIC -O2 -o slowsync.so bench/slowsync.c -ldl
 *   LD_PRELOAD=$PWD/slowsync.so SLOW_SYNC_MS=100 cargo bench -p greyhook --bench store
 * (tests/all/storefault.rs builds it the same way.) */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>
static void slow(void) { const char *e = getenv("SLOW_SYNC_MS"); usleep((e ? atoi(e) : 1000) * 1000); }
int fsync(int fd) { int (*f)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fsync"); slow(); return f(fd); }
int fdatasync(int fd) { int (*f)(int) = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync"); slow(); return f(fd); }
