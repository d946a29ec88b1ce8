// Autocast (automatic mixed precision) switches for a device, which tch 0.24 does not expose: its
// `tch::autocast` only acts on CUDA, through a deprecated call, with fp16 and no dtype setter
// (../shared/notes/libtorch-and-tch.md §4.2-4.3). These wrap ATen's own autocast state (ATen/autocast_mode.h),
// the state `torch.autocast(device_type, dtype)` sets in Python, including its nesting count: leaving the
// outermost region clears the cache of low-precision weight copies, so they never outlive an optimizer step.
#include <ATen/autocast_mode.h>

namespace {
at::DeviceType device_type(int device) {
    return device == 1 ? at::DeviceType::CUDA : at::DeviceType::CPU;
}
}  // namespace

extern "C" {

// Enters an autocast region on `device` (0 = CPU, 1 = CUDA) computing in `dtype` (a c10::ScalarType code,
// 15 = BFloat16): stores the previous enabled flag and dtype in *prev_enabled / *prev_dtype for
// whet_autocast_exit. Returns 0, or -1 if ATen threw.
int whet_autocast_enter(int device, int dtype, int* prev_enabled, int* prev_dtype) {
    try {
        at::DeviceType d = device_type(device);
        *prev_enabled = at::autocast::is_autocast_enabled(d) ? 1 : 0;
        *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(d));
        at::autocast::set_autocast_enabled(d, true);
        at::autocast::set_autocast_dtype(d, static_cast<at::ScalarType>(dtype));
        at::autocast::increment_nesting();
        return 0;
    } catch (...) {
        return -1;
    }
}

// Leaves the region: restores the previous flag and dtype; the outermost exit clears the cast cache.
int whet_autocast_exit(int device, int prev_enabled, int prev_dtype) {
    try {
        at::DeviceType d = device_type(device);
        if (at::autocast::decrement_nesting() == 0) {
            at::autocast::clear_cache();
        }
        at::autocast::set_autocast_enabled(d, prev_enabled != 0);
        at::autocast::set_autocast_dtype(d, static_cast<at::ScalarType>(prev_dtype));
        return 0;
    } catch (...) {
        return -1;
    }
}

// Whether autocast is on for `device`, and its dtype code (for tests): enabled * 1000 + dtype.
int whet_autocast_state(int device) {
    at::DeviceType d = device_type(device);
    return (at::autocast::is_autocast_enabled(d) ? 1000 : 0) + static_cast<int>(at::autocast::get_autocast_dtype(d));
}

}  // extern "C"
