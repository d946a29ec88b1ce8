//! The shim's C ABI (csrc/c10d_shim.h).
#![allow(non_camel_case_types)]

use std::os::raw::{c_char, c_int, c_void};

#[repr(C)]
pub struct c10d_store {
    _private: [u8; 0],
}
#[repr(C)]
pub struct c10d_work {
    _p: [u8; 0],
}
#[repr(C)]
pub struct c10d_pg {
    _private: [u8; 0],
}

extern "C" {
    pub fn c10d_last_error() -> *const c_char;
    pub fn c10d_store_new(host: *const c_char, port: c_int, is_server: c_int, timeout_ms: i64) -> *mut c10d_store;
    pub fn c10d_store_port(s: *mut c10d_store) -> c_int;
    pub fn c10d_store_set(s: *mut c10d_store, key: *const c_char, data: *const u8, len: i64) -> c_int;
    pub fn c10d_store_get(s: *mut c10d_store, key: *const c_char, out: *mut u8, cap: i64) -> i64;
    pub fn c10d_store_add(s: *mut c10d_store, key: *const c_char, delta: i64) -> i64;
    pub fn c10d_store_free(s: *mut c10d_store);
    pub fn c10d_pg_new_gloo(s: *mut c10d_store, prefix: *const c_char, rank: c_int, world: c_int, bind_host: *const c_char, timeout_ms: i64) -> *mut c10d_pg;
    pub fn c10d_pg_new_nccl(s: *mut c10d_store, prefix: *const c_char, rank: c_int, world: c_int, device: c_int, timeout_ms: i64) -> *mut c10d_pg;
    pub fn c10d_pg_rank(pg: *mut c10d_pg) -> c_int;
    pub fn c10d_pg_size(pg: *mut c10d_pg) -> c_int;
    pub fn c10d_pg_backend_name(pg: *mut c10d_pg) -> *const c_char;
    pub fn c10d_pg_allreduce_sum(pg: *mut c10d_pg, tensors: *const *mut c_void, n: c_int) -> c_int;
    pub fn c10d_pg_broadcast(pg: *mut c10d_pg, tensors: *const *mut c_void, n: c_int, root: c_int) -> c_int;
    pub fn c10d_pg_allgather_flat(pg: *mut c10d_pg, out: *mut c_void, input: *mut c_void) -> c_int;
    pub fn c10d_pg_reduce_scatter_flat_sum(pg: *mut c10d_pg, out: *mut c_void, input: *mut c_void) -> c_int;
    pub fn c10d_pg_allgather_flat_start(pg: *mut c10d_pg, out: *mut c_void, input: *mut c_void) -> *mut c10d_work;
    pub fn c10d_pg_reduce_scatter_flat_sum_start(pg: *mut c10d_pg, out: *mut c_void, input: *mut c_void) -> *mut c10d_work;
    pub fn c10d_work_wait(w: *mut c10d_work) -> c_int;
    pub fn c10d_pg_barrier(pg: *mut c10d_pg) -> c_int;
    pub fn c10d_pg_free(pg: *mut c10d_pg);
}
