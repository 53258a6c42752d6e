/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Records that cross from the kernel into user space. sockwatch/records.py
 * mirrors these structs and is checked against this object's BTF at load time
 * and in the tests, so the two sides cannot drift. Fixed-width fields, largest
 * first, explicit padding.
 */
#ifndef __SOCKWATCH_H
#define __SOCKWATCH_H

#define SW_COMM_LEN	16
/* TCP states are 1..13 (TCP_ESTABLISHED..TCP_BOUND_INACTIVE); slot 0 is unused. */
#define SW_TCP_STATES	14
/* Transition counters are indexed old * SW_TCP_STATES + new. */
#define SW_TRANSITIONS	(SW_TCP_STATES * SW_TCP_STATES)

enum sw_kind {
	SW_KIND_OPEN = 1,	/* a connection or listener became visible to its owner */
	SW_KIND_CLOSE = 2,	/* the socket reached TCP_CLOSE; carries final counters */
	SW_KIND_SNAPSHOT = 3,	/* one row of the iter/tcp dump (seed and reconcile) */
};

enum sw_role {
	SW_ROLE_UNKNOWN = 0,	/* predates sockwatch: seen only in a snapshot */
	SW_ROLE_CLIENT = 1,
	SW_ROLE_SERVER = 2,
	SW_ROLE_LISTENER = 3,
};

enum sw_result {
	SW_RESULT_OK = 0,
	SW_RESULT_REFUSED = 1,		/* RST answered our SYN (ECONNREFUSED) */
	SW_RESULT_TIMEOUT = 2,		/* retransmissions exhausted (ETIMEDOUT) */
	SW_RESULT_RESET = 3,		/* established, then reset by the peer */
	SW_RESULT_ABORTED = 4,		/* closed by its owner while still in SYN_SENT */
	SW_RESULT_UNREACHABLE = 5,	/* ICMP host/net unreachable during connect */
	SW_RESULT_ERROR = 6,		/* any other socket error */
};

/* How the owning task of a socket was learned. */
enum sw_attrib {
	SW_ATTRIB_NONE = 0,
	SW_ATTRIB_CONNECT = 1,		/* CLOSE->SYN_SENT or tcp_connect, in connect() */
	SW_ATTRIB_LISTEN = 2,		/* CLOSE->LISTEN, in listen() */
	SW_ATTRIB_ACCEPT = 3,		/* inet_csk_accept return or accept syscall exit */
	SW_ATTRIB_FIRST_IO = 4,		/* first send/recv by a task on an accepted socket */
	SW_ATTRIB_CLOSE = 5,		/* close()/shutdown() by a task on an accepted socket */
	SW_ATTRIB_LISTENER = 6,		/* never used by a task: owner of its listener */
	SW_ATTRIB_FD_TABLE = 7,		/* its holder in the fd tables, joined by the start-up walk */
};

/* Counters of everything the kernel side could not deliver or keep. */
enum sw_stat {
	/*
	 * Record lost: reservation failed in both ring buffers. Full, or (kernels
	 * with the resilient ring buffer lock, 6.15+) the lock timed out.
	 */
	SW_STAT_RINGBUF_FULL = 0,
	SW_STAT_SOCKS_FULL = 1,		/* socket not tracked: socks map update failed */
	SW_STAT_UNTRACKED_CLOSE = 2,	/* close of a socket with no socks entry */
	SW_STAT_SUPPRESSED_CLOSE = 3,	/* close record dropped on purpose (test switch) */
	SW_STAT_TOTALS_FULL = 4,	/* a total not counted: totals map full */
	SW_STAT_LATE_CLOSE = 5,		/* close seen only at destroy: the transition was missed */
	SW_STAT_STACK_HISTS_FULL = 6,	/* a stack latency not counted: stack_hists map full */
	SW_STAT_IFACES_FULL = 7,	/* a packet not counted: ifaces map full */
	SW_STAT_RESCUED = 8,		/* record saved by the rescue ring (not a loss) */
	SW_STAT_NESTED_RUNS = 9,	/* set_state events the kernel skipped, caught by the twin */
	/*
	 * Entries put in and taken out of the socks LRU map by us: the map evicts
	 * silently when full (even a little before: per-CPU free lists), so user
	 * space derives evictions as added - removed - entries present.
	 */
	SW_STAT_SOCKS_ADDED = 10,
	SW_STAT_SOCKS_REMOVED = 11,
	SW_STAT_MAX = 12,
};

#define SW_FLAG_OPEN_SENT	1	/* announced: an OPEN record was made for this socket */
/*
 * Its OPEN was held back (see "held" in lifecycle.bpf.c). In a CLOSE record:
 * the OPEN was never sent, and this record stands for both.
 */
#define SW_FLAG_OPEN_HELD	2

/*
 * Running totals kept in the kernel, so user space need not decode every
 * record to count it: one __u64 per key in the "totals" hash.
 */
enum sw_total {
	SW_TOTAL_CONNECT = 1,		/* outgoing connect finished; .result says how */
	SW_TOTAL_ACCEPT = 2,		/* accepted connection claimed by its owner; .port */
	SW_TOTAL_SENT_BYTES = 3,	/* payload of closed connections */
	SW_TOTAL_RECEIVED_BYTES = 4,
	SW_TOTAL_RETRANSMITS = 5,
};

struct sw_total_key {
	char comm[SW_COMM_LEN];		/* owning task; empty when unknown */
	__u16 port;			/* SW_TOTAL_ACCEPT: the listening port */
	__u8 what;			/* enum sw_total */
	__u8 result;			/* SW_TOTAL_CONNECT: enum sw_result */
	__u32 __pad;
};

/*
 * Records the ring buffer refused, by where they came from: lets a test (or a
 * container's owner) check "seen + lost = made" for its own namespace while
 * the rest of the host loses records too. The total is SW_STAT_RINGBUF_FULL.
 */
struct sw_lost_key {
	__u32 netns;			/* network namespace inode of the socket */
	__u8 kind;			/* enum sw_kind */
	__u8 role;			/* enum sw_role (0 when the socket was untracked) */
	__u16 __pad;
};

/*
 * One fd of one process that holds a TCP socket (bpf/owners.bpf.c): who holds
 * what, read instead of /proc/<pid>/fd, and the value of the holders map.
 */
struct sw_owner {
	__u64 skaddr;			/* kernel address of the sock: sw_event.skaddr */
	__u64 ino;			/* socket inode, as /proc/<pid>/fd shows socket:[ino] */
	__u32 tgid;
	__s32 fd;
	char comm[SW_COMM_LEN];		/* of the thread-group leader, as /proc/<pid>/stat shows */
};

/* Log2 histograms: slot k counts values <= 2^k microseconds; the last slot is the sum. */
#define SW_HIST_SLOTS		29	/* bounds 1 us .. 2^27 us (134 s), then one slot for larger */
#define SW_HIST_STRIDE		32	/* slots per histogram in the array, sum at [31] */
#define SW_HIST_SUM		31

enum sw_hist {
	SW_HIST_HANDSHAKE_CLIENT = 0,	/* SYN_SENT -> ESTABLISHED */
	SW_HIST_HANDSHAKE_SERVER = 1,	/* SYN_RECV -> ESTABLISHED */
	SW_HIST_LIFETIME_CLIENT = 2,	/* first state -> CLOSE */
	SW_HIST_LIFETIME_SERVER = 3,
	SW_HIST_ACCEPT_QUEUE = 4,	/* ESTABLISHED -> returned by accept() (see claim_accepted) */
	SW_HIST_MAX = 5,
};

/*
 * Per-layer stack latency (bpf/stack.bpf.c): one histogram per direction,
 * layer and interface, in the stack_hists per-CPU hash.
 */
enum sw_dir {
	SW_DIR_TX = 0,
	SW_DIR_RX = 1,
};

enum sw_layer {
	SW_LAYER_TCP = 0,	/* tx: write enters TCP -> leaves it; rx: TCP -> sk_data_ready */
	SW_LAYER_QDISC = 1,	/* tx: net_dev_queue -> net_dev_start_xmit */
	SW_LAYER_DRIVER = 2,	/* tx: start_xmit -> net_dev_xmit; rx: netif_receive_skb -> TCP */
	SW_LAYER_SOCKET = 3,	/* rx: sk_data_ready -> the application's read */
};

struct sw_hist_key {
	__u32 netns;			/* network namespace inode of the interface */
	__u32 ifindex;
	__u8 dir;			/* enum sw_dir */
	__u8 layer;			/* enum sw_layer */
	__u16 __pad;
};

/* Per-interface totals (ifaces per-CPU hash, keyed like sw_hist_key without dir/layer). */
struct sw_iface_key {
	__u32 netns;
	__u32 ifindex;
};

struct sw_iface {
	__u64 rx_packets;		/* skbs at netif_receive_skb, as the driver counts them */
	__u64 rx_bytes;			/* including the link-layer header, as the driver counts */
	__u64 tx_packets;		/* skbs the driver accepted (net_dev_xmit rc == 0) */
	__u64 tx_bytes;
	__u64 driver_errors;		/* net_dev_xmit with rc != 0 */
};

/*
 * Receive-queue wait summary per socket: saturating log4 counters. Slot k
 * counts waits of at most 4^k microseconds (slot 15: larger). Sixteen 16-bit
 * slots (32 bytes) span 1 us .. 268 s at a factor of 4: coarse, but the p50
 * it yields is clipped by the exact maximum, and a factor-4 bucket still tells
 * an idle reader (ms) from a busy one (us). When a slot would overflow every
 * slot is halved, which keeps the proportions (and so the median).
 */
#define SW_RCVQ_SLOTS		16

/*
 * What the stack programs keep per socket (sock_stack LRU hash, shared by the
 * lifecycle and stack objects: lifecycle summarises it into every record).
 * One sampled byte per direction is followed at a time, identified by its TCP
 * sequence number, so the wait measured is exact for that byte however many
 * writes or reads it spans.
 */
struct sw_stack_sock {
	__u64 rcvq_since_ns;		/* sampled received byte queued at; 0: none */
	__u64 rcvq_max_ns;		/* longest receive-queue wait seen */
	__u64 tx_since_ns;		/* sampled written byte entered TCP at; 0: none */
	__u32 rcvq_seq;			/* last byte queued at sampling: read once copied_seq passes it */
	__u32 tx_seq;			/* first byte of the sampled write: left TCP in the segment carrying it */
	__u32 rx_netns;			/* where the socket's data last arrived (netns, ifindex) */
	__u32 rx_ifindex;
	__u16 rcvq_slots[SW_RCVQ_SLOTS];
};

/*
 * When a socket first entered each state is kept as a 32-bit stamp relative
 * to its open_ns (0: never entered). The top two bits give the unit of the
 * rest: 1 ns for the first second (the stored value is the offset + 1), 1 us
 * up to 17 minutes, 1 ms up to 12 days, 1 s beyond. Handshakes keep their
 * nanoseconds, and every socket and record is 56 bytes smaller than with
 * 64-bit times. stamp_of()/stamp_time() in lifecycle.bpf.c and
 * records.state_stamp()/state_time() convert.
 */
#define SW_STAMP_SHIFT		30

/* What the kernel keeps per socket (value of the socks LRU map). */
struct sw_sock {
	/* Hot fields first: user space reads these from every record. */
	__u64 open_ns;			/* first state we saw, CLOCK_MONOTONIC */
	__u32 tgid;			/* owning process; 0 while unknown */
	__s32 fd;			/* -1 unless a syscall hook saw it */
	__u8 role;			/* enum sw_role */
	__u8 attrib;			/* enum sw_attrib */
	__u8 flags;			/* SW_FLAG_* */
	__u8 __pad;
	__u16 lport;			/* local port, kept: it is released before TCP_CLOSE */
	__u16 __pad2;
	__u64 ino;			/* socket inode, as /proc/<pid>/fd shows socket:[ino] */
	__u32 tid;
	__u32 uid;
	__u32 state_stamp[SW_TCP_STATES]; /* first entry into each state (see SW_STAMP_SHIFT) */
	char comm[SW_COMM_LEN];		/* captured at the event: short-lived tasks stay named */
	/*
	 * ESTABLISHED -> accept() returned; 0: unknown. Exact with the accept
	 * syscall hook (precise accept); otherwise measured at the first use by the
	 * owning task, an upper bound (accept() returns before its first use).
	 */
	__u64 accept_wait_ns;
};

/* One record: OPEN, CLOSE or SNAPSHOT. */
struct sw_event {
	/* Hot fields first: the table applies a record from these alone. */
	__u64 ts_ns;			/* when the record was made, CLOCK_MONOTONIC */
	__u64 skaddr;			/* kernel address of the sock: identity while it lives */
	__u8 kind;			/* enum sw_kind */
	__u8 result;			/* enum sw_result (CLOSE) */
	__u8 state;			/* state after the event */
	__u8 oldstate;			/* state before it (CLOSE: the last live state) */
	__u32 netns;			/* network namespace inode */
	struct sw_sock sock;
	/*
	 * The kernel's own counters, as tcp_info reports them. bytes_acked and
	 * bytes_received count sequence space, so they include SYN and FIN;
	 * payload is bytes_sent - bytes_retrans and bytes_received - peer_fin.
	 */
	__u64 bytes_acked;		/* tcpi_bytes_acked */
	__u64 bytes_received;		/* tcpi_bytes_received */
	__u64 bytes_sent;		/* tcpi_bytes_sent: payload incl. retransmissions */
	__u64 bytes_retrans;		/* tcpi_bytes_retrans */
	__u32 segs_out;
	__u32 segs_in;
	__u32 total_retrans;
	__u32 srtt_us;			/* smoothed RTT in microseconds */
	__u32 listen_backlog;		/* listeners: sk_max_ack_backlog */
	__u16 family;			/* AF_INET or AF_INET6 */
	__u16 sport;			/* host byte order */
	__u16 dport;			/* host byte order */
	__u8 peer_fin;			/* the peer's FIN arrived (SOCK_DONE) */
	__u8 __pad[5];
	__u8 saddr[16];			/* IPv4 in the first 4 bytes */
	__u8 daddr[16];
	/* Receive-queue wait of this socket (stack probes on; 0: unknown). */
	__u64 rcvq_wait_p50_ns;		/* median, from sw_stack_sock.rcvq_slots */
	__u64 rcvq_wait_max_ns;
};

#endif /* __SOCKWATCH_H */
