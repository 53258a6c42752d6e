// SPDX-License-Identifier: GPL-2.0
/*
 * Load generator for bench/connections.py and bench/stack.py. Compiled by the script with
 * `gcc -O2`; every mode is bounded in time or by its parent and stops by
 * itself. Results go to stdout as one JSON line.
 *
 *   loadgen conn CLIENTS SERVERS SECONDS
 *       Listens on 127.0.0.1:<ephemeral>, prints {"port": P}, forks SERVERS
 *       server processes (accept, read 1 byte, write 1 byte, close) and
 *       CLIENTS client processes (connect, send 1 byte, recv 1 byte, wait for
 *       EOF, close), then waits for a line on stdin ("go") and runs the
 *       clients for SECONDS. Prints connections accepted by the servers and
 *       completed by the clients.
 *
 *   loadgen getpid SECONDS
 *       Waits for "go" on stdin, then calls syscall(SYS_getpid) in a loop for
 *       SECONDS; prints calls and calls/s. No sockets at all.
 *
 *   loadgen hold N
 *       Opens N loopback connections (2N sockets plus a listener) and keeps
 *       them until stdin reaches EOF: the pre-existing connections a starting
 *       monitor must find.
 *
 *   loadgen serve PORT SIZE
 *       Listens on 0.0.0.0:PORT, prints {"ready": true}, accepts one
 *       connection. SIZE 0: reads until EOF (bulk sink); else answers every
 *       SIZE-byte message with SIZE bytes until EOF (ping-pong echo). Prints
 *       the bytes it read.
 *
 *   loadgen bulk HOST PORT SECONDS
 *       Connects and writes 64 KiB at a time for SECONDS; prints bytes and
 *       bytes/s.
 *
 *   loadgen pingpong HOST PORT SIZE SECONDS
 *       Connects (TCP_NODELAY), then sends SIZE bytes and waits for SIZE back,
 *       for SECONDS; prints round trips and round trips/s.
 *
 * Who closes first (conn mode): the SERVER. It writes its byte and closes;
 * the client reads the byte, then reads on until EOF (the server's FIN) and
 * only then closes. So the client goes CLOSE_WAIT -> LAST_ACK -> CLOSE and
 * never holds TIME_WAIT, and TIME_WAIT lands on the server side, where it
 * pins no ephemeral port (the 4-tuples all share the server's port; a reused
 * client port that meets an old TIME_WAIT entry is accepted by the usual
 * SYN-in-TIME_WAIT rule). Without the wait for EOF the client often closes
 * before the FIN has arrived (simultaneous close: both ends go to TIME_WAIT):
 * measured here, ~17 % of connections left a client-side TIME_WAIT entry,
 * i.e. ~4k ephemeral ports pinned per second for 60 s, out of ~28k. It only
 * keeps working because net.ipv4.tcp_tw_reuse=2 reuses them on loopback;
 * with the EOF wait the benchmark does not depend on that setting.
 * SO_LINGER {1,0} would avoid TIME_WAIT too, but turns every close into a RST
 * (result "reset" in the monitor, a different kernel path): not the common case.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_PROCS 64

struct shared {
	volatile double deadline;		/* CLOCK_MONOTONIC seconds */
	volatile uint64_t accepted[MAX_PROCS];	/* per server process */
	volatile uint64_t completed[MAX_PROCS];	/* per client process */
	volatile uint64_t errors[MAX_PROCS];	/* per client process */
	volatile uint64_t server_errors[MAX_PROCS];
};

static volatile sig_atomic_t stopping;

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static void on_stop(int sig)
{
	(void)sig;
	stopping = 1;
}

/* Children die with the process that forked them: nothing outlives a crash. */
static void child_setup(void)
{
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() == 1)
		_exit(3);
}

/* Block until a line arrives on stdin; false on EOF (the parent went away). */
static int wait_go(void)
{
	char line[64];

	return fgets(line, sizeof(line), stdin) != NULL;
}

static int listen_loopback(int backlog, int *port)
{
	struct sockaddr_in a = { .sin_family = AF_INET };
	socklen_t len = sizeof(a);
	int one = 1;
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0)
		die("socket");
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	a.sin_port = 0;
	if (bind(fd, (struct sockaddr *)&a, sizeof(a)) || listen(fd, backlog))
		die("bind/listen");
	if (getsockname(fd, (struct sockaddr *)&a, &len))
		die("getsockname");
	*port = ntohs(a.sin_port);
	return fd;
}

static void server_loop(int lfd, struct shared *sh, int idx)
{
	struct sigaction sa = { .sa_handler = on_stop };	/* no SA_RESTART */
	char b;

	sigaction(SIGUSR1, &sa, NULL);
	while (!stopping) {
		int c = accept(lfd, NULL, NULL);

		if (c < 0) {
			if (errno != EINTR)
				sh->server_errors[idx]++;
			continue;
		}
		if (read(c, &b, 1) != 1 || write(c, &b, 1) != 1)
			sh->server_errors[idx]++;
		close(c);
		sh->accepted[idx]++;
	}
	_exit(0);
}

static void client_loop(int port, int gate, struct shared *sh, int idx)
{
	struct sockaddr_in a = { .sin_family = AF_INET };
	char b = 'x', rb[16];
	double deadline;

	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	a.sin_port = htons(port);
	if (read(gate, rb, 1) < 0)	/* EOF when the parent closes the gate */
		_exit(1);
	deadline = sh->deadline;
	while (now() < deadline) {
		int fd = socket(AF_INET, SOCK_STREAM, 0);
		ssize_t n;

		if (fd < 0) {
			sh->errors[idx]++;
			continue;
		}
		if (connect(fd, (struct sockaddr *)&a, sizeof(a)) || write(fd, &b, 1) != 1 ||
		    read(fd, rb, 1) != 1) {
			sh->errors[idx]++;
			close(fd);
			if (errno == EADDRNOTAVAIL)
				usleep(1000);
			continue;
		}
		/* Wait for the server's FIN: the server closes first (see top). */
		while ((n = read(fd, rb, sizeof(rb))) > 0)
			;
		close(fd);
		if (n == 0)
			sh->completed[idx]++;
		else
			sh->errors[idx]++;
	}
	_exit(0);
}

static int mode_conn(int clients, int servers, double seconds)
{
	struct shared *sh;
	pid_t srv[MAX_PROCS], cli[MAX_PROCS];
	int gate[2], port, lfd, i;
	uint64_t acc = 0, done = 0, err = 0, serr = 0;
	struct rusage ru;
	double t0, t1, cpu;

	if (clients < 1 || clients > MAX_PROCS || servers < 1 || servers > MAX_PROCS)
		return fprintf(stderr, "1..%d clients and servers\n", MAX_PROCS), 2;
	sh = mmap(NULL, sizeof(*sh), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (sh == MAP_FAILED)
		die("mmap");
	memset((void *)sh, 0, sizeof(*sh));
	lfd = listen_loopback(4096, &port);
	if (pipe(gate))
		die("pipe");
	for (i = 0; i < servers; i++) {
		srv[i] = fork();
		if (srv[i] < 0)
			die("fork");
		if (srv[i] == 0) {
			child_setup();
			close(gate[1]);
			server_loop(lfd, sh, i);
		}
	}
	close(lfd);
	for (i = 0; i < clients; i++) {
		cli[i] = fork();
		if (cli[i] < 0)
			die("fork");
		if (cli[i] == 0) {
			child_setup();
			close(gate[1]);
			client_loop(port, gate[0], sh, i);
		}
	}
	close(gate[0]);
	printf("{\"port\": %d}\n", port);
	fflush(stdout);

	if (wait_go()) {
		t0 = now();
		sh->deadline = t0 + seconds;
	} else {
		t0 = now();
		sh->deadline = 0;	/* parent gone: clients leave at once */
	}
	close(gate[1]);
	for (i = 0; i < clients; i++)
		waitpid(cli[i], NULL, 0);
	t1 = now();
	/*
	 * Every completed client saw the server's FIN, so the servers are done with
	 * all of them; stop the servers (accept() returns EINTR).
	 */
	for (i = 0; i < servers; i++)
		kill(srv[i], SIGUSR1);
	for (i = 0; i < servers; i++)
		waitpid(srv[i], NULL, 0);
	/* CPU of all reaped children: clients and servers, user + system. */
	getrusage(RUSAGE_CHILDREN, &ru);
	cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 +
	      ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
	for (i = 0; i < servers; i++) {
		acc += sh->accepted[i];
		serr += sh->server_errors[i];
	}
	for (i = 0; i < clients; i++) {
		done += sh->completed[i];
		err += sh->errors[i];
	}
	printf("{\"mode\": \"conn\", \"port\": %d, \"clients\": %d, \"servers\": %d, "
	       "\"seconds\": %.6f, \"accepted\": %llu, \"completed\": %llu, "
	       "\"client_errors\": %llu, \"server_errors\": %llu, \"rate\": %.1f, "
	       "\"cpu_s\": %.3f}\n",
	       port, clients, servers, t1 - t0, (unsigned long long)acc,
	       (unsigned long long)done, (unsigned long long)err, (unsigned long long)serr,
	       (t1 - t0) > 0 ? done / (t1 - t0) : 0.0, cpu);
	return 0;
}

static int mode_getpid(double seconds)
{
	unsigned long long calls = 0;
	double t0, t1, deadline;
	int i;

	printf("{\"ready\": true}\n");
	fflush(stdout);
	if (!wait_go())
		return 1;
	t0 = now();
	deadline = t0 + seconds;
	do {
		for (i = 0; i < 4096; i++)
			syscall(SYS_getpid);
		calls += 4096;
	} while ((t1 = now()) < deadline);
	printf("{\"mode\": \"getpid\", \"seconds\": %.6f, \"calls\": %llu, \"rate\": %.1f, "
	       "\"ns_per_call\": %.2f}\n",
	       t1 - t0, calls, calls / (t1 - t0), (t1 - t0) * 1e9 / calls);
	return 0;
}

static int mode_hold(int n)
{
	struct sockaddr_in a = { .sin_family = AF_INET };
	struct rlimit rl;
	char buf[64];
	int port, lfd, i;

	rl.rlim_cur = rl.rlim_max = 2 * (rlim_t)n + 64;
	if (setrlimit(RLIMIT_NOFILE, &rl))
		die("setrlimit");
	lfd = listen_loopback(n + 16, &port);
	a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	a.sin_port = htons(port);
	for (i = 0; i < n; i++) {
		int c = socket(AF_INET, SOCK_STREAM, 0);

		if (c < 0 || connect(c, (struct sockaddr *)&a, sizeof(a)))
			die("hold connect");
		if (accept(lfd, NULL, NULL) < 0)
			die("hold accept");
	}
	printf("{\"port\": %d, \"connections\": %d}\n", port, n);
	fflush(stdout);
	while (fgets(buf, sizeof(buf), stdin))
		;	/* hold until the parent closes stdin (or dies) */
	return 0;
}

static int connect_to(const char *host, int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	int one = 1;
	int fd = socket(AF_INET, SOCK_STREAM, 0);

	if (fd < 0 || inet_pton(AF_INET, host, &a.sin_addr) != 1 ||
	    connect(fd, (struct sockaddr *)&a, sizeof(a)))
		die("connect");
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	return fd;
}

/* Read exactly @n bytes; false on EOF or error. */
static int read_full(int fd, char *buf, size_t n)
{
	size_t got = 0;

	while (got < n) {
		ssize_t r = read(fd, buf + got, n - got);

		if (r <= 0)
			return 0;
		got += r;
	}
	return 1;
}

static int mode_serve(int port, int size)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	static char buf[1 << 16];
	unsigned long long total = 0;
	int one = 1, lfd, c;
	ssize_t r;

	lfd = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (lfd < 0 || bind(lfd, (struct sockaddr *)&a, sizeof(a)) || listen(lfd, 4))
		die("serve bind/listen");
	printf("{\"ready\": true}\n");
	fflush(stdout);
	c = accept(lfd, NULL, NULL);
	if (c < 0)
		die("serve accept");
	setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (size <= 0 || size > (int)sizeof(buf)) {
		while ((r = read(c, buf, sizeof(buf))) > 0)
			total += r;
	} else {
		while (read_full(c, buf, size) && write(c, buf, size) == size)
			total += size;
	}
	printf("{\"mode\": \"serve\", \"bytes\": %llu}\n", total);
	return 0;
}

static int mode_bulk(const char *host, int port, double seconds)
{
	static char buf[1 << 16];
	unsigned long long total = 0;
	int fd = connect_to(host, port);
	double t0 = now(), t1;
	ssize_t w;

	while ((t1 = now()) < t0 + seconds) {
		w = write(fd, buf, sizeof(buf));
		if (w <= 0)
			die("bulk write");
		total += w;
	}
	close(fd);
	printf("{\"mode\": \"bulk\", \"seconds\": %.6f, \"bytes\": %llu, \"rate\": %.1f}\n",
	       t1 - t0, total, total / (t1 - t0));
	return 0;
}

static int mode_pingpong(const char *host, int port, int size, double seconds)
{
	static char buf[1 << 16];
	unsigned long long rounds = 0;
	int fd = connect_to(host, port);
	double t0 = now(), t1;

	if (size <= 0 || size > (int)sizeof(buf))
		die("pingpong size");
	while ((t1 = now()) < t0 + seconds) {
		if (write(fd, buf, size) != size || !read_full(fd, buf, size))
			die("pingpong");
		rounds++;
	}
	close(fd);
	printf("{\"mode\": \"pingpong\", \"seconds\": %.6f, \"rounds\": %llu, \"rate\": %.1f}\n",
	       t1 - t0, rounds, rounds / (t1 - t0));
	return 0;
}

int main(int argc, char **argv)
{
	signal(SIGPIPE, SIG_IGN);
	if (argc == 5 && !strcmp(argv[1], "conn"))
		return mode_conn(atoi(argv[2]), atoi(argv[3]), atof(argv[4]));
	if (argc == 3 && !strcmp(argv[1], "getpid"))
		return mode_getpid(atof(argv[2]));
	if (argc == 3 && !strcmp(argv[1], "hold"))
		return mode_hold(atoi(argv[2]));
	if (argc == 4 && !strcmp(argv[1], "serve"))
		return mode_serve(atoi(argv[2]), atoi(argv[3]));
	if (argc == 5 && !strcmp(argv[1], "bulk"))
		return mode_bulk(argv[2], atoi(argv[3]), atof(argv[4]));
	if (argc == 6 && !strcmp(argv[1], "pingpong"))
		return mode_pingpong(argv[2], atoi(argv[3]), atoi(argv[4]), atof(argv[5]));
	fprintf(stderr, "usage: %s conn CLIENTS SERVERS SECONDS | getpid SECONDS | hold N | "
		"serve PORT SIZE | bulk HOST PORT SECONDS | pingpong HOST PORT SIZE SECONDS\n",
		argv[0]);
	return 2;
}
