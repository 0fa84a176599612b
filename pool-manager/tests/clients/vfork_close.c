/* A function that starts a child with vfork while it holds a pooled connection; the child
 * closes its copy of that fd (and every other, as a careful child does) and exits.
 *
 * usage: vfork_close PORT
 * GET /parent1 on 127.0.0.1:PORT, vfork; child: close(fd), close_range(3, ~0), _exit(0).
 * Prints "held" once the child is gone and waits for a line on stdin; then GET /parent2
 * on the same connection, close, print "done <status of /parent2>".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static int get(int s, const char *path) {
    char req[256], buf[4096];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n", path);
    if (write(s, req, n) != n) return -1;
    size_t got = 0;
    while (got < sizeof buf - 1) { /* nginx answers "hello\n": the reply ends with it */
        ssize_t r = read(s, buf + got, sizeof buf - 1 - got);
        if (r <= 0) return -1;
        got += r;
        buf[got] = 0;
        char *body = strstr(buf, "\r\n\r\n");
        if (body && strstr(body, "hello\n")) break;
    }
    return atoi(buf + 9);
}

int main(int argc, char **argv) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    int s = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(s, (void *)&a, sizeof a) || get(s, "/parent1") != 200) { perror("first request"); return 1; }
    pid_t pid = vfork();
    if (pid == 0) {
        close(s);
        close_range(3, ~0U, 0);
        _exit(0);
    }
    int st;
    waitpid(pid, &st, 0);
    printf("held\n");
    fflush(stdout);
    char line[16];
    if (!fgets(line, sizeof line, stdin)) return 1;
    int status = get(s, "/parent2");
    close(s);
    printf("done %d\n", status);
    return 0;
}
