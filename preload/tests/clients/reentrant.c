/* Under the shim: a signal handler calls connect() while the shim waits for the pool
 * manager's answer. The handler's connect is reentrant (bypass "reentrant"); the interrupted
 * wait fails with EINTR (bypass "recv_failed"); both connects are the program's own.
 * Usage: reentrant PORT. Prints key=value lines. */
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static struct sockaddr_in target;
static volatile sig_atomic_t handler_rc = 99;

static void on_signal(int sig) {
    (void)sig;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    handler_rc = connect(s, (struct sockaddr *)&target, sizeof target);
    close(s);
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    target.sin_family = AF_INET;
    target.sin_port = htons((unsigned short)atoi(argv[1]));
    inet_pton(AF_INET, "127.0.0.1", &target.sin_addr);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal; /* no SA_RESTART: a wait with a timeout is never restarted anyway */
    sigaction(SIGUSR1, &sa, NULL);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int rc = connect(s, (struct sockaddr *)&target, sizeof target);
    long long (*count)(const char *) = (long long (*)(const char *))dlsym(RTLD_DEFAULT, "warmpool_bypass_count");
    struct sockaddr_in me;
    socklen_t len = sizeof me;
    getsockname(s, (struct sockaddr *)&me, &len);
    if (write(s, "x", 1) != 1) return 3;
    printf("main_rc=%d\nhandler_rc=%d\nlocal=127.0.0.1:%d\n", rc, (int)handler_rc, ntohs(me.sin_port));
    printf("reentrant=%lld\nrecv_failed=%lld\ntotal=%lld\n", count ? count("reentrant") : -2,
           count ? count("recv_failed") : -2, count ? count(NULL) : -2);
    close(s);
    return 0;
}
