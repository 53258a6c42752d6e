// SPDX-License-Identifier: GPL-2.0
/*
 * Per-layer latency along the kernel's TCP path, per network interface, and
 * per-interface packet/byte/driver-error totals.
 *
 *   tx: write enters TCP ─tcp─► net_dev_queue ─qdisc─► net_dev_start_xmit
 *       ─driver─► net_dev_xmit
 *   rx: netif_receive_skb ─driver─► tcp_probe ─tcp─► sk_data_ready
 *       ─socket─► the application's read
 *
 * Everything is aggregated here: per-CPU log2 histograms keyed by (netns,
 * ifindex, direction, layer) and per-CPU interface totals. Nothing per packet
 * goes to user space. These hooks fire per packet, so each does a handful of
 * map operations and reads and no more; user space can leave the whole object
 * unloaded (--no-stack-latency).
 *
 * How one piece of data is followed between two points, cheapest first:
 * - same CPU, same call chain (start_xmit -> xmit, tcp_probe -> data_ready):
 *   a per-CPU slot holding the skb or sock and its time;
 * - across CPUs or deferred work (a qdisc dequeued later or elsewhere; a
 *   packet parked in the socket backlog while its owner holds the lock): an
 *   LRU hash keyed by the skb's address, for the packets whose time is
 *   sampled (see SAMPLE_EVERY), deleted when matched. The kernel stamps no usable time of its own there: skb->tstamp
 *   is set on receive only while some socket asks for timestamps, and on
 *   transmit holds TCP's departure time, in the future under pacing;
 * - across system calls (write -> segment sent, queued -> read): one sampled
 *   byte per socket and direction, named by its TCP sequence number, in the
 *   sock_stack map. The wait is exact for that byte however writes and reads
 *   split the stream; a new sample starts once the last one is measured.
 *
 * Hooks come in tp_btf / raw_tp / classic tracepoint variants around one
 * handler each, as in lifecycle.bpf.c; the loader keeps the best that loads.
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

#define AF_INET		2
#define AF_INET6	10
#define IPPROTO_TCP	6
#define ETH_P_IP	0x0800
#define ETH_P_IPV6	0x86DD
#define MAC_UNSET	0xffff

char LICENSE[] SEC("license") = "GPL";

/* One histogram per (netns, ifindex, direction, layer): SW_HIST_STRIDE __u64. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);	/* 6 layers: ~170 interfaces */
	__type(key, struct sw_hist_key);
	__type(value, __u64[SW_HIST_STRIDE]);
} stack_hists SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 1024);
	__type(key, struct sw_iface_key);
	__type(value, struct sw_iface);
} ifaces SEC(".maps");

/*
 * Hand-overs between two hooks, and what they cost. On the development VM a
 * tracepoint program costs ~55 ns to run at all, a clock read ~45 ns, a hash
 * lookup 25-45 ns, and an LRU hash update plus delete ~350 ns; a round trip
 * of small messages crosses 16 of these hooks.
 *
 * - Timing is sampled: 1 packet in SAMPLE_EVERY (a per-CPU counter, blind to
 *   the packet's fate) is timed through its tx (qdisc, driver) or rx (driver,
 *   tcp) layers and counts SAMPLE_EVERY times in the histograms: unbiased
 *   estimates, with counts that still estimate packets. Other packets cost a
 *   slot write and a compare per hook; the per-interface totals count every
 *   packet exactly.
 * - The common hand-over is synchronous: the next hook runs on the same CPU
 *   before the previous one fires again (a noqueue device or an idle qdisc
 *   transmits at once; a segment goes from the driver to TCP in one softirq),
 *   so a per-CPU slot pairs them for the price of a compare.
 * - Otherwise (a qdisc that queued the packet; a segment parked in the socket
 *   backlog while its owner holds the lock) a sampled packet is found by its
 *   address in an LRU hash, written only for sampled packets, and on tx only
 *   when the device has a queue at all.
 */
#define SAMPLE_EVERY	8

enum mark_flags {
	MARK_TIMED = 1,		/* sampled: ns is set */
	MARK_HASHED = 2,	/* also in the hash, to be deleted when matched */
};

struct mark {
	__u64 key;		/* the skb (or, tcp -> data ready, the sock) */
	__u64 ns;
	__u32 netns;
	__u32 ifindex;
	__u32 flags;		/* enum mark_flags */
	__u32 __pad;
};

struct cpu_slot {
	struct mark queued;	/* net_dev_queue -> net_dev_start_xmit */
	struct mark xmit;	/* net_dev_start_xmit -> net_dev_xmit */
	struct mark received;	/* netif_receive_skb -> tcp_probe */
	struct mark tcp;	/* tcp_probe -> sk_data_ready */
	__u32 tx_tick;		/* sampling counters */
	__u32 rx_tick;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct cpu_slot);
} cpu_slots SEC(".maps");

/* net_dev_queue time of the sampled skbs, until net_dev_start_xmit takes them. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);	/* per-CPU LRU lists: no shared lock */
	__uint(max_entries, 8192);	/* sampled skbs waiting in all qdiscs at once */
	__type(key, __u64);		/* struct sk_buff * */
	__type(value, __u64);
} tx_queued SEC(".maps");

/* Where and when each sampled TCP skb entered the stack, until TCP takes it. */
struct rx_mark {
	__u64 ns;
	__u32 netns;
	__u32 ifindex;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(map_flags, BPF_F_NO_COMMON_LRU);
	__uint(max_entries, 4096);	/* sampled skbs between the driver and TCP */
	__type(key, __u64);		/* struct sk_buff * */
	__type(value, struct rx_mark);
} rx_received SEC(".maps");

static const __u64 zero_hist[SW_HIST_STRIDE];
static const struct sw_iface zero_iface;
static const struct sw_stack_sock zero_sock;

static __always_inline struct cpu_slot *cpu_slot(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&cpu_slots, &zero);
}

/* Count latency @ns @weight times in its (interface, direction, layer) histogram. */
static __always_inline void observe(__u32 netns, __u32 ifindex, __u8 dir, __u8 layer,
				    __u64 ns, __u32 weight)
{
	struct sw_hist_key key = { .netns = netns, .ifindex = ifindex, .dir = dir,
				   .layer = layer };
	__u64 *hist = lookup_or_init(&stack_hists, &key, zero_hist);

	if (hist)
		hist_add(hist, ns, weight);
	else
		percpu_inc(&stats, SW_STAT_STACK_HISTS_FULL);
}

static __always_inline struct sw_iface *iface(__u32 netns, __u32 ifindex)
{
	struct sw_iface_key key = { .netns = netns, .ifindex = ifindex };
	struct sw_iface *t = lookup_or_init(&ifaces, &key, &zero_iface);

	if (!t)
		percpu_inc(&stats, SW_STAT_IFACES_FULL);
	return t;
}

static __always_inline __u32 dev_netns(const bool btf, const struct net_device *dev)
{
	const struct net *net = RD(dev, nd_net.net);

	return RD(net, ns.inum);
}

static __always_inline bool is_tcp(const bool btf, const struct sock *sk)
{
	__u16 family = RD(sk, __sk_common.skc_family);

	return (family == AF_INET || family == AF_INET6) && sk_protocol(btf, sk) == IPPROTO_TCP;
}

/* (s32)(a - b) >= 0: sequence a is at or after b, modulo 2^32 as TCP compares. */
static __always_inline bool seq_reached(__u32 a, __u32 b)
{
	return (__s32)(a - b) >= 0;
}

/* ---- tx tcp: the application's write enters TCP ... ------------------------- */

/*
 * tcp:tcp_sendmsg_locked fires in tcp_sendmsg_locked() (write, send, sendmsg,
 * sendfile/splice) each time TCP is about to copy more of the caller's data
 * into its write queue, before it copies: write_seq is then the sequence
 * number of the first byte this write adds. The earliest point where data
 * "enters TCP" that has a tracepoint (v6.10+; the loader reports the layer as
 * unavailable on older kernels). Its classic tracepoint has no sock address,
 * so it has tp_btf and raw_tp variants only.
 */
static __always_inline int handle_sendmsg(const bool btf, const struct sock *sk)
{
	__u64 key = (__u64)sk;
	struct sw_stack_sock *q = lookup_or_init(&sock_stack, &key, &zero_sock);
	const struct tcp_sock *tp;

	if (!q || q->tx_since_ns)
		return 0;
	tp = tcp_sk_of(btf, sk);
	if (!tp)
		return 0;
	q->tx_seq = RD(tp, write_seq);
	q->tx_since_ns = bpf_ktime_get_ns();
	return 0;
}

TP_BTF_AND_RAW(sendmsg, tcp_sendmsg_locked, handle_sendmsg(btf, sk), const struct sock *sk)

/* ---- ... leaves TCP (and IP); tx qdisc starts ------------------------------- */

/*
 * Does this transmitted skb carry sequence number @seq? Read from the TCP
 * header in the packet: TCP's own control block (seq, end_seq) is wiped
 * before the skb goes down to IP.
 */
static __always_inline bool carries(const bool btf, const struct sk_buff *skb, __u32 seq)
{
	unsigned char *head = RD(skb, head);
	unsigned char *data = RD(skb, data);
	__u16 th_off = RD(skb, transport_header);
	__u32 len = RD(skb, len);
	__u8 th[13];
	__u32 start, hdrs;

	if (bpf_probe_read_kernel(th, sizeof(th), head + th_off))
		return false;
	start = bpf_ntohl(*(__u32 *)&th[4]);
	hdrs = (head + th_off - data) + (th[12] >> 4) * 4;
	return len > hdrs && seq_reached(start + (len - hdrs) - 1, seq);
}

/*
 * net:net_dev_queue fires in __dev_queue_xmit() for every packet handed to a
 * device, before its qdisc (or none: noqueue devices transmit at once). The
 * point where a segment has left TCP and IP; the IP output between the two is
 * synchronous and a microsecond or so, so this is the end of the tx tcp layer
 * too (the first point after tcp_transmit_skb with the sock: skb->sk). The
 * queue time is handed to net_dev_start_xmit.
 */
static __always_inline int handle_dev_queue(const bool btf, struct sk_buff *skb)
{
	const struct net_device *dev = RD(skb, dev);
	const struct sock *sk = RD(skb, sk);
	struct cpu_slot *slot = cpu_slot();
	__u64 key = (__u64)skb, now = 0;
	struct sw_stack_sock *q;
	struct mark *m;

	if (!slot)
		return 0;
	m = &slot->queued;
	m->key = key;
	m->flags = 0;
	if (slot->tx_tick++ % SAMPLE_EVERY == 0) {
		const struct Qdisc *qdisc = RD(dev, qdisc);

		now = bpf_ktime_get_ns();
		m->ns = now;
		m->flags = MARK_TIMED;
		/* noqueue (veth, loopback, tunnels) has no enqueue: nothing is deferred */
		if (RD(qdisc, enqueue) && !bpf_map_update_elem(&tx_queued, &key, &now, BPF_ANY))
			m->flags |= MARK_HASHED;
	}
	if (!sk)
		return 0;
	key = (__u64)sk;
	q = bpf_map_lookup_elem(&sock_stack, &key);
	if (q && q->tx_since_ns && carries(btf, skb, q->tx_seq)) {
		if (!now)
			now = bpf_ktime_get_ns();
		observe(dev_netns(btf, dev), RD(dev, ifindex), SW_DIR_TX, SW_LAYER_TCP,
			now - q->tx_since_ns, 1);
		q->tx_since_ns = 0;
	}
	return 0;
}

TP_BTF_AND_RAW(dev_queue, net_dev_queue, handle_dev_queue(btf, skb), struct sk_buff *skb)

SEC("tp/net/net_dev_queue")
int dev_queue_tp(struct trace_event_raw_net_dev_template *ctx)
{
	return handle_dev_queue(false, ctx->skbaddr);
}

/* ---- tx qdisc ends, tx driver starts ---------------------------------------- */

/*
 * net:net_dev_start_xmit fires in xmit_one() just before the driver's
 * ndo_start_xmit, after the qdisc released the skb: at once, on the same CPU
 * (the slot), or later, perhaps elsewhere (the sampled hash). A GSO skb that
 * had to be segmented in software reaches here as new skbs: those show no
 * qdisc wait.
 */
static __always_inline int handle_start_xmit(const bool btf, const struct sk_buff *skb,
					     const struct net_device *dev)
{
	struct cpu_slot *slot = cpu_slot();
	__u64 key = (__u64)skb, queued;
	struct mark *x, *m;
	__u64 *found;

	if (!slot)
		return 0;
	m = &slot->queued;
	x = &slot->xmit;
	x->key = key;
	x->flags = 0;
	x->netns = dev_netns(btf, dev);
	x->ifindex = RD(dev, ifindex);
	if (m->key == key) {
		m->key = 0;
		if (!(m->flags & MARK_TIMED))
			return 0;
		if (m->flags & MARK_HASHED)
			bpf_map_delete_elem(&tx_queued, &key);
		queued = m->ns;
	} else {
		found = bpf_map_lookup_elem(&tx_queued, &key);
		if (!found)
			return 0;
		queued = *found;
		bpf_map_delete_elem(&tx_queued, &key);
	}
	x->ns = bpf_ktime_get_ns();
	x->flags = MARK_TIMED;
	if (x->ns >= queued)
		observe(x->netns, x->ifindex, SW_DIR_TX, SW_LAYER_QDISC, x->ns - queued,
			SAMPLE_EVERY);
	return 0;
}

TP_BTF_AND_RAW(start_xmit, net_dev_start_xmit, handle_start_xmit(btf, skb, dev),
	       const struct sk_buff *skb, const struct net_device *dev)

SEC("tp/net/net_dev_start_xmit")
int start_xmit_tp(struct trace_event_raw_net_dev_start_xmit *ctx)
{
	const struct sk_buff *skb = ctx->skbaddr;

	return handle_start_xmit(false, skb, BPF_CORE_READ(skb, dev));
}

/*
 * net:net_dev_xmit fires in xmit_one() right after ndo_start_xmit returns, on
 * the same CPU (so the per-CPU slot pairs the two), with the driver's return
 * code and the length it was given. The skb may be freed by now: only its
 * address is compared, and the device comes from the slot. A nested transmit
 * (a tunnel device's xmit calling another device's) overwrites the slot: the
 * outer one then goes unmeasured and uncounted.
 */
static __always_inline int handle_xmit(const struct sk_buff *skb, int rc, __u32 len)
{
	struct cpu_slot *slot = cpu_slot();
	struct sw_iface *t;
	struct mark *x;

	if (!slot || slot->xmit.key != (__u64)skb)
		return 0;
	x = &slot->xmit;
	x->key = 0;
	if (x->flags & MARK_TIMED)
		observe(x->netns, x->ifindex, SW_DIR_TX, SW_LAYER_DRIVER, bpf_ktime_get_ns() - x->ns,
			SAMPLE_EVERY);
	t = iface(x->netns, x->ifindex);
	if (!t)
		return 0;
	if (rc) {
		t->driver_errors++;
	} else {
		t->tx_packets++;
		t->tx_bytes += len;
	}
	return 0;
}

TP_BTF_AND_RAW(xmit, net_dev_xmit, handle_xmit(skb, rc, len),
	       struct sk_buff *skb, int rc, struct net_device *dev, unsigned int len)

SEC("tp/net/net_dev_xmit")
int xmit_tp(struct trace_event_raw_net_dev_xmit *ctx)
{
	return handle_xmit(ctx->skbaddr, ctx->rc, ctx->len);
}

/* ---- rx driver: the driver hands the packet to the stack ... --------------- */

/* The IP protocol of a received packet (skb->data is at the network header). */
static __always_inline __u8 ip_proto(const bool btf, const struct sk_buff *skb)
{
	__u16 proto = bpf_ntohs(RD(skb, protocol));
	unsigned char *data = RD(skb, data);
	__u8 p = 0;

	if (proto == ETH_P_IP)
		bpf_probe_read_kernel(&p, 1, data + 9);		/* iphdr.protocol */
	else if (proto == ETH_P_IPV6)
		bpf_probe_read_kernel(&p, 1, data + 6);		/* ipv6hdr.nexthdr */
	return p;
}

/*
 * net:netif_receive_skb fires in __netif_receive_skb_core() for every packet a
 * driver delivers to the stack, whichever way it came (NAPI poll, GRO flush,
 * netif_rx backlog as veth and loopback use): one hook for all drivers, after
 * GRO merged what it could (napi_gro_receive_entry fires earlier, per wire
 * packet, but the packets it sees are merged away). Counts the interface's
 * received packets and bytes as its driver does (link-layer header
 * included), and hands the packet's arrival to tcp_probe.
 */
static __always_inline int handle_receive(const bool btf, const struct sk_buff *skb)
{
	const struct net_device *dev = RD(skb, dev);
	struct cpu_slot *slot = cpu_slot();
	__u16 mac = RD(skb, mac_header);
	__u32 len = RD(skb, len);
	__u64 key = (__u64)skb;
	struct sw_iface *t;
	struct mark *r;

	if (!slot)
		return 0;
	r = &slot->received;
	r->key = key;
	r->flags = 0;
	r->netns = dev_netns(btf, dev);
	r->ifindex = RD(dev, ifindex);
	if (slot->rx_tick++ % SAMPLE_EVERY == 0 && ip_proto(btf, skb) == IPPROTO_TCP) {
		struct rx_mark mark = { .ns = bpf_ktime_get_ns(), .netns = r->netns,
					.ifindex = r->ifindex };

		r->ns = mark.ns;
		r->flags = MARK_TIMED;
		/* any socket may be owned by its task when this arrives: keep it by address */
		if (!bpf_map_update_elem(&rx_received, &key, &mark, BPF_ANY))
			r->flags |= MARK_HASHED;
	}
	t = iface(r->netns, r->ifindex);
	if (t) {
		if (mac != MAC_UNSET)
			len += RD(skb, data) - (RD(skb, head) + mac);
		t->rx_packets++;
		t->rx_bytes += len;
	}
	return 0;
}

TP_BTF_AND_RAW(receive, netif_receive_skb, handle_receive(btf, skb), struct sk_buff *skb)

SEC("tp/net/netif_receive_skb")
int receive_tp(struct trace_event_raw_net_dev_template *ctx)
{
	return handle_receive(false, ctx->skbaddr);
}

/* ---- ... -> TCP; rx tcp starts --------------------------------------------- */

/*
 * tcp:tcp_probe fires at the top of tcp_rcv_established(), where TCP starts
 * processing a segment of an established connection: in softirq, or later in
 * the owner's release_sock() when the segment waited in the socket backlog
 * (that wait is part of the driver -> TCP layer: the sampled hash finds those).
 * Segments of other states (handshake) are not followed; sampled ones age out
 * of the LRU.
 */
static __always_inline int handle_tcp_rcv(const bool btf, const struct sock *sk,
					  const struct sk_buff *skb)
{
	struct cpu_slot *slot = cpu_slot();
	__u64 key = (__u64)skb, arrived;
	struct rx_mark *found;
	struct mark *r, *t;

	if (!slot)
		return 0;
	r = &slot->received;
	t = &slot->tcp;
	t->key = (__u64)sk;
	t->flags = 0;
	if (r->key == key) {
		r->key = 0;
		t->netns = r->netns;
		t->ifindex = r->ifindex;
		if (!(r->flags & MARK_TIMED))
			return 0;
		if (r->flags & MARK_HASHED)
			bpf_map_delete_elem(&rx_received, &key);
		arrived = r->ns;
	} else {
		found = bpf_map_lookup_elem(&rx_received, &key);
		if (!found) {
			t->netns = sock_netns(btf, sk);
			t->ifindex = RD(skb, skb_iif);
			return 0;
		}
		t->netns = found->netns;
		t->ifindex = found->ifindex;
		arrived = found->ns;
		bpf_map_delete_elem(&rx_received, &key);
	}
	t->ns = bpf_ktime_get_ns();
	t->flags = MARK_TIMED;
	if (t->ns >= arrived)
		observe(t->netns, t->ifindex, SW_DIR_RX, SW_LAYER_DRIVER, t->ns - arrived,
			SAMPLE_EVERY);
	return 0;
}

TP_BTF_AND_RAW(tcp_rcv, tcp_probe, handle_tcp_rcv(btf, sk, skb),
	       struct sock *sk, const struct sk_buff *skb)

SEC("tp/tcp/tcp_probe")
int tcp_rcv_tp(struct trace_event_raw_tcp_probe *ctx)
{
	return handle_tcp_rcv(false, ctx->skaddr, ctx->skbaddr);
}

/* ---- TCP -> socket receive queue; rx socket starts -------------------------- */

/*
 * sock:sk_data_ready fires when a socket is told data is readable: for TCP,
 * tcp_data_ready() right after a segment's payload was queued (same CPU and
 * call chain as its tcp_probe, so the per-CPU slot pairs them). rcv_nxt then
 * ends the data just queued: its last byte becomes the socket's receive
 * sample unless one is pending.
 */
static __always_inline int handle_data_ready(const bool btf, const struct sock *sk)
{
	struct cpu_slot *slot = cpu_slot();
	__u64 key = (__u64)sk, now = 0;
	const struct tcp_sock *tp;
	struct sw_stack_sock *q;
	bool from_tcp;

	if (!slot)
		return 0;
	from_tcp = slot->tcp.key == key;
	if (from_tcp) {
		slot->tcp.key = 0;
		if (slot->tcp.flags & MARK_TIMED) {
			now = bpf_ktime_get_ns();
			observe(slot->tcp.netns, slot->tcp.ifindex, SW_DIR_RX, SW_LAYER_TCP,
				now - slot->tcp.ns, SAMPLE_EVERY);
		}
	} else if (!is_tcp(btf, sk)) {
		return 0;
	}
	q = lookup_or_init(&sock_stack, &key, &zero_sock);
	if (!q || q->rcvq_since_ns)
		return 0;
	if (from_tcp) {
		q->rx_netns = slot->tcp.netns;
		q->rx_ifindex = slot->tcp.ifindex;
	} else if (!q->rx_ifindex) {
		return 0;	/* no interface known yet: the next data starts the sample */
	}
	tp = tcp_sk_of(btf, sk);
	if (!tp)
		return 0;
	q->rcvq_seq = RD(tp, rcv_nxt) - 1;
	q->rcvq_since_ns = now ?: bpf_ktime_get_ns();
	return 0;
}

TP_BTF_AND_RAW(data_ready, sk_data_ready, handle_data_ready(btf, sk), const struct sock *sk)

SEC("tp/sock/sk_data_ready")
int data_ready_tp(struct trace_event_raw_sk_data_ready *ctx)
{
	return ctx->protocol == IPPROTO_TCP ? handle_data_ready(false, ctx->skaddr) : 0;
}

/* ---- the application's read: rx socket ends --------------------------------- */

/* Count @ns in the socket's saturating log4 slots (see SW_RCVQ_SLOTS). */
static __always_inline void rcvq_count(struct sw_stack_sock *q, __u64 ns)
{
	__u64 us = (ns + 999) / 1000;
	__u32 k = us <= 1 ? 0 : (log2_u64(us - 1) + 2) / 2;	/* ceil(log4(us)) */
	int i;

	if (ns > q->rcvq_max_ns)
		q->rcvq_max_ns = ns;
	k = k < SW_RCVQ_SLOTS ? k : SW_RCVQ_SLOTS - 1;
	barrier_var(k);
	if (k >= SW_RCVQ_SLOTS)
		return;
	if (q->rcvq_slots[k] == 0xffff) {
#pragma unroll
		for (i = 0; i < SW_RCVQ_SLOTS; i++)
			q->rcvq_slots[i] >>= 1;
	}
	q->rcvq_slots[k]++;
}

/*
 * sock:sock_recv_length fires at the end of every recvmsg on a socket, in the
 * reading task, with what it returned. Once copied_seq (what the application
 * has read) reaches the sampled byte, that byte waited from sk_data_ready to
 * now. MSG_PEEK does not move copied_seq, so a peek measures nothing.
 */
static __always_inline int handle_recv(const bool btf, const struct sock *sk, int ret)
{
	const struct tcp_sock *tp;
	__u64 key = (__u64)sk;
	struct sw_stack_sock *q;
	__u64 wait;

	if (ret <= 0)
		return 0;
	q = bpf_map_lookup_elem(&sock_stack, &key);
	if (!q || !q->rcvq_since_ns)
		return 0;
	tp = tcp_sk_of(btf, sk);
	if (!tp || !seq_reached(RD(tp, copied_seq), q->rcvq_seq + 1))
		return 0;
	wait = bpf_ktime_get_ns() - q->rcvq_since_ns;
	q->rcvq_since_ns = 0;
	rcvq_count(q, wait);
	observe(q->rx_netns, q->rx_ifindex, SW_DIR_RX, SW_LAYER_SOCKET, wait, 1);
	return 0;
}

TP_BTF_AND_RAW(read, sock_recv_length, handle_recv(btf, sk, ret),
	       struct sock *sk, int ret, int flags)

SEC("tp/sock/sock_recv_length")
int read_tp(struct trace_event_raw_sock_msg_length *ctx)
{
	return ctx->protocol == IPPROTO_TCP ? handle_recv(false, ctx->sk, ctx->ret) : 0;
}
