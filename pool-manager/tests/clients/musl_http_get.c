/* A function linked against musl (tests/musl.rs and the musl image of tests/seccomp_agent.rs;
 * built with musl-gcc): connect to HOST:PORT, GET PATH on a keep-alive connection, read the whole reply (Content-Length),
 * close, exit. Prints the reply's status code; on a failed call, the call and its errno
 * text (so that a test sees ENOSYS or ECONNREFUSED as such).
 *
 * usage: http_get HOST PORT PATH
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) return 2;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) { perror("socket"); return 1; }
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &a.sin_addr) != 1) return 2;
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) { perror("connect"); return 1; }
    char req[512], buf[8192];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: keep-alive\r\n\r\n", argv[3], argv[1]);
    if (write(s, req, n) != n) { perror("write"); return 1; }
    size_t got = 0;
    for (;;) {
        if (got >= sizeof buf - 1) { fprintf(stderr, "reply too long\n"); return 1; }
        ssize_t r = read(s, buf + got, sizeof buf - 1 - got);
        if (r <= 0) { perror("read"); return 1; }
        got += r;
        buf[got] = 0;
        char *body = strstr(buf, "\r\n\r\n");
        if (!body) continue;
        char *cl = strcasestr(buf, "\r\nContent-Length:");
        long len = cl && cl < body ? atol(cl + 17) : 0;
        if ((long)(got - (size_t)(body + 4 - buf)) >= len) break;
    }
    int status = 0;
    if (sscanf(buf, "HTTP/1.1 %d", &status) != 1) return 1;
    if (close(s) != 0) { perror("close"); return 1; }
    printf("%d\n", status);
    return 0;
}
