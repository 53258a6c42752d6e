/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The holders map: the first holder of each TCP socket in the fd tables, as
 * map_owners (owners.bpf.c) finds it, for dump_tcp (lifecycle.bpf.c) to join
 * into the rows of the start-up walk. Both are linked into one object:
 * lifecycle.bpf.c defines the map, owners.bpf.c declares it extern. (The other
 * way round, bpftool 7's linker gave the extern the wrong offset in .maps.)
 */
#ifndef __OWNERS_BPF_H
#define __OWNERS_BPF_H

#include <bpf/bpf_helpers.h>
#include "sockwatch.h"

/*
 * Filled once, at start, and emptied (forget_owners) before the next walk, so
 * it is not preallocated: its entries cost memory only meanwhile, where a
 * preallocated map would keep 29 MB for the default 262144 entries. (Inserts
 * cost about twice as much then: 650 against 300 ns.)
 */
struct holders_map {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, 65536);	/* user space sets the socks map's size */
	__type(key, __u64);		/* struct sock * */
	__type(value, struct sw_owner);
};

#endif /* __OWNERS_BPF_H */
