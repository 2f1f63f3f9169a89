/* SPDX-License-Identifier: GPL-2.0-only
 *
 * hmmirror guest scenario player: runs scenario operations inside the test guest and prints what the
 * kernel did, in a line format that hmmirror.live.guest.protocol parses on the host.
 *
 * Usage:  player SCRIPT OUT        (controller: reads the command script, writes results to OUT)
 *         player --worker CMDFD REPFD   (internal: one scenario process)
 *
 * The controller keeps no scenario memory of its own.  Each scenario process is a *worker*: a fresh
 * exec of this program that reads one command line at a time from a pipe and answers with one line.
 * `fork` makes a worker fork; the child then talks to the controller through two FIFOs the controller
 * created.  `inspect` is read by the controller from /proc/PID/{pagemap,smaps}, /proc/kpageflags and the
 * PAGEMAP_SCAN ioctl, read-only, outside the worker, and printed raw (the host classifies it with the same
 * code that reads the host kernel).
 *
 * Script commands (one per line, tokens separated by spaces):
 *   SCN name                      begin a scenario
 *   SYS path value                write value into a /proc or /sys file (failure: ERR)
 *   MKFS type dev                 mkfs.ext4 -q -F -b 4096 dev, or mkfs.xfs -q -f dev
 *   MOUNT type src dir opts       mount(2) (opts "-" for none); dir is created
 *   HUGE kb n                     set the kb-sized hugetlb pool to n pages (fewer: ERR)
 *   FILE path size content cached content: data | sparse | zero
 *   PROC name                     start a worker
 *   OP idx proc op key=value...   one operation (see do_op in the worker)
 *   END                           kill the workers, unmount, reset pools
 * Output lines:
 *   S name | E name | ERR text | MI mountinfo-line
 *   R idx ok ret errno signal [key=value ...]       (errno/signal "-" when none)
 *   I idx start npages | V smaps-header | VK KernelPageSize VmFlags... | P entry kpf cats | Z count
 *   N idx note
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <poll.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "lib/test_hmm_uapi.h"
#include "mm/gup_test.h"

#ifndef HMM_DMIRROR_FLAGS
#define HMM_DMIRROR_FLAGS _IOWR('H', 0x08, struct hmm_dmirror_cmd)  /* 6.19+; EINVAL before */
#endif
#define FOLL_WRITE_ 0x01        /* as hmm-tests.c defines them for gup_test */
#define FOLL_LONGTERM_ 0x100

#define PAGE 4096UL
#define MAXPROC 16
#define MAXNAMES 256
#define MAXFDS 8
#define OP_TIMEOUT_MS 20000

/* ------------------------------------------------------------------------------------------ helpers */

static void *xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);

	if (!p) {
		fprintf(stderr, "player: out of memory\n");
		_exit(70);
	}
	return p;
}

static const char *errname(int e)
{
	switch (e) {
	case 0: return "-";
	case EPERM: return "EPERM";
	case ENOENT: return "ENOENT";
	case ESRCH: return "ESRCH";
	case EINTR: return "EINTR";
	case EIO: return "EIO";
	case ENXIO: return "ENXIO";
	case E2BIG: return "E2BIG";
	case EBADF: return "EBADF";
	case EAGAIN: return "EAGAIN";
	case ENOMEM: return "ENOMEM";
	case EACCES: return "EACCES";
	case EFAULT: return "EFAULT";
	case EBUSY: return "EBUSY";
	case EEXIST: return "EEXIST";
	case ENODEV: return "ENODEV";
	case EINVAL: return "EINVAL";
	case ENFILE: return "ENFILE";
	case EMFILE: return "EMFILE";
	case ENOTTY: return "ENOTTY";
	case EFBIG: return "EFBIG";
	case ENOSPC: return "ENOSPC";
	case EROFS: return "EROFS";
	case ERANGE: return "ERANGE";
	case ENOSYS: return "ENOSYS";
	case EOVERFLOW: return "EOVERFLOW";
	case EOPNOTSUPP: return "EOPNOTSUPP";
	case ETIMEDOUT: return "ETIMEDOUT";
	case EHWPOISON: return "EHWPOISON";
	default: {
		static char buf[32];

		snprintf(buf, sizeof(buf), "E%d", e);
		return buf;
	}
	}
}

/* key=value arguments of one OP line */
struct args {
	int n;
	char *key[32];
	char *val[32];
};

static void split_args(char *s, struct args *a)
{
	char *tok, *save = NULL;

	a->n = 0;
	for (tok = strtok_r(s, " \t\n", &save); tok && a->n < 32; tok = strtok_r(NULL, " \t\n", &save)) {
		char *eq = strchr(tok, '=');

		if (!eq)
			continue;
		*eq = 0;
		a->key[a->n] = tok;
		a->val[a->n] = eq + 1;
		a->n++;
	}
}

static const char *arg(const struct args *a, const char *key)
{
	for (int i = 0; i < a->n; i++)
		if (!strcmp(a->key[i], key))
			return a->val[i];
	return NULL;
}

static unsigned long argu(const struct args *a, const char *key, unsigned long dflt)
{
	const char *v = arg(a, key);

	return v ? strtoul(v, NULL, 0) : dflt;
}

/* ------------------------------------------------------------------------------------------ worker */

struct mapping {
	char name[64];
	unsigned long addr, len;
};

struct dfd {
	char name[64];
	int fd;
};

static struct mapping names[MAXNAMES];
static int nnames;
static struct dfd dfds[MAXFDS];
static sigjmp_buf touch_jmp;
static volatile sig_atomic_t touch_sig;
static FILE *wcmd;
static int wrep = -1;

static void on_fault(int sig)
{
	touch_sig = sig;
	siglongjmp(touch_jmp, 1);
}

/* Reply line: "ok ret errno signal extras" */
static void reply(int ok, long long ret, int err, const char *sig, const char *extra)
{
	char head[160];
	int n = snprintf(head, sizeof(head), "%d %lld %s %s", ok, ret, errname(err), sig ? sig : "-");

	if (write(wrep, head, n) != n)
		_exit(71);
	if (extra && *extra) {
		size_t len = strlen(extra);

		if (write(wrep, " ", 1) != 1 || write(wrep, extra, len) != (ssize_t)len)
			_exit(71);
	}
	if (write(wrep, "\n", 1) != 1)
		_exit(71);
}

static struct mapping *find_name(const char *n, size_t len)
{
	for (int i = nnames - 1; i >= 0; i--)
		if (strlen(names[i].name) == len && !strncmp(names[i].name, n, len))
			return &names[i];
	return NULL;
}

/* An address: 0x... or NAME or NAME+0x... / NAME-0x...; *base gets the named mapping (or NULL). */
static int resolve(const char *s, unsigned long *out, struct mapping **base)
{
	const char *op;
	struct mapping *m;

	*base = NULL;
	if (isdigit((unsigned char)s[0])) {
		*out = strtoul(s, NULL, 0);
		return 0;
	}
	op = strpbrk(s, "+-");
	m = find_name(s, op ? (size_t)(op - s) : strlen(s));
	if (!m)
		return -1;
	*base = m;
	*out = m->addr;
	if (op) {
		unsigned long off = strtoul(op + 1, NULL, 0);

		*out = *op == '+' ? m->addr + off : m->addr - off;
	}
	return 0;
}

static int range_args(const struct args *a, unsigned long *addr, unsigned long *len)
{
	struct mapping *base;
	const char *l = arg(a, "len");

	if (resolve(arg(a, "addr") ? arg(a, "addr") : "0", addr, &base))
		return -1;
	if (l) {
		*len = strtoul(l, NULL, 0);
	} else {
		if (!base)
			return -1;
		*len = base->addr + base->len > *addr ? base->addr + base->len - *addr : 0;
	}
	return 0;
}

static void remember(const char *name, unsigned long addr, unsigned long len)
{
	if (!name || nnames >= MAXNAMES)
		return;
	snprintf(names[nnames].name, sizeof(names[nnames].name), "%s", name);
	names[nnames].addr = addr;
	names[nnames].len = len;
	nnames++;
}

static unsigned long round_up(unsigned long x, unsigned long a)
{
	return (x + a - 1) / a * a;
}

static void w_mmap(const struct args *a)
{
	unsigned long len = argu(a, "len", 0), align = argu(a, "align", 0), off = argu(a, "off", 0);
	int prot = argu(a, "prot", 3), flags = argu(a, "flags", MAP_PRIVATE | MAP_ANONYMOUS), fd = -1;
	const char *path = arg(a, "path");
	unsigned long hint = 0;
	struct mapping *base;
	void *p;
	char extra[64];

	if (arg(a, "addr") && resolve(arg(a, "addr"), &hint, &base)) {
		reply(0, 0, EINVAL, NULL, "note=unresolved_address");
		return;
	}
	if (path && strcmp(path, "-")) {
		fd = open(path, O_RDWR | O_CLOEXEC);
		if (fd < 0 && (errno == EACCES || errno == EROFS || errno == EPERM))
			fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			reply(0, 0, errno, NULL, "note=open_failed");
			return;
		}
	}
	if (align) {
		unsigned long eff = round_up(len ? len : 1, argu(a, "psize", PAGE));
		void *res = mmap(NULL, eff + align, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		unsigned long start;

		if (res == MAP_FAILED) {
			reply(0, 0, errno, NULL, NULL);
			goto out;
		}
		start = round_up((unsigned long)res, align);
		p = mmap((void *)start, len, prot, (flags & ~MAP_FIXED_NOREPLACE) | MAP_FIXED, fd, off);
		if (p == MAP_FAILED) {
			int e = errno;

			munmap(res, eff + align);
			reply(0, 0, e, NULL, NULL);
			goto out;
		}
		if (start > (unsigned long)res)
			munmap(res, start - (unsigned long)res);
		if ((unsigned long)res + eff + align > start + eff)
			munmap((void *)(start + eff), (unsigned long)res + eff + align - (start + eff));
	} else {
		p = mmap((void *)hint, len, prot, flags, fd, off);
		if (p == MAP_FAILED) {
			reply(0, 0, errno, NULL, NULL);
			goto out;
		}
	}
	remember(arg(a, "as"), (unsigned long)p, round_up(len, PAGE));
	snprintf(extra, sizeof(extra), "addr=0x%lx", (unsigned long)p);
	reply(1, (long long)(unsigned long)p, 0, NULL, extra);
out:
	if (fd >= 0)
		close(fd);
}

static void fill_page(unsigned char *page, unsigned long index, const char *fill)
{
	if (!strcmp(fill, "index32")) {
		int32_t *w = (int32_t *)page;

		for (unsigned long i = 0; i < PAGE / 4; i++)
			w[i] = (int32_t)(index * (PAGE / 4) + i);
	} else {
		memset(page, (int)strtol(fill, NULL, 0) & 0xff, PAGE);
	}
}

static const char *signame(int sig)
{
	return sig == SIGSEGV ? "SIGSEGV" : sig == SIGBUS ? "SIGBUS" : "SIGNAL";
}

/* CPU access to every page of the range in order; a signal stops it (ret: pages done). */
static void w_touch(const struct args *a)
{
	unsigned long addr, len;
	const char *access = arg(a, "access");
	const char *volatile fill = arg(a, "fill");
	volatile int write_ = access && !strcmp(access, "write");
	volatile unsigned long done = 0;
	unsigned long first, last;

	if (range_args(a, &addr, &len)) {
		reply(0, 0, EINVAL, NULL, "note=unresolved_address");
		return;
	}
	first = addr & ~(PAGE - 1);
	last = len ? round_up(addr + len, PAGE) : first;
	if (sigsetjmp(touch_jmp, 1)) {
		reply(0, (long long)done, EFAULT, signame(touch_sig), NULL);
		return;
	}
	for (unsigned long va = first; va < last; va += PAGE) {
		volatile unsigned char *p = (volatile unsigned char *)va;

		if (write_ && fill && strcmp(fill, "-")) {
			/* whole-page stores, as the model's fill: the range's own page index */
			unsigned long idx = (va - first) / PAGE;

			p[0] = 0;  /* the fault happens here, before the fill below */
			fill_page((unsigned char *)va, idx, fill);
		} else if (write_) {
			p[0] = 0;
		} else {
			(void)p[0];
		}
		done++;
	}
	reply(1, (long long)done, 0, NULL, NULL);
}

/* Pages of the range whose bytes differ from fill (index32, a byte, or zero). */
static void w_check(const struct args *a)
{
	unsigned long addr, len;
	const char *volatile fill = arg(a, "fill");
	volatile long bad = 0;
	unsigned char *want = xmalloc(PAGE);
	char fillbuf[16] = "0";

	if (range_args(a, &addr, &len)) {
		free(want);
		reply(0, 0, EINVAL, NULL, "note=unresolved_address");
		return;
	}
	if (!fill || !strcmp(fill, "-"))
		fill = fillbuf;
	if (sigsetjmp(touch_jmp, 1)) {
		free(want);
		reply(0, 0, EFAULT, signame(touch_sig), NULL);
		return;
	}
	for (unsigned long off = 0; off < len; off += PAGE) {
		unsigned long n = len - off < PAGE ? len - off : PAGE;

		fill_page(want, off / PAGE, fill);
		if (memcmp((void *)(addr + off), want, n))
			bad++;
	}
	free(want);
	reply(1, bad, 0, NULL, NULL);
}

static int dmirror_fd(const char *name)
{
	for (int i = 0; i < MAXFDS; i++)
		if (dfds[i].fd > 0 && !strcmp(dfds[i].name, name))
			return dfds[i].fd;
	return -1;
}

static void w_dmirror_open(const struct args *a)
{
	char path[64];
	const char *name = arg(a, "fd") ? arg(a, "fd") : "dmirror0";
	int fd, slot = -1;

	snprintf(path, sizeof(path), "/dev/hmm_dmirror%lu", argu(a, "dev", 0));
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		reply(0, 0, errno, NULL, NULL);
		return;
	}
	for (int i = 0; i < MAXFDS; i++) {
		if (dfds[i].fd > 0 && !strcmp(dfds[i].name, name)) {
			close(dfds[i].fd);
			slot = i;
			break;
		}
		if (dfds[i].fd <= 0 && slot < 0)
			slot = i;
	}
	if (slot < 0) {
		close(fd);
		reply(0, 0, EMFILE, NULL, NULL);
		return;
	}
	snprintf(dfds[slot].name, sizeof(dfds[slot].name), "%s", name);
	dfds[slot].fd = fd;
	reply(1, 0, 0, NULL, NULL);
}

static void w_dmirror_close(const struct args *a)
{
	const char *name = arg(a, "fd") ? arg(a, "fd") : "dmirror0";

	for (int i = 0; i < MAXFDS; i++) {
		if (dfds[i].fd > 0 && !strcmp(dfds[i].name, name)) {
			close(dfds[i].fd);
			dfds[i].fd = 0;
			reply(1, 0, 0, NULL, NULL);
			return;
		}
	}
	reply(0, 0, EBADF, NULL, "note=no_such_fd");
}

/* One dmirror ioctl over the range; the device's buffer is filled (WRITE) or checked (READ) here. */
static void w_dmirror_cmd(const char *op, const struct args *a)
{
	unsigned long addr, len, npages, req;
	const char *fill = arg(a, "fill");
	int fd = dmirror_fd(arg(a, "fd") ? arg(a, "fd") : "dmirror0");
	struct hmm_dmirror_cmd cmd;
	unsigned char *buf;
	size_t bufsize, elen;
	char *extra;
	int ret;

	if (fd < 0) {
		reply(0, 0, EBADF, NULL, "note=no_such_fd");
		return;
	}
	if (range_args(a, &addr, &len)) {
		reply(0, 0, EINVAL, NULL, "note=unresolved_address");
		return;
	}
	npages = (len + PAGE - 1) / PAGE;
	if (!strcmp(op, "dmirror_flags"))
		npages = argu(a, "flags", 0);          /* the command's npages carries the flags */
	if (!strcmp(op, "dmirror_read"))
		req = HMM_DMIRROR_READ;
	else if (!strcmp(op, "dmirror_write"))
		req = HMM_DMIRROR_WRITE;
	else if (!strcmp(op, "dmirror_snapshot"))
		req = HMM_DMIRROR_SNAPSHOT;
	else if (!strcmp(op, "dmirror_migrate_to_dev"))
		req = HMM_DMIRROR_MIGRATE_TO_DEV;
	else if (!strcmp(op, "dmirror_migrate_to_sys"))
		req = HMM_DMIRROR_MIGRATE_TO_SYS;
	else if (!strcmp(op, "dmirror_exclusive"))
		req = HMM_DMIRROR_EXCLUSIVE;
	else if (!strcmp(op, "dmirror_check_exclusive"))
		req = HMM_DMIRROR_CHECK_EXCLUSIVE;
	else if (!strcmp(op, "dmirror_release"))
		req = HMM_DMIRROR_RELEASE;
	else if (!strcmp(op, "dmirror_flags"))
		req = HMM_DMIRROR_FLAGS;
	else {
		reply(0, 0, ENOSYS, NULL, "note=unknown_dmirror_op");
		return;
	}
	bufsize = req == HMM_DMIRROR_SNAPSHOT ? npages : req == HMM_DMIRROR_FLAGS ? 0 : npages * PAGE;
	buf = xmalloc(bufsize);
	memset(buf, 0, bufsize);
	if (req == HMM_DMIRROR_WRITE) {
		if (!fill || !strcmp(fill, "-"))
			fill = "index32";
		for (unsigned long i = 0; i < npages; i++)
			fill_page(buf + i * PAGE, i, fill);
	}
	memset(&cmd, 0, sizeof(cmd));
	cmd.addr = addr;
	cmd.ptr = (unsigned long)buf;
	cmd.npages = npages;
	ret = ioctl(fd, req, &cmd);
	if (ret) {
		int e = errno;

		free(buf);
		reply(0, 0, e, NULL, NULL);
		return;
	}
	elen = 96 + (req == HMM_DMIRROR_SNAPSHOT ? 2 * npages + 16 : 0);
	extra = xmalloc(elen);
	snprintf(extra, elen, "cpages=%llu faults=%llu", (unsigned long long)cmd.cpages,
		 (unsigned long long)cmd.faults);
	/* READ, and the commands that read the migrated or exclusive pages back, checked against fill */
	if ((req == HMM_DMIRROR_READ || req == HMM_DMIRROR_MIGRATE_TO_DEV || req == HMM_DMIRROR_EXCLUSIVE) &&
	    fill && strcmp(fill, "-")) {
		unsigned char *want = xmalloc(PAGE);
		unsigned long bad = 0;

		for (unsigned long i = 0; i < npages; i++) {
			fill_page(want, i, fill);
			if (memcmp(buf + i * PAGE, want, PAGE))
				bad++;
		}
		free(want);
		snprintf(extra + strlen(extra), elen - strlen(extra), " bad_pages=%lu", bad);
	}
	if (req == HMM_DMIRROR_SNAPSHOT) {
		char *p = extra + strlen(extra);

		p += sprintf(p, " snapshot=");
		for (unsigned long i = 0; i < npages; i++)
			p += sprintf(p, "%02x", buf[i]);
	}
	free(buf);
	reply(1, 0, 0, NULL, extra);
	free(extra);
}

/* The gup_test debugfs ioctl over the range, one page per call (as hmm-tests' gup_test_exec()). */
static void w_gup_test(const struct args *a)
{
	unsigned long addr, len;
	const char *cmd = arg(a, "cmd") ? arg(a, "cmd") : "GUP_BASIC_TEST";
	unsigned long req;
	struct gup_test gup;
	int fd, r;

	if (range_args(a, &addr, &len)) {
		reply(0, 0, EINVAL, NULL, "note=unresolved_address");
		return;
	}
	if (!strcmp(cmd, "GUP_BASIC_TEST"))
		req = GUP_BASIC_TEST;
	else if (!strcmp(cmd, "GUP_FAST_BENCHMARK"))
		req = GUP_FAST_BENCHMARK;
	else if (!strcmp(cmd, "PIN_FAST_BENCHMARK"))
		req = PIN_FAST_BENCHMARK;
	else if (!strcmp(cmd, "PIN_LONGTERM_BENCHMARK"))
		req = PIN_LONGTERM_BENCHMARK;
	else {
		reply(0, 0, EINVAL, NULL, "note=unknown_gup_test_cmd");
		return;
	}
	fd = open("/sys/kernel/debug/gup_test", O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		reply(0, 0, errno, NULL, "note=no_gup_test");
		return;
	}
	memset(&gup, 0, sizeof(gup));
	gup.addr = addr;
	gup.size = (len + PAGE - 1) / PAGE * PAGE;
	gup.nr_pages_per_call = 1;
	gup.gup_flags = (argu(a, "write", 1) ? FOLL_WRITE_ : 0) | (argu(a, "longterm", 0) ? FOLL_LONGTERM_ : 0);
	r = ioctl(fd, req, &gup);
	if (r)
		reply(0, 0, errno, NULL, NULL);
	else
		reply(1, 0, 0, NULL, NULL);
	close(fd);
}

/* fork: the child opens the FIFOs cmd= and rep= the controller made for it (in this order). */
static void w_fork(const struct args *a)
{
	const char *cpath = arg(a, "cmd"), *rpath = arg(a, "rep");
	pid_t pid = fork();

	if (pid < 0) {
		reply(0, 0, errno, NULL, NULL);
		return;
	}
	if (pid == 0) {
		int c, r;

		fclose(wcmd);
		close(wrep);
		for (int i = 0; i < MAXFDS; i++) {  /* dmirror files belong to the process that opened them */
			if (dfds[i].fd > 0)
				close(dfds[i].fd);
			dfds[i].fd = 0;
		}
		c = open(cpath, O_RDONLY | O_CLOEXEC);
		r = open(rpath, O_WRONLY | O_CLOEXEC);
		if (c < 0 || r < 0)
			_exit(72);
		wcmd = fdopen(c, "r");
		wrep = r;
		return;  /* back to the command loop, as the child */
	}
	reply(1, pid, 0, NULL, NULL);
}

static void w_truncate(const struct args *a)
{
	if (truncate(arg(a, "path"), (off_t)argu(a, "size", 0)))
		reply(0, 0, errno, NULL, NULL);
	else
		reply(1, 0, 0, NULL, NULL);
}

static void w_simple(const char *op, const struct args *a)
{
	unsigned long addr, len;
	int r;

	if (range_args(a, &addr, &len)) {
		reply(0, 0, EINVAL, NULL, "note=unresolved_address");
		return;
	}
	if (!strcmp(op, "munmap"))
		r = munmap((void *)addr, len);
	else if (!strcmp(op, "mprotect"))
		r = mprotect((void *)addr, len, (int)argu(a, "prot", 0));
	else
		r = madvise((void *)addr, len, (int)argu(a, "advice", 0));
	if (r)
		reply(0, 0, errno, NULL, NULL);
	else
		reply(1, 0, 0, NULL, NULL);
}

/* inspect is read by the controller; the worker only resolves the range (it knows the names) */
static void w_resolve(const struct args *a)
{
	unsigned long addr, len;
	char extra[64];

	if (range_args(a, &addr, &len)) {
		reply(0, 0, EINVAL, NULL, "note=unresolved_address");
		return;
	}
	snprintf(extra, sizeof(extra), "addr=%lx len=%lx", addr, len);
	reply(1, 0, 0, NULL, extra);
}

static int worker_main(int cmdfd, int repfd)
{
	char *line = NULL;
	size_t cap = 0;
	struct sigaction sa;

	/* keep malloc out of the address space the scenario maps (buffers come from brk) */
	mallopt(M_MMAP_THRESHOLD, 512 << 20);
	mallopt(M_TOP_PAD, 0);
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_fault;
	sa.sa_flags = SA_NODEFER;
	sigaction(SIGSEGV, &sa, NULL);
	sigaction(SIGBUS, &sa, NULL);
	signal(SIGCHLD, SIG_IGN);     /* forked children are reaped by the kernel */
	signal(SIGPIPE, SIG_IGN);
	/* a 4 MiB PROT_NONE spacer below the vdso, so no scenario mapping shares a page table with it */
	mmap(NULL, 4 << 20, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	wcmd = fdopen(cmdfd, "r");
	wrep = repfd;
	while (getline(&line, &cap, wcmd) > 0) {
		struct args a;
		char *sp = strchr(line, ' ');
		char op[64];

		if (sp)
			*sp = 0;
		snprintf(op, sizeof(op), "%s", line);
		op[strcspn(op, "\n")] = 0;
		split_args(sp ? sp + 1 : (char *)"", &a);
		if (!strcmp(op, "mmap"))
			w_mmap(&a);
		else if (!strcmp(op, "munmap") || !strcmp(op, "mprotect") || !strcmp(op, "madvise"))
			w_simple(op, &a);
		else if (!strcmp(op, "touch"))
			w_touch(&a);
		else if (!strcmp(op, "check"))
			w_check(&a);
		else if (!strcmp(op, "fork"))
			w_fork(&a);
		else if (!strcmp(op, "exit")) {
			reply(1, 0, 0, NULL, NULL);
			_exit(0);
		} else if (!strcmp(op, "truncate"))
			w_truncate(&a);
		else if (!strcmp(op, "resolve"))
			w_resolve(&a);
		else if (!strcmp(op, "dmirror_open"))
			w_dmirror_open(&a);
		else if (!strcmp(op, "dmirror_close"))
			w_dmirror_close(&a);
		else if (!strcmp(op, "gup_test"))
			w_gup_test(&a);
		else if (!strncmp(op, "dmirror_", 8))
			w_dmirror_cmd(op, &a);
		else
			reply(0, 0, ENOSYS, NULL, "note=unknown_op");
	}
	_exit(0);
}

/* ------------------------------------------------------------------------------------------ controller */

struct proc {
	char name[64];
	pid_t pid;
	int cmd, rep;       /* controller's ends */
	int alive;
	int direct;         /* our own child */
};

static struct proc procs[MAXPROC];
static int nprocs;
static FILE *out;
static const char *self_exe;
static char mounts[16][256];
static int nmounts;
static char pools[4][160];
static int npools;
static int fifo_seq;

static void emit(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vfprintf(out, fmt, ap);
	va_end(ap);
}

static struct proc *find_proc(const char *name)
{
	for (int i = 0; i < nprocs; i++)
		if (!strcmp(procs[i].name, name))
			return &procs[i];
	return NULL;
}

static int write_file(const char *path, const char *value)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -errno;
	n = write(fd, value, strlen(value));
	close(fd);
	return n == (ssize_t)strlen(value) ? 0 : -(n < 0 ? errno : EIO);
}

static long read_long(const char *path)
{
	char buf[64] = "";
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	return n > 0 ? strtol(buf, NULL, 10) : -1;
}

static void mkdirs(const char *path)
{
	char buf[256];

	snprintf(buf, sizeof(buf), "%s", path);
	for (char *p = buf + 1; *p; p++) {
		if (*p == '/') {
			*p = 0;
			mkdir(buf, 0755);
			*p = '/';
		}
	}
	mkdir(buf, 0755);
}

static int run_prog(char *const argv[])
{
	int status;
	pid_t pid = fork();

	if (pid == 0) {
		int devnull = open("/dev/null", O_WRONLY);

		if (devnull >= 0) {
			dup2(devnull, 1);
			dup2(devnull, 2);
		}
		execvp(argv[0], argv);
		_exit(127);
	}
	if (pid < 0 || waitpid(pid, &status, 0) < 0)
		return -1;
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128;
}

static void spawn(const char *name)
{
	int c[2], r[2];
	pid_t pid;
	struct proc *p;

	if (nprocs >= MAXPROC || pipe(c) || pipe(r)) {
		emit("ERR cannot start process %s\n", name);
		return;
	}
	fflush(out);
	pid = fork();
	if (pid == 0) {
		char a1[16], a2[16];

		close(c[1]);
		close(r[0]);
		snprintf(a1, sizeof(a1), "%d", c[0]);
		snprintf(a2, sizeof(a2), "%d", r[1]);
		execl(self_exe, self_exe, "--worker", a1, a2, (char *)NULL);
		_exit(127);
	}
	close(c[0]);
	close(r[1]);
	p = &procs[nprocs++];
	snprintf(p->name, sizeof(p->name), "%s", name);
	p->pid = pid;
	p->cmd = c[1];
	p->rep = r[0];
	fcntl(p->cmd, F_SETFD, FD_CLOEXEC);
	fcntl(p->rep, F_SETFD, FD_CLOEXEC);
	p->alive = 1;
	p->direct = 1;
}

/* Read one reply line from a worker within the timeout; NULL on death or timeout (*timedout set). */
static char *read_reply(struct proc *p, int *timedout)
{
	static char buf[1 << 20];
	size_t len = 0;

	*timedout = 0;
	for (;;) {
		struct pollfd pfd = { .fd = p->rep, .events = POLLIN };
		int r = poll(&pfd, 1, OP_TIMEOUT_MS);
		ssize_t n;

		if (r == 0) {
			*timedout = 1;
			return NULL;
		}
		if (r < 0) {
			if (errno == EINTR)
				continue;
			return NULL;
		}
		n = read(p->rep, buf + len, sizeof(buf) - 1 - len);
		if (n <= 0)
			return NULL;
		len += n;
		if (buf[len - 1] == '\n' || len >= sizeof(buf) - 1) {
			buf[len] = 0;
			return buf;
		}
	}
}

static int is_gone_or_zombie(pid_t pid)
{
	char path[64], buf[512];
	int fd;
	ssize_t n;
	char *rp;

	snprintf(path, sizeof(path), "/proc/%d/stat", pid);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return 1;
	n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return 1;
	buf[n] = 0;
	rp = strrchr(buf, ')');
	return !rp || rp[2] == 'Z' || rp[2] == 'X';
}

static void wait_exit(struct proc *p)
{
	if (p->direct) {
		waitpid(p->pid, NULL, 0);
		return;
	}
	for (int i = 0; i < 20000 && !is_gone_or_zombie(p->pid); i++)
		usleep(500);
}

static void kill_proc(struct proc *p)
{
	if (p->alive)
		kill(p->pid, SIGKILL);
	p->alive = 0;
	if (p->cmd >= 0)
		close(p->cmd);
	if (p->rep >= 0)
		close(p->rep);
	p->cmd = p->rep = -1;
}

/* --- inspect: read-only, from outside the worker ---------------------------------------------------- */

struct pm_scan_arg {
	uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
	uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};

struct page_region {
	uint64_t start, end, categories;
};

#define PAGEMAP_SCAN_IOCTL _IOWR('f', 16, struct pm_scan_arg)
#define PAGE_IS_PRESENT (1 << 3)
#define PAGE_IS_SWAPPED (1 << 4)
#define PAGE_IS_PFNZERO (1 << 5)
#define PAGE_IS_HUGE (1 << 6)
#define PM_PRESENT (1ULL << 63)
#define PM_PFN_MASK ((1ULL << 55) - 1)

static void print_smaps(pid_t pid, unsigned long lo, unsigned long hi)
{
	char path[64], *line = NULL;
	size_t cap = 0;
	FILE *f;
	int keep = 0;
	char kps[64] = "";

	snprintf(path, sizeof(path), "/proc/%d/smaps", pid);
	f = fopen(path, "re");
	if (!f)
		return;
	while (getline(&line, &cap, f) > 0) {
		line[strcspn(line, "\n")] = 0;
		if (isxdigit((unsigned char)line[0]) && !isupper((unsigned char)line[0])) {
			unsigned long s = strtoul(line, NULL, 16), e = strtoul(strchr(line, '-') + 1, NULL, 16);

			keep = s < hi && e > lo;
			if (keep)
				emit("V %s\n", line);
		} else if (keep && !strncmp(line, "KernelPageSize:", 15)) {
			snprintf(kps, sizeof(kps), "%s", line + 15);
		} else if (keep && !strncmp(line, "VmFlags:", 8)) {
			emit("VK %ld %s\n", strtol(kps, NULL, 10), line + 8);
		}
	}
	free(line);
	fclose(f);
}

static int inspect(struct proc *p, unsigned long addr, unsigned long len, int idx)
{
	unsigned long lo = addr & ~(PAGE - 1), hi = round_up(addr + len, PAGE), n = (hi - lo) / PAGE;
	uint64_t *ent, *kpf, *cats;
	char path[64];
	int fd, kfd;
	ssize_t got;
	unsigned long zeros = 0;

	if (!n)
		n = 0;
	snprintf(path, sizeof(path), "/proc/%d/pagemap", p->pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	ent = xmalloc(n * 8);
	kpf = xmalloc(n * 8);
	cats = xmalloc(n * 8);
	memset(kpf, 0, n * 8);
	memset(cats, 0, n * 8);
	got = pread(fd, ent, n * 8, (lo / PAGE) * 8);
	if (got != (ssize_t)(n * 8)) {
		int e = got < 0 ? errno : EINVAL;

		close(fd);
		free(ent);
		free(kpf);
		free(cats);
		return -e;
	}
	{
		struct page_region vec[512];
		unsigned long pos = lo;

		while (pos < hi) {
			struct pm_scan_arg sa = {
				.size = sizeof(sa), .start = pos, .end = hi, .vec = (uintptr_t)vec, .vec_len = 512,
				.category_anyof_mask = PAGE_IS_HUGE | PAGE_IS_PFNZERO,
				.return_mask = PAGE_IS_HUGE | PAGE_IS_PFNZERO | PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
			};
			int r = ioctl(fd, PAGEMAP_SCAN_IOCTL, &sa);

			if (r < 0)
				break;
			for (int i = 0; i < r; i++)
				for (uint64_t va = vec[i].start; va < vec[i].end; va += PAGE)
					cats[(va - lo) / PAGE] = vec[i].categories;
			if (sa.walk_end <= pos)
				break;
			pos = sa.walk_end;
		}
	}
	close(fd);
	kfd = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC);
	if (kfd >= 0) {
		/* runs of consecutive pfns in one pread */
		unsigned long i = 0;

		while (i < n) {
			unsigned long j = i + 1;
			uint64_t pfn;

			if (!(ent[i] & PM_PRESENT) || !(ent[i] & PM_PFN_MASK)) {
				i++;
				continue;
			}
			pfn = ent[i] & PM_PFN_MASK;
			while (j < n && (ent[j] & PM_PRESENT) && (ent[j] & PM_PFN_MASK) == pfn + (j - i) && j - i < 4096)
				j++;
			if (pread(kfd, kpf + i, (j - i) * 8, pfn * 8) != (ssize_t)((j - i) * 8)) {
				for (unsigned long k = i; k < j; k++)
					if (pread(kfd, kpf + k, 8, (ent[k] & PM_PFN_MASK) * 8) != 8)
						kpf[k] = 0;
			}
			i = j;
		}
		close(kfd);
	}
	emit("I %d 0x%lx %lu\n", idx, lo, n);
	print_smaps(p->pid, lo, hi);
	for (unsigned long i = 0; i < n; i++) {
		if (!ent[i] && !cats[i]) {
			zeros++;
			continue;
		}
		if (zeros) {
			emit("Z %lu\n", zeros);
			zeros = 0;
		}
		emit("P %llx %llx %llx\n", (unsigned long long)ent[i], (unsigned long long)kpf[i],
		     (unsigned long long)cats[i]);
	}
	if (zeros)
		emit("Z %lu\n", zeros);
	free(ent);
	free(kpf);
	free(cats);
	return 0;
}

/* --- one operation ------------------------------------------------------------------------------------ */

static void do_op(char *rest)
{
	char *save = NULL, *sidx = strtok_r(rest, " \n", &save), *pname = strtok_r(NULL, " \n", &save);
	char *op = strtok_r(NULL, " \n", &save), *argstr = strtok_r(NULL, "\n", &save);
	struct proc *p;
	char msg[4096];
	int idx, timedout, n;
	char *rep;

	if (!sidx || !pname || !op) {
		emit("ERR bad OP line\n");
		return;
	}
	idx = atoi(sidx);
	p = find_proc(pname);
	if (!p || !p->alive) {
		emit("R %d 0 0 ESRCH - note=process_not_running\n", idx);
		return;
	}
	if (!strcmp(op, "inspect")) {
		/* the worker resolves the address (it knows the names); then read from outside */
		n = snprintf(msg, sizeof(msg), "resolve %s\n", argstr ? argstr : "");
		if (write(p->cmd, msg, n) != n || !(rep = read_reply(p, &timedout))) {
			emit("R %d 0 0 ESRCH - note=worker_gone\n", idx);
			return;
		}
		{
			unsigned long addr = 0, len = 0;
			int ok = sscanf(rep, "1 %*d %*s %*s addr=%lx len=%lx", &addr, &len) == 2;
			int r = ok ? inspect(p, addr, len, idx) : -EINVAL;

			if (!ok)
				emit("R %d %s", idx, rep);
			else if (r)
				emit("R %d 0 0 %s -\n", idx, errname(-r));
			else
				emit("R %d 1 0 - -\n", idx);
		}
		return;
	}
	if (!strcmp(op, "fork")) {
		char cpath[64], rpath[64];
		struct proc *c;
		const char *child = NULL;
		char tmp[4096];
		struct args a;

		snprintf(tmp, sizeof(tmp), "%s", argstr ? argstr : "");
		split_args(tmp, &a);
		child = arg(&a, "child");
		if (!child || nprocs >= MAXPROC) {
			emit("R %d 0 0 EINVAL - note=bad_fork\n", idx);
			return;
		}
		snprintf(cpath, sizeof(cpath), "/tmp/player-%d.cmd", fifo_seq);
		snprintf(rpath, sizeof(rpath), "/tmp/player-%d.rep", fifo_seq++);
		unlink(cpath);
		unlink(rpath);
		if (mkfifo(cpath, 0600) || mkfifo(rpath, 0600)) {
			emit("R %d 0 0 %s - note=mkfifo\n", idx, errname(errno));
			return;
		}
		n = snprintf(msg, sizeof(msg), "fork cmd=%s rep=%s\n", cpath, rpath);
		if (write(p->cmd, msg, n) != n || !(rep = read_reply(p, &timedout))) {
			emit("R %d 0 0 EFAULT - note=worker_died\n", idx);
			kill_proc(p);
			return;
		}
		if (rep[0] != '1') {
			emit("R %d %s", idx, rep);
			return;
		}
		c = &procs[nprocs++];
		snprintf(c->name, sizeof(c->name), "%s", child);
		c->pid = (pid_t)strtol(rep + 2, NULL, 10);
		c->direct = 0;
		c->alive = 1;
		c->cmd = open(cpath, O_WRONLY | O_CLOEXEC);
		c->rep = open(rpath, O_RDONLY | O_CLOEXEC);
		unlink(cpath);
		unlink(rpath);
		emit("R %d %s", idx, rep);
		return;
	}
	n = snprintf(msg, sizeof(msg), "%s %s\n", op, argstr ? argstr : "");
	if (write(p->cmd, msg, n) != n) {
		emit("R %d 0 0 EFAULT - note=worker_died\n", idx);
		kill_proc(p);
		return;
	}
	rep = read_reply(p, &timedout);
	if (!rep) {
		int status = 0;
		const char *why = timedout ? "ETIMEDOUT" : "EFAULT";

		kill_proc(p);
		if (p->direct && waitpid(p->pid, &status, 0) > 0 && WIFSIGNALED(status))
			emit("R %d 0 0 %s %s note=worker_died\n", idx, why, signame(WTERMSIG(status)));
		else
			emit("R %d 0 0 %s - note=worker_died\n", idx, why);
		return;
	}
	emit("R %d %s", idx, rep);
	if (!strcmp(op, "exit") && rep[0] == '1') {
		p->alive = 0;
		close(p->cmd);
		close(p->rep);
		p->cmd = p->rep = -1;
		wait_exit(p);
	}
}

/* --- scenario set-up and tear-down ------------------------------------------------------------------- */

static void create_file(char *rest)
{
	char path[256], content[16];
	unsigned long size;
	int cached, fd;

	if (sscanf(rest, "%255s %lu %15s %d", path, &size, content, &cached) != 4) {
		emit("ERR bad FILE line\n");
		return;
	}
	{
		char dir[256];
		char *slash;

		snprintf(dir, sizeof(dir), "%s", path);
		slash = strrchr(dir, '/');
		if (slash && slash != dir) {
			*slash = 0;
			mkdirs(dir);
		}
	}
	fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		emit("ERR cannot create %s: %s\n", path, errname(errno));
		return;
	}
	if (!strcmp(content, "sparse") || size == 0) {
		if (ftruncate(fd, size))
			emit("ERR ftruncate %s: %s\n", path, errname(errno));
	} else if (!strcmp(content, "zero")) {
		if (ftruncate(fd, size) || posix_fallocate(fd, 0, size))
			emit("ERR fallocate %s: %s\n", path, errname(errno));
	} else {
		/* the int32 index pattern, written in 16 MiB pieces (as the host runner does) */
		unsigned long step = 16UL << 20;

		for (unsigned long off = 0; off < size; off += step) {
			unsigned long n = size - off < step ? size - off : step;
			int32_t *buf = xmalloc(round_up(n, 4));

			for (unsigned long i = 0; i < round_up(n, 4) / 4; i++)
				buf[i] = (int32_t)(off / 4 + i);
			if (pwrite(fd, buf, n, off) != (ssize_t)n) {
				/* hugetlbfs has no write(2): through a shared mapping */
				void *m;

				free(buf);
				if (ftruncate(fd, size)) {
					emit("ERR write %s: %s\n", path, errname(errno));
					break;
				}
				m = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
				if (m == MAP_FAILED) {
					emit("ERR write %s: %s\n", path, errname(errno));
					break;
				}
				for (unsigned long i = 0; i < size / 4; i++)
					((int32_t *)m)[i] = (int32_t)i;
				munmap(m, size);
				break;
			}
			free(buf);
		}
	}
	if (!cached) {
		fsync(fd);
		posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
	}
	close(fd);
}

static void end_scenario(const char *name)
{
	pid_t pid;

	int pending = 1;

	for (int i = 0; i < nprocs; i++)
		kill_proc(&procs[i]);
	for (int i = 0; i < nprocs; i++)
		kill(procs[i].pid, SIGKILL);
	/* we are the subreaper: a forked worker whose parent died becomes our child; wait until every worker
	 * is reaped or gone (not for the khugepaged anchor, which stays) */
	for (int tries = 0; tries < 5000 && pending; tries++) {
		pending = 0;
		while ((pid = waitpid(-1, NULL, WNOHANG)) > 0)
			;
		for (int i = 0; i < nprocs; i++) {
			if (procs[i].pid > 0 && waitpid(procs[i].pid, NULL, WNOHANG) == 0)
				pending = 1;
			else if (procs[i].pid > 0 && !is_gone_or_zombie(procs[i].pid))
				pending = 1;
		}
		if (pending)
			usleep(1000);
	}
	nprocs = 0;
	for (int i = nmounts - 1; i >= 0; i--)
		if (umount2(mounts[i], 0))
			umount2(mounts[i], MNT_DETACH);
	nmounts = 0;
	for (int i = 0; i < npools; i++)
		write_file(pools[i], "0");
	npools = 0;
	write_file("/proc/sys/vm/drop_caches", "3");
	write_file("/proc/sys/vm/compact_memory", "1");
	emit("E %s\n", name);
	fflush(out);
	{
		struct timespec ts;

		clock_gettime(CLOCK_MONOTONIC, &ts);
		fprintf(stderr, "HMMG: end %s t=%ld.%03ld\n", name, (long)ts.tv_sec, ts.tv_nsec / 1000000);
	}
}

/* A process that stays for the whole run with a MADV_HUGEPAGE area, so khugepaged always has an mm to
 * scan and sleeps its full scan_sleep_millisecs between passes instead of waking for every scenario. */
static pid_t start_anchor(void)
{
	int sync[2];
	char c = 0;
	pid_t pid;

	if (pipe(sync))
		return -1;
	pid = fork();
	if (pid == 0) {
		void *m = mmap(NULL, 2 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

		if (m != MAP_FAILED)
			madvise(m, 2 << 20, MADV_HUGEPAGE);
		if (write(sync[1], &c, 1) != 1)
			_exit(1);
		for (;;)
			pause();
	}
	close(sync[1]);
	if (pid > 0 && read(sync[0], &c, 1) != 1)
		fprintf(stderr, "player: khugepaged anchor did not start\n");
	close(sync[0]);
	return pid;
}

int main(int argc, char **argv)
{
	FILE *script;
	char *line = NULL, scn[128] = "";
	size_t cap = 0;
	pid_t anchor;

	if (argc == 4 && !strcmp(argv[1], "--worker"))
		return worker_main(atoi(argv[2]), atoi(argv[3]));
	if (argc != 3) {
		fprintf(stderr, "usage: %s SCRIPT OUT\n", argv[0]);
		return 2;
	}
	self_exe = "/proc/self/exe";
	{
		static char exe[256];
		ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);

		if (n > 0) {
			exe[n] = 0;
			self_exe = exe;
		}
	}
	script = fopen(argv[1], "re");
	out = fopen(argv[2], "we");
	if (!script || !out) {
		fprintf(stderr, "player: cannot open %s or %s\n", argv[1], argv[2]);
		return 2;
	}
	prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
	signal(SIGPIPE, SIG_IGN);
	anchor = start_anchor();
	while (getline(&line, &cap, script) > 0) {
		char *rest = strchr(line, ' ');

		line[strcspn(line, "\n")] = 0;
		if (rest)
			*rest++ = 0;
		else
			rest = line + strlen(line);
		if (!strcmp(line, "SCN")) {
			snprintf(scn, sizeof(scn), "%s", rest);
			emit("S %s\n", scn);
			struct timespec ts;

			clock_gettime(CLOCK_MONOTONIC, &ts);
			fprintf(stderr, "HMMG: scenario %s t=%ld.%03ld\n", scn, (long)ts.tv_sec, ts.tv_nsec / 1000000);
		} else if (!strcmp(line, "SYS")) {
			char path[256], value[128];

			if (sscanf(rest, "%255s %127s", path, value) == 2) {
				int r = write_file(path, value);

				if (r)
					emit("ERR write %s %s: %s\n", value, path, errname(-r));
			}
		} else if (!strcmp(line, "MKFS")) {
			char type[16], dev[128];
			char *ext4[] = { "mkfs.ext4", "-q", "-F", "-b", "4096", dev, NULL };
			char *xfs[] = { "mkfs.xfs", "-q", "-f", dev, NULL };

			if (sscanf(rest, "%15s %127s", type, dev) == 2 && run_prog(strcmp(type, "xfs") ? ext4 : xfs))
				emit("ERR mkfs.%s %s failed\n", type, dev);
		} else if (!strcmp(line, "MOUNT")) {
			char type[32], src[128], dir[200], opts[200];

			if (sscanf(rest, "%31s %127s %199s %199s", type, src, dir, opts) == 4) {
				mkdirs(dir);
				if (mount(src, dir, type, 0, strcmp(opts, "-") ? opts : NULL))
					emit("ERR mount %s %s: %s\n", type, dir, errname(errno));
				else if (nmounts < 16)
					snprintf(mounts[nmounts++], sizeof(mounts[0]), "%s", dir);
			}
		} else if (!strcmp(line, "HUGE")) {
			unsigned long kb, nr;
			char path[160], val[32];

			if (sscanf(rest, "%lu %lu", &kb, &nr) == 2) {
				snprintf(path, sizeof(path), "/sys/kernel/mm/hugepages/hugepages-%lukB/nr_hugepages", kb);
				snprintf(val, sizeof(val), "%lu", nr);
				write_file(path, val);
				if (npools < 4)
					snprintf(pools[npools++], sizeof(pools[0]), "%s", path);
				if (read_long(path) != (long)nr)
					emit("ERR hugetlb pool %lukB: %ld of %lu pages\n", kb, read_long(path), nr);
			}
		} else if (!strcmp(line, "FILE")) {
			create_file(rest);
		} else if (!strcmp(line, "MOUNTINFO")) {
			FILE *mi = fopen("/proc/self/mountinfo", "re");
			char *l = NULL;
			size_t c = 0;

			while (mi && getline(&l, &c, mi) > 0)
				emit("MI %s", l);
			free(l);
			if (mi)
				fclose(mi);
		} else if (!strcmp(line, "PROC")) {
			spawn(rest);
		} else if (!strcmp(line, "OP")) {
			do_op(rest);
		} else if (!strcmp(line, "END")) {
			end_scenario(scn);
		}
		fflush(out);
	}
	if (anchor > 0) {
		kill(anchor, SIGKILL);
		waitpid(anchor, NULL, 0);
	}
	emit("DONE\n");
	fclose(out);
	return 0;
}
