/* SPDX-License-Identifier: GPL-2.0 */
/* Kernel differences, handled by CO-RE feature tests rather than version checks. */
#ifndef __CORE_FIXES_BPF_H
#define __CORE_FIXES_BPF_H

#include <bpf/bpf_core_read.h>

/*
 * sk_protocol was an 8-bit bitfield until commit bf9765145b85 ("sock: Make
 * sk_protocol a 16-bit value", v5.6). The probed bitfield read handles both
 * layouts through CO-RE relocations; from a typed (BTF) pointer the bitfield
 * is read with a direct load (see read.bpf.h).
 */
static __always_inline __u16 sk_protocol(const bool btf, const struct sock *sk)
{
	return btf ? BPF_CORE_READ_BITFIELD(sk, sk_protocol)
		   : BPF_CORE_READ_BITFIELD_PROBED(sk, sk_protocol);
}

#endif /* __CORE_FIXES_BPF_H */
