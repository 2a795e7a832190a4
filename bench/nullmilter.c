/*
 * A milter that decides nothing, for bench/smtp-vs-postfix.sh: the peer
 * greyhook's milter is measured against. Built on Sendmail's libmilter
 * (Debian's libmilter-dev), the milter library most C milters use, it asks
 * Postfix for the same steps and macros as greyhook's milter
 * (host/src/frontend/milter/mod.rs: no body, DATA, end of headers or
 * unknown commands; `i` at every stage and `{auth_authen}` at MAIL) and
 * answers each at once. With `nr` it also asks for greyhook's no-reply
 * steps (`SMFIP_NR_HDR`, `NR_CONN`, `NR_HELO`, `NR_MAIL`); without, it
 * answers every step, as most milters do. With `min` it asks Postfix to
 * send no connect, HELO, MAIL or header step at all (`SMFIP_NOCONNECT`,
 * `NOHELO`, `NOMAIL`, `NOHDRS`): only RCPT and end of message, the least
 * a milter that sees recipients can ask for, so its figure is the ceiling
 * of every milter path on the machine. With `skip` it asks for the
 * no-reply steps and for no connect or MAIL step (`SMFIP_NOCONNECT`,
 * `NOMAIL`): what greyhook's milter could ask for when its chain skips
 * those hooks (the client and sender would then come from macros; the
 * HELO name has no Postfix macro, and the headers carry the Message-ID).
 * `bench/milter-steps.sh` sets two modes against each other. Not part of
 * greyhook: a bench tool only.
 *
 *   cc -O2 -o nullmilter bench/nullmilter.c -lmilter -pthread
 *   ./nullmilter inet:PORT@127.0.0.1 [nr|min|skip]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libmilter/mfapi.h>

#define NO_STEPS (SMFIP_NOBODY | SMFIP_NODATA | SMFIP_NOEOH | SMFIP_NOUNKNOWN)
#define NO_REPLIES (SMFIP_NR_HDR | SMFIP_NR_CONN | SMFIP_NR_HELO | SMFIP_NR_MAIL)
#define NO_EARLY_STEPS (SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NOHDRS)

/* Whether to ask for the no-reply steps too (the `nr` argument), whether
 * to ask for no step before RCPT and no headers (`min`), and whether for
 * no connect or MAIL step (`skip`). */
static int no_replies, minimal, skip;

/* The answer to a step that may be negotiated as no-reply. */
static sfsistat quiet(void) { return no_replies ? SMFIS_NOREPLY : SMFIS_CONTINUE; }

static sfsistat nm_negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1, unsigned long f2, unsigned long f3, unsigned long *pf0,
                             unsigned long *pf1, unsigned long *pf2, unsigned long *pf3) {
    (void)f2;
    (void)f3;
    *pf0 = f0 & (SMFIF_ADDHDRS | SMFIF_SETSYMLIST);
    *pf1 = f1 & (NO_STEPS | (no_replies ? NO_REPLIES : 0) | (minimal ? NO_EARLY_STEPS : 0) |
                 (skip ? (SMFIP_NOCONNECT | SMFIP_NOMAIL) : 0));
    *pf2 = 0;
    *pf3 = 0;
    if (f0 & SMFIF_SETSYMLIST) {
        static const int stages[] = {SMFIM_CONNECT, SMFIM_HELO, SMFIM_ENVRCPT, SMFIM_DATA, SMFIM_EOM, SMFIM_EOH};
        for (size_t i = 0; i < sizeof stages / sizeof stages[0]; i++) smfi_setsymlist(ctx, stages[i], "i");
        smfi_setsymlist(ctx, SMFIM_ENVFROM, "i {auth_authen}");
    }
    return SMFIS_CONTINUE;
}

/* With `nr`, the steps Postfix does not wait for get no reply
 * (`SMFIS_NOREPLY` is libmilter's answer for a step negotiated so). */
static sfsistat nm_connect(SMFICTX *ctx, char *host, _SOCK_ADDR *addr) {
    (void)ctx, (void)host, (void)addr;
    return quiet();
}
static sfsistat nm_helo(SMFICTX *ctx, char *helo) {
    (void)ctx, (void)helo;
    return quiet();
}
static sfsistat nm_envfrom(SMFICTX *ctx, char **argv) {
    (void)ctx, (void)argv;
    return quiet();
}
static sfsistat nm_header(SMFICTX *ctx, char *name, char *value) {
    (void)ctx, (void)name, (void)value;
    return quiet();
}
static sfsistat nm_envrcpt(SMFICTX *ctx, char **argv) {
    (void)ctx, (void)argv;
    return SMFIS_CONTINUE;
}
static sfsistat nm_eom(SMFICTX *ctx) {
    (void)ctx;
    return SMFIS_CONTINUE;
}

int main(int argc, char **argv) {
    if (argc < 2 || argc > 3 ||
        (argc == 3 && strcmp(argv[2], "nr") != 0 && strcmp(argv[2], "min") != 0 && strcmp(argv[2], "skip") != 0)) {
        fprintf(stderr, "usage: %s inet:PORT@127.0.0.1|unix:PATH [nr|min|skip]\n", argv[0]);
        return 2;
    }
    minimal = argc == 3 && strcmp(argv[2], "min") == 0;
    skip = argc == 3 && strcmp(argv[2], "skip") == 0;
    no_replies = argc == 3;
    struct smfiDesc desc;
    memset(&desc, 0, sizeof desc);
    desc.xxfi_name = "nullmilter";
    desc.xxfi_version = SMFI_VERSION;
    desc.xxfi_flags = SMFIF_ADDHDRS;
    desc.xxfi_connect = nm_connect;
    desc.xxfi_helo = nm_helo;
    desc.xxfi_envfrom = nm_envfrom;
    desc.xxfi_envrcpt = nm_envrcpt;
    desc.xxfi_header = nm_header;
    desc.xxfi_eom = nm_eom;
    desc.xxfi_negotiate = nm_negotiate;
    if (smfi_setconn(argv[1]) == MI_FAILURE || smfi_register(desc) == MI_FAILURE) {
        fprintf(stderr, "nullmilter: cannot listen on %s\n", argv[1]);
        return 1;
    }
    /* Postfix connects for every SMTP session; the default backlog is 5. */
    smfi_setbacklog(128);
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
