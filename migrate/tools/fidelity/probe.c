/*
 * The fidelity probe: a static aarch64 /init that asks a real arm64 KVM
 * (with MTE) the questions hosts/ answers in simulation, and prints one
 * line per case on the console:
 *
 *     FIDELITY case <name> | <setup> | <call> | <result> | <observations>
 *
 * <result> is the return value or the errno's name; observations are
 * "key=value" pairs separated by "; ".  No address is ever printed: guest
 * addresses are fixed (RAM at 0x40000000, as in hosts/), user buffers are
 * described by how many bytes are readable before a guard page.
 *
 * Tag strings (see describe()): one item per page of 256 tags, joined by
 * "/": "p<s>" is the test pattern with seed s (tag of granule g is
 * (s + g/16) & 15), otherwise runs "<value>*<count>" joined by ".".
 * Residency strings: one character per page, '1' in memory, '0' not,
 * 'z' the shared zero page (a private mapping's read fault).
 *
 * migrate/tools/fidelity/cases.py replays every case on hosts/ and must
 * produce the same line; change both together.  No vCPU ever runs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/klog.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#ifndef PROT_MTE
#define PROT_MTE 0x20
#endif
#ifndef MFD_HUGETLB
#define MFD_HUGETLB 4
#endif

#define PAGE 4096UL
#define GRANULE 16UL
#define TAGS_PER_PAGE 256UL
#define BASE 0x40000000ULL /* guest RAM's first IPA, as hosts/constants.py */
#define TO_GUEST 0ULL
#define FROM_GUEST 1ULL

typedef uint64_t u64;

static int kvm = -1;
static int ncases;

/* ---- one output line ------------------------------------------------ */
static char line[16384];
static size_t used;

static void add(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line + used, sizeof(line) - used, fmt, ap);
	va_end(ap);
	if (n > 0)
		used = used + (size_t)n < sizeof(line) ? used + (size_t)n : sizeof(line) - 1;
}

static int nobs;

/* Starts a case: its name and the VM it runs on. */
static void begin(const char *name, const char *setup)
{
	used = 0;
	nobs = 0;
	add("%s | %s | ", name, setup);
}

static const char *errname(long e)
{
	static char other[32];
	switch (e) {
	case EPERM: return "EPERM";
	case ENOENT: return "ENOENT";
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
	case ENOSPC: return "ENOSPC";
	case ENOTTY: return "ENOTTY";
	case ERANGE: return "ERANGE";
	case ENOSYS: return "ENOSYS";
	case EOPNOTSUPP: return "EOPNOTSUPP";
	}
	snprintf(other, sizeof(other), "E%ld", e);
	return other;
}

/* A return value: >= 0 as a number, < 0 as -errno's name. */
static const char *rv(long r)
{
	static char buf[4][32];
	static int i;
	i = (i + 1) % 4;
	if (r < 0)
		return errname(-r);
	snprintf(buf[i], sizeof(buf[i]), "%ld", r);
	return buf[i];
}

/* The call and its result. */
static void result(const char *call, long r)
{
	add("%s | %s | ", call, rv(r));
}

static void obs(const char *key, const char *fmt, ...)
{
	va_list ap;
	add("%s%s=", nobs++ ? "; " : "", key);
	va_start(ap, fmt);
	int n = vsnprintf(line + used, sizeof(line) - used, fmt, ap);
	va_end(ap);
	if (n > 0)
		used = used + (size_t)n < sizeof(line) ? used + (size_t)n : sizeof(line) - 1;
}

static void end(void)
{
	/* no trailing blanks: the golden file is compared line by line */
	while (used && line[used - 1] == ' ')
		used--;
	if (used >= 2 && line[used - 1] == '|' && line[used - 2] == ' ')
		used -= 2;
	line[used] = 0;
	printf("FIDELITY case %s\n", line);
	fflush(stdout);
	ncases++;
}

/* ---- tags: the test pattern and descriptions ------------------------ */
static unsigned char pat(unsigned seed, unsigned long g)
{
	return (unsigned char)((seed + g / 16) & 15);
}

/* npages of pattern into buf, page p with seed (seed + p) & 15. */
static void fill_pat(unsigned char *buf, unsigned long npages, unsigned seed)
{
	for (unsigned long p = 0; p < npages; p++)
		for (unsigned long g = 0; g < TAGS_PER_PAGE; g++)
			buf[p * TAGS_PER_PAGE + g] = pat((seed + p) & 15, g);
}

static const char *describe(const unsigned char *t, unsigned long n)
{
	static char out[8192];
	size_t o = 0;
	out[0] = 0;
	for (unsigned long start = 0; start < n; start += TAGS_PER_PAGE) {
		unsigned long len = n - start < TAGS_PER_PAGE ? n - start : TAGS_PER_PAGE;
		const unsigned char *c = t + start;
		int seed = -1;
		if (start)
			o += snprintf(out + o, sizeof(out) - o, "/");
		if (len == TAGS_PER_PAGE) {
			for (unsigned s = 0; s < 16 && seed < 0; s++) {
				unsigned long g = 0;
				while (g < len && c[g] == pat(s, g))
					g++;
				if (g == len)
					seed = (int)s;
			}
		}
		if (seed >= 0) {
			o += snprintf(out + o, sizeof(out) - o, "p%x", seed);
			continue;
		}
		for (unsigned long g = 0; g < len;) {
			unsigned long k = g;
			while (k < len && c[k] == c[g])
				k++;
			o += snprintf(out + o, sizeof(out) - o, "%s%x*%lu", g ? "." : "", c[g], k - g);
			g = k;
		}
	}
	return out;
}

/* ---- VMs and their memory ------------------------------------------- */
enum backing { MEMFD, ANON, ANON_SHARED, RAMFS_FILE, HUGETLB };
static const char *backing_name[] = { "memfd", "anon", "anon-shared", "ramfs-file", "hugetlb" };

struct vm {
	int fd;
	int memfd;       /* the backing file, or -1 for anonymous memory */
	unsigned char *ram; /* the VMM's mapping: every memslot's userspace address */
	unsigned long npages;
};

static long sys_ret(long r)
{
	return r < 0 ? -errno : r;
}

static long enable_mte(int vmfd)
{
	struct kvm_enable_cap cap = { .cap = KVM_CAP_ARM_MTE };
	return sys_ret(ioctl(vmfd, KVM_ENABLE_CAP, &cap));
}

static long set_slot(int vmfd, unsigned slot, u64 ipa, void *host, u64 size, unsigned flags)
{
	struct kvm_userspace_memory_region r = {
		.slot = slot, .flags = flags, .guest_phys_addr = ipa,
		.memory_size = size, .userspace_addr = (u64)(uintptr_t)host,
	};
	return sys_ret(ioctl(vmfd, KVM_SET_USER_MEMORY_REGION, &r));
}

static int new_vmfd(void)
{
	int fd = ioctl(kvm, KVM_CREATE_VM, 0);
	if (fd < 0) {
		printf("FIDELITY error KVM_CREATE_VM %s\n", errname(errno));
		exit(1);
	}
	return fd;
}

/* Guest RAM of npages with the given backing, mapped read/write (prot may
 * add PROT_MTE or drop PROT_WRITE). */
static unsigned char *map_ram(struct vm *v, enum backing b, unsigned long npages, int prot)
{
	size_t size = npages * PAGE;
	void *p = MAP_FAILED;
	v->memfd = -1;
	v->npages = npages;
	switch (b) {
	case MEMFD:
		v->memfd = memfd_create("guest-ram", MFD_CLOEXEC);
		break;
	case HUGETLB:
		v->memfd = memfd_create("guest-ram-huge", MFD_CLOEXEC | MFD_HUGETLB);
		break;
	case RAMFS_FILE:
		v->memfd = open("/ramfs/guest-ram", O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
		break;
	case ANON:
		p = mmap(NULL, size, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		break;
	case ANON_SHARED:
		p = mmap(NULL, size, prot, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
		break;
	}
	if (v->memfd >= 0) {
		if (ftruncate(v->memfd, (off_t)size) == 0)
			p = mmap(NULL, size, prot, MAP_SHARED, v->memfd, 0);
	}
	v->ram = p == MAP_FAILED ? NULL : p;
	return v->ram;
}

/* The usual VM: memslots of the given page counts side by side from BASE,
 * all in one memfd, then KVM_CAP_ARM_MTE.  hosts/ makes a VM in that order,
 * and it is the order 6.1 needs: it refuses a shared-memory memslot once
 * MTE is on (see the backing.* cases), but not MTE once the slot is in. */
static void std_vm(struct vm *v, const unsigned long *slots, int nslots)
{
	unsigned long total = 0;
	for (int i = 0; i < nslots; i++)
		total += slots[i];
	v->fd = new_vmfd();
	map_ram(v, MEMFD, total, PROT_READ | PROT_WRITE);
	unsigned long off = 0;
	for (int i = 0; i < nslots; i++) {
		set_slot(v->fd, (unsigned)i, BASE + off * PAGE, v->ram + off * PAGE, slots[i] * PAGE, 0);
		off += slots[i];
	}
	enable_mte(v->fd);
}

static void one_slot_vm(struct vm *v, unsigned long npages)
{
	std_vm(v, &npages, 1);
}

static void vm_close(struct vm *v)
{
	if (v->ram)
		munmap(v->ram, v->npages * PAGE);
	if (v->memfd >= 0)
		close(v->memfd);
	close(v->fd);
}

static long copy_tags_r(int vmfd, u64 ipa, u64 len, void *buf, u64 flags, u64 r0, u64 r1)
{
	struct kvm_arm_copy_mte_tags c = {
		.guest_ipa = ipa, .length = len, .addr = buf, .flags = flags,
		.reserved = { r0, r1 },
	};
	return sys_ret(ioctl(vmfd, KVM_ARM_MTE_COPY_TAGS, &c));
}

static long copy_tags(int vmfd, u64 ipa, u64 len, void *buf, u64 flags)
{
	return copy_tags_r(vmfd, ipa, len, buf, flags, 0, 0);
}

/* The call as printed: COPY_TAGS(TO|FROM, ipa=+0x1000, len=0x2000, buf=...) with
 * ipa relative to BASE. */
static const char *copy_call(u64 flags, u64 ipa, u64 len, const char *buf)
{
	static char s[256];
	const char *dir = flags == TO_GUEST ? "TO" : flags == FROM_GUEST ? "FROM" : NULL;
	char fl[32];
	if (!dir) {
		snprintf(fl, sizeof(fl), "flags=0x%llx", (unsigned long long)flags);
		dir = fl;
	}
	if (ipa >= BASE)
		snprintf(s, sizeof(s), "COPY_TAGS(%s, ipa=+0x%llx, len=0x%llx, buf=%s)", dir,
			 (unsigned long long)(ipa - BASE), (unsigned long long)len, buf);
	else
		snprintf(s, sizeof(s), "COPY_TAGS(%s, ipa=0x%llx, len=0x%llx, buf=%s)", dir,
			 (unsigned long long)ipa, (unsigned long long)len, buf);
	return s;
}

static unsigned char scratch[64 * TAGS_PER_PAGE];

/* The tags of npages from guest page `page` as FROM_GUEST reads them. */
static const char *tags_of(struct vm *v, unsigned long page, unsigned long npages)
{
	memset(scratch, 0xee, npages * TAGS_PER_PAGE);
	long r = copy_tags(v->fd, BASE + page * PAGE, npages * PAGE, scratch, FROM_GUEST);
	if (r != (long)(npages * PAGE)) {
		static char err[64];
		snprintf(err, sizeof(err), "read:%s", rv(r));
		return err;
	}
	return describe(scratch, npages * TAGS_PER_PAGE);
}

/* Pattern tags onto npages from `page` with TO_GUEST (setup, not the call under test). */
static long put_tags(struct vm *v, unsigned long page, unsigned long npages, unsigned seed)
{
	fill_pat(scratch, npages, seed);
	return copy_tags(v->fd, BASE + page * PAGE, npages * PAGE, scratch, TO_GUEST);
}

static u64 zero_pfn;

static u64 pagemap_pfn(const void *addr)
{
	static int fd = -1;
	u64 e = 0;
	if (fd < 0)
		fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (pread(fd, &e, sizeof(e), (off_t)((uintptr_t)addr / PAGE * 8)) != sizeof(e))
		return 0;
	return (e >> 63) ? (e & ((1ULL << 55) - 1)) : 0;
}

/* Which of npages from page `first` of the VMM's mapping hold memory
 * (mincore; 'z': the zero page, found with /proc/self/pagemap). */
static const char *residency(struct vm *v, unsigned long first, unsigned long npages)
{
	static char out[128];
	unsigned char vec[64];
	if (mincore(v->ram + first * PAGE, npages * PAGE, vec) != 0) {
		snprintf(out, sizeof(out), "mincore:%s", errname(errno));
		return out;
	}
	for (unsigned long i = 0; i < npages; i++) {
		u64 pfn = v->memfd < 0 ? pagemap_pfn(v->ram + (first + i) * PAGE) : 0;
		out[i] = (pfn && pfn == zero_pfn) ? 'z' : (vec[i] & 1) ? '1' : '0';
	}
	out[npages] = 0;
	return out;
}

/* KVM_GET_DIRTY_LOG of a slot as one character per page. */
static const char *dirty_log(struct vm *v, unsigned slot, unsigned long npages)
{
	static char out[128];
	u64 bitmap[4] = { 0 };
	struct kvm_dirty_log log = { .slot = slot, .dirty_bitmap = bitmap };
	if (ioctl(v->fd, KVM_GET_DIRTY_LOG, &log) < 0)
		return errname(errno);
	for (unsigned long i = 0; i < npages; i++)
		out[i] = (bitmap[i / 64] >> (i % 64)) & 1 ? '1' : '0';
	out[npages] = 0;
	return out;
}

/* ---- the VMM's PROT_MTE alias of a memfd: LDG and STG ---------------- */
static unsigned char *alias_map(struct vm *v)
{
	void *p = mmap(NULL, v->npages * PAGE, PROT_READ | PROT_WRITE | PROT_MTE, MAP_SHARED, v->memfd, 0);
	return p == MAP_FAILED ? NULL : p;
}

static unsigned ldg(const void *addr)
{
	uintptr_t p = (uintptr_t)addr;
	__asm__ volatile("ldg %0, [%0]" : "+r"(p) : : "memory");
	return (unsigned)(p >> 56) & 15;
}

static void stg(void *addr, unsigned tag)
{
	uintptr_t p = (uintptr_t)addr | ((uintptr_t)tag << 56);
	__asm__ volatile("stg %0, [%0]" : : "r"(p) : "memory");
}

/* LDG over npages of the alias from `page`, described. */
static const char *ldg_pages(unsigned char *alias, unsigned long page, unsigned long npages)
{
	for (unsigned long g = 0; g < npages * TAGS_PER_PAGE; g++)
		scratch[g] = (unsigned char)ldg(alias + page * PAGE + g * GRANULE);
	return describe(scratch, npages * TAGS_PER_PAGE);
}

/* STG the pattern over npages of the alias from `page`. */
static void stg_pages(unsigned char *alias, unsigned long page, unsigned long npages, unsigned seed)
{
	fill_pat(scratch, npages, seed);
	for (unsigned long g = 0; g < npages * TAGS_PER_PAGE; g++)
		stg(alias + page * PAGE + g * GRANULE, scratch[g]);
}

/* The first data byte of each page, as "xx" per page joined by "/". */
static const char *data_of(const unsigned char *ram, unsigned long page, unsigned long npages)
{
	static char out[256];
	size_t o = 0;
	for (unsigned long i = 0; i < npages; i++) {
		const unsigned char *p = ram + (page + i) * PAGE;
		int same = 1;
		for (unsigned long k = 1; k < PAGE; k++)
			same &= p[k] == p[0];
		o += snprintf(out + o, sizeof(out) - o, "%s%02x%s", i ? "/" : "", p[0], same ? "" : "+");
	}
	return out;
}

/* ---- user buffers that end at a PROT_NONE guard page --------------- */
static unsigned char *guard_area;

/* A buffer with exactly `readable` bytes before an inaccessible page,
 * filled with 0xee (never a tag) so untouched bytes show. */
static unsigned char *guarded(unsigned long readable)
{
	unsigned char *end = guard_area + 8 * PAGE; /* the guard page follows */
	memset(guard_area, 0xee, 8 * PAGE);
	return end - readable;
}

/* ---- userfaultfd ---------------------------------------------------- */
struct uffd {
	int fd;
	int mode;          /* UFFDIO_REGISTER_MODE_MISSING or _MINOR */
	volatile int stop;
	char events[64];   /* one letter per fault: R/W missing, r/w minor */
	int nevents;
	pthread_t thread;
	unsigned char *src; /* data a MISSING fault is resolved with */
};

static void *uffd_handler(void *arg)
{
	struct uffd *u = arg;
	for (;;) {
		struct pollfd pfd = { .fd = u->fd, .events = POLLIN };
		int n = poll(&pfd, 1, 50);
		if (n <= 0) {
			if (u->stop)
				break;
			continue;
		}
		struct uffd_msg msg;
		if (read(u->fd, &msg, sizeof(msg)) != sizeof(msg))
			continue;
		if (msg.event != UFFD_EVENT_PAGEFAULT)
			continue;
		u64 flags = msg.arg.pagefault.flags;
		u64 addr = msg.arg.pagefault.address & ~(PAGE - 1);
		int minor = (flags & UFFD_PAGEFAULT_FLAG_MINOR) != 0;
		int write = (flags & UFFD_PAGEFAULT_FLAG_WRITE) != 0;
		if (u->nevents < 60)
			u->events[u->nevents++] = minor ? (write ? 'w' : 'r') : (write ? 'W' : 'R');
		if (u->nevents > 8) { /* never resolving: let the kernel go on alone */
			struct uffdio_range all = { .start = addr, .len = PAGE };
			ioctl(u->fd, UFFDIO_WAKE, &all);
			continue;
		}
		if (minor) {
			struct uffdio_continue c = { .range = { .start = addr, .len = PAGE } };
			if (ioctl(u->fd, UFFDIO_CONTINUE, &c) < 0)
				ioctl(u->fd, UFFDIO_WAKE, &c.range);
		} else {
			struct uffdio_copy c = { .dst = addr, .src = (u64)(uintptr_t)u->src, .len = PAGE };
			if (ioctl(u->fd, UFFDIO_COPY, &c) < 0)
				ioctl(u->fd, UFFDIO_WAKE, &(struct uffdio_range){ .start = addr, .len = PAGE });
		}
	}
	return NULL;
}

/* Open a userfaultfd and register npages of `ram` with `mode`; 0 or -errno. */
static long uffd_open(struct uffd *u, unsigned char *ram, unsigned long npages, int mode)
{
	memset(u, 0, sizeof(*u));
	u->mode = mode;
	u->fd = (int)syscall(__NR_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (u->fd < 0)
		return -errno;
	struct uffdio_api api = { .api = UFFD_API,
				  .features = mode == UFFDIO_REGISTER_MODE_MINOR ? UFFD_FEATURE_MINOR_SHMEM : 0 };
	if (ioctl(u->fd, UFFDIO_API, &api) < 0)
		return -errno;
	struct uffdio_register reg = { .range = { .start = (u64)(uintptr_t)ram, .len = npages * PAGE }, .mode = (u64)mode };
	if (ioctl(u->fd, UFFDIO_REGISTER, &reg) < 0)
		return -errno;
	static unsigned char src[PAGE] __attribute__((aligned(4096)));
	memset(src, 0x5a, sizeof(src));
	u->src = src;
	pthread_create(&u->thread, NULL, uffd_handler, u);
	return 0;
}

static const char *uffd_close(struct uffd *u)
{
	u->stop = 1;
	pthread_join(u->thread, NULL);
	close(u->fd);
	u->events[u->nevents] = 0;
	return u->nevents ? u->events : "-";
}

/* UFFDIO_COPY of a page of 0x5a bytes to `page`; 0 or -errno. */
static long uffd_copy(struct uffd *u, unsigned char *ram, unsigned long page)
{
	struct uffdio_copy c = { .dst = (u64)(uintptr_t)(ram + page * PAGE), .src = (u64)(uintptr_t)u->src, .len = PAGE };
	return ioctl(u->fd, UFFDIO_COPY, &c) < 0 ? -errno : 0;
}

static long uffd_continue(struct uffd *u, unsigned char *ram, unsigned long page)
{
	struct uffdio_continue c = { .range = { .start = (u64)(uintptr_t)(ram + page * PAGE), .len = PAGE } };
	return ioctl(u->fd, UFFDIO_CONTINUE, &c) < 0 ? -errno : 0;
}

/* ==================================================================== */
/* The cases.  Each prints exactly one line.                            */
/* ==================================================================== */

/* -- the argument rules of KVM_ARM_MTE_COPY_TAGS ---------------------- */
struct arg_case {
	const char *name;
	u64 flags, ipa, len, r0, r1;
};

static void argument_rules(void)
{
	static const struct arg_case cases[] = {
		{ "args.to_guest", TO_GUEST, BASE, PAGE, 0, 0 },
		{ "args.from_guest", FROM_GUEST, BASE, PAGE, 0, 0 },
		{ "args.flags_2", 2, BASE, PAGE, 0, 0 },
		{ "args.flags_3", 3, BASE, PAGE, 0, 0 },
		{ "args.flags_bit63", 1ULL << 63, BASE, PAGE, 0, 0 },
		{ "args.reserved0", TO_GUEST, BASE, PAGE, 1, 0 },
		{ "args.reserved1", FROM_GUEST, BASE, PAGE, 0, 1 },
		{ "args.ipa_granule", TO_GUEST, BASE + GRANULE, PAGE, 0, 0 },
		{ "args.ipa_half_page", FROM_GUEST, BASE + PAGE / 2, PAGE, 0, 0 },
		{ "args.len_granule", TO_GUEST, BASE, GRANULE, 0, 0 },
		{ "args.len_page_plus_1", FROM_GUEST, BASE, PAGE + 1, 0, 0 },
		{ "args.len_0_to", TO_GUEST, BASE, 0, 0, 0 },
		{ "args.len_0_from", FROM_GUEST, BASE, 0, 0, 0 },
		{ "args.len_0_no_slot", FROM_GUEST, BASE + 0x10000000, 0, 0, 0 },
		{ "args.len_0_ipa_unaligned", FROM_GUEST, BASE + GRANULE, 0, 0, 0 },
		{ "args.len_0_flags_2", 2, BASE, 0, 0, 0 },
		{ "args.len_int_max_aligned", FROM_GUEST, BASE, 0x7ffff000ULL, 0, 0 },
		{ "args.len_int_max_aligned_to", TO_GUEST, BASE, 0x7ffff000ULL, 0, 0 },
		{ "args.len_2g", FROM_GUEST, BASE, 0x80000000ULL, 0, 0 },
		{ "args.len_4g_plus_page", FROM_GUEST, BASE, 0x100001000ULL, 0, 0 },
		{ "args.len_max_aligned", FROM_GUEST, BASE, ~0xfffULL, 0, 0 },
		{ "args.ipa_no_slot", FROM_GUEST, BASE + 0x10000000, PAGE, 0, 0 },
		{ "args.ipa_zero", TO_GUEST, 0, PAGE, 0, 0 },
		{ "args.ipa_below_slot", FROM_GUEST, BASE - PAGE, 2 * PAGE, 0, 0 },
		{ "args.ipa_huge", FROM_GUEST, 1ULL << 52, PAGE, 0, 0 },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const struct arg_case *c = &cases[i];
		struct vm v;
		one_slot_vm(&v, 4);
		put_tags(&v, 0, 4, 1);
		static unsigned char buf[4 * TAGS_PER_PAGE];
		fill_pat(buf, 4, 7);
		begin(c->name, "mte memfd slots=4");
		char call[256];
		snprintf(call, sizeof(call), "%s", copy_call(c->flags, c->ipa, c->len, "1024"));
		if (c->r0 || c->r1)
			snprintf(call + strlen(call) - 1, sizeof(call) - strlen(call) + 1, ", reserved=%llu:%llu)",
				 (unsigned long long)c->r0, (unsigned long long)c->r1);
		result(call, copy_tags_r(v.fd, c->ipa, c->len, buf, c->flags, c->r0, c->r1));
		obs("tags", "%s", tags_of(&v, 0, 4));
		if (c->flags == FROM_GUEST)
			obs("buf", "%s", describe(buf, 4 * TAGS_PER_PAGE));
		end();
		vm_close(&v);
	}

	/* Without KVM_CAP_ARM_MTE every call is refused, whatever else is wrong. */
	static const struct arg_case off[] = {
		{ "args.no_mte_to", TO_GUEST, BASE, PAGE, 0, 0 },
		{ "args.no_mte_from", FROM_GUEST, BASE, PAGE, 0, 0 },
		{ "args.no_mte_len_0", FROM_GUEST, BASE, 0, 0, 0 },
		{ "args.no_mte_flags_2", 2, BASE, PAGE, 0, 0 },
	};
	for (size_t i = 0; i < sizeof(off) / sizeof(off[0]); i++) {
		struct vm v;
		v.fd = new_vmfd();
		map_ram(&v, MEMFD, 4, PROT_READ | PROT_WRITE);
		set_slot(v.fd, 0, BASE, v.ram, 4 * PAGE, 0);
		static unsigned char buf[4 * TAGS_PER_PAGE];
		begin(off[i].name, "no-mte memfd slots=4");
		result(copy_call(off[i].flags, off[i].ipa, off[i].len, "1024"),
		       copy_tags(v.fd, off[i].ipa, off[i].len, buf, off[i].flags));
		obs("res", "%s", residency(&v, 0, 4));
		end();
		vm_close(&v);
	}

	/* A NULL argument pointer: the ioctl cannot read its struct. */
	{
		struct vm v;
		one_slot_vm(&v, 4);
		begin("args.struct_null", "mte memfd slots=4");
		result("COPY_TAGS(struct=NULL)", sys_ret(ioctl(v.fd, KVM_ARM_MTE_COPY_TAGS, NULL)));
		end();
		vm_close(&v);
	}
}

/* -- return values: partial copies at the end of memslots -------------- */
static void partial_copies(void)
{
	static unsigned char buf[16 * TAGS_PER_PAGE];
	struct vm v;
	unsigned long two[] = { 4, 4 };

	one_slot_vm(&v, 4);
	fill_pat(buf, 2, 3);
	begin("part.end_of_slot_to", "mte memfd slots=4");
	result(copy_call(TO_GUEST, BASE + 3 * PAGE, 2 * PAGE, "2048"),
	       copy_tags(v.fd, BASE + 3 * PAGE, 2 * PAGE, buf, TO_GUEST));
	obs("tags", "%s", tags_of(&v, 0, 4));
	end();
	vm_close(&v);

	one_slot_vm(&v, 4);
	put_tags(&v, 0, 4, 1);
	memset(buf, 0xee, sizeof(buf));
	begin("part.end_of_slot_from", "mte memfd slots=4");
	result(copy_call(FROM_GUEST, BASE + 2 * PAGE, 3 * PAGE, "3072"),
	       copy_tags(v.fd, BASE + 2 * PAGE, 3 * PAGE, buf, FROM_GUEST));
	obs("buf", "%s", describe(buf, 3 * TAGS_PER_PAGE));
	end();
	vm_close(&v);

	one_slot_vm(&v, 4);
	begin("part.past_the_end", "mte memfd slots=4");
	result(copy_call(TO_GUEST, BASE + 4 * PAGE, PAGE, "1024"), copy_tags(v.fd, BASE + 4 * PAGE, PAGE, buf, TO_GUEST));
	end();
	vm_close(&v);

	one_slot_vm(&v, 4);
	fill_pat(buf, 8, 5);
	begin("part.whole_slot_and_beyond_to", "mte memfd slots=4");
	result(copy_call(TO_GUEST, BASE, 8 * PAGE, "4096"), copy_tags(v.fd, BASE, 8 * PAGE, buf, TO_GUEST));
	obs("tags", "%s", tags_of(&v, 0, 4));
	end();
	vm_close(&v);

	std_vm(&v, two, 2);
	fill_pat(buf, 2, 9);
	begin("part.across_two_slots_to", "mte memfd slots=4+4");
	result(copy_call(TO_GUEST, BASE + 3 * PAGE, 2 * PAGE, "2048"),
	       copy_tags(v.fd, BASE + 3 * PAGE, 2 * PAGE, buf, TO_GUEST));
	obs("tags", "%s", tags_of(&v, 2, 4));
	end();
	vm_close(&v);

	std_vm(&v, two, 2);
	put_tags(&v, 0, 8, 2);
	memset(buf, 0xee, sizeof(buf));
	begin("part.across_two_slots_from", "mte memfd slots=4+4");
	result(copy_call(FROM_GUEST, BASE + 2 * PAGE, 4 * PAGE, "4096"),
	       copy_tags(v.fd, BASE + 2 * PAGE, 4 * PAGE, buf, FROM_GUEST));
	obs("buf", "%s", describe(buf, 4 * TAGS_PER_PAGE));
	end();
	vm_close(&v);

	std_vm(&v, two, 2);
	fill_pat(buf, 10, 4);
	begin("part.two_slots_and_beyond_to", "mte memfd slots=4+4");
	result(copy_call(TO_GUEST, BASE, 10 * PAGE, "10240"), copy_tags(v.fd, BASE, 10 * PAGE, buf, TO_GUEST));
	obs("tags", "%s", tags_of(&v, 0, 8));
	end();
	vm_close(&v);

	/* A hole in the guest's address space: slot 1 starts 4 pages after
	 * slot 0 ends.  (hosts/ has no holes: replayed as the end of RAM.) */
	v.fd = new_vmfd();
	map_ram(&v, MEMFD, 8, PROT_READ | PROT_WRITE);
	set_slot(v.fd, 0, BASE, v.ram, 4 * PAGE, 0);
	set_slot(v.fd, 1, BASE + 8 * PAGE, v.ram + 4 * PAGE, 4 * PAGE, 0);
	enable_mte(v.fd);
	fill_pat(buf, 12, 6);
	begin("part.hole_between_slots_to", "mte memfd slots=4,hole=4,4");
	result(copy_call(TO_GUEST, BASE + 2 * PAGE, 8 * PAGE, "8192"),
	       copy_tags(v.fd, BASE + 2 * PAGE, 8 * PAGE, buf, TO_GUEST));
	obs("tags", "%s", tags_of(&v, 0, 4));
	end();
	vm_close(&v);
}

/* -- user buffers that fault partway ----------------------------------- */
struct fault_case {
	const char *name;
	u64 flags;
	unsigned long npages;   /* length of the call in pages */
	unsigned long readable; /* bytes of buffer before the guard page */
	int pretagged;          /* the pages held pattern tags (seed 1) before */
};

static void faulting_buffers(void)
{
	static const struct fault_case cases[] = {
		{ "fault.to_none_readable", TO_GUEST, 1, 0, 1 },
		{ "fault.to_mid_page0", TO_GUEST, 1, 100, 1 },
		{ "fault.to_at_page1", TO_GUEST, 2, 256, 1 },
		{ "fault.to_mid_page1", TO_GUEST, 2, 384, 1 },
		{ "fault.to_mid_page2_of_4", TO_GUEST, 4, 640, 1 },
		{ "fault.to_untouched_mid_page1", TO_GUEST, 2, 384, 0 },
		{ "fault.to_untouched_none_readable", TO_GUEST, 2, 0, 0 },
		{ "fault.from_none_readable", FROM_GUEST, 1, 0, 1 },
		{ "fault.from_mid_page0", FROM_GUEST, 1, 100, 1 },
		{ "fault.from_at_page1", FROM_GUEST, 2, 256, 1 },
		{ "fault.from_mid_page1", FROM_GUEST, 2, 384, 1 },
		{ "fault.from_untouched_mid_page1", FROM_GUEST, 2, 384, 0 },
		{ "fault.from_untouched_at_page2", FROM_GUEST, 3, 512, 0 },
		{ "fault.from_untouched_none_readable", FROM_GUEST, 2, 0, 0 },
	};
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const struct fault_case *c = &cases[i];
		struct vm v;
		one_slot_vm(&v, 4);
		if (c->pretagged)
			put_tags(&v, 0, 4, 1);
		unsigned char *buf = guarded(c->readable);
		if (c->flags == TO_GUEST) { /* the readable bytes: pattern seed 8 from the buffer's start */
			static unsigned char tmp[8 * TAGS_PER_PAGE];
			fill_pat(tmp, 8, 8);
			memcpy(buf, tmp, c->readable);
		}
		char bufdesc[32];
		snprintf(bufdesc, sizeof(bufdesc), "%lu+guard", c->readable);
		begin(c->name, c->pretagged ? "mte memfd slots=4 tagged=p1" : "mte memfd slots=4");
		result(copy_call(c->flags, BASE, c->npages * PAGE, bufdesc),
		       copy_tags(v.fd, BASE, c->npages * PAGE, buf, c->flags));
		obs("res", "%s", residency(&v, 0, 4));
		if (c->flags == FROM_GUEST)
			obs("buf", "%s", c->readable ? describe(buf, c->readable) : "-");
		obs("tags", "%s", tags_of(&v, 0, 4));
		end();
		vm_close(&v);
	}

	/* NULL buffers: nothing readable at all. */
	for (int dir = 0; dir < 2; dir++) {
		struct vm v;
		one_slot_vm(&v, 4);
		begin(dir ? "fault.from_null_buffer" : "fault.to_null_buffer", "mte memfd slots=4");
		result(copy_call(dir ? FROM_GUEST : TO_GUEST, BASE, PAGE, "NULL"),
		       copy_tags(v.fd, BASE, PAGE, NULL, dir ? FROM_GUEST : TO_GUEST));
		obs("res", "%s", residency(&v, 0, 4));
		obs("tags", "%s", tags_of(&v, 0, 4));
		end();
		vm_close(&v);
	}

	/* FROM_GUEST into a read-only buffer; TO_GUEST from one. */
	{
		struct vm v;
		one_slot_vm(&v, 4);
		put_tags(&v, 0, 4, 1);
		unsigned char *ro = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		fill_pat(ro, 1, 4);
		mprotect(ro, PAGE, PROT_READ);
		begin("fault.from_readonly_buffer", "mte memfd slots=4 tagged=p1");
		result(copy_call(FROM_GUEST, BASE, PAGE, "readonly"), copy_tags(v.fd, BASE, PAGE, ro, FROM_GUEST));
		obs("buf", "%s", describe(ro, TAGS_PER_PAGE));
		end();
		begin("fault.to_readonly_buffer", "mte memfd slots=4 tagged=p1");
		result(copy_call(TO_GUEST, BASE, PAGE, "readonly"), copy_tags(v.fd, BASE, PAGE, ro, TO_GUEST));
		obs("tags", "%s", tags_of(&v, 0, 1));
		end();
		munmap(ro, PAGE);
		vm_close(&v);
	}
}

/* -- untouched pages: their tags, and whether the call populates them -- */
static void untouched_pages(void)
{
	static unsigned char buf[4 * TAGS_PER_PAGE];
	for (int b = MEMFD; b <= ANON; b++) {
		char setup[64], name[64];
		snprintf(setup, sizeof(setup), "mte %s slots=4", backing_name[b]);
		for (int dir = 0; dir < 2; dir++) {
			struct vm v;
			v.fd = new_vmfd();
			map_ram(&v, (enum backing)b, 4, PROT_READ | PROT_WRITE);
			set_slot(v.fd, 0, BASE, v.ram, 4 * PAGE, 0);
			enable_mte(v.fd);
			snprintf(name, sizeof(name), "untouched.%s_%s", backing_name[b], dir ? "from" : "to");
			fill_pat(buf, 1, 2);
			memset(buf + TAGS_PER_PAGE, 0xee, TAGS_PER_PAGE);
			char before[16];
			snprintf(before, sizeof(before), "%s", residency(&v, 0, 4));
			begin(name, setup);
			result(copy_call(dir ? FROM_GUEST : TO_GUEST, BASE + PAGE, PAGE, "256"),
			       copy_tags(v.fd, BASE + PAGE, PAGE, buf, dir ? FROM_GUEST : TO_GUEST));
			obs("res_before", "%s", before);
			obs("res", "%s", residency(&v, 0, 4));
			if (dir)
				obs("buf", "%s", describe(buf, TAGS_PER_PAGE));
			obs("tags", "%s", tags_of(&v, 0, 4));
			obs("res_after_read", "%s", residency(&v, 0, 4));
			end();
			vm_close(&v);
		}
		/* a private page read by the ioctl (the zero page), then written */
		if (b == ANON) {
			struct vm v;
			v.fd = new_vmfd();
			map_ram(&v, ANON, 4, PROT_READ | PROT_WRITE);
			set_slot(v.fd, 0, BASE, v.ram, 4 * PAGE, 0);
			enable_mte(v.fd);
			copy_tags(v.fd, BASE, PAGE, buf, FROM_GUEST);
			char res1[16];
			snprintf(res1, sizeof(res1), "%s", residency(&v, 0, 1));
			fill_pat(buf, 1, 6);
			begin("untouched.anon_from_then_to", "mte anon slots=4");
			result(copy_call(TO_GUEST, BASE, PAGE, "256"), copy_tags(v.fd, BASE, PAGE, buf, TO_GUEST));
			obs("res_between", "%s", res1);
			obs("res", "%s", residency(&v, 0, 1));
			obs("tags", "%s", tags_of(&v, 0, 1));
			end();
			vm_close(&v);
		}
	}

	/* The VMM reads an untouched page (plain mapping), then the ioctl. */
	{
		struct vm v;
		one_slot_vm(&v, 4);
		volatile unsigned char sink = v.ram[0];
		(void)sink;
		begin("untouched.memfd_vmm_read_then_from", "mte memfd slots=4");
		result(copy_call(FROM_GUEST, BASE, PAGE, "256"), copy_tags(v.fd, BASE, PAGE, buf, FROM_GUEST));
		obs("buf", "%s", describe(buf, TAGS_PER_PAGE));
		obs("res", "%s", residency(&v, 0, 4));
		end();
		vm_close(&v);
	}
	/* The VMM writes data (plain mapping); the tags stay, the data too. */
	{
		struct vm v;
		one_slot_vm(&v, 4);
		put_tags(&v, 0, 1, 3);
		memset(v.ram, 0xab, PAGE);
		begin("untouched.tags_then_vmm_data", "mte memfd slots=4");
		result(copy_call(FROM_GUEST, BASE, PAGE, "256"), copy_tags(v.fd, BASE, PAGE, buf, FROM_GUEST));
		obs("buf", "%s", describe(buf, TAGS_PER_PAGE));
		obs("data", "%s", data_of(v.ram, 0, 1));
		end();
		vm_close(&v);
	}
	{
		struct vm v;
		one_slot_vm(&v, 4);
		memset(v.ram, 0xab, PAGE);
		fill_pat(buf, 1, 3);
		begin("untouched.vmm_data_then_to", "mte memfd slots=4");
		result(copy_call(TO_GUEST, BASE, PAGE, "256"), copy_tags(v.fd, BASE, PAGE, buf, TO_GUEST));
		obs("data", "%s", data_of(v.ram, 0, 1));
		obs("tags", "%s", tags_of(&v, 0, 1));
		end();
		vm_close(&v);
	}
}

/* -- which memslot backings an MTE VM accepts -------------------------- */
static void backings(void)
{
	for (int b = MEMFD; b <= HUGETLB; b++) {
		for (int order = 0; order < 2; order++) {
			struct vm v;
			unsigned long npages = b == HUGETLB ? 512 : 4;
			char name[64], setup[64];
			v.fd = new_vmfd();
			if (order == 0)
				enable_mte(v.fd);
			snprintf(name, sizeof(name), "backing.%s%s", backing_name[b], order ? "_cap_after_slot" : "");
			snprintf(setup, sizeof(setup), "%s %s slots=%lu", order ? "cap-after-slot" : "mte", backing_name[b],
				 npages);
			begin(name, setup);
			if (!map_ram(&v, (enum backing)b, npages, PROT_READ | PROT_WRITE)) {
				result("mmap", -errno);
				end();
				close(v.fd);
				continue;
			}
			long r = set_slot(v.fd, 0, BASE, v.ram, npages * PAGE, 0);
			result("SET_USER_MEMORY_REGION(slot=0)", r);
			if (order)
				obs("enable_cap", "%s", rv(enable_mte(v.fd)));
			static unsigned char buf[TAGS_PER_PAGE];
			fill_pat(buf, 1, 5);
			obs("to", "%s", rv(copy_tags(v.fd, BASE, PAGE, buf, TO_GUEST)));
			obs("tags", "%s", tags_of(&v, 0, 1));
			end();
			vm_close(&v);
		}
	}
	/* Private anonymous memory mapped PROT_MTE as the memslot itself, MTE
	 * enabled first (as QEMU does): the VMM's own tag access with no
	 * shared memory at all */
	{
		struct vm v;
		v.fd = new_vmfd();
		enable_mte(v.fd);
		map_ram(&v, ANON, 4, PROT_READ | PROT_WRITE | PROT_MTE);
		begin("backing.anon_prot_mte", "mte anon(PROT_MTE) slots=4");
		result("SET_USER_MEMORY_REGION(slot=0)", set_slot(v.fd, 0, BASE, v.ram, 4 * PAGE, 0));
		stg_pages(v.ram, 0, 1, 4);
		obs("tags", "%s", tags_of(&v, 0, 2));
		static unsigned char buf[TAGS_PER_PAGE];
		fill_pat(buf, 1, 9);
		obs("to", "%s", rv(copy_tags(v.fd, BASE + PAGE, PAGE, buf, TO_GUEST)));
		obs("ldg", "%s", ldg_pages(v.ram, 1, 1));
		end();
		vm_close(&v);
	}
	/* A PROT_MTE mapping as the memslot itself */
	{
		struct vm v;
		v.fd = new_vmfd();
		map_ram(&v, MEMFD, 4, PROT_READ | PROT_WRITE | PROT_MTE);
		begin("backing.memfd_prot_mte", "mte memfd(PROT_MTE) slots=4");
		result("SET_USER_MEMORY_REGION(slot=0)", set_slot(v.fd, 0, BASE, v.ram, 4 * PAGE, 0));
		enable_mte(v.fd);
		stg_pages(v.ram, 0, 1, 4);
		obs("tags", "%s", tags_of(&v, 0, 2));
		end();
		vm_close(&v);
	}
}

/* -- read-only memslots and read-only VMM mappings --------------------- */
static void read_only(void)
{
	static unsigned char buf[TAGS_PER_PAGE];
	for (int kind = 0; kind < 2; kind++) {
		for (int dir = 0; dir < 2; dir++) {
			struct vm v;
			v.fd = new_vmfd();
			map_ram(&v, MEMFD, 4, kind ? PROT_READ : PROT_READ | PROT_WRITE);
			long rs = set_slot(v.fd, 0, BASE, v.ram, 4 * PAGE, kind ? 0 : KVM_MEM_READONLY);
			enable_mte(v.fd);
			char name[64];
			snprintf(name, sizeof(name), "readonly.%s_%s", kind ? "vmm_mapping" : "memslot", dir ? "from" : "to");
			begin(name, kind ? "mte memfd(PROT_READ) slots=4" : "mte memfd slots=4(READONLY)");
			fill_pat(buf, 1, 5);
			result(copy_call(dir ? FROM_GUEST : TO_GUEST, BASE, PAGE, "256"),
			       copy_tags(v.fd, BASE, PAGE, buf, dir ? FROM_GUEST : TO_GUEST));
			obs("slot", "%s", rv(rs));
			obs("res", "%s", residency(&v, 0, 4));
			obs("tags", "%s", tags_of(&v, 0, 1));
			end();
			vm_close(&v);
		}
	}
}

/* -- KVM_ENABLE_CAP(KVM_CAP_ARM_MTE): when it may be enabled ------------ */
static void capability(void)
{
	begin("cap.check_extension", "kvm");
	result("CHECK_EXTENSION(KVM_CAP_ARM_MTE)", sys_ret(ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE)));
	end();

	int fd = new_vmfd();
	begin("cap.check_extension_vm", "vm");
	result("CHECK_EXTENSION(KVM_CAP_ARM_MTE)", sys_ret(ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_ARM_MTE)));
	end();
	begin("cap.fresh_vm", "vm");
	result("ENABLE_CAP(MTE)", enable_mte(fd));
	end();
	begin("cap.twice", "vm mte");
	result("ENABLE_CAP(MTE)", enable_mte(fd));
	end();
	close(fd);

	struct vm v;
	v.fd = new_vmfd();
	map_ram(&v, MEMFD, 4, PROT_READ | PROT_WRITE);
	set_slot(v.fd, 0, BASE, v.ram, 4 * PAGE, 0);
	begin("cap.after_memslot", "vm memfd slots=4");
	result("ENABLE_CAP(MTE)", enable_mte(v.fd));
	static unsigned char buf[TAGS_PER_PAGE];
	fill_pat(buf, 1, 5);
	obs("to", "%s", rv(copy_tags(v.fd, BASE, PAGE, buf, TO_GUEST)));
	obs("tags", "%s", tags_of(&v, 0, 1));
	end();
	vm_close(&v);

	v.fd = new_vmfd();
	map_ram(&v, MEMFD, 4, PROT_READ | PROT_WRITE);
	set_slot(v.fd, 0, BASE, v.ram, 4 * PAGE, 0);
	int vcpu = ioctl(v.fd, KVM_CREATE_VCPU, 0);
	begin("cap.after_vcpu", "vm memfd slots=4 vcpus=1");
	result("ENABLE_CAP(MTE)", enable_mte(v.fd));
	obs("vcpu", "%s", vcpu >= 0 ? "0" : errname(errno));
	obs("from", "%s", rv(copy_tags(v.fd, BASE, PAGE, buf, FROM_GUEST)));
	end();
	if (vcpu >= 0)
		close(vcpu);
	vm_close(&v);

	/* enabled, then a vCPU: the capability stays */
	one_slot_vm(&v, 4);
	vcpu = ioctl(v.fd, KVM_CREATE_VCPU, 0);
	begin("cap.then_vcpu_then_again", "mte memfd slots=4 vcpus=1");
	result("ENABLE_CAP(MTE)", enable_mte(v.fd));
	obs("from", "%s", rv(copy_tags(v.fd, BASE, PAGE, buf, FROM_GUEST)));
	end();
	if (vcpu >= 0)
		close(vcpu);
	vm_close(&v);
}

/* -- the ioctl and dirty logging --------------------------------------- */
static void dirty_logging(void)
{
	static unsigned char buf[4 * TAGS_PER_PAGE];
	for (int what = 0; what < 5; what++) {
		struct vm v;
		static const char *names[] = { "dirty.to_guest", "dirty.from_guest", "dirty.vmm_data_store",
					       "dirty.vmm_stg", "dirty.to_guest_untouched" };
		v.fd = new_vmfd();
		map_ram(&v, MEMFD, 4, PROT_READ | PROT_WRITE);
		set_slot(v.fd, 0, BASE, v.ram, 4 * PAGE, 0);
		enable_mte(v.fd);
		if (what != 4)
			put_tags(&v, 0, 4, 1); /* every page tagged and populated */
		/* then dirty logging switched on, as a migration source does */
		long rs = set_slot(v.fd, 0, BASE, v.ram, 4 * PAGE, KVM_MEM_LOG_DIRTY_PAGES);
		char first[32];
		snprintf(first, sizeof(first), "%s", dirty_log(&v, 0, 4));
		begin(names[what], what == 4 ? "mte memfd slots=4 +LOG_DIRTY_PAGES" : "mte memfd slots=4 tagged=p1 +LOG_DIRTY_PAGES");
		fill_pat(buf, 1, 6);
		unsigned char *alias = NULL;
		switch (what) {
		case 0:
		case 4:
			result(copy_call(TO_GUEST, BASE + PAGE, PAGE, "256"), copy_tags(v.fd, BASE + PAGE, PAGE, buf, TO_GUEST));
			break;
		case 1:
			result(copy_call(FROM_GUEST, BASE + PAGE, PAGE, "256"),
			       copy_tags(v.fd, BASE + PAGE, PAGE, buf, FROM_GUEST));
			break;
		case 2:
			memset(v.ram + PAGE, 0xcd, PAGE);
			result("VMM store(page=1)", 0);
			break;
		case 3:
			alias = alias_map(&v);
			stg_pages(alias, 1, 1, 6);
			result("VMM STG(page=1)", 0);
			break;
		}
		obs("log_on", "%s", rv(rs));
		obs("log_before", "%s", first);
		obs("log", "%s", dirty_log(&v, 0, 4));
		obs("tags", "%s", tags_of(&v, 1, 1));
		end();
		if (alias)
			munmap(alias, 4 * PAGE);
		vm_close(&v);
	}

	/* logging on another memslot than the one the tags go to; logging
	 * switched off again; a zero-length call while logging */
	for (int what = 0; what < 3; what++) {
		static const char *names[] = { "dirty.to_guest_other_slot_logging", "dirty.to_guest_after_log_off",
					       "dirty.to_guest_len_0_logging" };
		static const char *setups[] = { "mte memfd slots=4+4 slot1+LOG_DIRTY_PAGES",
						"mte memfd slots=4 +LOG_DIRTY_PAGES -LOG_DIRTY_PAGES",
						"mte memfd slots=4 +LOG_DIRTY_PAGES" };
		struct vm v;
		unsigned long two[] = { 4, 4 };
		std_vm(&v, two, what ? 1 : 2);
		if (what == 0)
			set_slot(v.fd, 1, BASE + 4 * PAGE, v.ram + 4 * PAGE, 4 * PAGE, KVM_MEM_LOG_DIRTY_PAGES);
		else
			set_slot(v.fd, 0, BASE, v.ram, 4 * PAGE, KVM_MEM_LOG_DIRTY_PAGES);
		if (what == 1)
			set_slot(v.fd, 0, BASE, v.ram, 4 * PAGE, 0);
		fill_pat(buf, 1, 6);
		u64 len = what == 2 ? 0 : PAGE;
		begin(names[what], setups[what]);
		result(copy_call(TO_GUEST, BASE, len, "256"), copy_tags(v.fd, BASE, len, buf, TO_GUEST));
		obs("tags", "%s", tags_of(&v, 0, 1));
		end();
		vm_close(&v);
	}

	/* private anonymous memory, MTE first: the configuration 6.1 accepts
	 * dirty logging on */
	for (int dir = 0; dir < 2; dir++) {
		struct vm v;
		v.fd = new_vmfd();
		enable_mte(v.fd);
		map_ram(&v, ANON, 4, PROT_READ | PROT_WRITE);
		set_slot(v.fd, 0, BASE, v.ram, 4 * PAGE, 0);
		put_tags(&v, 0, 4, 1);
		long rs = set_slot(v.fd, 0, BASE, v.ram, 4 * PAGE, KVM_MEM_LOG_DIRTY_PAGES);
		char first[32];
		snprintf(first, sizeof(first), "%s", dirty_log(&v, 0, 4));
		fill_pat(buf, 1, 6);
		begin(dir ? "dirty.anon_from_guest" : "dirty.anon_to_guest", "mte anon slots=4 tagged=p1 +LOG_DIRTY_PAGES");
		result(copy_call(dir ? FROM_GUEST : TO_GUEST, BASE + PAGE, PAGE, "256"),
		       copy_tags(v.fd, BASE + PAGE, PAGE, buf, dir ? FROM_GUEST : TO_GUEST));
		obs("log_on", "%s", rv(rs));
		obs("log_before", "%s", first);
		obs("log", "%s", dirty_log(&v, 0, 4));
		obs("tags", "%s", tags_of(&v, 1, 1));
		end();
		vm_close(&v);
	}

	struct vm v;
	one_slot_vm(&v, 4);
	begin("dirty.log_not_enabled", "mte memfd slots=4");
	{
		u64 bitmap[1];
		struct kvm_dirty_log log = { .slot = 0, .dirty_bitmap = bitmap };
		result("GET_DIRTY_LOG(slot=0)", sys_ret(ioctl(v.fd, KVM_GET_DIRTY_LOG, &log)));
	}
	end();
	vm_close(&v);
}

/* -- tags through the VMM's PROT_MTE alias against the ioctl ------------ */
static void alias_against_ioctl(void)
{
	static unsigned char buf[4 * TAGS_PER_PAGE];
	struct vm v;
	unsigned char *alias;

	one_slot_vm(&v, 4);
	alias = alias_map(&v);
	stg_pages(alias, 0, 1, 4);
	begin("alias.stg_then_from", "mte memfd slots=4 alias");
	result(copy_call(FROM_GUEST, BASE, 2 * PAGE, "512"), copy_tags(v.fd, BASE, 2 * PAGE, buf, FROM_GUEST));
	obs("buf", "%s", describe(buf, 2 * TAGS_PER_PAGE));
	obs("res", "%s", residency(&v, 0, 4));
	end();
	munmap(alias, 4 * PAGE);
	vm_close(&v);

	one_slot_vm(&v, 4);
	fill_pat(buf, 2, 9);
	begin("alias.to_then_ldg", "mte memfd slots=4 alias");
	result(copy_call(TO_GUEST, BASE, 2 * PAGE, "512"), copy_tags(v.fd, BASE, 2 * PAGE, buf, TO_GUEST));
	alias = alias_map(&v);
	obs("ldg", "%s", ldg_pages(alias, 0, 3));
	obs("res", "%s", residency(&v, 0, 4));
	end();
	munmap(alias, 4 * PAGE);
	vm_close(&v);

	one_slot_vm(&v, 4);
	alias = alias_map(&v);
	begin("alias.ldg_untouched", "mte memfd slots=4 alias");
	result("VMM LDG(page=2)", 0);
	obs("ldg", "%s", ldg_pages(alias, 2, 1));
	obs("res", "%s", residency(&v, 0, 4));
	obs("tags", "%s", tags_of(&v, 2, 1));
	end();
	munmap(alias, 4 * PAGE);
	vm_close(&v);

	one_slot_vm(&v, 4);
	alias = alias_map(&v);
	begin("alias.stg_untouched_populates", "mte memfd slots=4 alias");
	stg_pages(alias, 3, 1, 2);
	result("VMM STG(page=3)", 0);
	obs("res", "%s", residency(&v, 0, 4));
	obs("tags", "%s", tags_of(&v, 3, 1));
	end();
	munmap(alias, 4 * PAGE);
	vm_close(&v);

	/* data written through the plain mapping first, never tagged: the
	 * alias's first access finds the page untagged and clears its tags */
	one_slot_vm(&v, 4);
	memset(v.ram, 0xab, PAGE);
	alias = alias_map(&v);
	begin("alias.vmm_data_then_ldg", "mte memfd slots=4 alias");
	result("VMM LDG(page=0)", 0);
	obs("ldg", "%s", ldg_pages(alias, 0, 1));
	obs("data", "%s", data_of(v.ram, 0, 1));
	end();
	munmap(alias, 4 * PAGE);
	vm_close(&v);

	/* STG then TO_GUEST: the ioctl overwrites, the alias sees it */
	one_slot_vm(&v, 4);
	alias = alias_map(&v);
	stg_pages(alias, 0, 1, 2);
	fill_pat(buf, 1, 12);
	begin("alias.stg_then_to", "mte memfd slots=4 alias");
	result(copy_call(TO_GUEST, BASE, PAGE, "256"), copy_tags(v.fd, BASE, PAGE, buf, TO_GUEST));
	obs("ldg", "%s", ldg_pages(alias, 0, 1));
	end();
	munmap(alias, 4 * PAGE);
	vm_close(&v);

	/* single granules: STG one granule, FROM_GUEST sees just it */
	one_slot_vm(&v, 4);
	alias = alias_map(&v);
	stg(alias + 5 * GRANULE, 9);
	begin("alias.stg_one_granule", "mte memfd slots=4 alias");
	result(copy_call(FROM_GUEST, BASE, PAGE, "256"), copy_tags(v.fd, BASE, PAGE, buf, FROM_GUEST));
	obs("buf", "%s", describe(buf, TAGS_PER_PAGE));
	end();
	munmap(alias, 4 * PAGE);
	vm_close(&v);
}

/* -- userfaultfd: MISSING + UFFDIO_COPY, MINOR + UFFDIO_CONTINUE --------- */
static void userfaults(void)
{
	static unsigned char buf[4 * TAGS_PER_PAGE];
	struct uffd u;
	struct vm v;
	long r;

	/* MISSING on the memslot's mapping, the page placed with UFFDIO_COPY */
	for (int b = MEMFD; b <= ANON; b++) {
		v.fd = new_vmfd();
		map_ram(&v, (enum backing)b, 4, PROT_READ | PROT_WRITE);
		set_slot(v.fd, 0, BASE, v.ram, 4 * PAGE, 0);
		enable_mte(v.fd);
		char name[64], setup[64];
		snprintf(name, sizeof(name), "uffd.missing_copy_%s", backing_name[b]);
		snprintf(setup, sizeof(setup), "mte %s slots=4 uffd=missing", backing_name[b]);
		r = uffd_open(&u, v.ram, 4, UFFDIO_REGISTER_MODE_MISSING);
		begin(name, setup);
		if (r < 0) {
			result("UFFDIO_REGISTER(MISSING)", r);
			end();
			vm_close(&v);
			continue;
		}
		result("UFFDIO_COPY(page=0)", uffd_copy(&u, v.ram, 0));
		obs("tags", "%s", tags_of(&v, 0, 1));
		obs("data", "%s", data_of(v.ram, 0, 1));
		obs("events", "%s", uffd_close(&u));
		end();
		vm_close(&v);
	}

	/* the ioctl itself hits a missing page: who resolves it? */
	for (int dir = 0; dir < 2; dir++) {
		one_slot_vm(&v, 4);
		r = uffd_open(&u, v.ram, 4, UFFDIO_REGISTER_MODE_MISSING);
		begin(dir ? "uffd.missing_from_faults" : "uffd.missing_to_faults", "mte memfd slots=4 uffd=missing");
		fill_pat(buf, 1, 3);
		result(copy_call(dir ? FROM_GUEST : TO_GUEST, BASE + PAGE, PAGE, "256"),
		       r < 0 ? r : copy_tags(v.fd, BASE + PAGE, PAGE, buf, dir ? FROM_GUEST : TO_GUEST));
		obs("events", "%s", r < 0 ? "-" : uffd_close(&u));
		obs("data", "%s", data_of(v.ram, 1, 1));
		obs("tags", "%s", tags_of(&v, 1, 1));
		end();
		vm_close(&v);
	}

	/* tags stored through a PROT_MTE alias before UFFDIO_COPY: the page
	 * exists in the file by then, so the copy finds it (EEXIST) */
	one_slot_vm(&v, 4);
	r = uffd_open(&u, v.ram, 4, UFFDIO_REGISTER_MODE_MISSING);
	{
		unsigned char *alias = alias_map(&v);
		stg_pages(alias, 0, 1, 7);
		begin("uffd.missing_alias_stg_then_copy", "mte memfd slots=4 uffd=missing alias");
		result("UFFDIO_COPY(page=0)", r < 0 ? r : uffd_copy(&u, v.ram, 0));
		obs("tags", "%s", tags_of(&v, 0, 1));
		obs("events", "%s", r < 0 ? "-" : uffd_close(&u));
		end();
		munmap(alias, 4 * PAGE);
	}
	vm_close(&v);

	/* MINOR: data and tags placed through a PROT_MTE alias of the memfd,
	 * then UFFDIO_CONTINUE maps the page in the registered mapping */
	one_slot_vm(&v, 4);
	r = uffd_open(&u, v.ram, 4, UFFDIO_REGISTER_MODE_MINOR);
	{
		unsigned char *alias = alias_map(&v);
		memset(alias, 0x77, PAGE);
		stg_pages(alias, 0, 1, 11);
		begin("uffd.minor_alias_tags_then_continue", "mte memfd slots=4 uffd=minor alias");
		result("UFFDIO_CONTINUE(page=0)", r < 0 ? r : uffd_continue(&u, v.ram, 0));
		obs("tags", "%s", tags_of(&v, 0, 1));
		obs("data", "%s", data_of(v.ram, 0, 1));
		obs("events", "%s", r < 0 ? "-" : uffd_close(&u));
		end();
		munmap(alias, 4 * PAGE);
	}
	vm_close(&v);

	/* MINOR: the ioctl meets a page that is in the file but not mapped */
	for (int dir = 0; dir < 2; dir++) {
		one_slot_vm(&v, 4);
		r = uffd_open(&u, v.ram, 4, UFFDIO_REGISTER_MODE_MINOR);
		unsigned char *alias = alias_map(&v);
		memset(alias + PAGE, 0x77, PAGE);
		stg_pages(alias, 1, 1, 11);
		fill_pat(buf, 1, 3);
		begin(dir ? "uffd.minor_from_faults" : "uffd.minor_to_faults", "mte memfd slots=4 uffd=minor alias");
		result(copy_call(dir ? FROM_GUEST : TO_GUEST, BASE + PAGE, PAGE, "256"),
		       r < 0 ? r : copy_tags(v.fd, BASE + PAGE, PAGE, buf, dir ? FROM_GUEST : TO_GUEST));
		obs("events", "%s", r < 0 ? "-" : uffd_close(&u));
		if (dir)
			obs("buf", "%s", describe(buf, TAGS_PER_PAGE));
		obs("ldg", "%s", ldg_pages(alias, 1, 1));
		end();
		munmap(alias, 4 * PAGE);
		vm_close(&v);
	}

	/* MINOR registered, the page not in the file at all: an ordinary fault */
	one_slot_vm(&v, 4);
	r = uffd_open(&u, v.ram, 4, UFFDIO_REGISTER_MODE_MINOR);
	begin("uffd.minor_missing_page_from", "mte memfd slots=4 uffd=minor");
	result(copy_call(FROM_GUEST, BASE + 2 * PAGE, PAGE, "256"),
	       r < 0 ? r : copy_tags(v.fd, BASE + 2 * PAGE, PAGE, buf, FROM_GUEST));
	obs("events", "%s", r < 0 ? "-" : uffd_close(&u));
	obs("res", "%s", residency(&v, 0, 4));
	end();
	vm_close(&v);
}


/* ---- the machine ------------------------------------------------------ */
static void boot_facts(void)
{
	struct utsname u;
	uname(&u);
	printf("FIDELITY uname %s %s\n", u.release, u.version);
	static char log[1 << 20];
	int n = klogctl(3 /* SYSLOG_ACTION_READ_ALL */, log, sizeof(log) - 1);
	if (n < 0)
		return;
	log[n] = 0;
	for (char *s = log, *nl; s && *s; s = nl ? nl + 1 : NULL) {
		nl = strchr(s, '\n');
		if (nl)
			*nl = 0;
		char *text = strstr(s, "] ");
		text = text ? text + 2 : s;
		if (strstr(text, "VHE mode") || strstr(text, "Memory Tagging") || strstr(text, "kvm [1]: Hyp") ||
		    strstr(text, "IPA Size"))
			printf("FIDELITY dmesg %s\n", text);
	}
}

static void on_alarm(int sig)
{
	(void)sig;
	static const char msg[] = "FIDELITY error timeout\n";
	write(1, msg, sizeof(msg) - 1);
	reboot(RB_POWER_OFF);
	_exit(1);
}

int main(void)
{
	mkdir("/dev", 0755);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	mkdir("/proc", 0755);
	mount("proc", "/proc", "proc", 0, NULL);
	mkdir("/ramfs", 0755);
	mount("ramfs", "/ramfs", "ramfs", 0, NULL);
	if (fcntl(1, F_GETFD) < 0) {
		int c = open("/dev/console", O_RDWR);
		dup2(c, 1);
		dup2(c, 2);
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	signal(SIGALRM, on_alarm);
	alarm(120);

	/* user-space tag checks off: the probe only moves tags */
	prctl(PR_SET_TAGGED_ADDR_CTRL, PR_TAGGED_ADDR_ENABLE | PR_MTE_TCF_NONE, 0, 0, 0);
	/* two huge pages for the hugetlb backing */
	int hp = open("/proc/sys/vm/nr_hugepages", O_WRONLY);
	if (hp >= 0) {
		write(hp, "2\n", 2);
		close(hp);
	}

	boot_facts();
	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0) {
		printf("FIDELITY error /dev/kvm %s\n", errname(errno));
		printf("FIDELITY end 0\n");
		fflush(stdout);
		reboot(RB_POWER_OFF);
		return 1;
	}

	/* the zero page's frame, to tell it apart in residency() */
	volatile unsigned char *z = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	(void)z[0];
	zero_pfn = pagemap_pfn((const void *)z);

	/* 8 pages then a PROT_NONE guard page, for the faulting buffers */
	guard_area = mmap(NULL, 9 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	mprotect(guard_area + 8 * PAGE, PAGE, PROT_NONE);

	argument_rules();
	partial_copies();
	faulting_buffers();
	untouched_pages();
	backings();
	read_only();
	capability();
	dirty_logging();
	alias_against_ioctl();
	userfaults();

	printf("FIDELITY end %d\n", ncases);
	fflush(stdout);
	sync();
	reboot(RB_POWER_OFF);
	return 0;
}
