// SPDX-License-Identifier: GPL-2.0
/*
 * Who holds every TCP socket: one struct sw_owner per fd of every process
 * whose file is an IPv4 or IPv6 TCP socket, in any network namespace.
 *
 * Sockets that predate sockwatch were seen by no hook, and no cheap hook gives
 * the fd of any socket; user space used to learn both by reading every
 * /proc/<pid>/fd link (a syscall per fd, the slowest part of a start). This
 * walk reads the same fd tables from inside the kernel in one pass.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include "sockwatch.h"
#include "core_fixes.bpf.h"

#define AF_INET		2
#define AF_INET6	10
#define IPPROTO_TCP	6
#define SOCK_STREAM	1

char LICENSE[] SEC("license") = "GPL";

/*
 * iter/task_file visits every open file of every process of the reader's pid
 * namespace. Threads that share their leader's fd table are skipped by the
 * kernel, so each fd is seen once per process. bpf_sock_from_file() is the
 * kernel's own "is this file a socket" test (f_op == &socket_file_ops); a raw
 * socket may carry IPPROTO_TCP too, hence the type check.
 */
SEC("iter/task_file")
int dump_owners(struct bpf_iter__task_file *ctx)
{
	struct task_struct *task = ctx->task;
	struct file *file = ctx->file;
	struct sw_owner o = {};
	struct socket *sock;
	struct sock *sk;
	__u16 family;

	if (!task || !file)
		return 0;
	sock = bpf_sock_from_file(file);
	if (!sock)
		return 0;
	sk = sock->sk;
	if (!sk)
		return 0;
	family = sk->__sk_common.skc_family;
	if ((family != AF_INET && family != AF_INET6) || sk_protocol(true, sk) != IPPROTO_TCP ||
	    BPF_CORE_READ_BITFIELD(sk, sk_type) != SOCK_STREAM)
		return 0;
	o.skaddr = (__u64)sk;
	o.ino = file->f_inode->i_ino;
	o.tgid = task->tgid;
	o.fd = ctx->fd;
	bpf_probe_read_kernel_str(o.comm, sizeof(o.comm), task->group_leader->comm);
	bpf_seq_write(ctx->meta->seq, &o, sizeof(o));
	return 0;
}
