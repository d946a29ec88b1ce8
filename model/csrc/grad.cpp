// Releasing a tensor's gradient (what `param.grad = None` does in Python), which tch 0.24 does not expose:
// its zero_grad keeps the buffer. Sharded data parallelism frees each micro-batch's full gradients once they
// are reduced into this rank's shard.
#include <ATen/ATen.h>

extern "C" {

// Drops the gradient of `*t` (an at::Tensor, tch's C_tensor). Returns 0, or -1 if ATen threw.
int whet_release_grad(void* t) {
    try {
        static_cast<at::Tensor*>(t)->mutable_grad().reset();
        return 0;
    } catch (...) {
        return -1;
    }
}
}
