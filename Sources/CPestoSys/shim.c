// SPDX-License-Identifier: GPL-2.0-or-later

/* CPestoSys shim: GNU-only calls behind plain wrappers. See include/CPestoSys.h for why. */
#define _GNU_SOURCE 1
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <pthread.h>
#include <malloc.h>
#include <netinet/in.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/fib_rules.h>
#include "CPestoSys.h"

_Static_assert(PESTO_CLONE_NEWNET == CLONE_NEWNET, "CLONE_NEWNET");
_Static_assert(PESTO_SPLICE_F_MOVE == SPLICE_F_MOVE, "SPLICE_F_MOVE");
_Static_assert(PESTO_SPLICE_F_NONBLOCK == SPLICE_F_NONBLOCK, "SPLICE_F_NONBLOCK");
_Static_assert(PESTO_O_CLOEXEC == O_CLOEXEC, "O_CLOEXEC");
_Static_assert(PESTO_O_NONBLOCK == O_NONBLOCK, "O_NONBLOCK");
_Static_assert(PESTO_F_SETPIPE_SZ == F_SETPIPE_SZ, "F_SETPIPE_SZ");
_Static_assert(PESTO_IP_BIND_ADDRESS_NO_PORT == IP_BIND_ADDRESS_NO_PORT, "IP_BIND_ADDRESS_NO_PORT");
_Static_assert(PESTO_IP_TRANSPARENT == IP_TRANSPARENT, "IP_TRANSPARENT");
_Static_assert(PESTO_IPV6_TRANSPARENT == IPV6_TRANSPARENT, "IPV6_TRANSPARENT");
_Static_assert(PESTO_SO_MARK == SO_MARK, "SO_MARK");
_Static_assert(PESTO_AF_NETLINK == AF_NETLINK, "AF_NETLINK");
_Static_assert(PESTO_NETLINK_ROUTE == NETLINK_ROUTE, "NETLINK_ROUTE");
_Static_assert(PESTO_NLMSG_ERROR == NLMSG_ERROR, "NLMSG_ERROR");
_Static_assert(PESTO_NLM_F_REQUEST == NLM_F_REQUEST, "NLM_F_REQUEST");
_Static_assert(PESTO_NLM_F_ACK == NLM_F_ACK, "NLM_F_ACK");
_Static_assert(PESTO_NLM_F_REPLACE == NLM_F_REPLACE, "NLM_F_REPLACE");
_Static_assert(PESTO_NLM_F_EXCL == NLM_F_EXCL, "NLM_F_EXCL");
_Static_assert(PESTO_NLM_F_CREATE == NLM_F_CREATE, "NLM_F_CREATE");
_Static_assert(PESTO_RTM_NEWROUTE == RTM_NEWROUTE, "RTM_NEWROUTE");
_Static_assert(PESTO_RTM_DELROUTE == RTM_DELROUTE, "RTM_DELROUTE");
_Static_assert(PESTO_RTM_NEWRULE == RTM_NEWRULE, "RTM_NEWRULE");
_Static_assert(PESTO_RTM_DELRULE == RTM_DELRULE, "RTM_DELRULE");
_Static_assert(PESTO_RTN_LOCAL == RTN_LOCAL, "RTN_LOCAL");
_Static_assert(PESTO_RT_SCOPE_HOST == RT_SCOPE_HOST, "RT_SCOPE_HOST");
_Static_assert(PESTO_RTPROT_STATIC == RTPROT_STATIC, "RTPROT_STATIC");
_Static_assert(PESTO_RTA_DST == RTA_DST, "RTA_DST");
_Static_assert(PESTO_RTA_OIF == RTA_OIF, "RTA_OIF");
_Static_assert(PESTO_RTA_PREFSRC == RTA_PREFSRC, "RTA_PREFSRC");
_Static_assert(PESTO_RTA_TABLE == RTA_TABLE, "RTA_TABLE");
_Static_assert(PESTO_FR_ACT_TO_TBL == FR_ACT_TO_TBL, "FR_ACT_TO_TBL");
_Static_assert(PESTO_FRA_IIFNAME == FRA_IIFNAME, "FRA_IIFNAME");
_Static_assert(PESTO_FRA_PRIORITY == FRA_PRIORITY, "FRA_PRIORITY");
_Static_assert(PESTO_FRA_FWMARK == FRA_FWMARK, "FRA_FWMARK");
_Static_assert(PESTO_FRA_TABLE == FRA_TABLE, "FRA_TABLE");
_Static_assert(PESTO_FRA_FWMASK == FRA_FWMASK, "FRA_FWMASK");
_Static_assert(PESTO_FRA_IP_PROTO == FRA_IP_PROTO, "FRA_IP_PROTO");
_Static_assert(sizeof(struct nlmsghdr) == 16, "nlmsghdr");
_Static_assert(sizeof(struct rtmsg) == 12, "rtmsg");
_Static_assert(sizeof(struct fib_rule_hdr) == 12, "fib_rule_hdr");
_Static_assert(sizeof(struct nlmsgerr) >= 20, "nlmsgerr");

int pesto_setns(int fd, int nstype) { return setns(fd, nstype); }

ssize_t pesto_splice(int fd_in, int fd_out, size_t len, unsigned int flags)
{
    return splice(fd_in, NULL, fd_out, NULL, len, flags);
}

int pesto_pipe2(int fds[2], int flags) { return pipe2(fds, flags); }

int pesto_accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags)
{
    return accept4(fd, addr, len, flags);
}

/* Puts one control message (level, type, `len` bytes of `data`) in `msg`, using `buf` (zeroed,
 * aligned, at least CMSG_SPACE(len) bytes) as its control buffer. */
static void put_cmsg(struct msghdr *msg, void *buf, int level, int type, const void *data, size_t len)
{
    struct cmsghdr *c;

    msg->msg_control = buf;
    msg->msg_controllen = CMSG_SPACE(len);
    c = CMSG_FIRSTHDR(msg);
    c->cmsg_level = level;
    c->cmsg_type = type;
    c->cmsg_len = CMSG_LEN(len);
    memcpy(CMSG_DATA(c), data, len);
}

ssize_t pesto_send_fds(int sock, const void *data, size_t len, const int *fds, int nfds)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * PESTO_MAX_FDS_PER_MESSAGE)];
        struct cmsghdr align;
    } control;
    struct iovec iov = { .iov_base = (void *)data, .iov_len = len };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };

    if (nfds < 0 || nfds > PESTO_MAX_FDS_PER_MESSAGE) {
        errno = EINVAL;
        return -1;
    }
    if (nfds > 0) {
        memset(&control, 0, sizeof(control));
        put_cmsg(&msg, control.buf, SOL_SOCKET, SCM_RIGHTS, fds, sizeof(int) * (size_t)nfds);
    }
    return sendmsg(sock, &msg, MSG_NOSIGNAL);
}

ssize_t pesto_recv_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds)
{
    union {
        char buf[CMSG_SPACE(sizeof(int) * 253)];
        struct cmsghdr align;
    } control;
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
                          .msg_control = control.buf, .msg_controllen = sizeof(control.buf) };
    struct cmsghdr *c;
    ssize_t n;
    int bad = 0;

    *nfds = 0;
    n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0)
        return -1;
    for (c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        int count, i;

        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (i = 0; i < count; i++) {
            int fd;

            memcpy(&fd, CMSG_DATA(c) + sizeof(int) * (size_t)i, sizeof(int));
            if (*nfds < maxfds)
                fds[(*nfds)++] = fd;
            else {
                close(fd);
                bad = 1;
            }
        }
    }
    if (bad || (msg.msg_flags & MSG_CTRUNC)) {
        for (int i = 0; i < *nfds; i++)
            close(fds[i]);
        *nfds = 0;
        errno = EMSGSIZE;
        return -1;
    }
    return n;
}

int pesto_pidfd_open(pid_t pid)
{
    return (int)syscall(SYS_pidfd_open, pid, 0);
}

int pesto_pidfd_getfd(int pidfd, int targetfd)
{
    return (int)syscall(SYS_pidfd_getfd, pidfd, targetfd, 0);
}

int pesto_spawn_closefrom(posix_spawn_file_actions_t *actions, int from)
{
    return posix_spawn_file_actions_addclosefrom_np(actions, from);
}

int pesto_first_allowed_cpu(void)
{
    cpu_set_t set;
    int cpu;

    if (sched_getaffinity(0, sizeof(set), &set))
        return -1;
    for (cpu = 0; cpu < CPU_SETSIZE; cpu++)
        if (CPU_ISSET(cpu, &set))
            return cpu;
    errno = ESRCH;
    return -1;
}

int pesto_pin_to_cpu(int cpu)
{
    cpu_set_t set;

    if (cpu < 0 || cpu >= CPU_SETSIZE) {
        errno = EINVAL;
        return -1;
    }
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof(set), &set);
}

/* Control space for one datagram's pktinfo, either family. */
#define PKTINFO_SPACE (CMSG_SPACE(sizeof(struct in6_pktinfo)) + CMSG_SPACE(sizeof(struct in_pktinfo)))

/* The local end a received message's control data gives (family 0 when none). */
static void read_pktinfo(struct msghdr *msg, struct pesto_pktinfo *local)
{
    struct cmsghdr *c;

    memset(local, 0, sizeof(*local));
    for (c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c)) {
        if (c->cmsg_level == IPPROTO_IP && c->cmsg_type == IP_PKTINFO &&
            c->cmsg_len >= CMSG_LEN(sizeof(struct in_pktinfo))) {
            struct in_pktinfo info;
            memcpy(&info, CMSG_DATA(c), sizeof(info));
            local->family = AF_INET;
            local->ifindex = info.ipi_ifindex;
            /* ipi_spec_dst: the local address the datagram was for (ipi_addr is the header's
             * destination, which for broadcast is not an address of ours). */
            memcpy(local->addr, &info.ipi_spec_dst, 4);
        } else if (c->cmsg_level == IPPROTO_IPV6 && c->cmsg_type == IPV6_PKTINFO &&
                   c->cmsg_len >= CMSG_LEN(sizeof(struct in6_pktinfo))) {
            struct in6_pktinfo info;
            memcpy(&info, CMSG_DATA(c), sizeof(info));
            local->family = AF_INET6;
            local->ifindex = (int)info.ipi6_ifindex;
            memcpy(local->addr, &info.ipi6_addr, 16);
        }
    }
}

/* Puts `local` into `msg` as the pktinfo a reply leaves with, in `buf` (at least
 * CMSG_SPACE(sizeof(struct in6_pktinfo)) bytes, aligned); nothing for family 0. */
static void write_pktinfo(struct msghdr *msg, void *buf, int socket_family, const struct pesto_pktinfo *local)
{
    if (local && local->family == AF_INET && socket_family == AF_INET) {
        /* The source address only: forcing the arrival interface would send a reply to a
         * local client (its datagram to an address of eth0 "arrived on" eth0) out of eth0.
         * A rule bound to an interface has SO_BINDTODEVICE, which keeps replies on it. */
        struct in_pktinfo info = { .ipi_ifindex = 0 };
        memcpy(&info.ipi_spec_dst, local->addr, 4);
        put_cmsg(msg, buf, IPPROTO_IP, IP_PKTINFO, &info, sizeof(info));
    } else if (local && local->family != 0 && socket_family == AF_INET6) {
        struct in6_pktinfo info = { .ipi6_ifindex = 0 };
        if (local->family == AF_INET6) {
            memcpy(&info.ipi6_addr, local->addr, 16);
            /* A link-local address means something only with its interface. */
            if (IN6_IS_ADDR_LINKLOCAL(&info.ipi6_addr))
                info.ipi6_ifindex = (unsigned)local->ifindex;
        } else {
            /* An IPv4 client of a dual-stack socket: the source, IPv4-mapped. */
            info.ipi6_addr.s6_addr[10] = 0xff;
            info.ipi6_addr.s6_addr[11] = 0xff;
            memcpy(&info.ipi6_addr.s6_addr[12], local->addr, 4);
        }
        put_cmsg(msg, buf, IPPROTO_IPV6, IPV6_PKTINFO, &info, sizeof(info));
    }
}

ssize_t pesto_recv_pktinfo(int fd, void *buf, size_t len, int flags, struct sockaddr *from, socklen_t *fromlen,
                           struct pesto_pktinfo *local)
{
    union {
        char buf[PKTINFO_SPACE];
        struct cmsghdr align;
    } control;
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    struct msghdr msg = {
        .msg_name = from, .msg_namelen = *fromlen, .msg_iov = &iov, .msg_iovlen = 1,
        .msg_control = control.buf, .msg_controllen = sizeof(control.buf),
    };
    ssize_t n;

    memset(local, 0, sizeof(*local));
    n = recvmsg(fd, &msg, flags);
    if (n < 0)
        return n;
    *fromlen = msg.msg_namelen;
    read_pktinfo(&msg, local);
    return n;
}

ssize_t pesto_send_pktinfo(int fd, const void *buf, size_t len, int flags, const struct sockaddr *to, socklen_t tolen,
                           int socket_family, const struct pesto_pktinfo *local)
{
    union {
        char buf[CMSG_SPACE(sizeof(struct in6_pktinfo))];
        struct cmsghdr align;
    } control;
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    struct msghdr msg = {
        .msg_name = (void *)to, .msg_namelen = tolen, .msg_iov = &iov, .msg_iovlen = 1,
    };

    memset(&control, 0, sizeof(control));
    write_pktinfo(&msg, control.buf, socket_family, local);
    return sendmsg(fd, &msg, flags);
}

int pesto_recv_batch(int fd, struct pesto_datagram *d, unsigned n, int flags)
{
    struct mmsghdr msgs[PESTO_BATCH_MAX];
    struct iovec iov[PESTO_BATCH_MAX];
    union {
        char buf[PKTINFO_SPACE];
        struct cmsghdr align;
    } control[PESTO_BATCH_MAX];
    unsigned i;
    int got;

    if (n > PESTO_BATCH_MAX)
        n = PESTO_BATCH_MAX;
    for (i = 0; i < n; i++) {
        iov[i].iov_base = d[i].data;
        iov[i].iov_len = d[i].capacity;
        msgs[i].msg_hdr = (struct msghdr){
            .msg_name = &d[i].peer, .msg_namelen = sizeof(d[i].peer), .msg_iov = &iov[i], .msg_iovlen = 1,
            .msg_control = control[i].buf, .msg_controllen = sizeof(control[i].buf),
        };
        msgs[i].msg_len = 0;
    }
    got = recvmmsg(fd, msgs, n, flags, NULL);
    for (i = 0; got > 0 && i < (unsigned)got; i++) {
        d[i].length = msgs[i].msg_len;
        d[i].peer_len = msgs[i].msg_hdr.msg_namelen;
        read_pktinfo(&msgs[i].msg_hdr, &d[i].local);
    }
    return got;
}

int pesto_send_batch(int fd, const struct pesto_datagram *d, unsigned n, int flags, const struct sockaddr *to, socklen_t tolen,
                     int socket_family, const struct pesto_pktinfo *local)
{
    struct mmsghdr msgs[PESTO_BATCH_MAX];
    struct iovec iov[PESTO_BATCH_MAX];
    union {
        char buf[CMSG_SPACE(sizeof(struct in6_pktinfo))];
        struct cmsghdr align;
    } control;
    struct msghdr first = { 0 };
    unsigned i;

    if (n > PESTO_BATCH_MAX)
        n = PESTO_BATCH_MAX;
    /* Every datagram has the same destination and source: one control block serves all. */
    memset(&control, 0, sizeof(control));
    write_pktinfo(&first, control.buf, socket_family, local);
    for (i = 0; i < n; i++) {
        iov[i].iov_base = d[i].data;
        iov[i].iov_len = d[i].length;
        msgs[i].msg_hdr = (struct msghdr){
            .msg_name = (void *)to, .msg_namelen = tolen, .msg_iov = &iov[i], .msg_iovlen = 1,
            .msg_control = first.msg_control, .msg_controllen = first.msg_controllen,
        };
        msgs[i].msg_len = 0;
    }
    return sendmmsg(fd, msgs, n, flags);
}

int pesto_send_batch_each(int fd, const struct pesto_datagram *d, unsigned n, int flags)
{
    struct mmsghdr msgs[PESTO_BATCH_MAX];
    struct iovec iov[PESTO_BATCH_MAX];
    union {
        char buf[CMSG_SPACE(sizeof(struct in6_pktinfo))];
        struct cmsghdr align;
    } control[PESTO_BATCH_MAX];
    unsigned i;

    if (n > PESTO_BATCH_MAX)
        n = PESTO_BATCH_MAX;
    for (i = 0; i < n; i++) {
        iov[i].iov_base = d[i].data;
        iov[i].iov_len = d[i].length;
        msgs[i].msg_hdr = (struct msghdr){
            .msg_name = (void *)&d[i].peer, .msg_namelen = d[i].peer_len, .msg_iov = &iov[i], .msg_iovlen = 1,
        };
        memset(&control[i], 0, sizeof(control[i]));
        /* The peer's family is the socket's: an IPv4 client of a dual-stack socket is IPv4-mapped. */
        write_pktinfo(&msgs[i].msg_hdr, control[i].buf, d[i].peer.ss_family, &d[i].local);
        msgs[i].msg_len = 0;
    }
    return sendmmsg(fd, msgs, n, flags);
}

int pesto_send_batch_connected(int fd, const struct pesto_datagram *d, const uint8_t *index, unsigned n, int flags)
{
    struct mmsghdr msgs[PESTO_BATCH_MAX];
    struct iovec iov[PESTO_BATCH_MAX];
    unsigned i;

    if (n > PESTO_BATCH_MAX)
        n = PESTO_BATCH_MAX;
    for (i = 0; i < n; i++) {
        iov[i].iov_base = d[index[i]].data;
        iov[i].iov_len = d[index[i]].length;
        msgs[i].msg_hdr = (struct msghdr){ .msg_iov = &iov[i], .msg_iovlen = 1 };
        msgs[i].msg_len = 0;
    }
    return sendmmsg(fd, msgs, n, flags);
}

const char *pesto_errno_name(int err) { return strerrorname_np(err); }

int pesto_errno(void) { return errno; }

static int stop_fd = -1;

static void stop_handler(int sig)
{
    uint64_t one = 1;
    int saved = errno;
    (void)sig;
    if (stop_fd >= 0 && write(stop_fd, &one, sizeof(one)) < 0) {
        /* Nothing to do: the eventfd is already signalled or gone. */
    }
    errno = saved;
}

static int upgrade_fd = -1;

static void upgrade_handler(int sig)
{
    uint64_t one = 1;
    int saved = errno;
    (void)sig;
    if (upgrade_fd >= 0 && write(upgrade_fd, &one, sizeof(one)) < 0) {
        /* Nothing to do: the eventfd is already signalled or gone. */
    }
    errno = saved;
}

int pesto_upgrade_on_signal(int fd)
{
    struct sigaction sa = { 0 };
    sigset_t set;

    upgrade_fd = fd;
    sa.sa_handler = upgrade_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGUSR2, &sa, NULL))
        return -1;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    return pthread_sigmask(SIG_UNBLOCK, &set, NULL) ? -1 : 0;
}

int pesto_stop_on_signals(int fd)
{
    static const int sigs[] = { SIGTERM, SIGINT, SIGHUP };
    struct sigaction sa = { 0 };
    sigset_t set;
    unsigned i;

    stop_fd = fd;
    sa.sa_handler = stop_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigemptyset(&set);
    for (i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++) {
        if (sigaction(sigs[i], &sa, NULL))
            return -1;
        sigaddset(&set, sigs[i]);
    }
    if (signal(SIGPIPE, SIG_IGN) == SIG_ERR)
        return -1;
    return pthread_sigmask(SIG_UNBLOCK, &set, NULL) ? -1 : 0;
}

int pesto_malloc_trim(void) { return malloc_trim(0); }
