// SPDX-License-Identifier: GPL-2.0
/*
 * virtio_cpufreq - cpufreq driver for the vhost-user-cpufreq virtio device.
 *
 * The device (protocol/SPEC.md in the vhost-user-cpufreq project) mirrors
 * the host's current/min/max frequency of every frequency domain the VM's
 * vCPUs run in, in a 256-byte config space with a generation counter, and
 * takes batches of per-vCPU utilisation records on one request queue.
 *
 * This driver registers a cpufreq driver with one policy per device domain.
 * Frequency requests from the governor become records:
 *
 *   util     = request * 1024 / domain max (0..1024)
 *   perf_khz = request in kHz, if VIRTIO_CPUFREQ_F_PERF_REQUEST was negotiated
 *
 * ->fast_switch() runs in scheduler context: it only stores the record in a
 * per-vCPU slot (one atomic word) and queues an irq_work.  The irq_work
 * collects every pending slot into one preallocated batch buffer, adds it to
 * the queue and notifies the device only when VIRTIO_RING_F_EVENT_IDX says
 * the device wants a notification.  Notification policy (SPEC 6.4): a
 * request for more speed (the vCPU's first, or a util at least urgent_delta
 * above what was last sent) is sent at once; others stay in their slots,
 * where a newer request replaces them, until urgent_records are waiting or
 * lazy_ms passed, and then go out together.  Used buffers are reclaimed when the next
 * batch is built; the queue has no callback and its interrupts stay off.
 *
 * The config space is read at probe and after a configuration change
 * notification only: with QEMU's generic vhost-user device every 32-bit
 * config read is a GET_CONFIG round trip to the device back-end.
 * ->get() answers from the cached copy (sysfs cpuinfo_cur_freq shows the
 * host's current frequency); scaling_cur_freq shows the last request, as
 * for every fast-switching cpufreq driver.
 *
 * Shared frequency page (SPEC 8, VIRTIO_CPUFREQ_F_FREQ_PAGE): when the
 * device has shared memory region 0, the driver maps it (memremap of the
 * virtio_get_shm_region() range) and ->get() reads the domain's cur_khz
 * there under its sequence count: plain loads, no exit, no config access.
 * Until the device has placed the page (magic 0) or while it is not LIVE,
 * or when the count stays odd, the cached config answers.
 *
 * Energy model (SPEC 9.4, VIRTIO_CPUFREQ_F_ENERGY_MODEL, arm64): the page
 * also carries each domain's power per performance state.  Probe waits
 * (bounded) for the page, reads the section under its sequence count into a
 * local copy, checks every value, and the cpufreq driver's ->register_em()
 * gives each new policy's domain to the kernel (em_dev_register_perf_domain)
 * before its governor starts, so the scheduler's perf domains and EAS see it.
 *
 * Assumption: Linux CPU number N is vCPU N (true for QEMU x86 and arm64
 * guests with the default topology).
 *
 * Written for Linux 7.3; license GPL-2.0.
 */

#define pr_fmt(fmt) KBUILD_MODNAME ": " fmt

#include <linux/atomic.h>
#include <linux/cpufreq.h>
#include <linux/cpumask.h>
#include <linux/io.h>
#include <linux/irq_work.h>
#include <linux/kernel_stat.h>
#include <linux/ktime.h>
#include <linux/module.h>
#include <linux/mutex.h>
#include <linux/scatterlist.h>
#include <linux/slab.h>
#include <linux/spinlock.h>
#include <linux/timer.h>
#include <linux/virtio.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ring.h>
#include <linux/workqueue.h>
#ifdef CONFIG_GENERIC_ARCH_TOPOLOGY
#include <linux/arch_topology.h>
#include <linux/cpu.h>
#include <linux/delay.h>
#include <linux/energy_model.h>
#include <linux/of.h>
#include <linux/sched/topology.h>
#include <linux/topology.h>
#endif

/*
 * The project's default device id.  OASIS assigned 38 to a "parameter
 * server" device that neither QEMU nor Linux implements; QEMU's generic
 * vhost-user-test-device only accepts ids from its name table, so the
 * project uses 38 (QEMU: virtio-id=38, PCI device 0x1066).  Both sides
 * must agree; change it here (id tables are static) if the deployment
 * uses another id.
 */
#define VIRTIO_ID_CPUFREQ		38

#define VIRTIO_CPUFREQ_F_PERF_REQUEST	0
#define VIRTIO_CPUFREQ_F_FREQ_PAGE	1
#define VIRTIO_CPUFREQ_F_ENERGY_MODEL	2

/* The shared frequency page (SPEC 8): shmid 0, 4 KiB, written by the device only. */
#define VCF_PAGE_SHMID			0
#define VCF_PAGE_SIZE			4096
#define VCF_PAGE_MAGIC			0x50464356	/* "VCFP" */
#define VCF_PAGE_F_LIVE			(1 << 0)
#define VCF_PAGE_TRIES			16

/* The energy model section of the page (SPEC 9.4). */
#define VCF_EM_OFFSET			256
#define VCF_EM_MAX_STATES		32
#define VCF_EM_MAX_POWER_UW		64000000U	/* Linux's EM_MAX_POWER, 64 W */

#define VCF_CONFIG_SIZE			256
#define VCF_MAX_DOMAINS			8
#define VCF_MAX_RUNS			56
#define VCF_MAX_RECORDS			256
#define VCF_UTIL_SCALE			1024
#define VCF_BATCH_F_RESYNC		(1 << 0)

struct virtio_cpufreq_domain {
	__le32 cur_khz;
	__le32 min_khz;
	__le32 max_khz;
	__le16 capacity;
	__le16 reserved;
} __packed;

struct virtio_cpufreq_run {
	u8 domain;
	u8 count;
} __packed;

struct virtio_cpufreq_config {
	__le32 generation;
	__le16 num_domains;
	__le16 num_vcpus;
	__le32 flags;
	__le16 num_runs;
	__le16 max_batch;
	struct virtio_cpufreq_domain domains[VCF_MAX_DOMAINS];
	struct virtio_cpufreq_run runs[VCF_MAX_RUNS];
} __packed;

struct virtio_cpufreq_record {
	__le16 vcpu;
	__le16 util;
	__le32 perf_khz;
} __packed;

struct virtio_cpufreq_batch {
	__le32 seq;
	__le16 num_records;
	__le16 flags;
	__le64 timestamp_ns;
	struct virtio_cpufreq_record records[];
} __packed;

struct virtio_cpufreq_page_domain {
	__le32 seq;		/* odd while the device writes this entry */
	__le32 cur_khz;
	__le16 freq_scale;
	__le16 perf;
	__le32 reserved;
};

struct virtio_cpufreq_page {
	__le32 magic;
	__le16 version;
	__le16 num_domains;
	__le32 flags;
	__le32 reserved;
	struct virtio_cpufreq_page_domain domains[VCF_MAX_DOMAINS];
};

struct virtio_cpufreq_em_state {
	__le32 khz;
	__le32 power_uw;
};

struct virtio_cpufreq_em_domain {
	__le16 num_states;
	__le16 reserved;
	__le32 reserved2;
	struct virtio_cpufreq_em_state states[VCF_EM_MAX_STATES];
};

struct virtio_cpufreq_energy {
	__le32 seq;		/* odd while the device writes the section */
	__le16 num_domains;	/* 0: no model for this topology */
	__le16 reserved;
	__le32 reserved2[2];
	struct virtio_cpufreq_em_domain domains[VCF_MAX_DOMAINS];
};

static_assert(sizeof(struct virtio_cpufreq_page) <= VCF_EM_OFFSET);
static_assert(sizeof(struct virtio_cpufreq_em_domain) == 264);
static_assert(offsetof(struct virtio_cpufreq_energy, domains) == 16);
static_assert(VCF_EM_OFFSET + sizeof(struct virtio_cpufreq_energy) <= VCF_PAGE_SIZE);
static_assert(offsetof(struct virtio_cpufreq_page, domains) == 16);
static_assert(sizeof(struct virtio_cpufreq_config) == VCF_CONFIG_SIZE);
static_assert(offsetof(struct virtio_cpufreq_config, domains) == 16);
static_assert(offsetof(struct virtio_cpufreq_config, runs) == 144);
static_assert(sizeof(struct virtio_cpufreq_batch) == 16);
static_assert(sizeof(struct virtio_cpufreq_record) == 8);

/* -- module parameters ------------------------------------------------------ */

static unsigned int table_steps = 16;
module_param(table_steps, uint, 0444);
MODULE_PARM_DESC(table_steps, "frequency table entries per domain, evenly spaced from min to max (2..64)");

static unsigned int rate_limit_us = 1000;
module_param(rate_limit_us, uint, 0444);
MODULE_PARM_DESC(rate_limit_us, "policy transition_delay_us: how often schedutil may ask for a new frequency");

static unsigned int util_threshold = 4;
module_param(util_threshold, uint, 0644);
MODULE_PARM_DESC(util_threshold, "send a vCPU's record only when its util moved by more than this (0..1024)");

static unsigned int refresh_ms = 200;
module_param(refresh_ms, uint, 0644);
MODULE_PARM_DESC(refresh_ms, "re-send the request of a busy vCPU whose governor stayed silent this long (0: never)");

static unsigned int urgent_delta = 128;
module_param(urgent_delta, uint, 0644);
MODULE_PARM_DESC(urgent_delta, "a util rise of at least this much (of 1024) over what was last sent goes out at once");

static unsigned int lazy_ms = 32;
module_param(lazy_ms, uint, 0644);
MODULE_PARM_DESC(lazy_ms, "longest any other request waits before it is sent (0: send every request at once)");

static unsigned int lazy_records = 32;
module_param(lazy_records, uint, 0644);
MODULE_PARM_DESC(lazy_records, "send the waiting requests once this many are pending");

static unsigned int num_buffers = 32;
module_param(num_buffers, uint, 0444);
MODULE_PARM_DESC(num_buffers, "preallocated batch buffers (capped by the queue size)");

static bool capacities = true;
module_param(capacities, bool, 0444);
MODULE_PARM_DESC(capacities, "arm64: give the scheduler each domain's capacity (cpu_scale)");

static bool freq_invariance = true;
module_param(freq_invariance, bool, 0444);
MODULE_PARM_DESC(freq_invariance, "arm64: read each vCPU's frequency scale from the shared page every tick");

static bool energy_model = true;
module_param(energy_model, bool, 0444);
MODULE_PARM_DESC(energy_model, "arm64: give the kernel the device's energy model (SPEC 9.4), for EAS");

static unsigned int em_wait_ms = 2000;
module_param(em_wait_ms, uint, 0444);
MODULE_PARM_DESC(em_wait_ms, "how long probe waits for the device to place the page before it reads the energy model");

/* -- driver state ----------------------------------------------------------- */

struct vcf_domain {
	unsigned int index;
	u32 cur_khz;		/* mirror of the device; read locklessly */
	u32 min_khz;
	u32 max_khz;
	u16 capacity;
	cpumask_var_t cpus;	/* CPUs (vCPUs) mapped to this domain */
};

/* slot value: 0 = nothing pending, else VCF_SLOT_VALID | util << 32 | perf_khz */
#define VCF_SLOT_VALID		BIT_ULL(63)

struct vcf_vcpu {
	atomic64_t pending;	/* written by the governor, taken by the flusher */
	u64 last;		/* last value queued (flusher, under vi->lock) */
	unsigned long last_jiffies;
	u64 idle_us;		/* for the refresh timer */
	u64 wall_us;
	int last_util;		/* last util accepted by vcf_request(); -1: none */
};

struct vcf_dev {
	struct virtio_device *vdev;
	struct virtqueue *vq;
	bool perf_request;
	struct virtio_cpufreq_page *page;	/* the shared frequency page, or NULL */

	/* config mirror */
	u32 generation;
	u32 cfg_flags;
	unsigned int num_domains;
	unsigned int num_vcpus;
	unsigned int max_batch;
	struct vcf_domain domains[VCF_MAX_DOMAINS];
	u8 *vcpu_domain;	/* [num_vcpus] */
	struct vcf_vcpu *vcpus;	/* [num_vcpus] */

	/* request queue, all under lock */
	spinlock_t lock;
	void **free_bufs;
	unsigned int nr_free;
	unsigned int nr_bufs;
	size_t buf_size;
	unsigned int recs_per_buf;
	u32 seq;
	bool resync;
	bool starved;
	atomic_t urgent;	/* a pending request must go out at once */
	atomic_t lazy;		/* pending requests that may wait */

	struct irq_work flush_work;
	struct timer_list timer;	/* refresh, and retry when starved */
	struct work_struct config_work;
	struct mutex config_lock;
	bool removing;

	/* statistics (sysfs) */
	atomic64_t stat_requests;
	u64 stat_batches;
	u64 stat_records;
	u64 stat_notifies;
	atomic64_t stat_deferred;	/* flushes run from irq_work and the timer, unlocked */
	u64 stat_refreshes;
	u64 stat_starved;
	u64 stat_add_errors;
	atomic64_t stat_config_reads;
	atomic64_t stat_config_changes;
	atomic64_t stat_range_changes;
	atomic64_t stat_page_reads;	/* ->get() answered from the shared page */
	atomic64_t stat_page_fallbacks;	/* ... from the cache: page not placed, not LIVE, or busy */
	atomic64_t stat_topology_changes;	/* announced by the device and applied */

	/* arm64 (GENERIC_ARCH_TOPOLOGY): what the scheduler was given */
	bool fie;		/* our frequency-scale source is registered */
	enum { VCF_CAP_NONE, VCF_CAP_DEVICE, VCF_CAP_FIRMWARE } cap_source;
	unsigned long *saved_scale;	/* cpu_scale before this driver wrote it */
	cpumask_var_t fie_cpus;	/* CPUs it was registered for */

	/* energy model (SPEC 9.4): the last one read and accepted, per domain */
	struct vcf_em {
		unsigned int nr;
		u32 khz[VCF_EM_MAX_STATES];
		u32 uw[VCF_EM_MAX_STATES];
	} em[VCF_MAX_DOMAINS];
	bool have_em;
	struct vcf_em *em_reg;	/* the tables the kernel was given, and the map then */
	u8 *em_reg_map;
	cpumask_var_t em_cpus;	/* one CPU of each domain registered by this bind */
	atomic_t em_registered;	/* performance domains registered with the kernel */
	atomic_t em_exists;	/* ... that the kernel had already (an earlier bind) */
	atomic_t em_errors;	/* ... that it refused */
	atomic_t em_rejected;	/* models read from the page and refused (the reason is logged) */
	bool em_stale;		/* the model or map differs from what the kernel was given */
};

/* cpufreq has one driver for the whole system: at most one device is used. */
static struct vcf_dev *vcf;
static DEFINE_MUTEX(vcf_probe_lock);

/* -- config space ----------------------------------------------------------- */

/*
 * Read @len bytes (a multiple of 4) at @off in 32-bit accesses: one
 * GET_CONFIG each with the generic vhost-user device.
 */
static void vcf_read_dwords(struct vcf_dev *vi, unsigned int off, void *buf, size_t len)
{
	__virtio_cread_many(vi->vdev, off, buf, len / 4, 4);
	atomic64_add(len / 4, &vi->stat_config_reads);
}

/*
 * A consistent snapshot of the header and the domains (and the runs when
 * @runs): generation, fields, generation again; retried while they differ.
 */
static int vcf_read_config(struct vcf_dev *vi, struct virtio_cpufreq_config *cfg, bool runs)
{
	unsigned int tries, ndom, nruns;
	__le32 gen2;

	for (tries = 0; tries < 16; tries++) {
		memset(cfg, 0, sizeof(*cfg));
		vcf_read_dwords(vi, 0, cfg, offsetof(struct virtio_cpufreq_config, domains));
		ndom = le16_to_cpu(cfg->num_domains);
		nruns = le16_to_cpu(cfg->num_runs);
		if (ndom < 1 || ndom > VCF_MAX_DOMAINS || nruns > VCF_MAX_RUNS)
			goto recheck;
		vcf_read_dwords(vi, offsetof(struct virtio_cpufreq_config, domains), cfg->domains,
				ndom * sizeof(cfg->domains[0]));
		if (runs && nruns)
			vcf_read_dwords(vi, offsetof(struct virtio_cpufreq_config, runs), cfg->runs,
					round_up(nruns * sizeof(cfg->runs[0]), 4));
recheck:
		vcf_read_dwords(vi, 0, &gen2, sizeof(gen2));
		if (gen2 != cfg->generation)
			continue;	/* torn read */
		if (ndom < 1 || ndom > VCF_MAX_DOMAINS || nruns > VCF_MAX_RUNS) {
			dev_err(&vi->vdev->dev, "bad config: %u domains, %u runs\n", ndom, nruns);
			return -EINVAL;
		}
		return 0;
	}
	dev_err(&vi->vdev->dev, "config generation never settled\n");
	return -EIO;
}

static int vcf_parse_domains(struct vcf_dev *vi, const struct virtio_cpufreq_config *cfg)
{
	unsigned int i;

	for (i = 0; i < vi->num_domains; i++) {
		const struct virtio_cpufreq_domain *c = &cfg->domains[i];
		u32 min = le32_to_cpu(c->min_khz), max = le32_to_cpu(c->max_khz);

		if (!max || min > max) {
			dev_err(&vi->vdev->dev, "domain %u: bad range %u..%u kHz\n", i, min, max);
			return -EINVAL;
		}
		vi->domains[i].index = i;
		vi->domains[i].cur_khz = clamp(le32_to_cpu(c->cur_khz), min, max);
		vi->domains[i].min_khz = min;
		vi->domains[i].max_khz = max;
		vi->domains[i].capacity = le16_to_cpu(c->capacity);
	}
	return 0;
}

/* Probe: the whole layout, including the vCPU-to-domain runs. */
static int vcf_init_config(struct vcf_dev *vi)
{
	struct virtio_cpufreq_config *cfg;
	unsigned int i, j, v, nruns;
	int err;

	cfg = kzalloc(sizeof(*cfg), GFP_KERNEL);
	if (!cfg)
		return -ENOMEM;
	err = vcf_read_config(vi, cfg, true);
	if (err)
		goto out;

	vi->generation = le32_to_cpu(cfg->generation);
	vi->cfg_flags = le32_to_cpu(cfg->flags);
	vi->num_domains = le16_to_cpu(cfg->num_domains);
	vi->num_vcpus = le16_to_cpu(cfg->num_vcpus);
	vi->max_batch = le16_to_cpu(cfg->max_batch);
	nruns = le16_to_cpu(cfg->num_runs);
	if (!vi->num_vcpus || !vi->max_batch) {
		dev_err(&vi->vdev->dev, "bad config: %u vCPUs, max_batch %u\n", vi->num_vcpus, vi->max_batch);
		err = -EINVAL;
		goto out;
	}
	err = vcf_parse_domains(vi, cfg);
	if (err)
		goto out;

	vi->vcpu_domain = kcalloc(vi->num_vcpus, sizeof(*vi->vcpu_domain), GFP_KERNEL);
	if (!vi->vcpu_domain) {
		err = -ENOMEM;
		goto out;
	}
	for (i = 0, v = 0; i < nruns; i++) {
		unsigned int dom = cfg->runs[i].domain, count = cfg->runs[i].count;

		if (dom >= vi->num_domains || v + count > vi->num_vcpus) {
			dev_err(&vi->vdev->dev, "bad run %u: domain %u count %u\n", i, dom, count);
			err = -EINVAL;
			goto out;
		}
		for (j = 0; j < count; j++, v++) {
			vi->vcpu_domain[v] = dom;
			if (v < nr_cpu_ids)
				cpumask_set_cpu(v, vi->domains[dom].cpus);
		}
	}
	if (v != vi->num_vcpus) {
		dev_err(&vi->vdev->dev, "runs cover %u vCPUs, header says %u\n", v, vi->num_vcpus);
		err = -EINVAL;
	}
out:
	kfree(cfg);
	return err;
}

static void vcf_set_capacities(struct vcf_dev *vi, bool announced);
static void vcf_fie_start(struct vcf_dev *vi);
static void vcf_fie_stop(struct vcf_dev *vi);
static void vcf_em_retopology(struct vcf_dev *vi);
static struct cpufreq_driver vcf_cpufreq_driver;

/*
 * The vCPU-to-domain map the runs describe, into @map; false if they do not
 * cover num_vcpus or name a domain beyond the config's num_domains.
 */
static bool vcf_runs_map(const struct vcf_dev *vi, const struct virtio_cpufreq_config *cfg, u8 *map)
{
	unsigned int i, j, v = 0, nruns = le16_to_cpu(cfg->num_runs), ndom = le16_to_cpu(cfg->num_domains);

	for (i = 0; i < nruns && i < VCF_MAX_RUNS; i++) {
		unsigned int dom = cfg->runs[i].domain, count = cfg->runs[i].count;

		if (dom >= ndom || v + count > vi->num_vcpus)
			return false;
		for (j = 0; j < count; j++)
			map[v++] = dom;
	}
	return v == vi->num_vcpus;
}

/*
 * A topology change the device announced (a domain's capacity, the number
 * of domains or the vCPU map changed: re-pinning): the policies are made anew.  Unregistering the
 * cpufreq driver stops the governors (no ->fast_switch() after it), the
 * domains and the map are replaced, the new capacities go to cpu_scale, and
 * registering again builds the new frequency tables; starting schedutil
 * rebuilds the scheduler's domains.  The frequency-scale source is off
 * meanwhile (it reads the map every tick).
 */
static void vcf_retopology(struct vcf_dev *vi, const struct virtio_cpufreq_config *cfg, const u8 *map)
{
	unsigned int i, v;
	int err;

	vcf_fie_stop(vi);
	cpufreq_unregister_driver(&vcf_cpufreq_driver);
	/* 1..VCF_MAX_DOMAINS (vcf_read_config); domains[] and their cpumasks exist for all of them. */
	vi->num_domains = le16_to_cpu(cfg->num_domains);
	if (vcf_parse_domains(vi, cfg)) {
		dev_err(&vi->vdev->dev, "announced topology unusable; the device is not driven\n");
		return;
	}
	for (i = 0; i < VCF_MAX_DOMAINS; i++)
		cpumask_clear(vi->domains[i].cpus);
	for (v = 0; v < vi->num_vcpus; v++) {
		WRITE_ONCE(vi->vcpu_domain[v], map[v]);
		if (v < nr_cpu_ids)
			cpumask_set_cpu(v, vi->domains[map[v]].cpus);
		vi->vcpus[v].last_util = -1;	/* the next request goes out */
	}
	vcf_set_capacities(vi, true);
	vcf_em_retopology(vi);
	err = cpufreq_register_driver(&vcf_cpufreq_driver);
	if (err) {
		dev_err(&vi->vdev->dev, "cannot register the cpufreq driver again: %d\n", err);
		return;
	}
	vcf_fie_start(vi);
	atomic64_inc(&vi->stat_topology_changes);
	for (i = 0; i < vi->num_domains; i++)
		dev_info(&vi->vdev->dev, "domain %u now: cpus %*pbl, %u..%u kHz, capacity %u\n", i,
			 cpumask_pr_args(vi->domains[i].cpus), vi->domains[i].min_khz,
			 vi->domains[i].max_khz, vi->domains[i].capacity);
}

/*
 * After a configuration change notification: refresh the frequency mirror,
 * or make the policies anew when the topology changed.
 */
static void vcf_config_work(struct work_struct *work)
{
	struct vcf_dev *vi = container_of(work, struct vcf_dev, config_work);
	struct virtio_cpufreq_config *cfg;
	bool topology;
	unsigned int i;
	u8 *map = NULL;
	u32 gen;

	cfg = kzalloc(sizeof(*cfg), GFP_KERNEL);
	if (!cfg)
		return;
	mutex_lock(&vi->config_lock);
	if (vi->removing || vcf_read_config(vi, cfg, true))
		goto out;
	gen = le32_to_cpu(cfg->generation);
	if (gen == vi->generation)
		goto out;	/* nothing new */
	if (le16_to_cpu(cfg->num_vcpus) != vi->num_vcpus) {
		/* The per-vCPU slots and buffers are sized at probe. */
		dev_warn(&vi->vdev->dev, "now %u vCPUs (was %u); rebind the driver to use them\n",
			 le16_to_cpu(cfg->num_vcpus), vi->num_vcpus);
		goto out;
	}
	map = kcalloc(vi->num_vcpus, sizeof(*map), GFP_KERNEL);
	if (!map || !vcf_runs_map(vi, cfg, map)) {
		dev_warn(&vi->vdev->dev, "bad vCPU map in the configuration; ignored\n");
		goto out;
	}
	topology = memcmp(map, vi->vcpu_domain, vi->num_vcpus) != 0 ||
		   le16_to_cpu(cfg->num_domains) != vi->num_domains;
	for (i = 0; i < vi->num_domains && !topology; i++)
		topology |= le16_to_cpu(cfg->domains[i].capacity) != vi->domains[i].capacity;
	if (topology) {
		vcf_retopology(vi, cfg, map);
	} else {
		for (i = 0; i < vi->num_domains; i++) {
			struct vcf_domain *d = &vi->domains[i];
			const struct virtio_cpufreq_domain *c = &cfg->domains[i];
			u32 min = le32_to_cpu(c->min_khz), max = le32_to_cpu(c->max_khz);

			if (min != d->min_khz || max != d->max_khz) {
				/* The frequency table stays; requests keep their meaning. */
				atomic64_inc(&vi->stat_range_changes);
				dev_info_ratelimited(&vi->vdev->dev,
						     "domain %u range now %u..%u kHz (table keeps %u..%u)\n",
						     i, min, max, d->min_khz, d->max_khz);
			}
			WRITE_ONCE(d->cur_khz, le32_to_cpu(c->cur_khz));
		}
	}
	vi->generation = gen;
	vi->cfg_flags = le32_to_cpu(cfg->flags);
	atomic64_inc(&vi->stat_config_changes);
out:
	mutex_unlock(&vi->config_lock);
	kfree(map);
	kfree(cfg);
}

static void vcf_config_changed(struct virtio_device *vdev)
{
	struct vcf_dev *vi = vdev->priv;

	/* May run in interrupt context; config reads sleep. */
	schedule_work(&vi->config_work);
}

/* -- request queue ---------------------------------------------------------- */

static void vcf_reclaim_locked(struct vcf_dev *vi)
{
	unsigned int len;
	void *buf;

	while ((buf = virtqueue_get_buf(vi->vq, &len)) != NULL)
		vi->free_bufs[vi->nr_free++] = buf;
}

/*
 * Turn pending slots into batches.  Called with vi->lock held; returns
 * true when the device should be notified (after the lock is dropped).
 */
static bool vcf_flush_locked(struct vcf_dev *vi)
{
	bool added = false;
	unsigned int v = 0;

	vcf_reclaim_locked(vi);
	while (v < vi->num_vcpus) {
		struct virtio_cpufreq_batch *b;
		struct scatterlist sg;
		unsigned int n = 0;
		int err;

		if (!vi->nr_free) {
			/* Every buffer is with the device: retry shortly. */
			if (!vi->starved) {
				vi->starved = true;
				vi->stat_starved++;
			}
			break;
		}
		b = vi->free_bufs[vi->nr_free - 1];
		for (; v < vi->num_vcpus && n < vi->recs_per_buf; v++) {
			u64 val = atomic64_xchg(&vi->vcpus[v].pending, 0);

			if (!val)
				continue;
			b->records[n].vcpu = cpu_to_le16(v);
			b->records[n].util = cpu_to_le16((val >> 32) & 0xffff);
			b->records[n].perf_khz = vi->perf_request ? cpu_to_le32((u32)val) : 0;
			vi->vcpus[v].last = val;
			vi->vcpus[v].last_jiffies = jiffies;
			n++;
		}
		if (!n)
			break;
		b->seq = cpu_to_le32(vi->seq);
		b->num_records = cpu_to_le16(n);
		b->flags = cpu_to_le16(vi->resync ? VCF_BATCH_F_RESYNC : 0);
		b->timestamp_ns = cpu_to_le64(ktime_get_ns());
		sg_init_one(&sg, b, sizeof(*b) + n * sizeof(b->records[0]));
		err = virtqueue_add_outbuf(vi->vq, &sg, 1, b, GFP_ATOMIC);
		if (err) {
			/* Cannot happen with nr_bufs <= ring size unless the device broke. */
			vi->stat_add_errors++;
			break;
		}
		vi->nr_free--;
		vi->seq++;
		vi->resync = false;
		vi->starved = false;
		vi->stat_batches++;
		vi->stat_records += n;
		added = true;
	}
	return added && virtqueue_kick_prepare(vi->vq);
}

static void vcf_flush(struct vcf_dev *vi, bool force)
{
	unsigned int lazy = READ_ONCE(lazy_ms);
	unsigned long flags;
	bool notify, starved;

	if (!force && lazy && !atomic_read(&vi->urgent) &&
	    (unsigned int)atomic_read(&vi->lazy) < READ_ONCE(lazy_records)) {
		/* Nothing urgent: come back within lazy_ms (timer_reduce only brings it closer). */
		if (!READ_ONCE(vi->removing))
			timer_reduce(&vi->timer, jiffies + msecs_to_jiffies(lazy));
		atomic64_inc(&vi->stat_deferred);
		return;
	}
	atomic_set(&vi->urgent, 0);
	atomic_set(&vi->lazy, 0);
	spin_lock_irqsave(&vi->lock, flags);
	notify = vcf_flush_locked(vi);
	if (notify)
		vi->stat_notifies++;
	starved = vi->starved;
	spin_unlock_irqrestore(&vi->lock, flags);
	if (notify)
		virtqueue_notify(vi->vq);
	if ((starved || refresh_ms) && !timer_pending(&vi->timer) && !READ_ONCE(vi->removing))
		mod_timer(&vi->timer, jiffies + (starved ? 1 : msecs_to_jiffies(refresh_ms ?: 1)));
}

static void vcf_flush_irq_work(struct irq_work *work)
{
	vcf_flush(container_of(work, struct vcf_dev, flush_work), false);
}

/*
 * Refresh: the device drops a vCPU's request after its decay period, but
 * schedutil stays silent while its answer does not change.  Re-send the last
 * request of each vCPU that was mostly busy since the last look and asked
 * for more than its domain's minimum.
 */
static bool vcf_refresh(struct vcf_dev *vi)
{
	unsigned long now = jiffies, period = msecs_to_jiffies(refresh_ms);
	bool active = false, queued = false;
	unsigned int v;

	for (v = 0; v < vi->num_vcpus && v < nr_cpu_ids; v++) {
		struct vcf_vcpu *c = &vi->vcpus[v];
		const struct vcf_domain *d = &vi->domains[vi->vcpu_domain[v]];
		u64 last = READ_ONCE(c->last), wall, idle;
		bool busy = true;

		if (!last || (u32)last <= d->min_khz || !cpu_online(v))
			continue;
		active = true;
		idle = get_cpu_idle_time_us(v, &wall);
		if (idle != (u64)-1) {
			u64 dw = wall - c->wall_us, di = idle - c->idle_us;

			c->wall_us = wall;
			c->idle_us = idle;
			busy = dw && di * 2 < dw;
		}
		if (!busy || time_before(now, READ_ONCE(c->last_jiffies) + period))
			continue;
		if (atomic64_cmpxchg(&c->pending, 0, last) == 0) {
			vi->stat_refreshes++;
			queued = true;
		}
	}
	return queued || active;
}

static void vcf_timer_fn(struct timer_list *t)
{
	struct vcf_dev *vi = timer_container_of(vi, t, timer);
	bool rearm = READ_ONCE(vi->starved);

	if (READ_ONCE(vi->removing))
		return;
	if (refresh_ms && vcf_refresh(vi))
		rearm = true;
	vcf_flush(vi, true);
	if (rearm && !timer_pending(&vi->timer))
		mod_timer(&vi->timer, jiffies + msecs_to_jiffies(refresh_ms ?: 4));
}

/* Record a request for @cpu; true if it should be sent. */
static bool vcf_request(struct vcf_dev *vi, unsigned int cpu, const struct vcf_domain *d,
			unsigned int khz)
{
	struct vcf_vcpu *c;
	unsigned int util;
	u64 sent;

	if (cpu >= vi->num_vcpus)
		return false;
	c = &vi->vcpus[cpu];
	util = min_t(u64, div_u64((u64)khz * VCF_UTIL_SCALE, d->max_khz), VCF_UTIL_SCALE);
	if (c->last_util >= 0) {
		int delta = abs((int)util - c->last_util);
		/* The extremes always go out, so small steps cannot stop short of them. */
		bool extreme = util == VCF_UTIL_SCALE || khz <= d->min_khz;

		if (!delta || (delta <= (int)READ_ONCE(util_threshold) && !extreme))
			return false;
	}
	c->last_util = util;
	sent = READ_ONCE(c->last);
	if (!sent || util >= ((sent >> 32) & 0xffff) + READ_ONCE(urgent_delta))
		atomic_set(&vi->urgent, 1);
	else
		atomic_inc(&vi->lazy);
	atomic64_set(&c->pending, VCF_SLOT_VALID | (u64)util << 32 | khz);
	atomic64_inc(&vi->stat_requests);
	return true;
}

/* -- cpufreq driver --------------------------------------------------------- */

static unsigned int vcf_fast_switch(struct cpufreq_policy *policy, unsigned int target_freq)
{
	struct vcf_dev *vi = READ_ONCE(vcf);
	unsigned int cpu = smp_processor_id();

	if (!cpumask_test_cpu(cpu, policy->cpus))
		cpu = policy->cpu;
	if (vcf_request(vi, cpu, policy->driver_data, target_freq))
		irq_work_queue(&vi->flush_work);
	return target_freq;
}

static int vcf_target_index(struct cpufreq_policy *policy, unsigned int index)
{
	struct vcf_dev *vi = READ_ONCE(vcf);
	unsigned int freq = policy->freq_table[index].frequency, cpu;
	bool any = false;

	for_each_cpu(cpu, policy->cpus)
		any |= vcf_request(vi, cpu, policy->driver_data, freq);
	if (any)
		vcf_flush(vi, true);
	return 0;
}

/*
 * Domain @dom's current frequency from the shared page (SPEC 8.2): the
 * sequence count, the value, the count again; retried while the device
 * writes, bounded.  False: use the cached config.
 */
static bool vcf_page_khz(struct vcf_dev *vi, unsigned int dom, u32 *khz)
{
	struct virtio_cpufreq_page *pg = vi->page;
	struct virtio_cpufreq_page_domain *d;
	unsigned int i;
	u32 s1, s2;

	if (!pg || le32_to_cpu(READ_ONCE(pg->magic)) != VCF_PAGE_MAGIC ||
	    !(le32_to_cpu(READ_ONCE(pg->flags)) & VCF_PAGE_F_LIVE) ||
	    dom >= le16_to_cpu(READ_ONCE(pg->num_domains)) || dom >= VCF_MAX_DOMAINS)
		return false;
	d = &pg->domains[dom];
	for (i = 0; i < VCF_PAGE_TRIES; i++) {
		s1 = le32_to_cpu(READ_ONCE(d->seq));
		if (s1 & 1) {
			cpu_relax();
			continue;
		}
		smp_rmb();
		*khz = le32_to_cpu(READ_ONCE(d->cur_khz));
		smp_rmb();
		s2 = le32_to_cpu(READ_ONCE(d->seq));
		if (s1 == s2)
			return true;
	}
	return false;
}

static unsigned int vcf_get(unsigned int cpu)
{
	struct vcf_dev *vi = READ_ONCE(vcf);
	unsigned int dom;
	u32 khz;

	if (!vi || cpu >= vi->num_vcpus)
		return 0;
	dom = vi->vcpu_domain[cpu];
	if (vi->page) {
		if (vcf_page_khz(vi, dom, &khz)) {
			atomic64_inc(&vi->stat_page_reads);
			return khz;
		}
		atomic64_inc(&vi->stat_page_fallbacks);
	}
	return READ_ONCE(vi->domains[dom].cur_khz);
}

/* -- scheduler: frequency invariance and capacities (arm64) ------------------ */

#ifdef CONFIG_GENERIC_ARCH_TOPOLOGY
/*
 * The arch topology code (drivers/base/arch_topology.c) calls the
 * registered scale_freq_data's set_freq_scale() from every scheduler tick
 * on the ticking CPU (topology_scale_freq_tick(), under sched-RCU).  Ours
 * reads the domain's current frequency from the shared page, as upstream
 * virtual-cpufreq reads its cur_perf register, with no VM exit.  While a
 * source is registered for a CPU the cpufreq core no longer writes that
 * CPU's arch_freq_scale from the requested frequency.  Counters from an
 * architecture (arm64 AMU) keep precedence: then ours is not installed.
 */
struct vcf_fie_stat {
	u64 ticks;		/* scale taken from the page */
	u64 fallbacks;		/* page not readable: scale from the cached config */
	u64 changed;		/* ticks + fallbacks when the scale last changed */
};
static DEFINE_PER_CPU(struct vcf_fie_stat, vcf_fie_stat);

static unsigned long vcf_scale(u32 khz, u32 max_khz)
{
	return min_t(u64, div_u64((u64)khz << SCHED_CAPACITY_SHIFT, max_khz), SCHED_CAPACITY_SCALE);
}

static void vcf_fie_tick(void)
{
	/* vcf stays valid: remove clears the source (synchronize_rcu) before freeing. */
	struct vcf_dev *vi = READ_ONCE(vcf);
	unsigned int cpu = smp_processor_id();
	struct vcf_fie_stat *st = this_cpu_ptr(&vcf_fie_stat);
	const struct vcf_domain *d;
	unsigned long scale;
	u32 khz;

	if (!vi || cpu >= vi->num_vcpus)
		return;
	d = &vi->domains[vi->vcpu_domain[cpu]];
	if (vcf_page_khz(vi, d->index, &khz)) {
		st->ticks++;
	} else {
		khz = READ_ONCE(d->cur_khz);
		st->fallbacks++;
	}
	scale = vcf_scale(khz, d->max_khz);
	if (scale != this_cpu_read(arch_freq_scale)) {
		this_cpu_write(arch_freq_scale, scale);
		st->changed = st->ticks + st->fallbacks;
	}
}

static struct scale_freq_data vcf_sfd = {
	.source		= SCALE_FREQ_SOURCE_VIRT,
	.set_freq_scale	= vcf_fie_tick,
};

/*
 * Capacities.  The scheduler's capacity asymmetry (SD_ASYM_CPUCAPACITY, which
 * gates misfit migration, capacity-aware wake-up and EAS) is scanned from
 * cpu_scale only at boot and when the arch topology code itself rebuilds the
 * domains: after the cpufreq policies exist, when the firmware gave each CPU
 * capacity-dmips-mhz (DT) or CPPC highest_perf (ACPI).  No exported interface
 * lets a module ask for that rescan, so the VMM describes the vCPUs'
 * capacities in firmware (as for upstream virtual-cpufreq) and the device's
 * capacities must agree with it: capacity_mismatch counts the vCPUs whose
 * cpu_scale differs from their domain's capacity.  Without firmware
 * capacities the driver still writes cpu_scale (the exported per-CPU
 * variable, as arch_topology does at run time): cpu_capacity and the load
 * balancer's capacity_of() then follow the device, the domains' flags do not.
 */
static bool vcf_firmware_capacities(const struct vcf_dev *vi)
{
	unsigned int cpu;

	for (cpu = 0; cpu < vi->num_vcpus && cpu < nr_cpu_ids; cpu++) {
		struct device_node *np = of_get_cpu_node(cpu, NULL);
		bool has = np && of_property_present(np, "capacity-dmips-mhz");

		of_node_put(np);
		if (!has)
			return false;
	}
	return true;
}

/*
 * At probe (@announced false) firmware capacities win; after a topology change
 * the device announced they are stale, and the device's are written.
 */
static void vcf_set_capacities(struct vcf_dev *vi, bool announced)
{
	unsigned int cpu;

	if (!announced && vcf_firmware_capacities(vi)) {
		vi->cap_source = VCF_CAP_FIRMWARE;
		return;
	}
	if (!capacities)
		return;
	for (cpu = 0; cpu < vi->num_vcpus && cpu < nr_cpu_ids; cpu++) {
		u16 cap = vi->domains[vi->vcpu_domain[cpu]].capacity;

		if (!cap || cap > SCHED_CAPACITY_SCALE)
			return;		/* the device gives none: leave cpu_scale alone */
	}
	if (!vi->saved_scale) {
		vi->saved_scale = kcalloc(vi->num_vcpus, sizeof(*vi->saved_scale), GFP_KERNEL);
		if (!vi->saved_scale)
			return;
		for (cpu = 0; cpu < vi->num_vcpus && cpu < nr_cpu_ids; cpu++)
			vi->saved_scale[cpu] = per_cpu(cpu_scale, cpu);
	}
	for (cpu = 0; cpu < vi->num_vcpus && cpu < nr_cpu_ids; cpu++)
		WRITE_ONCE(per_cpu(cpu_scale, cpu), vi->domains[vi->vcpu_domain[cpu]].capacity);
	vi->cap_source = VCF_CAP_DEVICE;
}

/* What this driver wrote goes back before the governors' exit rebuilds the domains. */
static void vcf_clear_capacities(struct vcf_dev *vi)
{
	unsigned int cpu;

	if (vi->cap_source == VCF_CAP_DEVICE)
		for (cpu = 0; cpu < vi->num_vcpus && cpu < nr_cpu_ids; cpu++)
			WRITE_ONCE(per_cpu(cpu_scale, cpu), vi->saved_scale[cpu]);
	kfree(vi->saved_scale);
	vi->saved_scale = NULL;
	vi->cap_source = VCF_CAP_NONE;
}

static unsigned int vcf_capacity_mismatch(const struct vcf_dev *vi)
{
	unsigned int cpu, n = 0;

	for (cpu = 0; cpu < vi->num_vcpus && cpu < nr_cpu_ids; cpu++)
		n += topology_get_cpu_scale(cpu) != vi->domains[vi->vcpu_domain[cpu]].capacity;
	return n;
}

static void vcf_fie_start(struct vcf_dev *vi)
{
	unsigned int cpu;

	if (!freq_invariance || !vi->page)
		return;
	for (cpu = 0; cpu < vi->num_vcpus && cpu < nr_cpu_ids; cpu++) {
		cpumask_set_cpu(cpu, vi->fie_cpus);
		per_cpu(vcf_fie_stat, cpu) = (struct vcf_fie_stat){ 0 };
	}
	topology_set_scale_freq_source(&vcf_sfd, vi->fie_cpus);
	vi->fie = true;
}

static void vcf_fie_stop(struct vcf_dev *vi)
{
	unsigned int cpu;

	if (!vi->fie)
		return;
	/* Waits for every tick still in vcf_fie_tick() (synchronize_rcu). */
	topology_clear_scale_freq_source(SCALE_FREQ_SOURCE_VIRT, vi->fie_cpus);
	/* No cpufreq driver may follow: do not leave the last host frequency behind. */
	for_each_cpu(cpu, vi->fie_cpus)
		per_cpu(arch_freq_scale, cpu) = SCHED_CAPACITY_SCALE;
	vi->fie = false;
}

/* Since this device's source was registered (the counters start at 0 then). */
static u64 vcf_fie_sum(const struct vcf_dev *vi, bool fallbacks)
{
	unsigned int cpu;
	u64 n = 0;

	for_each_cpu(cpu, vi->fie_cpus)
		n += fallbacks ? per_cpu(vcf_fie_stat, cpu).fallbacks : per_cpu(vcf_fie_stat, cpu).ticks;
	return n;
}
#endif

/* -- energy model (SPEC 9.4) ------------------------------------------------- */

#if defined(CONFIG_GENERIC_ARCH_TOPOLOGY) && defined(CONFIG_ENERGY_MODEL)
#define VCF_EM 1

static bool vcf_page_live(const struct vcf_dev *vi)
{
	return le32_to_cpu(READ_ONCE(vi->page->magic)) == VCF_PAGE_MAGIC &&
	       (le32_to_cpu(READ_ONCE(vi->page->flags)) & VCF_PAGE_F_LIVE);
}

/* What is wrong with a copied section (SPEC 9.4's reasons), or NULL. */
static const char *vcf_em_check(const struct vcf_dev *vi, const struct virtio_cpufreq_energy *e)
{
	unsigned int i, j, nd = le16_to_cpu(e->num_domains);

	if (!nd)
		return "no-em";
	if (nd != vi->num_domains)
		return "bad-em-header";
	for (i = 0; i < nd; i++) {
		const struct virtio_cpufreq_em_domain *d = &e->domains[i];
		unsigned int n = le16_to_cpu(d->num_states);
		u32 prev = 0;

		if (n < 1 || n > VCF_EM_MAX_STATES)
			return "bad-em-states";
		for (j = 0; j < n; j++) {
			u32 khz = le32_to_cpu(d->states[j].khz), uw = le32_to_cpu(d->states[j].power_uw);

			if (khz <= prev)
				return "bad-em-frequency";
			if (!uw || uw > VCF_EM_MAX_POWER_UW)
				return "bad-em-power";
			prev = khz;
		}
		if (prev != vi->domains[i].max_khz)
			return "em-top-mismatch";
	}
	return NULL;
}

/*
 * Read the section into a local copy between two loads of its count (the
 * device may be rewriting it; a guest may scribble on it), check the copy,
 * and only then take it.  Process context: the retries may sleep.
 */
static void vcf_em_read(struct vcf_dev *vi)
{
	const void *src = (const void *)vi->page + VCF_EM_OFFSET;
	struct virtio_cpufreq_energy *e;
	const char *why = "em-torn";
	unsigned int i, j, tries;
	u32 s1, s2;

	vi->have_em = false;
	e = kmalloc(sizeof(*e), GFP_KERNEL);
	if (!e)
		return;
	for (tries = 0; tries < VCF_PAGE_TRIES; tries++) {
		s1 = le32_to_cpu(READ_ONCE(*(const __le32 *)src));
		if (!(s1 & 1)) {
			smp_rmb();
			memcpy(e, src, sizeof(*e));
			smp_rmb();
			s2 = le32_to_cpu(READ_ONCE(*(const __le32 *)src));
			if (s1 == s2) {
				why = vcf_em_check(vi, e);
				break;
			}
		}
		usleep_range(100, 200);
	}
	if (why) {
		atomic_inc(&vi->em_rejected);
		dev_warn(&vi->vdev->dev, "energy model refused: %s\n", why);
	} else {
		for (i = 0; i < vi->num_domains; i++) {
			const struct virtio_cpufreq_em_domain *d = &e->domains[i];

			vi->em[i].nr = le16_to_cpu(d->num_states);
			for (j = 0; j < vi->em[i].nr; j++) {
				vi->em[i].khz[j] = le32_to_cpu(d->states[j].khz);
				vi->em[i].uw[j] = le32_to_cpu(d->states[j].power_uw);
			}
		}
		vi->have_em = true;
	}
	kfree(e);
}

/* Probe: once the device has placed the page (after DRIVER_OK), read the model. */
static void vcf_em_probe(struct vcf_dev *vi)
{
	unsigned int waited;

	if (!energy_model || !vi->page || !virtio_has_feature(vi->vdev, VIRTIO_CPUFREQ_F_ENERGY_MODEL))
		return;
	for (waited = 0; !vcf_page_live(vi) && waited < em_wait_ms; waited += 5)
		msleep(5);
	if (!vcf_page_live(vi)) {
		dev_warn(&vi->vdev->dev, "page not placed within %u ms: no energy model\n", em_wait_ms);
		return;
	}
	vcf_em_read(vi);
}

/*
 * The kernel's EM builds its table by asking for the lowest state at or
 * above *freq, from 0 upwards (em_data_callback.active_power); called only
 * while em_dev_register_perf_domain() runs, from our ->register_em().
 */
static int vcf_em_active_power(struct device *dev, unsigned long *power, unsigned long *freq)
{
	struct vcf_dev *vi = READ_ONCE(vcf);
	const struct vcf_em *em;
	unsigned int i;

	if (!vi || dev->id >= vi->num_vcpus)
		return -ENODEV;
	em = &vi->em[vi->vcpu_domain[dev->id]];
	for (i = 0; i < em->nr; i++) {
		if (em->khz[i] >= *freq) {
			*freq = em->khz[i];
			*power = em->uw[i];
			return 0;
		}
	}
	return -EINVAL;
}

static const struct em_data_callback vcf_em_cb = EM_DATA_CB(vcf_em_active_power);

/*
 * cpufreq_online() calls this for a new policy before its governor starts
 * (and before CPUFREQ_CREATE_POLICY), so the scheduler domains that the
 * governor's start rebuilds get this perf domain and EAS can run.  The
 * kernel keeps CPU perf domains for good (em_dev_unregister_perf_domain()
 * ignores CPU devices, and updating one needs em_table_alloc(), which is
 * not exported): a later bind finds them (-EEXIST) and they stay as first
 * registered.  The kernel copies the table; nothing of this module is kept.
 */
static void vcf_register_em(struct cpufreq_policy *policy)
{
	struct vcf_dev *vi = READ_ONCE(vcf);
	const struct vcf_domain *d = policy->driver_data;
	int err;

	if (!vi || !vi->have_em || !d)
		return;
	err = em_dev_register_perf_domain(get_cpu_device(policy->cpu), vi->em[d->index].nr, &vcf_em_cb,
					  policy->cpus, true);
	if (err == -EEXIST) {
		atomic_inc(&vi->em_exists);
	} else if (err) {
		atomic_inc(&vi->em_errors);
		dev_warn(&vi->vdev->dev, "energy model for CPUs %*pbl refused: %d\n",
			 cpumask_pr_args(policy->cpus), err);
	} else {
		atomic_inc(&vi->em_registered);
		cpumask_set_cpu(policy->cpu, vi->em_cpus);
	}
}

/* After the policies exist: remember what the kernel was given, to tell when it goes stale. */
static void vcf_em_registered(struct vcf_dev *vi)
{
	if (!vi->have_em || vi->em_reg || !atomic_read(&vi->em_registered))
		return;
	vi->em_reg = kmemdup(vi->em, sizeof(vi->em), GFP_KERNEL);
	vi->em_reg_map = kmemdup(vi->vcpu_domain, vi->num_vcpus, GFP_KERNEL);
}

/*
 * A topology change: the device rewrote the section before it announced the
 * change.  The kernel's perf domains cannot follow (see vcf_register_em()),
 * so em_stale says when the map or a table differs from what it was given.
 */
static void vcf_em_retopology(struct vcf_dev *vi)
{
	if (!vi->have_em && !vi->em_reg)
		return;
	vcf_em_read(vi);
	vi->em_stale = vi->em_reg && (!vi->have_em || !vi->em_reg_map ||
		       memcmp(vi->em_reg, vi->em, sizeof(vi->em)) ||
		       memcmp(vi->em_reg_map, vi->vcpu_domain, vi->num_vcpus));
	if (vi->em_stale)
		dev_warn(&vi->vdev->dev, "the kernel's energy model describes the topology it was registered with\n");
}

/* Remove: a no-op for CPU devices in 7.3 (they are never unregistered), kept for kernels that do. */
static void vcf_em_remove(struct vcf_dev *vi)
{
	unsigned int cpu;

	for_each_cpu(cpu, vi->em_cpus)
		em_dev_unregister_perf_domain(get_cpu_device(cpu));
	cpumask_clear(vi->em_cpus);
	kfree(vi->em_reg);
	kfree(vi->em_reg_map);
	vi->em_reg = NULL;
	vi->em_reg_map = NULL;
}
#else
/* x86: capacities cannot reach the scheduler from a module, so an energy model would not enable EAS. */
static void vcf_em_probe(struct vcf_dev *vi) { }
static void vcf_em_registered(struct vcf_dev *vi) { }
static void vcf_em_retopology(struct vcf_dev *vi) { }
static void vcf_em_remove(struct vcf_dev *vi) { }
#endif

#ifndef CONFIG_GENERIC_ARCH_TOPOLOGY
/*
 * x86 (and any architecture without GENERIC_ARCH_TOPOLOGY): the frequency
 * scale comes from APERF/MPERF in arch_scale_freq_tick() and no interface
 * takes another source; cpu_scale does not exist.  See README.md.
 */
static void vcf_set_capacities(struct vcf_dev *vi, bool announced) { }
static void vcf_clear_capacities(struct vcf_dev *vi) { }
static unsigned int vcf_capacity_mismatch(const struct vcf_dev *vi) { return 0; }
static void vcf_fie_start(struct vcf_dev *vi) { }
static void vcf_fie_stop(struct vcf_dev *vi) { }
#endif

static int vcf_verify(struct cpufreq_policy_data *policy)
{
	return cpufreq_generic_frequency_table_verify(policy);
}

static int vcf_cpu_init(struct cpufreq_policy *policy)
{
	struct vcf_dev *vi = READ_ONCE(vcf);
	struct cpufreq_frequency_table *table;
	struct vcf_domain *d;
	unsigned int steps, i, n = 0;

	if (!vi || policy->cpu >= vi->num_vcpus)
		return -ENODEV;
	d = &vi->domains[vi->vcpu_domain[policy->cpu]];

	steps = clamp(table_steps, 2U, 64U);
	if (d->min_khz == d->max_khz)
		steps = 1;
	table = kcalloc(steps + 1, sizeof(*table), GFP_KERNEL);
	if (!table)
		return -ENOMEM;
	for (i = 0; i < steps; i++) {
		u32 f = steps == 1 ? d->max_khz :
			d->min_khz + div_u64((u64)(d->max_khz - d->min_khz) * i, steps - 1);

		if (n && table[n - 1].frequency == f)
			continue;
		table[n].driver_data = i;
		table[n++].frequency = f;
	}
	table[n].frequency = CPUFREQ_TABLE_END;

	policy->freq_table = table;
	policy->driver_data = d;
	cpumask_copy(policy->cpus, d->cpus);
	policy->cpuinfo.transition_latency = 10 * NSEC_PER_USEC;
	policy->transition_delay_us = rate_limit_us;
	policy->fast_switch_possible = true;
	/*
	 * Requests are made on the vCPU they are for, so the host can see
	 * which vCPU thread asked (as with Linux's virtual-cpufreq).
	 */
	policy->dvfs_possible_from_any_cpu = false;
	policy->cur = READ_ONCE(d->cur_khz);
	return 0;
}

static void vcf_cpu_exit(struct cpufreq_policy *policy)
{
	kfree(policy->freq_table);
	policy->freq_table = NULL;
}

static struct cpufreq_driver vcf_cpufreq_driver = {
	.name		= "virtio-cpufreq",
	.flags		= CPUFREQ_CONST_LOOPS,
	.init		= vcf_cpu_init,
	.exit		= vcf_cpu_exit,
	.verify		= vcf_verify,
	.target_index	= vcf_target_index,
	.fast_switch	= vcf_fast_switch,
	.get		= vcf_get,
#ifdef VCF_EM
	.register_em	= vcf_register_em,
#endif
};

/* -- sysfs statistics (under the virtio device) ------------------------------ */

static struct vcf_dev *dev_to_vcf(struct device *dev)
{
	return dev_to_virtio(dev)->priv;
}

#define VCF_STAT_ATTR(_name, _expr)						\
static ssize_t _name##_show(struct device *dev, struct device_attribute *attr,	\
			    char *buf)						\
{										\
	struct vcf_dev *vi = dev_to_vcf(dev);					\
	return sysfs_emit(buf, "%llu\n", (unsigned long long)(_expr));		\
}										\
static DEVICE_ATTR_RO(_name)

VCF_STAT_ATTR(requests, atomic64_read(&vi->stat_requests));
VCF_STAT_ATTR(batches, READ_ONCE(vi->stat_batches));
VCF_STAT_ATTR(records, READ_ONCE(vi->stat_records));
VCF_STAT_ATTR(notifies, READ_ONCE(vi->stat_notifies));
VCF_STAT_ATTR(deferred, atomic64_read(&vi->stat_deferred));
VCF_STAT_ATTR(refreshes, READ_ONCE(vi->stat_refreshes));
VCF_STAT_ATTR(starved, READ_ONCE(vi->stat_starved));
VCF_STAT_ATTR(add_errors, READ_ONCE(vi->stat_add_errors));
VCF_STAT_ATTR(config_reads, atomic64_read(&vi->stat_config_reads));
VCF_STAT_ATTR(config_changes, atomic64_read(&vi->stat_config_changes));
VCF_STAT_ATTR(range_changes, atomic64_read(&vi->stat_range_changes));
VCF_STAT_ATTR(topology_changes, atomic64_read(&vi->stat_topology_changes));
VCF_STAT_ATTR(generation, READ_ONCE(vi->generation));
VCF_STAT_ATTR(seq, READ_ONCE(vi->seq));
VCF_STAT_ATTR(page, vi->page ? 1 : 0);
VCF_STAT_ATTR(page_reads, atomic64_read(&vi->stat_page_reads));
VCF_STAT_ATTR(page_fallbacks, atomic64_read(&vi->stat_page_fallbacks));
#ifdef CONFIG_GENERIC_ARCH_TOPOLOGY
VCF_STAT_ATTR(fie, vi->fie ? 1 : 0);
VCF_STAT_ATTR(fie_ticks, vcf_fie_sum(vi, false));
VCF_STAT_ATTR(fie_fallbacks, vcf_fie_sum(vi, true));
VCF_STAT_ATTR(capacity_source, vi->cap_source);	/* 0 none, 1 the device's, 2 firmware */
VCF_STAT_ATTR(capacity_mismatch, vcf_capacity_mismatch(vi));

/*
 * "jiffies=J hz=HZ cpuN=S/P/T/C ...": each online CPU's arch_freq_scale (S,
 * what the scheduler uses), the scale the page gives its domain now (P, -1
 * when the page cannot be read), how many ticks that CPU's source ran (T)
 * and at which of them S last changed (C), read together for the boot test.
 */
static ssize_t freq_scale_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	struct vcf_dev *vi = dev_to_vcf(dev);
	unsigned int cpu;
	int n;

	n = sysfs_emit_at(buf, 0, "jiffies=%lu hz=%u", jiffies, HZ);
	for_each_online_cpu(cpu) {
		long page = -1;
		u32 khz;

		if (cpu < vi->num_vcpus && vcf_page_khz(vi, vi->vcpu_domain[cpu], &khz))
			page = vcf_scale(khz, vi->domains[vi->vcpu_domain[cpu]].max_khz);
		const struct vcf_fie_stat *st = per_cpu_ptr(&vcf_fie_stat, cpu);

		n += sysfs_emit_at(buf, n, " cpu%u=%lu/%ld/%llu/%llu", cpu, topology_get_freq_scale(cpu), page,
				   READ_ONCE(st->ticks) + READ_ONCE(st->fallbacks), READ_ONCE(st->changed));
	}
	n += sysfs_emit_at(buf, n, "\n");
	return n;
}
static DEVICE_ATTR_RO(freq_scale);
#endif
#ifdef VCF_EM
VCF_STAT_ATTR(em, vi->have_em ? 1 : 0);
VCF_STAT_ATTR(em_domains, atomic_read(&vi->em_registered));
VCF_STAT_ATTR(em_exists, atomic_read(&vi->em_exists));
VCF_STAT_ATTR(em_errors, atomic_read(&vi->em_errors));
VCF_STAT_ATTR(em_rejected, atomic_read(&vi->em_rejected));
VCF_STAT_ATTR(em_stale, vi->em_stale ? 1 : 0);
#endif

static struct attribute *vcf_stat_attrs[] = {
	&dev_attr_requests.attr,
	&dev_attr_batches.attr,
	&dev_attr_records.attr,
	&dev_attr_notifies.attr,
	&dev_attr_deferred.attr,
	&dev_attr_refreshes.attr,
	&dev_attr_starved.attr,
	&dev_attr_add_errors.attr,
	&dev_attr_config_reads.attr,
	&dev_attr_config_changes.attr,
	&dev_attr_range_changes.attr,
	&dev_attr_topology_changes.attr,
	&dev_attr_generation.attr,
	&dev_attr_seq.attr,
	&dev_attr_page.attr,
	&dev_attr_page_reads.attr,
	&dev_attr_page_fallbacks.attr,
#ifdef CONFIG_GENERIC_ARCH_TOPOLOGY
	&dev_attr_fie.attr,
	&dev_attr_fie_ticks.attr,
	&dev_attr_fie_fallbacks.attr,
	&dev_attr_capacity_source.attr,
	&dev_attr_capacity_mismatch.attr,
	&dev_attr_freq_scale.attr,
#endif
#ifdef VCF_EM
	&dev_attr_em.attr,
	&dev_attr_em_domains.attr,
	&dev_attr_em_exists.attr,
	&dev_attr_em_errors.attr,
	&dev_attr_em_rejected.attr,
	&dev_attr_em_stale.attr,
#endif
	NULL,
};

static const struct attribute_group vcf_stat_group = {
	.name = "cpufreq",
	.attrs = vcf_stat_attrs,
};

/* -- virtio driver ---------------------------------------------------------- */

static void vcf_free(struct vcf_dev *vi)
{
	unsigned int i;

	if (vi->free_bufs) {
		for (i = 0; i < vi->nr_free; i++)
			kfree(vi->free_bufs[i]);
		kfree(vi->free_bufs);
	}
	for (i = 0; i < VCF_MAX_DOMAINS; i++)
		free_cpumask_var(vi->domains[i].cpus);
	free_cpumask_var(vi->fie_cpus);
	free_cpumask_var(vi->em_cpus);
	kfree(vi->em_reg);
	kfree(vi->em_reg_map);
	kfree(vi->vcpus);
	kfree(vi->vcpu_domain);
	if (vi->page)
		memunmap(vi->page);
	kfree(vi);
}

static int vcf_alloc_buffers(struct vcf_dev *vi)
{
	unsigned int i, ring = virtqueue_get_vring_size(vi->vq);

	vi->recs_per_buf = min3(vi->num_vcpus, vi->max_batch, (unsigned int)VCF_MAX_RECORDS);
	vi->buf_size = sizeof(struct virtio_cpufreq_batch) +
		       vi->recs_per_buf * sizeof(struct virtio_cpufreq_record);
	/* One descriptor per buffer: never more buffers than ring entries. */
	vi->nr_bufs = clamp(num_buffers, 2U, max(ring, 2U));
	vi->nr_bufs = min(vi->nr_bufs, ring);
	vi->free_bufs = kcalloc(vi->nr_bufs, sizeof(void *), GFP_KERNEL);
	if (!vi->free_bufs)
		return -ENOMEM;
	for (i = 0; i < vi->nr_bufs; i++) {
		vi->free_bufs[i] = kzalloc(vi->buf_size, GFP_KERNEL);
		if (!vi->free_bufs[i])
			return -ENOMEM;
		vi->nr_free++;
	}
	return 0;
}

/* After the device stopped: get every buffer back into the free list. */
static void vcf_take_back_buffers(struct vcf_dev *vi)
{
	void *buf;

	vcf_reclaim_locked(vi);
	while ((buf = virtqueue_detach_unused_buf(vi->vq)) != NULL)
		vi->free_bufs[vi->nr_free++] = buf;
}

static int vcf_probe(struct virtio_device *vdev)
{
	struct vcf_dev *vi;
	unsigned int i;
	int err;

	if (!vdev->config->get) {
		dev_err(&vdev->dev, "config access disabled\n");
		return -EINVAL;
	}

	mutex_lock(&vcf_probe_lock);
	if (vcf) {
		dev_warn(&vdev->dev, "a cpufreq device is bound already; ignoring this one\n");
		err = -EBUSY;
		goto unlock;
	}

	vi = kzalloc(sizeof(*vi), GFP_KERNEL);
	if (!vi) {
		err = -ENOMEM;
		goto unlock;
	}
	vi->vdev = vdev;
	vdev->priv = vi;
	spin_lock_init(&vi->lock);
	mutex_init(&vi->config_lock);
	init_irq_work(&vi->flush_work, vcf_flush_irq_work);
	timer_setup(&vi->timer, vcf_timer_fn, 0);
	INIT_WORK(&vi->config_work, vcf_config_work);
	for (i = 0; i < VCF_MAX_DOMAINS; i++) {
		if (!zalloc_cpumask_var(&vi->domains[i].cpus, GFP_KERNEL)) {
			err = -ENOMEM;
			goto free;
		}
	}
	if (!zalloc_cpumask_var(&vi->fie_cpus, GFP_KERNEL) || !zalloc_cpumask_var(&vi->em_cpus, GFP_KERNEL)) {
		err = -ENOMEM;
		goto free;
	}

	err = vcf_init_config(vi);
	if (err)
		goto free;
	vi->perf_request = virtio_has_feature(vdev, VIRTIO_CPUFREQ_F_PERF_REQUEST);
	if (virtio_has_feature(vdev, VIRTIO_CPUFREQ_F_FREQ_PAGE)) {
		struct virtio_shm_region r;

		/* The device places the page after DRIVER_OK; ->get() checks its magic. */
		if (virtio_get_shm_region(vdev, &r, VCF_PAGE_SHMID) && r.len >= VCF_PAGE_SIZE)
			vi->page = memremap(r.addr, VCF_PAGE_SIZE, MEMREMAP_WB);
		if (!vi->page)
			dev_warn(&vdev->dev, "frequency page offered but not mappable; using config space\n");
	}

	vi->vcpus = kcalloc(vi->num_vcpus, sizeof(*vi->vcpus), GFP_KERNEL);
	if (!vi->vcpus) {
		err = -ENOMEM;
		goto free;
	}
	for (i = 0; i < vi->num_vcpus; i++)
		vi->vcpus[i].last_util = -1;

	/* No callback: used buffers are reclaimed when the next batch goes out. */
	vi->vq = virtio_find_single_vq(vdev, NULL, "requests");
	if (IS_ERR(vi->vq)) {
		err = PTR_ERR(vi->vq);
		vi->vq = NULL;
		goto free;
	}
	virtqueue_disable_cb(vi->vq);
	err = vcf_alloc_buffers(vi);
	if (err)
		goto del_vqs;

	vi->seq = 0;
	vi->resync = true;	/* first batch after DRIVER_OK */
	virtio_device_ready(vdev);

	WRITE_ONCE(vcf, vi);
	vcf_set_capacities(vi, false);
	vcf_em_probe(vi);	/* before the policies: ->register_em() gives it to the kernel */
	err = cpufreq_register_driver(&vcf_cpufreq_driver);
	if (err) {
		dev_err(&vdev->dev, "cannot register the cpufreq driver: %d%s\n", err,
			err == -EEXIST ? " (another cpufreq driver is active)" : "");
		vcf_clear_capacities(vi);
		WRITE_ONCE(vcf, NULL);
		goto reset;
	}
	/*
	 * Firmware capacities are final now (arch_topology sets them while the
	 * policies are created); ones that disagree with the device (the VM was
	 * re-pinned since boot) give way to the device's.
	 */
	if (vi->cap_source == VCF_CAP_FIRMWARE && vcf_capacity_mismatch(vi))
		vcf_set_capacities(vi, true);
	vcf_em_registered(vi);
	vcf_fie_start(vi);
	if (sysfs_create_group(&vdev->dev.kobj, &vcf_stat_group))
		dev_warn(&vdev->dev, "no statistics in sysfs\n");

	dev_info(&vdev->dev,
		 "%u vCPUs in %u domains, generation %u, %llu config reads, %u buffers of %u records%s%s%s%s%s%s\n",
		 vi->num_vcpus, vi->num_domains, vi->generation,
		 (unsigned long long)atomic64_read(&vi->stat_config_reads), vi->nr_bufs, vi->recs_per_buf,
		 vi->perf_request ? ", perf requests" : "",
		 virtio_has_feature(vdev, VIRTIO_RING_F_EVENT_IDX) ? ", event idx" : "",
		 vi->page ? ", frequency page" : "", vi->fie ? ", frequency-scale source" : "",
		 vi->cap_source == VCF_CAP_FIRMWARE ? ", firmware capacities" :
		 vi->cap_source == VCF_CAP_DEVICE ? ", device capacities" : "",
		 atomic_read(&vi->em_registered) ? ", energy model" :
		 atomic_read(&vi->em_exists) ? ", energy model (registered before)" : "");
	for (i = 0; i < vi->num_domains; i++)
		dev_info(&vdev->dev, "domain %u: cpus %*pbl, %u..%u kHz, now %u kHz, capacity %u\n", i,
			 cpumask_pr_args(vi->domains[i].cpus), vi->domains[i].min_khz,
			 vi->domains[i].max_khz, vi->domains[i].cur_khz, vi->domains[i].capacity);
	mutex_unlock(&vcf_probe_lock);
	return 0;

reset:
	virtio_reset_device(vdev);
	vcf_take_back_buffers(vi);
del_vqs:
	vdev->config->del_vqs(vdev);
free:
	vcf_free(vi);
	vdev->priv = NULL;
unlock:
	mutex_unlock(&vcf_probe_lock);
	return err;
}

static void vcf_remove(struct virtio_device *vdev)
{
	struct vcf_dev *vi = vdev->priv;

	mutex_lock(&vcf_probe_lock);
	sysfs_remove_group(&vdev->dev.kobj, &vcf_stat_group);
	/* First the config work: it may be re-registering the cpufreq driver. */
	mutex_lock(&vi->config_lock);
	WRITE_ONCE(vi->removing, true);
	mutex_unlock(&vi->config_lock);
	virtio_config_driver_disable(vdev);
	cancel_work_sync(&vi->config_work);
	vcf_fie_stop(vi);		/* no tick reads the page after this */
	vcf_clear_capacities(vi);	/* before the governors' exit rebuilds the domains */
	/* Stops the governors: no ->fast_switch()/->target_index() after this. */
	cpufreq_unregister_driver(&vcf_cpufreq_driver);
	vcf_em_remove(vi);
	irq_work_sync(&vi->flush_work);
	timer_shutdown_sync(&vi->timer);	/* and no re-arming from here on */
	irq_work_sync(&vi->flush_work);

	virtio_reset_device(vdev);
	vcf_take_back_buffers(vi);
	vdev->config->del_vqs(vdev);
	WRITE_ONCE(vcf, NULL);
	dev_info(&vdev->dev, "removed after %llu batches, %llu records, %llu notifications, %llu config reads\n",
		 vi->stat_batches, vi->stat_records, vi->stat_notifies,
		 (unsigned long long)atomic64_read(&vi->stat_config_reads));
	vcf_free(vi);
	mutex_unlock(&vcf_probe_lock);
}

static const struct virtio_device_id vcf_id_table[] = {
	{ VIRTIO_ID_CPUFREQ, VIRTIO_DEV_ANY_ID },
	{ 0 },
};
MODULE_DEVICE_TABLE(virtio, vcf_id_table);

static const unsigned int vcf_features[] = {
	VIRTIO_CPUFREQ_F_PERF_REQUEST,
	VIRTIO_CPUFREQ_F_FREQ_PAGE,
#ifdef VCF_EM
	VIRTIO_CPUFREQ_F_ENERGY_MODEL,	/* only where EAS can use it: capacities reach the scheduler */
#endif
};

static struct virtio_driver vcf_driver = {
	.driver.name		= KBUILD_MODNAME,
	.id_table		= vcf_id_table,
	.feature_table		= vcf_features,
	.feature_table_size	= ARRAY_SIZE(vcf_features),
	.probe			= vcf_probe,
	.remove			= vcf_remove,
	.config_changed		= vcf_config_changed,
};

module_virtio_driver(vcf_driver);

MODULE_DESCRIPTION("cpufreq driver for the vhost-user-cpufreq virtio device");
MODULE_LICENSE("GPL");
