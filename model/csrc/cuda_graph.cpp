// CUDA graphs for the rollout engine's static decode step: capture a sequence of libtorch kernels once and
// replay it, so a decode step costs one graph launch instead of hundreds of kernel launches from the host.
// tch 0.24 does not bind at::cuda::CUDAGraph; this shim does. model/build.rs compiles it into a shared library
// (headers only, no CUDA library at link time) that the binary carries and dlopens once the CUDA preload has
// loaded libtorch_cuda (model/src/cuda_graph.rs); scripts/check-cuda-graph-shim.sh links it against the
// wheel's CUDA libraries to show every symbol it needs is there.
//
// Capture follows PyTorch's rules (torch.cuda.graphs): it must run on a stream other than the legacy default
// stream, so a graph owns a side stream that waits for the current stream before and is waited on after; the
// same side stream runs an eager warm-up first (lazy initialisation such as cuBLAS workspaces must not
// happen during capture). Graphs may share one memory pool when they are never replayed concurrently.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraph.h>
#include <cuda_runtime_api.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>
#include <string>

namespace {

struct WhetGraph {
    at::cuda::CUDAGraph graph;
    c10::cuda::CUDAStream side;
    std::optional<c10::cuda::CUDAStream> outer;
    std::optional<c10::cuda::CUDAStreamGuard> guard;
    explicit WhetGraph(c10::DeviceIndex device) : side(c10::cuda::getStreamFromPool(false, device)) {}
};

thread_local std::string last_error;

int fail(const std::exception& e) {
    last_error = e.what();
    return -1;
}

// `waiter` waits for the work queued on `on` so far (an event, no host synchronisation).
void order(const c10::cuda::CUDAStream& on, const c10::cuda::CUDAStream& waiter) {
    cudaEvent_t e;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(e, on.stream()));
    C10_CUDA_CHECK(cudaStreamWaitEvent(waiter.stream(), e, 0));
    C10_CUDA_CHECK(cudaEventDestroy(e));
}

// The side stream becomes current after waiting for the work already queued on the current stream.
void enter_side(WhetGraph* g) {
    auto outer = c10::cuda::getCurrentCUDAStream(g->side.device_index());
    order(outer, g->side);
    g->outer = outer;
    g->guard.emplace(g->side);
}

// Back to the outer stream, which waits for what the side stream queued.
void leave_side(WhetGraph* g) {
    g->guard.reset();
    order(g->side, *g->outer);
    g->outer.reset();
}

}  // namespace

extern "C" {

const char* whet_cuda_graph_last_error() { return last_error.c_str(); }

// A new graph on CUDA device `device`, or null (see whet_cuda_graph_last_error).
void* whet_cuda_graph_new(int device) {
    try {
        return new WhetGraph(static_cast<c10::DeviceIndex>(device));
    } catch (const std::exception& e) {
        fail(e);
        return nullptr;
    }
}

void whet_cuda_graph_free(void* g) { delete static_cast<WhetGraph*>(g); }

// Eager work on the graph's side stream (the warm-up before a capture): begin ... end.
int whet_cuda_graph_side_begin(void* g) {
    try {
        enter_side(static_cast<WhetGraph*>(g));
        return 0;
    } catch (const std::exception& e) {
        return fail(e);
    }
}

int whet_cuda_graph_side_end(void* g) {
    try {
        leave_side(static_cast<WhetGraph*>(g));
        return 0;
    } catch (const std::exception& e) {
        return fail(e);
    }
}

// Starts capturing the kernels the current thread queues; `pool_of`: a graph whose memory pool this one
// shares (null: a pool of its own).
int whet_cuda_graph_capture_begin(void* g, void* pool_of) {
    auto* w = static_cast<WhetGraph*>(g);
    try {
        enter_side(w);
        at::cuda::MempoolId_t pool{0, 0};
        if (pool_of != nullptr) {
            pool = static_cast<WhetGraph*>(pool_of)->graph.pool();
        }
        w->graph.capture_begin(pool);
        return 0;
    } catch (const std::exception& e) {
        if (w->guard) {
            leave_side(w);
        }
        return fail(e);
    }
}

int whet_cuda_graph_capture_end(void* g) {
    auto* w = static_cast<WhetGraph*>(g);
    try {
        w->graph.capture_end();
        leave_side(w);
        return 0;
    } catch (const std::exception& e) {
        if (w->guard) {
            leave_side(w);
        }
        return fail(e);
    }
}

// Launches the captured kernels on the current stream.
int whet_cuda_graph_replay(void* g) {
    try {
        static_cast<WhetGraph*>(g)->graph.replay();
        return 0;
    } catch (const std::exception& e) {
        return fail(e);
    }
}
}
