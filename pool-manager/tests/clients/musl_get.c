/* A function linked against musl (built with musl-gcc by tests/musl.rs): connect to
 * 127.0.0.1:PORT, GET PATH on a keep-alive connection, read the reply, close, exit.
 * Prints "<status>" of the reply.
 *
 * usage: musl_get PORT PATH
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (s < 0) { perror("socket"); return 1; }
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons((unsigned short)atoi(argv[1]));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) { perror("connect"); return 1; }
    char req[256], buf[4096];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n", argv[2]);
    if (write(s, req, n) != n) { perror("write"); return 1; }
    size_t got = 0;
    while (got < sizeof buf - 1) { /* nginx answers "hello\n": the reply ends with it */
        ssize_t r = read(s, buf + got, sizeof buf - 1 - got);
        if (r <= 0) { perror("read"); return 1; }
        got += r;
        buf[got] = 0;
        char *body = strstr(buf, "\r\n\r\n");
        if (body && strstr(body, "hello\n")) break;
    }
    int status = 0;
    if (sscanf(buf, "HTTP/1.1 %d", &status) != 1) return 1;
    if (close(s) != 0) { perror("close"); return 1; }
    printf("%d\n", status);
    return 0;
}
