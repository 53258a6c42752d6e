/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Maps both objects use. The lifecycle object creates them; the loader hands
 * their fds to the stack object before it loads (bpf_map__reuse_fd), so the
 * two see one instance of each.
 */
#ifndef __SHARED_BPF_H
#define __SHARED_BPF_H

#include <bpf/bpf_helpers.h>
#include "sockwatch.h"

/* What could not be delivered or kept (enum sw_stat). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SW_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

/*
 * Per-socket receive-queue and send samples of the stack programs. Every
 * lifecycle record summarises the socket's entry (rcvq_wait_*); the lifecycle
 * object deletes it when the socket closes. Sized to 1 entry when the stack
 * programs are off.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);	/* user space sets the configured size */
	__type(key, __u64);		/* struct sock * */
	__type(value, struct sw_stack_sock);
} sock_stack SEC(".maps");

#endif /* __SHARED_BPF_H */
