/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Reading kernel memory, and the tp_btf / raw_tp program pairs built on it.
 *
 * tp_btf (and fentry, and iterator) arguments are typed (BTF) pointers: their
 * fields are read with plain loads the verifier checks and turns into
 * fault-safe PROBE_MEM loads, about a nanosecond each. raw_tp, kprobe and
 * classic tracepoint arguments are bare addresses, read through
 * bpf_probe_read_kernel(), a helper call of tens of ns. Handlers take a
 * constant `btf` and read with RD(): once inlined, the compiler keeps only
 * the branch of its variant. Both branches go through CO-RE relocations
 * (vmlinux.h types carry preserve_access_index), so offsets follow the
 * running kernel either way.
 */
#ifndef __READ_BPF_H
#define __READ_BPF_H

#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#define RD(p, field)	(btf ? (p)->field : BPF_CORE_READ(p, field))
#define __maybe_unused	__attribute__((unused))

/*
 * The tp_btf and raw_tp variants of one hook: the same arguments and the same
 * handler call (which passes `btf` on); user space keeps the one that loads.
 */
#define TP_BTF_AND_RAW(name, tp, call, args...)				\
SEC("tp_btf/" #tp)							\
int BPF_PROG(name##_btf, args)						\
{									\
	const bool btf __maybe_unused = true;				\
	return call;							\
}									\
SEC("raw_tp/" #tp)							\
int BPF_PROG(name##_raw, args)						\
{									\
	const bool btf __maybe_unused = false;				\
	return call;							\
}

/* Network namespace inode of @sk. */
static __always_inline __u32 sock_netns(const bool btf, const struct sock *sk)
{
	const struct net *net = RD(sk, __sk_common.skc_net.net);

	return RD(net, ns.inum);
}

/*
 * A TCP sock's tcp_sock. A typed pointer to struct sock may not be read past
 * it: tp_btf needs the checked cast (NULL unless a full TCP sock).
 */
static __always_inline const struct tcp_sock *tcp_sk_of(const bool btf, const struct sock *sk)
{
	return btf ? bpf_skc_to_tcp_sock((void *)sk) : (const struct tcp_sock *)sk;
}

#endif /* __READ_BPF_H */
