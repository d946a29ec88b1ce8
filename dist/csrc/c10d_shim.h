/* A C ABI over PyTorch's c10d (TCPStore, ProcessGroupGloo, ProcessGroupNCCL) for the Rust `dist` crate.
 * Every function catches C++ exceptions: `int` results are 0 ok / -1 error, pointers NULL on error, and
 * c10d_last_error() then says why (thread-local, valid until the next call).
 * Tensors are `at::Tensor*` as handed out by tch (`Tensor::as_ptr()`).
 * Recipe: ../../../shared/notes/distributed-c10d.md (section 3). */
#ifndef WHET_C10D_SHIM_H
#define WHET_C10D_SHIM_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

typedef struct c10d_store c10d_store;
typedef struct c10d_pg c10d_pg;
typedef struct c10d_work c10d_work;

const char* c10d_last_error(void);

/* is_server: bind host:port (port 0 = any free port); otherwise connect, retrying until timeout. */
c10d_store* c10d_store_new(const char* host, int port, int is_server, int64_t timeout_ms);
int c10d_store_port(c10d_store* s);
int c10d_store_set(c10d_store* s, const char* key, const uint8_t* data, int64_t len);
/* Blocks until the key exists (or timeout); returns the value's length and copies min(len, cap) bytes. */
int64_t c10d_store_get(c10d_store* s, const char* key, uint8_t* out, int64_t cap);
/* Atomic add; returns the new value (or INT64_MIN on error). */
int64_t c10d_store_add(c10d_store* s, const char* key, int64_t delta);

void c10d_store_free(c10d_store* s);

/* Process groups; keys go under `prefix` in the store. bind_host NULL: GLOO_SOCKET_IFNAME, else the host
 * name (as torch does). */
c10d_pg* c10d_pg_new_gloo(c10d_store* s, const char* prefix, int rank, int world, const char* bind_host, int64_t timeout_ms);
/* Only in builds with -DC10D_SHIM_NCCL; otherwise NULL with an error. */
c10d_pg* c10d_pg_new_nccl(c10d_store* s, const char* prefix, int rank, int world, int device_index, int64_t timeout_ms);
int c10d_pg_rank(c10d_pg* pg);
int c10d_pg_size(c10d_pg* pg);
const char* c10d_pg_backend_name(c10d_pg* pg);
/* In-place SUM of each tensor (one collective per tensor, issued together, then all waited). */
int c10d_pg_allreduce_sum(c10d_pg* pg, void* const* tensors, int n);
int c10d_pg_broadcast(c10d_pg* pg, void* const* tensors, int n, int root);
/* out (world × n elements, flat) ← every rank's `in` (n elements), in rank order. */
int c10d_pg_allgather_flat(c10d_pg* pg, void* out, void* in);
/* out (n elements) ← the SUM over the ranks of this rank's block of `in` (world × n elements, flat). */
int c10d_pg_reduce_scatter_flat_sum(c10d_pg* pg, void* out, void* in);
/* The same two, started: they run on the backend's own threads (Gloo) or stream (NCCL) until waited for. */
c10d_work* c10d_pg_allgather_flat_start(c10d_pg* pg, void* out, void* in);
c10d_work* c10d_pg_reduce_scatter_flat_sum_start(c10d_pg* pg, void* out, void* in);
/* Waits for a started collective and frees its handle (also on error). */
int c10d_work_wait(c10d_work* w);
int c10d_pg_barrier(c10d_pg* pg);
void c10d_pg_free(c10d_pg* pg);

#ifdef __cplusplus
}
#endif
#endif
