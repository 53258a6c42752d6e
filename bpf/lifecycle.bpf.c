// SPDX-License-Identifier: GPL-2.0
/*
 * Lifecycle of every TCP socket: who opened it (connect, listen, accept),
 * every state transition, and how it ended, with the kernel's own counters.
 *
 * One record per opening and one per close go to user space through the ring
 * buffer; state transitions are only counted here. Per-socket state lives in
 * an LRU hash keyed by the sock's address. An iter/tcp program dumps the same
 * record shape for every live socket so user space can seed and reconcile its
 * tables without a second decoder.
 *
 * Hooks come in thin variants (tp_btf, raw_tp, classic tracepoint; fentry or
 * kprobe where the kernel has them) around one static handler each. User space
 * turns the losing variants off with bpf_program__set_autoload() after probing.
 * Handlers take a constant `btf`: true where the sock is a typed pointer
 * (tp_btf, fentry, the iterator), whose fields are plain loads (read.bpf.h).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_endian.h>
#include "sockwatch.h"
#include "maps.bpf.h"
#include "shared.bpf.h"
#include "core_fixes.bpf.h"
#include "read.bpf.h"
#include "owners.bpf.h"

#define AF_INET		2
#define AF_INET6	10
#define IPPROTO_TCP	6

#define EPIPE		32
#define ENETUNREACH	101
#define ECONNRESET	104
#define ETIMEDOUT	110
#define ECONNREFUSED	111
#define EHOSTUNREACH	113

/*
 * States are range-checked once, but clang may index with an unchecked copy of
 * the register and drops a plain mask it can prove redundant; hiding the value
 * behind barrier_var() first keeps the bound visible to the verifier.
 */
static __always_inline __u32 state_slot(__u32 state)
{
	barrier_var(state);
	return state & 0xf;
}

/* @at as the state stamp of a socket opened at @open_ns (see SW_STAMP_SHIFT). */
static __always_inline __u32 stamp_of(__u64 open_ns, __u64 at)
{
	const __u64 span = 1ULL << SW_STAMP_SHIFT;
	__u64 d = at > open_ns ? at - open_ns : 0;

	if (d < span - 1)
		return d + 1;
	d /= 1000;
	if (d < span)
		return (1U << SW_STAMP_SHIFT) | d;
	d /= 1000;
	if (d < span)
		return (2U << SW_STAMP_SHIFT) | d;
	d /= 1000;
	return (3U << SW_STAMP_SHIFT) | (d < span ? d : span - 1);
}

/* When @s first entered @state (CLOCK_MONOTONIC), from its stamp; 0: never. */
static __always_inline __u64 stamp_time(const struct sw_sock *s, int state)
{
	__u32 stamp = s->state_stamp[state_slot(state)];
	__u64 open_ns = s->open_ns, v = stamp & ((1U << SW_STAMP_SHIFT) - 1);

	switch (stamp >> SW_STAMP_SHIFT) {
	case 0:
		return stamp ? open_ns + v - 1 : 0;
	case 1:
		return open_ns + v * 1000;
	case 2:
		return open_ns + v * 1000000;
	default:
		return open_ns + v * 1000000000ULL;
	}
}

char LICENSE[] SEC("license") = "GPL";

/* Test-only switch: drop CLOSE records to prove reconciliation repairs them. */
const volatile bool suppress_close = false;
/*
 * Records never wake the reader (it drains on a timer), unless the ring buffer
 * holds more than this many bytes: then a burst wakes it before it overflows.
 */
const volatile __u64 wakeup_bytes = 512 << 10;	/* user space sets a quarter of the ring */
/*
 * The stack object runs and fills sock_stack. Without it (--no-stack-latency)
 * the map is empty: records and closes skip its lookups and deletes.
 */
const volatile bool stack_samples = true;

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);	/* user space sets the configured size */
	__type(key, __u64);		/* struct sock * */
	__type(value, struct sw_sock);
} socks SEC(".maps");

/*
 * Held OPENs. Under churn most connections live for less than one tick of the
 * reader, so their OPEN and CLOSE records reached user space together, and the
 * CLOSE carries everything the OPEN did. With hold_opens set, announcing a
 * connection puts its address here instead of sending an OPEN. At each drain
 * the reader first runs release_opens (below), which sends the OPEN of every
 * socket still held; a CLOSE that finds its socket still held takes it back
 * and goes alone, flagged SW_FLAG_OPEN_HELD. A short connection costs one
 * record per end instead of two, in the kernel and in user space.
 */
volatile __u32 hold_opens;	/* .bss: user space sets it at load and at run time */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2048);	/* full: sent at once; the sweep walks every bucket (12 ns each) */
	__type(key, __u64);		/* struct sock * */
	__type(value, __u8);
} held SEC(".maps");

/* Owner of each listening port, for accepted sockets no task ever touched. */
struct listen_key {
	__u32 netns;
	__u16 port;
	__u16 __pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct listen_key);
	__type(value, struct sw_sock);
} listeners SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 2 << 20);	/* user space sets the configured size */
} events SEC(".maps");

/*
 * The rescue ring: a record whose reservation in "events" failed goes here.
 * Since 6.15 the ring buffer's lock gives up (and the reservation fails)
 * after spinning too long, which happens on busy virtual machines when the
 * vCPU holding it is descheduled, while the ring has plenty of room. The
 * same trick as wprof's fallback ring buffer: another lock, another chance.
 */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 << 10);	/* user space sets the configured size */
} events_rescue SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SW_TRANSITIONS);
	__type(key, __u32);
	__type(value, __u64);
} transitions SEC(".maps");

/* Running totals by task name (see enum sw_total): user space reads them at scrape. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct sw_total_key);
	__type(value, __u64);
} totals SEC(".maps");

/* Handshake and lifetime histograms (enum sw_hist), SW_HIST_STRIDE slots each. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SW_HIST_MAX * SW_HIST_STRIDE);
	__type(key, __u32);
	__type(value, __u64);
} hists SEC(".maps");

/* Lost records by namespace, kind and role (struct sw_lost_key); bounded, LRU. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct sw_lost_key);
	__type(value, __u64);
} lost SEC(".maps");

/* Scratch record for the iterator: too large for the 512-byte stack. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct sw_event);
} scratch SEC(".maps");

static __always_inline __u64 sock_ino(const bool btf, const struct sock *sk)
{
	const struct socket *sock = RD(sk, sk_socket);
	const struct file *file = RD(sock, file);
	const struct inode *inode = RD(file, f_inode);

	return RD(inode, i_ino);
}

/* Make the current task the owner of @s. */
static __always_inline void set_owner(const bool btf, struct sw_sock *s, const struct sock *sk,
				      __u8 attrib)
{
	__u64 id = bpf_get_current_pid_tgid();

	s->tgid = id >> 32;
	s->tid = (__u32)id;
	s->attrib = attrib;
	bpf_get_current_comm(s->comm, sizeof(s->comm));
	if (!s->ino)
		s->ino = sock_ino(btf, sk);
}

/* Start tracking @sk; false when the map is full. */
static __always_inline bool track(const bool btf, const struct sock *sk, __u8 role, __u8 attrib,
				  int state, __u64 now)
{
	__u64 key = (__u64)sk;
	struct sw_sock fresh = {};

	fresh.open_ns = now;
	fresh.role = role;
	fresh.fd = -1;
	fresh.lport = RD(sk, __sk_common.skc_num);
	fresh.uid = RD(sk, sk_uid.val);
	if (state > 0 && state < SW_TCP_STATES)
		fresh.state_stamp[state_slot(state)] = stamp_of(now, now);
	if (attrib)
		set_owner(btf, &fresh, sk, attrib);
	if (!bpf_map_update_elem(&socks, &key, &fresh, BPF_NOEXIST)) {
		percpu_inc(&stats, SW_STAT_SOCKS_ADDED);
	} else if (bpf_map_update_elem(&socks, &key, &fresh, BPF_ANY)) {
		percpu_inc(&stats, SW_STAT_SOCKS_FULL);
		return false;
	}
	return true;
}

/* The same, for callers that go on with the new entry (NULL when the map is full). */
static __always_inline struct sw_sock *track_entry(const bool btf, const struct sock *sk,
						   __u8 role, __u8 attrib, int state, __u64 now)
{
	__u64 key = (__u64)sk;

	return track(btf, sk, role, attrib, state, now) ? bpf_map_lookup_elem(&socks, &key)
							 : NULL;
}

/* A closed socket's stack-latency state goes with it. */
static __always_inline void forget_stack(__u64 key)
{
	if (stack_samples)
		bpf_map_delete_elem(&sock_stack, &key);
}

/*
 * Stop tracking a closed socket: its entry (counted only if it was still there,
 * not evicted) and its stack-latency state.
 */
static __always_inline void untrack(__u64 key)
{
	if (!bpf_map_delete_elem(&socks, &key))
		percpu_inc(&stats, SW_STAT_SOCKS_REMOVED);
	forget_stack(key);
}

/* The kernel's own TCP counters, read once per close (and per snapshot row). */
struct counters {
	__u64 bytes_acked;
	__u64 bytes_received;
	__u64 bytes_sent;
	__u64 bytes_retrans;
	__u32 segs_out;
	__u32 segs_in;
	__u32 total_retrans;
	__u32 srtt_us;
	__u8 peer_fin;
};

static __always_inline void read_counters(const bool btf, struct counters *c,
					  const struct sock *sk)
{
	const struct tcp_sock *tp = tcp_sk_of(btf, sk);

	__builtin_memset(c, 0, sizeof(*c));
	if (!tp)
		return;
	c->bytes_acked = RD(tp, bytes_acked);
	c->bytes_received = RD(tp, bytes_received);
	c->bytes_sent = RD(tp, bytes_sent);
	c->bytes_retrans = RD(tp, bytes_retrans);
	c->segs_out = RD(tp, segs_out);
	c->segs_in = RD(tp, segs_in);
	c->total_retrans = RD(tp, total_retrans);
	c->srtt_us = RD(tp, srtt_us) >> 3;
	c->peer_fin = !!(RD(sk, __sk_common.skc_flags) &
			 (1UL << bpf_core_enum_value(enum sock_flags, SOCK_DONE)));
}

/*
 * Median receive-queue wait from the socket's log4 slots: the upper bound of
 * the slot holding the middle wait, clipped by the exact maximum.
 */
static __always_inline __u64 rcvq_p50(const struct sw_stack_sock *q)
{
	__u32 total = 0, seen = 0;
	int k;

#pragma unroll
	for (k = 0; k < SW_RCVQ_SLOTS; k++)
		total += q->rcvq_slots[k];
	if (!total)
		return 0;
#pragma unroll
	for (k = 0; k < SW_RCVQ_SLOTS - 1; k++) {
		seen += q->rcvq_slots[k];
		if (2 * seen >= total) {
			__u64 bound = (1ULL << (2 * k)) * 1000;

			return bound < q->rcvq_max_ns ? bound : q->rcvq_max_ns;
		}
	}
	return q->rcvq_max_ns;
}

/*
 * Fill everything but the kind from @s (may be NULL), the sock itself and, when
 * given, its counters (an OPEN has none worth reading yet).
 */
static __always_inline void build_event(const bool btf, struct sw_event *e,
					const struct sw_sock *s, const struct sock *sk,
					const struct counters *c, __u64 now)
{
	const struct sw_stack_sock *q;
	__u64 key = (__u64)sk;

	__builtin_memset(e, 0, sizeof(*e));
	if (s) {
		__builtin_memcpy(&e->sock, s, sizeof(*s));
	} else {
		e->sock.fd = -1;
		e->sock.ino = sock_ino(btf, sk);
		e->sock.uid = RD(sk, sk_uid.val);
	}
	e->ts_ns = now;
	e->skaddr = (__u64)sk;
	e->family = RD(sk, __sk_common.skc_family);
	e->sport = RD(sk, __sk_common.skc_num);
	e->dport = bpf_ntohs(RD(sk, __sk_common.skc_dport));
	if (e->family == AF_INET) {
		*(__be32 *)e->saddr = RD(sk, __sk_common.skc_rcv_saddr);
		*(__be32 *)e->daddr = RD(sk, __sk_common.skc_daddr);
	} else {
		*(struct in6_addr *)e->saddr = RD(sk, __sk_common.skc_v6_rcv_saddr);
		*(struct in6_addr *)e->daddr = RD(sk, __sk_common.skc_v6_daddr);
	}
	e->netns = sock_netns(btf, sk);
	e->state = RD(sk, __sk_common.skc_state);
	/* The local port is released before TCP_CLOSE: use the one we kept. */
	if (!e->sport && s)
		e->sport = s->lport;
	if (c) {
		e->bytes_acked = c->bytes_acked;
		e->bytes_received = c->bytes_received;
		e->bytes_sent = c->bytes_sent;
		e->bytes_retrans = c->bytes_retrans;
		e->segs_out = c->segs_out;
		e->segs_in = c->segs_in;
		e->total_retrans = c->total_retrans;
		e->srtt_us = c->srtt_us;
		e->peer_fin = c->peer_fin;
	}
	if (s && s->role == SW_ROLE_LISTENER)
		e->listen_backlog = RD(sk, sk_max_ack_backlog);
	q = stack_samples ? bpf_map_lookup_elem(&sock_stack, &key) : NULL;
	if (q) {
		e->rcvq_wait_p50_ns = rcvq_p50(q);
		e->rcvq_wait_max_ns = q->rcvq_max_ns;
	}
}

/* A record the ring buffer refused: count it, in total and by where it came from. */
static __always_inline void count_lost(const bool btf, const struct sw_sock *s,
				       const struct sock *sk, __u8 kind)
{
	struct sw_lost_key key = { .netns = sock_netns(btf, sk), .kind = kind };
	__u64 one = 1, *n;

	percpu_inc(&stats, SW_STAT_RINGBUF_FULL);
	if (s)
		key.role = s->role;
	n = bpf_map_lookup_elem(&lost, &key);
	if (n)
		__sync_fetch_and_add(n, 1);
	else if (bpf_map_update_elem(&lost, &key, &one, BPF_NOEXIST) &&
		 (n = bpf_map_lookup_elem(&lost, &key)))
		__sync_fetch_and_add(n, 1);	/* another CPU created it meanwhile */
}

/* Send one OPEN or CLOSE record; never wakes the reader (it polls on a timer). */
static __always_inline void emit(const bool btf, struct sw_sock *s, const struct sock *sk,
				 const struct counters *c, __u8 kind, __u8 result, int oldstate,
				 int newstate, __u64 now)
{
	struct sw_event *e;

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		e = bpf_ringbuf_reserve(&events_rescue, sizeof(*e), 0);
		if (!e) {
			count_lost(btf, s, sk, kind);
			return;
		}
		percpu_inc(&stats, SW_STAT_RESCUED);
	}
	build_event(btf, e, s, sk, c, now);
	if (kind == SW_KIND_OPEN && s)
		s->lport = e->sport;
	e->kind = kind;
	e->result = result;
	e->oldstate = oldstate;
	e->state = newstate;
	bpf_ringbuf_submit(e, bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > wakeup_bytes
				      ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

/*
 * Announce connection @s: send its OPEN, or hold it back (see "held"). A stale
 * entry at the same address (a socket whose close we never saw) is taken over:
 * that socket's OPEN is never sent.
 */
static __always_inline void announce(const bool btf, struct sw_sock *s, const struct sock *sk,
				     int oldstate, int newstate, __u64 now)
{
	__u64 key = (__u64)sk;
	__u8 one = 1;

	if (hold_opens && !bpf_map_update_elem(&held, &key, &one, BPF_ANY)) {
		s->flags |= SW_FLAG_OPEN_HELD;
		s->lport = RD(sk, __sk_common.skc_num);	/* as emit() keeps it */
		return;
	}
	emit(btf, s, sk, NULL, SW_KIND_OPEN, SW_RESULT_OK, oldstate, newstate, now);
}

/*
 * Before the CLOSE of @s: take its held OPEN back, so the CLOSE goes alone
 * and says so (SW_FLAG_OPEN_HELD stays set). If release_opens sent it first,
 * the flag is cleared: this CLOSE ends a row user space has.
 */
static __always_inline void take_back(struct sw_sock *s, __u64 key)
{
	if ((s->flags & SW_FLAG_OPEN_HELD) && bpf_map_delete_elem(&held, &key))
		s->flags &= ~SW_FLAG_OPEN_HELD;
}

/* Add @val to the running total @what of task @comm (NULL: owner unknown). */
static __always_inline void add_total(const char *comm, __u8 what, __u8 result, __u16 port,
				      __u64 val)
{
	struct sw_total_key key = { .what = what, .result = result, .port = port };
	__u64 zero = 0, *slot;

	if (comm)
		__builtin_memcpy(key.comm, comm, sizeof(key.comm));
	slot = lookup_or_init(&totals, &key, &zero);
	if (!slot) {
		percpu_inc(&stats, SW_STAT_TOTALS_FULL);
		return;
	}
	__sync_fetch_and_add(slot, val);
}

static __always_inline void observe_between(__u32 hist, __u64 from, __u64 to)
{
	if (from && to >= from)
		hist_observe(&hists, hist, to - from);
}

/* Fold a finished connection's payload and retransmits into its owner's totals. */
static __always_inline void account_close(const struct sw_sock *s, const struct counters *c,
					  __u64 now)
{
	const char *comm = s ? s->comm : NULL;

	add_total(comm, SW_TOTAL_SENT_BYTES, 0, 0, c->bytes_sent - c->bytes_retrans);
	add_total(comm, SW_TOTAL_RECEIVED_BYTES, 0, 0,
		  c->bytes_received > c->peer_fin ? c->bytes_received - c->peer_fin : 0);
	add_total(comm, SW_TOTAL_RETRANSMITS, 0, 0, c->total_retrans);
	if (s)
		observe_between(s->role == SW_ROLE_SERVER ? SW_HIST_LIFETIME_SERVER
							  : SW_HIST_LIFETIME_CLIENT,
				s->open_ns, now);
}

/* An accepted socket no task has claimed yet (see claim_accepted). */
static __always_inline bool unclaimed(const struct sw_sock *s)
{
	return s->role == SW_ROLE_SERVER && !(s->flags & SW_FLAG_OPEN_SENT);
}

/*
 * A task has shown it owns accepted socket @s, still unclaimed(): attribute it
 * and announce it. Callers check first, and read the clock only then. @now is
 * when accept() returned (syscall exit, fexit) or, with the default
 * first-use attribution, the end of the first send/recv/close by the owner:
 * accept() returned before that, so the accept-queue wait is an upper bound
 * there (a server that blocks in recv() right after accept() adds the time
 * until data arrives).
 */
static __always_inline void claim_accepted(const bool btf, struct sw_sock *s,
					   const struct sock *sk, __u8 attrib, __u64 now)
{
	__u64 established = stamp_time(s, TCP_ESTABLISHED);

	set_owner(btf, s, sk, attrib);
	s->flags |= SW_FLAG_OPEN_SENT;
	add_total(s->comm, SW_TOTAL_ACCEPT, 0, RD(sk, __sk_common.skc_num), 1);
	observe_between(SW_HIST_HANDSHAKE_SERVER, stamp_time(s, TCP_SYN_RECV), established);
	if (established && now >= established) {
		s->accept_wait_ns = now - established;
		hist_observe(&hists, SW_HIST_ACCEPT_QUEUE, s->accept_wait_ns);
	}
	announce(btf, s, sk, TCP_ESTABLISHED, TCP_ESTABLISHED, now);
}

static __always_inline __u8 classify_close(const bool btf, const struct sock *sk, int oldstate)
{
	int err = RD(sk, sk_err);

	if (oldstate == TCP_SYN_SENT) {
		switch (err) {
		case 0:
			return SW_RESULT_ABORTED;
		case ECONNREFUSED:
			return SW_RESULT_REFUSED;
		case ETIMEDOUT:
			return SW_RESULT_TIMEOUT;
		case EHOSTUNREACH:
		case ENETUNREACH:
			return SW_RESULT_UNREACHABLE;
		default:
			return SW_RESULT_ERROR;
		}
	}
	switch (err) {
	case 0:
		return SW_RESULT_OK;
	case ECONNRESET:
	case EPIPE:
		return SW_RESULT_RESET;
	case ETIMEDOUT:
		return SW_RESULT_TIMEOUT;
	default:
		return SW_RESULT_ERROR;
	}
}

/* The listeners key of @sk: a listener's, or the listener an accepted sock came from. */
static __always_inline struct listen_key listen_key_of(const bool btf, const struct sock *sk)
{
	struct listen_key key = {
		.netns = sock_netns(btf, sk),
		.port = RD(sk, __sk_common.skc_num),
	};

	return key;
}

/* Give an accepted socket its listener's owner until a task claims it. */
static __always_inline void inherit_listener(const bool btf, struct sw_sock *s,
					     const struct sock *sk)
{
	struct listen_key key = listen_key_of(btf, sk);
	struct sw_sock *l = bpf_map_lookup_elem(&listeners, &key);

	if (!l)
		return;
	s->tgid = l->tgid;
	s->tid = l->tid;
	s->attrib = SW_ATTRIB_LISTENER;
	__builtin_memcpy(s->comm, l->comm, sizeof(s->comm));
}

static __always_inline int handle_set_state(const bool btf, const struct sock *sk, int oldstate,
					    int newstate)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 key = (__u64)sk;
	struct listen_key lkey;
	struct sw_sock *s;
	struct counters c;
	__u8 result;

	if (oldstate <= 0 || oldstate >= SW_TCP_STATES || newstate <= 0 ||
	    newstate >= SW_TCP_STATES)
		return 0;
	percpu_inc(&transitions, oldstate * SW_TCP_STATES + newstate);

	switch (newstate) {
	case TCP_SYN_SENT:
		/*
		 * CLOSE->SYN_SENT runs in connect(), in the connecting task. It always
		 * starts a new socket: an entry at this address is stale (a close we
		 * never saw), so it is overwritten, not reused.
		 */
		track(btf, sk, SW_ROLE_CLIENT, SW_ATTRIB_CONNECT, newstate, now);
		return 0;
	case TCP_LISTEN:
		/* CLOSE->LISTEN runs in listen(), in the listening task. */
		s = track_entry(btf, sk, SW_ROLE_LISTENER, SW_ATTRIB_LISTEN, newstate, now);
		if (!s)
			return 0;
		lkey = listen_key_of(btf, sk);
		bpf_map_update_elem(&listeners, &lkey, s, BPF_ANY);
		s->flags |= SW_FLAG_OPEN_SENT;
		emit(btf, s, sk, NULL, SW_KIND_OPEN, SW_RESULT_OK, oldstate, newstate, now);
		return 0;
	case TCP_SYN_RECV:
		/* LISTEN->SYN_RECV: the child sock is cloned in softirq; no owner yet. */
		s = track_entry(btf, sk, SW_ROLE_SERVER, SW_ATTRIB_NONE, newstate, now);
		if (s)
			inherit_listener(btf, s, sk);
		return 0;
	}

	s = bpf_map_lookup_elem(&socks, &key);
	if (!s) {
		/* Predates sockwatch or was evicted: still tell user space it is gone. */
		if (newstate == TCP_CLOSE) {
			percpu_inc(&stats, SW_STAT_UNTRACKED_CLOSE);
			read_counters(btf, &c, sk);
			/* Record first, totals second: a reader that sees the totals
			 * can then find the record in the ring (see the exporter). */
			if (!suppress_close)
				emit(btf, NULL, sk, &c, SW_KIND_CLOSE,
				     classify_close(btf, sk, oldstate),
				     oldstate, newstate, now);
			if (oldstate != TCP_SYN_SENT)
				account_close(NULL, &c, now);
			forget_stack(key);
		}
		return 0;
	}
	if (!s->state_stamp[state_slot(newstate)])
		s->state_stamp[state_slot(newstate)] = stamp_of(s->open_ns, now);

	switch (newstate) {
	case TCP_ESTABLISHED:
		/* Clients are announced once the 4-tuple is complete. */
		if (s->role == SW_ROLE_CLIENT) {
			s->flags |= SW_FLAG_OPEN_SENT;
			add_total(s->comm, SW_TOTAL_CONNECT, SW_RESULT_OK, 0, 1);
			observe_between(SW_HIST_HANDSHAKE_CLIENT, stamp_time(s, TCP_SYN_SENT), now);
			announce(btf, s, sk, oldstate, newstate, now);
		}
		return 0;
	case TCP_FIN_WAIT1:
	case TCP_LAST_ACK:
		/* Only close()/shutdown() make these transitions: process context. */
		if (unclaimed(s))
			claim_accepted(btf, s, sk, SW_ATTRIB_CLOSE, now);
		return 0;
	case TCP_CLOSE:
		result = classify_close(btf, sk, oldstate);
		read_counters(btf, &c, sk);
		take_back(s, key);
		/* Record first, totals second (as above). */
		if (suppress_close)
			percpu_inc(&stats, SW_STAT_SUPPRESSED_CLOSE);
		else
			emit(btf, s, sk, &c, SW_KIND_CLOSE, result, oldstate, newstate, now);
		if (oldstate == TCP_SYN_SENT && result != SW_RESULT_OK)
			add_total(s->comm, SW_TOTAL_CONNECT, result, 0, 1);
		else if (s->role != SW_ROLE_LISTENER)
			account_close(s, &c, now);
		untrack(key);
		if (s->role == SW_ROLE_LISTENER) {
			lkey = listen_key_of(btf, sk);
			bpf_map_delete_elem(&listeners, &lkey);
		}
		return 0;
	}
	return 0;
}

/*
 * The kernel never runs a tp_btf/raw_tp program while the same program is
 * under way on that CPU (bpf_prog->active): a softirq that changes a socket's
 * state, or frees one, while the program runs in a task would go unseen. So
 * the two hooks that fire in both contexts (the state change and the destroy)
 * get a second copy of their program on the same tracepoint, which the kernel
 * runs right after the first for each event. The first copy pushes the event
 * it is given (the sock, and the transition) on a small per-CPU stack as its
 * first act; the twin pops it if
 * it is on top, and otherwise (the kernel skipped the first copy: it was under
 * way for the event an interrupt came in on) handles the event itself. A
 * depth flag would leave a window at the program's entry and exit, where the
 * first copy is skipped but the flag is down: the flood test lost a few events
 * there. Records lost to nesting are the first copies' skipped runs minus
 * SW_STAT_NESTED_RUNS. (Classic tracepoints share one per-CPU guard for all
 * programs: no help.)
 */
enum { SW_NEST_STATE, SW_NEST_DESTROY, SW_NEST_HOOKS };
#define SW_NEST_SLOTS 4 /* a power of two; deeper nesting than 1 does not happen */

/* One event of a hook: the sock, and for state changes the transition. */
struct nest_event {
	__u64 sk;
	__u64 transition;
};

struct nest_stack {
	__u32 depth;
	__u32 __pad;
	struct nest_event events[SW_NEST_SLOTS];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SW_NEST_HOOKS);
	__type(key, __u32);
	__type(value, struct nest_stack);
} nest SEC(".maps");

/* In the first copy, first of all: this event is under way. */
static __always_inline void nest_push(__u32 hook, const struct sock *sk, __u64 transition)
{
	struct nest_stack *n = bpf_map_lookup_elem(&nest, &hook);
	struct nest_event *e;
	__u32 d;

	if (!n)
		return;
	/* Full only with entries of runs whose twin the kernel skipped: stale. */
	d = n->depth < SW_NEST_SLOTS ? n->depth : 0;
	e = &n->events[d & (SW_NEST_SLOTS - 1)];
	e->sk = (__u64)sk;
	e->transition = transition;
	n->depth = d + 1;
}

/* In the twin: true when the first copy was skipped for this event. */
static __always_inline bool nested_event(__u32 hook, const struct sock *sk, __u64 transition)
{
	struct nest_stack *n = bpf_map_lookup_elem(&nest, &hook);
	struct nest_event *top;
	__u32 d;

	if (!n)
		return false;
	d = n->depth;
	top = &n->events[(d - 1) & (SW_NEST_SLOTS - 1)];
	if (d && d <= SW_NEST_SLOTS && top->sk == (__u64)sk && top->transition == transition) {
		n->depth = d - 1;
		return false; /* the first copy has had this event */
	}
	percpu_inc(&stats, SW_STAT_NESTED_RUNS);
	return true;
}

static __always_inline int set_state_first(const bool btf, const struct sock *sk, int oldstate,
					   int newstate)
{
	/* Any event, TCP or not: the kernel skips the first copy for both. */
	nest_push(SW_NEST_STATE, sk, (__u64)oldstate << 32 | (__u32)newstate);
	if (sk_protocol(btf, sk) == IPPROTO_TCP)
		handle_set_state(btf, sk, oldstate, newstate);
	return 0;
}

static __always_inline int set_state_nested(const bool btf, const struct sock *sk, int oldstate,
					    int newstate)
{
	/* Nesting first: as the first copy, it counts skipped non-TCP events too. */
	if (!nested_event(SW_NEST_STATE, sk, (__u64)oldstate << 32 | (__u32)newstate) ||
	    sk_protocol(btf, sk) != IPPROTO_TCP)
		return 0;
	return handle_set_state(btf, sk, oldstate, newstate);
}

/*
 * sock:inet_sock_set_state fires for every TCP state change, in connect() and
 * listen() for the opening transitions and in softirq for the handshake. It is
 * the portable hook for connect as well: CLOSE->SYN_SENT runs in the connecting
 * task just before tcp_connect(). The first copy and its twin (see above).
 */
TP_BTF_AND_RAW(set_state, inet_sock_set_state, set_state_first(btf, sk, oldstate, newstate),
	       const struct sock *sk, int oldstate, int newstate)
TP_BTF_AND_RAW(set_state_nested, inet_sock_set_state,
	       set_state_nested(btf, sk, oldstate, newstate),
	       const struct sock *sk, int oldstate, int newstate)

SEC("tp/sock/inet_sock_set_state")
int set_state_tp(struct trace_event_raw_inet_sock_set_state *ctx)
{
	if (ctx->protocol != IPPROTO_TCP)
		return 0;
	return handle_set_state(false, ctx->skaddr, ctx->oldstate, ctx->newstate);
}

/*
 * tcp_connect() sends the SYN once the source port is bound: the preferred hook
 * where fentry or kprobes exist. It only makes sure the socket is tracked; the
 * state hook above covers kernels without either.
 */
static __always_inline int handle_connect(const bool btf, const struct sock *sk)
{
	__u64 key = (__u64)sk;

	if (!bpf_map_lookup_elem(&socks, &key))
		track(btf, sk, SW_ROLE_CLIENT, SW_ATTRIB_CONNECT, TCP_SYN_SENT, bpf_ktime_get_ns());
	return 0;
}

SEC("fentry/tcp_connect")
int BPF_PROG(connect_fentry, struct sock *sk)
{
	return handle_connect(true, sk);
}

SEC("kprobe/tcp_connect")
int BPF_KPROBE(connect_kprobe, struct sock *sk)
{
	return handle_connect(false, sk);
}

/*
 * Accept. inet_csk_accept() returns the child sock in the accepting task: the
 * preferred hook (fexit, else kretprobe). Without either, the accept syscall
 * exit gives the task and the fd exactly, but a syscall tracepoint puts every
 * syscall of every task on the slow path, so it is opt-in ("precise accept").
 * The default claims the socket at its first send or receive, or at close(),
 * all of which run in the owning task (see the sock_*_length hooks below).
 */
static __always_inline int handle_accept(const bool btf, const struct sock *sk, int fd)
{
	__u64 key = (__u64)sk;
	struct sw_sock *s;

	if (!sk)
		return 0;
	s = bpf_map_lookup_elem(&socks, &key);
	if (!s)
		return 0;
	if (fd >= 0)
		s->fd = fd;
	if (unclaimed(s))
		claim_accepted(btf, s, sk, SW_ATTRIB_ACCEPT, bpf_ktime_get_ns());
	return 0;
}

SEC("fexit/inet_csk_accept")
int BPF_PROG(accept_fexit)
{
	__u64 ret = 0;

	/* The argument list changed in v6.10; bpf_get_func_ret() does not care. */
	bpf_get_func_ret(ctx, &ret);
	return handle_accept(false, (const struct sock *)ret, -1);
}

SEC("kretprobe/inet_csk_accept")
int BPF_KRETPROBE(accept_kretprobe, struct sock *ret)
{
	return handle_accept(false, ret, -1);
}

/* The sock behind file descriptor @fd of the current task. */
static __always_inline const struct sock *sock_of_fd(long fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct socket *sock;
	struct file *file = NULL;

	if (fd < 0 || fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	bpf_core_read(&file, sizeof(file), &fds[fd]);
	if (!file)
		return NULL;
	sock = BPF_CORE_READ(file, private_data);
	return BPF_CORE_READ(sock, sk);
}

/* Syscall numbers are per architecture; these are x86_64's. */
#define NR_ACCEPT	43
#define NR_ACCEPT4	288

static __always_inline int handle_sys_exit(long id, long ret)
{
	if ((id != NR_ACCEPT && id != NR_ACCEPT4) || ret < 0)
		return 0;
	return handle_accept(false, sock_of_fd(ret), ret);
}

TP_BTF_AND_RAW(accept_sys, sys_exit, handle_sys_exit(RD(regs, orig_ax), ret),
	       struct pt_regs *regs, long ret)

SEC("tp/raw_syscalls/sys_exit")
int accept_sys_tp(struct trace_event_raw_sys_exit *ctx)
{
	return handle_sys_exit(ctx->id, ctx->ret);
}

/*
 * sock:sock_send_length and sock:sock_recv_length fire at the end of every
 * sendmsg/recvmsg on any socket, in the calling task. They only fire for socket
 * I/O (not every syscall), and a TCP socket's first one after accept() names
 * its owner: the default accept attribution. One map lookup per call: for a
 * non-TCP socket it misses, which costs no more than reading sk_protocol first
 * (the classic tracepoint has the protocol in its context, so it checks).
 */
static __always_inline int handle_io(const bool btf, const struct sock *sk)
{
	__u64 key = (__u64)sk;
	struct sw_sock *s = bpf_map_lookup_elem(&socks, &key);

	if (s && unclaimed(s))
		claim_accepted(btf, s, sk, SW_ATTRIB_FIRST_IO, bpf_ktime_get_ns());
	return 0;
}

TP_BTF_AND_RAW(send, sock_send_length, handle_io(btf, sk), struct sock *sk, int ret, int flags)

SEC("tp/sock/sock_send_length")
int send_tp(struct trace_event_raw_sock_msg_length *ctx)
{
	return ctx->protocol == IPPROTO_TCP ? handle_io(false, ctx->sk) : 0;
}

TP_BTF_AND_RAW(recv, sock_recv_length, handle_io(btf, sk), struct sock *sk, int ret, int flags)

SEC("tp/sock/sock_recv_length")
int recv_tp(struct trace_event_raw_sock_msg_length *ctx)
{
	return ctx->protocol == IPPROTO_TCP ? handle_io(false, ctx->sk) : 0;
}

/*
 * tcp:tcp_destroy_sock fires when a full TCP socket is freed, after its last
 * state change. A socket still in the socks map here had its transition to
 * TCP_CLOSE missed (the program was skipped on nesting, or the kernel took a
 * path without one): announce the close now, late, and count it.
 */
static __always_inline int handle_destroy(const bool btf, const struct sock *sk)
{
	__u64 key = (__u64)sk, now;
	struct sw_sock *s = bpf_map_lookup_elem(&socks, &key);
	struct counters c;
	__u8 result;

	if (!s)
		return 0;	/* the common case: its close was seen */
	now = bpf_ktime_get_ns();
	percpu_inc(&stats, SW_STAT_LATE_CLOSE);
	result = classify_close(btf, sk, TCP_ESTABLISHED);
	read_counters(btf, &c, sk);
	take_back(s, key);
	emit(btf, s, sk, &c, SW_KIND_CLOSE, result, TCP_ESTABLISHED, TCP_CLOSE, now);
	if (s->role != SW_ROLE_LISTENER)
		account_close(s, &c, now);
	untrack(key);
	return 0;
}

static __always_inline int destroy_first(const bool btf, const struct sock *sk)
{
	nest_push(SW_NEST_DESTROY, sk, 0);
	return handle_destroy(btf, sk);
}

TP_BTF_AND_RAW(destroy, tcp_destroy_sock, destroy_first(btf, sk), struct sock *sk)
TP_BTF_AND_RAW(destroy_nested, tcp_destroy_sock,
	       nested_event(SW_NEST_DESTROY, sk, 0) ? handle_destroy(btf, sk) : 0,
	       struct sock *sk)

SEC("tp/tcp/tcp_destroy_sock")
int destroy_tp(struct trace_event_raw_tcp_event_sk *ctx)
{
	return handle_destroy(false, ctx->skaddr);
}

/* Filled by map_owners (owners.bpf.c) just before the start-up walk. */
struct holders_map holders SEC(".maps");

/*
 * Give a row no task attributed its holder from the fd tables, if map_owners
 * found one (the map is empty but from the start-up walk to the next). The
 * inode must match: the socket the holder held may have closed since, and its
 * address gone to this one.
 */
static __always_inline void join_holder(struct sw_event *e)
{
	const struct sw_owner *o;

	if (e->sock.attrib != SW_ATTRIB_NONE && e->sock.attrib != SW_ATTRIB_LISTENER)
		return;
	o = bpf_map_lookup_elem(&holders, &e->skaddr);
	if (!o || o->ino != e->sock.ino)
		return;
	e->sock.tgid = o->tgid;
	e->sock.fd = o->fd;
	e->sock.attrib = SW_ATTRIB_FD_TABLE;
	__builtin_memcpy(e->sock.comm, o->comm, sizeof(e->sock.comm));
}

/*
 * iter/tcp walks every TCP socket of the reader's network namespace. One record
 * per full socket (TIME_WAIT and request socks are skipped), joined with what
 * the socks map knows, and at start with the fd tables (join_holder): the
 * start-up seed and the periodic reconciliation.
 */
SEC("iter/tcp")
int dump_tcp(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	struct counters c;
	struct tcp_sock *tp;
	struct sw_event *e;
	struct sw_sock *s;
	__u32 zero = 0;
	__u64 key;

	if (!skc)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	e = bpf_map_lookup_elem(&scratch, &zero);
	if (!e)
		return 0;
	key = (__u64)tp;
	s = bpf_map_lookup_elem(&socks, &key);
	read_counters(true, &c, (const struct sock *)tp);
	build_event(true, e, s, (const struct sock *)tp, &c, bpf_ktime_get_ns());
	e->kind = SW_KIND_SNAPSHOT;
	/* A listener that predates us is still plainly a listener. */
	if (e->state == TCP_LISTEN) {
		e->sock.role = SW_ROLE_LISTENER;
		e->listen_backlog = tp->inet_conn.icsk_inet.sk.sk_max_ack_backlog;
	}
	join_holder(e);
	bpf_seq_write(ctx->meta->seq, e, sizeof(*e));
	return 0;
}

/*
 * The reader's sweep of "held", run (bpf_iter_create) before each drain: send
 * the OPEN of every socket still held. The record is reserved before the
 * entry is taken, so a CLOSE that then fails to take it back (take_back)
 * reserves after it: user space always reads the OPEN first. An entry whose
 * socket is no longer tracked (evicted) goes without a record. The socket may
 * be closing on another CPU meanwhile: its memory stays a sock under RCU, and
 * whatever this OPEN reads, the CLOSE that follows it carries the truth.
 */
SEC("iter/bpf_map_elem")
int release_opens(struct bpf_iter__bpf_map_elem *ctx)
{
	const bool btf = false;	/* the key is a bare address */
	__u64 *addr = ctx->key;
	struct sw_event *e;
	struct sw_sock *s;
	__u64 key;

	if (!addr)
		return 0;
	key = *addr;
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e)
		return 0;	/* full: held until the next sweep */
	if (bpf_map_delete_elem(&held, &key) || !(s = bpf_map_lookup_elem(&socks, &key))) {
		bpf_ringbuf_discard(e, BPF_RB_NO_WAKEUP);
		return 0;
	}
	/*
	 * Stamped when it was announced (established), as if sent then: never
	 * later than its CLOSE, which the rescue ring's merge relies on.
	 */
	build_event(btf, e, s, (const struct sock *)key, NULL,
		    stamp_time(s, TCP_ESTABLISHED) ?: s->open_ns);
	e->kind = SW_KIND_OPEN;
	e->oldstate = e->state;
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
	return 0;
}
