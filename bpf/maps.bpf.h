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

/*
 * The value at @key, created from @init when missing; NULL only when the map
 * is full. (An update that fails because another CPU created the key first
 * still finds it.)
 */
static __always_inline void *lookup_or_init(void *map, const void *key, const void *init)
{
	void *value = bpf_map_lookup_elem(map, key);

	if (value)
		return value;
	bpf_map_update_elem(map, key, init, BPF_NOEXIST);
	return bpf_map_lookup_elem(map, key);
}

static __always_inline void percpu_inc(void *map, __u32 idx)
{
	percpu_add(map, idx, 1);
}

/*
 * The log2 slot of @ns: slot k holds values of at most 2^k microseconds, slot
 * SW_HIST_SLOTS - 1 the larger ones. The one place the bucket math lives (user
 * space expands it to cumulative buckets).
 */
static __always_inline __u32 hist_slot(__u64 ns)
{
	__u64 us = (ns + 999) / 1000;	/* round up: 1.5 us is not <= 1 us */
	__u32 slot = us <= 1 ? 0 : log2_u64(us - 1) + 1;

	return slot >= SW_HIST_SLOTS ? SW_HIST_SLOTS - 1 : slot;
}

/*
 * Count @ns in histogram @hist of a per-CPU array laid out SW_HIST_STRIDE
 * slots per histogram, the sum in ns at slot SW_HIST_SUM.
 */
static __always_inline void hist_observe(void *map, __u32 hist, __u64 ns)
{
	percpu_inc(map, hist * SW_HIST_STRIDE + hist_slot(ns));
	percpu_add(map, hist * SW_HIST_STRIDE + SW_HIST_SUM, ns);
}

/*
 * The same for one histogram that is a per-CPU map value of SW_HIST_STRIDE
 * __u64, counting @ns @weight times (a sample standing for that many).
 */
static __always_inline void hist_add(__u64 *hist, __u64 ns, __u32 weight)
{
	__u32 slot = hist_slot(ns);

	barrier_var(slot);	/* keep the bound the verifier saw on the register used */
	if (slot < SW_HIST_SLOTS)
		hist[slot] += weight;
	hist[SW_HIST_SUM] += ns * weight;
}

#endif /* __MAPS_BPF_H */
