// SPDX-License-Identifier: GPL-2.0-or-later

/* CPestoSys: the few Linux/GNU system calls that Swift's Glibc module does not import.
 *
 * Swift's Glibc module is built without _GNU_SOURCE and has no <sys/epoll.h>, so setns(),
 * splice(), pipe2(), accept4(), sched_setaffinity() and posix_spawn's closefrom are invisible
 * to Swift. Defining _GNU_SOURCE in an imported
 * header breaks the module build ("'fds_bits' ... not present in definition of 'fd_set'"), so
 * this header declares plain wrappers and shim.c, which defines _GNU_SOURCE, implements them.
 * Every wrapper returns what the syscall returns and leaves errno set, as the syscall does. */
#ifndef CPESTOSYS_H
#define CPESTOSYS_H

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <spawn.h>

/* Values of GNU-only macros, checked against the real ones with _Static_assert in shim.c. */
enum {
    PESTO_CLONE_NEWNET = 0x40000000,
    PESTO_SPLICE_F_MOVE = 1,
    PESTO_SPLICE_F_NONBLOCK = 2,
    PESTO_O_CLOEXEC = 02000000,
    PESTO_O_NONBLOCK = 04000,
    PESTO_F_SETPIPE_SZ = 1031,
    PESTO_IP_BIND_ADDRESS_NO_PORT = 24,
    PESTO_IP_TRANSPARENT = 19,
    PESTO_IPV6_TRANSPARENT = 75,
    PESTO_SO_MARK = 36,
};

/* rtnetlink (linux/netlink.h, linux/rtnetlink.h, linux/fib_rules.h): the values pestod's
 * policy routing messages use (RouteNetlink.swift), checked in shim.c. */
enum {
    PESTO_AF_NETLINK = 16,
    PESTO_NETLINK_ROUTE = 0,
    PESTO_NLMSG_ERROR = 2,
    PESTO_NLM_F_REQUEST = 0x1,
    PESTO_NLM_F_ACK = 0x4,
    PESTO_NLM_F_REPLACE = 0x100,
    PESTO_NLM_F_EXCL = 0x200,
    PESTO_NLM_F_CREATE = 0x400,
    PESTO_RTM_NEWROUTE = 24,
    PESTO_RTM_DELROUTE = 25,
    PESTO_RTM_NEWRULE = 32,
    PESTO_RTM_DELRULE = 33,
    PESTO_RTN_LOCAL = 2,
    PESTO_RT_SCOPE_HOST = 254,
    PESTO_RTPROT_STATIC = 4,
    PESTO_RTA_DST = 1,
    PESTO_RTA_OIF = 4,
    PESTO_RTA_PREFSRC = 7,
    PESTO_RTA_TABLE = 15,
    PESTO_FR_ACT_TO_TBL = 1,
    PESTO_FRA_IIFNAME = 3,
    PESTO_FRA_PRIORITY = 6,
    PESTO_FRA_FWMARK = 10,
    PESTO_FRA_TABLE = 15,
    PESTO_FRA_FWMASK = 16,
    PESTO_FRA_IP_PROTO = 22,
};

/* setns(2): move the calling thread into the namespace behind fd. */
int pesto_setns(int fd, int nstype);

/* splice(2) between two fds without offsets (sockets and pipes). */
ssize_t pesto_splice(int fd_in, int fd_out, size_t len, unsigned int flags);

/* pipe2(2). */
int pesto_pipe2(int fds[_Nonnull 2], int flags);

/* accept4(2). */
int pesto_accept4(int fd, struct sockaddr *_Nullable addr, socklen_t *_Nullable len, int flags);

/* The most descriptors one pesto_send_fds call carries (below the kernel's SCM_MAX_FD, 253). */
enum { PESTO_MAX_FDS_PER_MESSAGE = 240 };

/* sendmsg(2) of `len` bytes with `nfds` descriptors (at most PESTO_MAX_FDS_PER_MESSAGE) in one
 * SCM_RIGHTS message, MSG_NOSIGNAL. Returns the bytes sent, or -1 with errno. */
ssize_t pesto_send_fds(int sock, const void *_Nonnull data, size_t len, const int *_Nullable fds, int nfds);

/* recvmsg(2) of at most `len` bytes and at most `maxfds` descriptors (MSG_CMSG_CLOEXEC);
 * `*nfds` receives how many arrived. Descriptors beyond `maxfds`, or a truncated control
 * message, make it fail with EMSGSIZE after closing every descriptor received. Returns the
 * bytes read (0 at end of file), or -1 with errno. */
ssize_t pesto_recv_fds(int sock, void *_Nonnull buf, size_t len, int *_Nonnull fds, int maxfds, int *_Nonnull nfds);

/* pidfd_open(2) and pidfd_getfd(2), through syscall(2) (glibc 2.36 declares them only in
 * <sys/pidfd.h>): a copy of another process's descriptor, for tests that look at pestod's
 * sockets directly. */
int pesto_pidfd_open(pid_t pid);
int pesto_pidfd_getfd(int pidfd, int targetfd);

/* Makes SIGTERM, SIGINT and SIGHUP write 8 bytes to `fd` (an eventfd) and unblocks them
 * (a parent may have started us with them blocked); ignores SIGPIPE, so a peer closing a
 * socket is an EPIPE error and never kills the process. Returns 0, or -1 with errno. */
int pesto_stop_on_signals(int fd);

/* Makes SIGUSR2 write 8 bytes to `fd` (an eventfd) and unblocks it: the request to upgrade
 * (pestod spawns the installed binary with --replace). Returns 0, or -1 with errno. */
int pesto_upgrade_on_signal(int fd);

/* posix_spawn_file_actions_addclosefrom_np(3): the spawned child closes every descriptor from
 * `from` up, so it inherits only what the file actions dup2 into place. */
int pesto_spawn_closefrom(posix_spawn_file_actions_t *_Nonnull actions, int from);

/* The lowest CPU this process may run on (sched_getaffinity(2)), or -1 with errno. */
int pesto_first_allowed_cpu(void);

/* Pins the calling process (and the children it spawns later) to `cpu` (sched_setaffinity(2));
 * 0, or -1 with errno. */
int pesto_pin_to_cpu(int cpu);

/* The local end of a UDP datagram: the address it was sent to and the interface it came in
 * on (IP_PKTINFO / IPV6_PKTINFO), or where a reply is to leave from. `family` is AF_INET
 * (`addr` holds 4 bytes, network order), AF_INET6 (16 bytes; an IPv4 datagram on a
 * dual-stack socket comes IPv4-mapped), or 0 when the kernel gave none. */
struct pesto_pktinfo {
    int family;
    int ifindex;
    unsigned char addr[16];
};

/* recvmsg(2) of one datagram into `buf`, its sender into `from`/`fromlen`, and its local end
 * into `local` (family 0 when the socket has no IP_PKTINFO/IPV6_RECVPKTINFO set). The control
 * buffer is on the stack: nothing is allocated. Returns what recvmsg returns. */
ssize_t pesto_recv_pktinfo(int fd, void *_Nullable buf, size_t len, int flags, struct sockaddr *_Nonnull from,
                           socklen_t *_Nonnull fromlen, struct pesto_pktinfo *_Nonnull local);

/* sendmsg(2) of one datagram to `to`, leaving from `local`'s address (and, for an IPv6
 * link-local address, its interface; otherwise the route's: a local client's datagram to an
 * address of eth0 "arrives on" eth0, yet its reply must go through lo)
 * (IP_PKTINFO on an AF_INET socket, IPV6_PKTINFO on an AF_INET6 one; `local` IPv4 is given
 * IPv4-mapped to an AF_INET6 socket). With `local` NULL or of family 0, a plain sendto.
 * Returns what sendmsg returns. */
ssize_t pesto_send_pktinfo(int fd, const void *_Nullable buf, size_t len, int flags, const struct sockaddr *_Nonnull to,
                           socklen_t tolen, int socket_family, const struct pesto_pktinfo *_Nullable local);

/* The most datagrams one pesto_recv_batch / pesto_send_batch call takes: their mmsghdr, iovec
 * and control arrays live on the shim's stack, sized for this many. */
#define PESTO_BATCH_MAX 64

/* One datagram of a batch. `data`/`capacity`: the caller's buffer; `length`: what was
 * received. `peer`/`peer_len`: the sender; `local`: where it arrived (family 0 without
 * IP_PKTINFO/IPV6_RECVPKTINFO). */
struct pesto_datagram {
    void *_Nullable data;
    size_t capacity;
    size_t length;
    struct sockaddr_storage peer;
    socklen_t peer_len;
    struct pesto_pktinfo local;
};

/* recvmmsg(2) of up to `n` (at most PESTO_BATCH_MAX) datagrams into `d`, each with its sender
 * and local end. Nothing is allocated. Returns how many were received (at least 1), or -1 with
 * errno (EAGAIN: none waiting). */
int pesto_recv_batch(int fd, struct pesto_datagram *_Nonnull d, unsigned n, int flags);

/* sendmmsg(2) of the first `length` bytes of each of `n` (at most PESTO_BATCH_MAX) datagrams to
 * the one destination `to`, each leaving from `local` as pesto_send_pktinfo does. Returns how
 * many were sent (the rest were not: the first of them failed, its error is lost), or -1 with
 * errno when the first one failed. */
int pesto_send_batch(int fd, const struct pesto_datagram *_Nonnull d, unsigned n, int flags, const struct sockaddr *_Nonnull to,
                     socklen_t tolen, int socket_family, const struct pesto_pktinfo *_Nullable local);

/* sendmmsg(2) of the first `length` bytes of each of `n` (at most PESTO_BATCH_MAX) datagrams,
 * each to its own `peer` (of `peer_len` bytes, of the socket's family) and leaving from its own
 * `local` as pesto_send_pktinfo does. Returns as pesto_send_batch. */
int pesto_send_batch_each(int fd, const struct pesto_datagram *_Nonnull d, unsigned n, int flags);

/* sendmmsg(2) on a connected socket of `n` (at most PESTO_BATCH_MAX) datagrams of `d`: the
 * first `length` bytes of d[index[0]], d[index[1]], ... in that order. Returns as
 * pesto_send_batch. */
int pesto_send_batch_connected(int fd, const struct pesto_datagram *_Nonnull d, const uint8_t *_Nonnull index, unsigned n,
                               int flags);

/* The symbolic name of an errno value ("EADDRINUSE"), or NULL when the C library knows none. */
const char *_Nullable pesto_errno_name(int err);

/* The current thread's errno (Swift's `errno` works too; this one is for C-side tests). */
int pesto_errno(void);

/* malloc_trim(3) (glibc): returns the heap's free memory to the system, after a large table
 * shrank. Returns 1 if memory was released, 0 if there was none to release. */
int pesto_malloc_trim(void);

#endif
