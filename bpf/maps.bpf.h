/* SPDX-License-Identifier: GPL-2.0 */
/* Small map helpers shared by the sockwatch programs. */
#ifndef __MAPS_BPF_H
#define __MAPS_BPF_H

#include <bpf/bpf_helpers.h>
#include "bits.bpf.h"
#include "sockwatch.h"

/* Add @val to slot @idx of a per-CPU __u64 array: no atomics needed. */
static __always_inline void percpu_add(void *map, __u32 idx, __u64 val)
{
	__u64 *slot = bpf_map_lookup_elem(map, &idx);

	if (slot)
		*slot += val;
}

static __always_inline void percpu_inc(void *map, __u32 idx)
{
	percpu_add(map, idx, 1);
}

/*
 * Count @ns in histogram @hist of a per-CPU array laid out SW_HIST_STRIDE
 * slots per histogram: slot k holds values of at most 2^k microseconds, slot
 * SW_HIST_SLOTS - 1 the larger ones, slot SW_HIST_SUM the sum in ns. The one
 * place the bucket math lives (user space expands it to cumulative buckets).
 */
static __always_inline void hist_observe(void *map, __u32 hist, __u64 ns)
{
	__u64 us = (ns + 999) / 1000;	/* round up: 1.5 us is not <= 1 us */
	__u32 slot = us <= 1 ? 0 : log2_u64(us - 1) + 1;

	if (slot >= SW_HIST_SLOTS)
		slot = SW_HIST_SLOTS - 1;
	percpu_inc(map, hist * SW_HIST_STRIDE + slot);
	percpu_add(map, hist * SW_HIST_STRIDE + SW_HIST_SUM, ns);
}

#endif /* __MAPS_BPF_H */
