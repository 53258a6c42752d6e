/* SPDX-License-Identifier: GPL-2.0 */
/* Small map helpers shared by the sockwatch programs. */
#ifndef __MAPS_BPF_H
#define __MAPS_BPF_H

#include <bpf/bpf_helpers.h>

/* Add one to slot @idx of a per-CPU __u64 array: no atomics needed. */
static __always_inline void percpu_inc(void *map, __u32 idx)
{
	__u64 *val = bpf_map_lookup_elem(map, &idx);

	if (val)
		(*val)++;
}

#endif /* __MAPS_BPF_H */
