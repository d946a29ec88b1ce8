// fp32 linear layers with MKL's packed GEMM (cblas_sgemm_pack / cblas_sgemm_compute), through the two
// operators PyTorch registers for its own CPU inference path (`mkl::_mkl_reorder_linear_weight`,
// `mkl::_mkl_linear`, used by TorchInductor's weight freezing) and which tch 0.24 does not bind. Packing a
// weight matrix once for a fixed number of input rows saves the per-call packing that a plain sgemm does,
// which dominates the skinny products of decoding (a few rows times a large weight).
// Tensors cross as tch's `torch::Tensor*` handles.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <string.h>

namespace {
thread_local char last_error[512];
void set_error(const char* what) {
    strncpy(last_error, what, sizeof(last_error) - 1);
    last_error[sizeof(last_error) - 1] = 0;
}
}  // namespace

extern "C" {

const char* whet_mkl_last_error() { return last_error; }

// Whether both operators are registered (libtorch built with MKL): 1, else 0.
int whet_mkl_available() {
    auto& d = c10::Dispatcher::singleton();
    return d.findSchema({"mkl::_mkl_reorder_linear_weight", ""}).has_value() &&
           d.findSchema({"mkl::_mkl_linear", ""}).has_value();
}

// Packs `weight` [out, in] (fp32, CPU) for inputs of `rows` rows; *out receives a new tensor. 0, or -1.
int whet_mkl_pack(at::Tensor* weight, int64_t rows, at::Tensor** out) {
    try {
        static auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkl::_mkl_reorder_linear_weight", "")
                             .typed<at::Tensor(const at::Tensor&, int64_t)>();
        *out = new at::Tensor(op.call(*weight, rows));
        return 0;
    } catch (const std::exception& e) {
        set_error(e.what());
        return -1;
    }
}

// x [rows, in] @ weight^T (+ bias) with the packed weight; `bias` may be null. 0, or -1.
int whet_mkl_linear(at::Tensor* x, at::Tensor* packed, at::Tensor* weight, at::Tensor* bias, int64_t rows,
                    at::Tensor** out) {
    try {
        static auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkl::_mkl_linear", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                               const std::optional<at::Tensor>&, int64_t)>();
        std::optional<at::Tensor> b;
        if (bias) b = *bias;
        *out = new at::Tensor(op.call(*x, *packed, *weight, b, rows));
        return 0;
    } catch (const std::exception& e) {
        set_error(e.what());
        return -1;
    }
}

}  // extern "C"
