// SPDX-License-Identifier: GPL-2.0
/*
 * Feature probes: one empty program per attach type. User space loads and
 * attaches each alone to learn what this kernel allows before it picks the
 * variants of the real programs (kprobes missing, fentry refused, tracefs not
 * mounted are all seen in the wild).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} probe_ringbuf SEC(".maps");

SEC("fentry/tcp_connect")
int BPF_PROG(probe_fentry, struct sock *sk)
{
	return 0;
}

SEC("kprobe/tcp_connect")
int BPF_KPROBE(probe_kprobe, struct sock *sk)
{
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(probe_tp_btf, const struct sock *sk, int oldstate, int newstate)
{
	return 0;
}

SEC("raw_tp/inet_sock_set_state")
int BPF_PROG(probe_raw_tp, const struct sock *sk, int oldstate, int newstate)
{
	return 0;
}

SEC("tp/sock/inet_sock_set_state")
int probe_tracepoint(void *ctx)
{
	return 0;
}

/* Also proves the ring buffer map type: the program references it. */
SEC("iter/tcp")
int probe_iter(struct bpf_iter__tcp *ctx)
{
	void *rec = bpf_ringbuf_reserve(&probe_ringbuf, 8, 0);

	if (rec)
		bpf_ringbuf_discard(rec, 0);
	return 0;
}
