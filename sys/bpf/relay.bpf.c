// SPDX-License-Identifier: GPL-2.0-only OR MIT
//
// portmux's in-kernel relay: an sk_skb stream verdict program on a sockhash.
// Each forwarded flow puts its two sockets in `socks` (keyed by socket
// cookie) and says in `links` which is whose peer and which slot of `stats`
// and `ctl` each direction uses. Bytes arriving on one socket go straight to
// its peer's send path (bpf_sk_redirect_hash), unless
//  - user space still has bytes of this direction to write itself
//    (stats.passed != ctl.written): then they queue on the socket for user
//    space too, so that nothing overtakes them;
//  - the direction used up its budget (ctl.limit): the kernel queues
//    redirected bytes without bound when the peer stops reading, so past the
//    limit bytes stay on the socket (bounded by its receive buffer: the TCP
//    window closes) until user space saw the peer take what was sent and
//    raised the limit;
//  - the peer is not in the map (yet, or any more).
// Built by sys/build.rs with clang; nothing here needs libbpf's headers.
#include <linux/bpf.h>
#include <linux/types.h>

#define SEC(name) __attribute__((section(name), used))
#define __uint(name, val) int(*name)[val]
#define __type(name, val) typeof(val) *name

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static long (*bpf_sk_redirect_hash)(struct __sk_buff *skb, void *map, void *key, __u64 flags) =
	(void *)BPF_FUNC_sk_redirect_hash;
static __u64 (*bpf_get_socket_cookie)(void *ctx) = (void *)BPF_FUNC_get_socket_cookie;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)BPF_FUNC_ktime_get_ns;

// Keep in step with sys/src/sockmap.rs (LAYOUT names this layout).
#define SLOTS 65536

struct link {
	__u64 peer; // the peer socket's cookie
	__u32 slot; // this direction's slot in stats and ctl
	__u32 pad;
};

struct stats { // written here only
	__u64 passed; // bytes left on the socket for user space
	__u64 redirected; // bytes sent to the peer in the kernel
	__u64 last; // bpf_ktime_get_ns() of the last byte (CLOCK_MONOTONIC)
};

struct ctl { // written by user space only
	__u64 written; // of the passed bytes, those user space has written to the peer
	__u64 limit; // redirect while redirected stays within this
};

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, SLOTS);
	__type(key, __u64);
	__type(value, __u32);
} socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SLOTS);
	__type(key, __u64);
	__type(value, struct link);
} links SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SLOTS);
	__type(key, __u32);
	__type(value, struct stats);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SLOTS);
	__type(key, __u32);
	__type(value, struct ctl);
} ctl SEC(".maps");

// Which processes use which pair of slots (slot of the client's direction,
// even -> pid): claimed with BPF_NOEXIST, so two processes sharing the maps
// during an upgrade never pick the same. Not used by the program.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} claims SEC(".maps");

SEC("sk_skb/stream_verdict")
int relay(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct link *l = bpf_map_lookup_elem(&links, &cookie);
	if (!l)
		return SK_PASS;
	__u32 slot = l->slot;
	struct stats *s = bpf_map_lookup_elem(&stats, &slot);
	struct ctl *c = bpf_map_lookup_elem(&ctl, &slot);
	if (!s || !c)
		return SK_PASS;
	__u64 len = skb->len;
	// A bare FIN comes as an empty skb; TCP has noted the end of file
	// already. Sent on, it would fail on the peer, shut down by then.
	if (len == 0)
		return SK_DROP;
	// One socket's verdicts run one at a time: plain updates suffice.
	s->last = bpf_ktime_get_ns();
	if (s->passed == c->written && s->redirected + len <= c->limit) {
		__u64 peer = l->peer;
		if (bpf_sk_redirect_hash(skb, &socks, &peer, 0) == SK_PASS) {
			s->redirected += len;
			return SK_PASS;
		}
	}
	s->passed += len;
	return SK_PASS;
}

char _license[] SEC("license") = "Dual MIT/GPL";
