// c10d from Rust: see c10d_shim.h. Follows ../shared/notes/distributed-c10d.md §3-§6 (torch 2.11, tch 0.24).
#include "c10d_shim.h"

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Types.hpp>
#ifdef C10D_SHIM_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <nccl.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
// ProcessGroupNCCL::Options embeds ncclConfig_t by value: our nccl.h must be the one torch was built with.
#ifndef C10D_SHIM_NCCL_VERSION_CODE
#define C10D_SHIM_NCCL_VERSION_CODE NCCL_VERSION(2, 28, 9)
#endif
#if NCCL_VERSION_CODE != C10D_SHIM_NCCL_VERSION_CODE
#error "nccl.h is not NCCL 2.28.9, the version torch 2.11.0 is built with (ProcessGroupNCCL::Options layout)"
#endif
#endif

#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unistd.h>
#include <vector>

struct c10d_store {
  c10::intrusive_ptr<c10d::TCPStore> store;
};
struct c10d_pg {
  c10::intrusive_ptr<c10d::Backend> pg;
  std::string name;
};
struct c10d_work {
  c10::intrusive_ptr<c10d::Work> work;
};

static thread_local std::string last_error;
static thread_local bool has_error = false;

static void set_error(const std::string& e) {
  last_error = e;
  has_error = true;
}

const char* c10d_last_error(void) { return has_error ? last_error.c_str() : nullptr; }

// Runs `body`; C++ exceptions become the last error (c10::Error without its C++ backtrace).
template <typename T, typename F>
static T guard(T on_error, F body) {
  has_error = false;
  try {
    return body();
  } catch (const c10::Error& e) {
    set_error(e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_error(e.what());
  } catch (...) {
    set_error("unknown C++ exception");
  }
  return on_error;
}

c10d_store* c10d_store_new(const char* host, int port, int is_server, int64_t timeout_ms) {
  return guard<c10d_store*>(nullptr, [&] {
    c10d::TCPStoreOptions o;
    o.port = static_cast<std::uint16_t>(port);
    o.isServer = is_server != 0;
    o.waitWorkers = false;
    o.numWorkers = std::nullopt;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    return new c10d_store{c10::make_intrusive<c10d::TCPStore>(std::string(host), o)};
  });
}

int c10d_store_port(c10d_store* s) {
  return guard<int>(-1, [&] { return static_cast<int>(s->store->getPort()); });
}

int c10d_store_set(c10d_store* s, const char* key, const uint8_t* data, int64_t len) {
  return guard<int>(-1, [&] {
    s->store->set(std::string(key), std::vector<uint8_t>(data, data + len));
    return 0;
  });
}

int64_t c10d_store_get(c10d_store* s, const char* key, uint8_t* out, int64_t cap) {
  return guard<int64_t>(-1, [&] {
    std::vector<uint8_t> v = s->store->get(std::string(key));
    int64_t n = static_cast<int64_t>(v.size());
    if (out && cap > 0) std::memcpy(out, v.data(), static_cast<size_t>(std::min(n, cap)));
    return n;
  });
}

int64_t c10d_store_add(c10d_store* s, const char* key, int64_t delta) {
  return guard<int64_t>(INT64_MIN, [&] { return s->store->add(std::string(key), delta); });
}

void c10d_store_free(c10d_store* s) { delete s; }

c10d_pg* c10d_pg_new_gloo(c10d_store* s, const char* prefix, int rank, int world, const char* bind_host, int64_t timeout_ms) {
  return guard<c10d_pg*>(nullptr, [&] {
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), s->store);
    auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    std::string host;
    if (bind_host) {
      host = bind_host;
    }
    const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
    if (!bind_host && ifname && *ifname) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    } else if (!host.empty()) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(host));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    return new c10d_pg{pg, "gloo"};
  });
}

c10d_pg* c10d_pg_new_nccl(c10d_store* s, const char* prefix, int rank, int world, int device_index, int64_t timeout_ms) {
#ifdef C10D_SHIM_NCCL
  return guard<c10d_pg*>(nullptr, [&] {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device_index));
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), s->store);
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, opts);
    at::Device dev(at::kCUDA, static_cast<c10::DeviceIndex>(device_index));
    pg->setBoundDeviceId(dev);
    pg->eagerConnectSingleDevice(dev);
    return new c10d_pg{pg, "nccl"};
  });
#else
  (void)s; (void)prefix; (void)rank; (void)world; (void)device_index; (void)timeout_ms;
  set_error("this build has no NCCL (build with `--features nccl` after `scripts/libtorch.sh cuda`)");
  return nullptr;
#endif
}

int c10d_pg_rank(c10d_pg* pg) { return pg->pg->getRank(); }
int c10d_pg_size(c10d_pg* pg) { return pg->pg->getSize(); }
const char* c10d_pg_backend_name(c10d_pg* pg) { return pg->name.c_str(); }

// A list of tensors in one allreduce means "one tensor per local device", not "reduce each": one
// collective per tensor (note §4, problem 4). Tensors are detached so autograd's in-place checks stay out.
int c10d_pg_allreduce_sum(c10d_pg* pg, void* const* tensors, int n) {
  return guard<int>(-1, [&] {
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    for (int i = 0; i < n; i++) {
      std::vector<at::Tensor> one{static_cast<at::Tensor*>(tensors[i])->detach()};
      works.push_back(pg->pg->allreduce(one, o));
    }
    for (auto& w : works) w->wait();
    return 0;
  });
}

int c10d_pg_broadcast(c10d_pg* pg, void* const* tensors, int n, int root) {
  return guard<int>(-1, [&] {
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    c10d::BroadcastOptions o;
    o.rootRank = root;
    for (int i = 0; i < n; i++) {
      std::vector<at::Tensor> one{static_cast<at::Tensor*>(tensors[i])->detach()};
      works.push_back(pg->pg->broadcast(one, o));
    }
    for (auto& w : works) w->wait();
    return 0;
  });
}

// Flat all-gather and reduce-scatter (the "_base" collectives: one buffer of world equal blocks), as
// torch.distributed.all_gather_into_tensor / reduce_scatter_tensor; Gloo and NCCL both implement them. The
// blocking forms start the collective and wait for it.
int c10d_pg_allgather_flat(c10d_pg* pg, void* out, void* in) {
  c10d_work* w = c10d_pg_allgather_flat_start(pg, out, in);
  return w ? c10d_work_wait(w) : -1;
}

int c10d_pg_reduce_scatter_flat_sum(c10d_pg* pg, void* out, void* in) {
  c10d_work* w = c10d_pg_reduce_scatter_flat_sum_start(pg, out, in);
  return w ? c10d_work_wait(w) : -1;
}

c10d_work* c10d_pg_allgather_flat_start(c10d_pg* pg, void* out, void* in) {
  return guard<c10d_work*>(nullptr, [&] {
    at::Tensor o = static_cast<at::Tensor*>(out)->detach();
    at::Tensor i = static_cast<at::Tensor*>(in)->detach();
    c10d::AllgatherOptions opts;
    return new c10d_work{pg->pg->_allgather_base(o, i, opts)};
  });
}

c10d_work* c10d_pg_reduce_scatter_flat_sum_start(c10d_pg* pg, void* out, void* in) {
  return guard<c10d_work*>(nullptr, [&] {
    at::Tensor o = static_cast<at::Tensor*>(out)->detach();
    at::Tensor i = static_cast<at::Tensor*>(in)->detach();
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    return new c10d_work{pg->pg->_reduce_scatter_base(o, i, opts)};
  });
}

int c10d_work_wait(c10d_work* w) {
  int rc = guard<int>(-1, [&] {
    w->work->wait();
    return 0;
  });
  delete w;
  return rc;
}

int c10d_pg_barrier(c10d_pg* pg) {
  return guard<int>(-1, [&] {
    c10d::BarrierOptions o;
    pg->pg->barrier(o)->wait();
    return 0;
  });
}

void c10d_pg_free(c10d_pg* pg) {
  if (!pg) return;
  guard<int>(-1, [&] {
    pg->pg->shutdown();
    return 0;
  });
  delete pg;
}
