// SPDX-License-Identifier: GPL-2.0
/*
 * Who holds every TCP socket: one struct sw_owner per fd of every process
 * whose file is an IPv4 or IPv6 TCP socket, in any network namespace.
 *
 * Sockets that predate sockwatch were seen by no hook, and no cheap hook gives
 * the fd of any socket; user space used to learn both by reading every
 * /proc/<pid>/fd link (a syscall per fd, the slowest part of a start). These
 * walks read the same fd tables from inside the kernel in one pass.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "sockwatch.h"
#include "owners.bpf.h"
#include "core_fixes.bpf.h"

#define AF_INET		2
#define AF_INET6	10
#define IPPROTO_TCP	6
#define SOCK_STREAM	1
#define EEXIST		17

char LICENSE[] SEC("license") = "GPL";

/* Defined in lifecycle.bpf.c, which joins it into the walk's rows. */
extern struct holders_map holders SEC(".maps");

/*
 * iter/task_file visits every open file of every process of the reader's pid
 * namespace, in pid order. Threads that share their leader's fd table are
 * skipped by the kernel, so each fd is seen once per process.
 * bpf_sock_from_file() is the kernel's own "is this file a socket" test
 * (f_op == &socket_file_ops); a raw socket may carry IPPROTO_TCP too, hence
 * the type check. False when the file is not a TCP socket.
 */
static __always_inline bool holder_of(struct bpf_iter__task_file *ctx, struct sw_owner *o)
{
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	struct socket *sock;
	struct sock *sk;
	__u16 family;

	if (!task || !file)
		return false;
	sock = bpf_sock_from_file(file);
	if (!sock)
		return false;
	sk = sock->sk;
	if (!sk)
		return false;
	family = sk->__sk_common.skc_family;
	if ((family != AF_INET && family != AF_INET6) || sk_protocol(true, sk) != IPPROTO_TCP ||
	    BPF_CORE_READ_BITFIELD(sk, sk_type) != SOCK_STREAM)
		return false;
	o->skaddr = (__u64)sk;
	o->ino = file->f_inode->i_ino;
	o->tgid = task->tgid;
	o->fd = ctx->fd;
	bpf_probe_read_kernel_str(o->comm, sizeof(o->comm), task->group_leader->comm);
	return true;
}

/* Every holder, as records: user space names the owners a walk left unknown. */
SEC("iter/task_file")
int dump_owners(struct bpf_iter__task_file *ctx)
{
	struct sw_owner o = {};

	if (holder_of(ctx, &o))
		bpf_seq_write(ctx->meta->seq, &o, sizeof(o));
	return 0;
}

/*
 * Every socket's first holder (in pid order: the lowest pid) into the holders
 * map, run just before the start-up walk: dump_tcp then writes each row's
 * owner itself, and user space reads no holder at all. A holder the full map
 * cannot take is written out instead, so user space knows the join is partial.
 */
SEC("iter/task_file")
int map_owners(struct bpf_iter__task_file *ctx)
{
	struct sw_owner o = {};
	long err;

	if (!holder_of(ctx, &o))
		return 0;
	err = bpf_map_update_elem(&holders, &o.skaddr, &o, BPF_NOEXIST);
	if (err && err != -EEXIST)
		bpf_seq_write(ctx->meta->seq, &o, sizeof(o));
	return 0;
}

/* Empty the holders map once the start-up walk has joined it. */
SEC("iter/bpf_map_elem")
int forget_owners(struct bpf_iter__bpf_map_elem *ctx)
{
	__u64 *addr = ctx->key;
	__u64 key;

	if (!addr)
		return 0;
	key = *addr;
	bpf_map_delete_elem(&holders, &key);
	return 0;
}
