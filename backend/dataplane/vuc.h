/* Types shared by the request-queue drain (ring_drain.c), the kick lane (kick_lane.c and the twins it
 * runs: engine.c, accounting.c, kick_batcher.c, virtqueue.c, actuators.c) and the guard (guard.c).
 *
 * The layouts are also declared to cffi in backend/dataplane/cdefs.py (the one list of what
 * Python may call); vuc_abi_sizes() and vuc_lane_abi() let Python check them before trusting C.
 */
#ifndef VUC_H
#define VUC_H

#include <stddef.h>
#include <stdint.h>

/* Calls between the library's own files: not part of what Python sees. */
#define VUC_INTERNAL __attribute__((visibility("hidden")))

#define VIRTQ_DESC_F_NEXT 1u
#define VIRTQ_DESC_F_WRITE 2u
#define VIRTQ_DESC_F_INDIRECT 4u
#define DESC_SIZE 16u
#define MAX_INDIRECT_DESCS 32768u

#define BATCH_HEADER_SIZE 16u
#define RECORD_SIZE 8u
#define MAX_RECORDS 256u
#define MAX_BATCH_BYTES (BATCH_HEADER_SIZE + MAX_RECORDS * RECORD_SIZE)
#define BATCH_F_RESYNC 1u
#define UTIL_SCALE 1024u
#define DESCRIPTORS_PER_UNIT 8u
#define NO_HEAD 0xFFFFFFFFu

/* Must match protocol/requests.py REASONS, index for index (a test checks). */
enum reason {
    REASON_OK,
    REASON_AVAIL_INDEX_JUMP,
    REASON_BAD_HEAD,
    REASON_ADDRESS_OUT_OF_RANGE,
    REASON_DESCRIPTOR_LOOP,
    REASON_INDIRECT_NOT_NEGOTIATED,
    REASON_INDIRECT_WITH_NEXT,
    REASON_BAD_INDIRECT_LENGTH,
    REASON_CHAIN_TOO_LONG,
    REASON_READABLE_AFTER_WRITABLE,
    REASON_NEXT_OUT_OF_RANGE,
    REASON_NESTED_INDIRECT,
    REASON_SHORT_BATCH,
    REASON_BAD_BATCH_FLAGS,
    REASON_BAD_RECORD_COUNT,
    REASON_BAD_BATCH_SIZE,
    REASON_BAD_VCPU,
    REASON_BAD_UTIL,
    REASON_PERF_NOT_NEGOTIATED,
    REASON_COUNT
};


typedef struct {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
} vuc_region;

typedef struct {
    uint8_t *desc;
    uint16_t *avail;
    uint8_t *used;
    uint32_t size;
    uint32_t indirect;
    uint32_t max_chain_bytes;
    uint32_t max_indirect;
    uint32_t num_vcpus;
    uint32_t perf_request;
    const vuc_region *regions;
    uint32_t nregions;
    /* The cursor, shared with DeviceQueue: passed in and returned packed by vuc_drain. */
    uint32_t last_avail;
    uint32_t avail_shadow;
    uint32_t used_idx;
    uint32_t broken;
} vuc_queue;

/* 24 bytes, struct "<IHHIHHQ" on the Python side. */
typedef struct {
    uint32_t head;
    uint16_t status;
    uint16_t nvalid;
    uint32_t seq;
    uint16_t flags;
    uint16_t ntotal;
    uint64_t ts;
} vuc_entry;

typedef struct {
    uint32_t entries;
    uint32_t records;
    uint32_t rejects;
    uint32_t descriptors;
    uint32_t spent;
    uint32_t more;
    uint32_t returned;
} vuc_result;

/* guard.c: guest memory faults made harmless, eventfd access that cannot block. */
int vuc_guard_install(void);
int32_t vuc_guard_add(const void *start, uint64_t len);
void vuc_guard_remove(int32_t id);
uint64_t vuc_guard_faults(int32_t id);
uint64_t vuc_guard_faults_in(const void *start, uint64_t len);
void vuc_guard_stats(uint64_t *epoch, uint64_t *stray, uint64_t *fatal);
uint64_t vuc_guard_epoch(void);
int vuc_eventfd_signal(int fd);
int64_t vuc_eventfd_drain(int fd);

const char *vuc_reason_name(int code);
int vuc_abi_sizes(void);

uint64_t vuc_drain(vuc_queue *q, uint64_t cursor, uint32_t budget, uint32_t num_vcpus,
                   uint32_t perf_request, vuc_entry *entries, uint8_t *records,
                   uint32_t *rejects, uint8_t *scratch, vuc_result *res);

#endif
