// Builds the C++ shim over c10d (csrc/c10d_shim.cpp) against the headers of the libtorch that torch-sys
// links (DEP_TCH_LIBTORCH_LIB), following ../shared/notes/distributed-c10d.md §3:
// -DUSE_C10D_GLOO (else ProcessGroupGloo silently does not exist), the C++11 ABI of the PyPI wheel, and the
// gloo headers the wheel lacks (Debian's libgloo-dev, unpacked by scripts/libtorch.sh into WHET_GLOO_INCLUDE;
// only shared_ptr members and exported out-of-line functions of gloo types are used, so its version skew
// against torch's bundled gloo is harmless). Feature `nccl` adds ProcessGroupNCCL with the CUDA and NCCL
// headers of the NVIDIA wheels next to torch (override with CUDA_INCLUDE / NCCL_INCLUDE).
use std::path::{Path, PathBuf};

mod rpath {
    include!("../scripts/build_rpath.rs");
    pub(super) fn run() {
        main()
    }
}

fn main() {
    rpath::run();
    for v in ["WHET_GLOO_INCLUDE", "CUDA_INCLUDE", "NCCL_INCLUDE", "DEP_TCH_LIBTORCH_LIB"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/c10d_shim.h");
    let lib = PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB"));
    let lib = std::fs::canonicalize(&lib).unwrap_or(lib);
    let torch = lib.parent().expect("libtorch lib dir has a parent").to_path_buf();
    let include = torch.join("include");

    let mut b = cc::Build::new();
    b.cpp(true)
        .file("csrc/c10d_shim.cpp")
        .include("csrc")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-fPIC")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .define("GLOG_USE_GLOG_EXPORT", None)
        .warnings(false);
    match std::env::var_os("WHET_GLOO_INCLUDE") {
        Some(g) => {
            b.include(g);
        }
        None if Path::new("/usr/include/gloo/algorithm.h").exists() => {}
        None => panic!(
            "the gloo headers are missing (the torch wheel ships none): run `bash scripts/libtorch.sh` \
             (it unpacks Debian's libgloo-dev and sets WHET_GLOO_INCLUDE in .cargo/config.toml), or \
             `apt-get install libgloo-dev`, or set WHET_GLOO_INCLUDE to a directory holding gloo/*.h"
        ),
    }
    if std::env::var_os("CARGO_FEATURE_NCCL").is_some() {
        // torch/lib -> site-packages/nvidia/{cu13,nccl}/include
        let site = torch.parent().expect("torch has a parent").to_path_buf();
        let cuda = std::env::var_os("CUDA_INCLUDE").map(PathBuf::from).unwrap_or_else(|| site.join("nvidia/cu13/include"));
        let nccl = std::env::var_os("NCCL_INCLUDE").map(PathBuf::from).unwrap_or_else(|| site.join("nvidia/nccl/include"));
        for (what, dir, probe) in [("CUDA", &cuda, "cuda_runtime_api.h"), ("NCCL", &nccl, "nccl.h")] {
            if !dir.join(probe).exists() {
                panic!("feature `nccl`: no {probe} in {} (run `bash scripts/libtorch.sh cuda`, or set {what}_INCLUDE)", dir.display());
            }
        }
        b.include(cuda).include(nccl).define("USE_C10D_NCCL", None).define("C10D_SHIM_NCCL", None);
    }
    b.compile("c10d_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    if std::env::var_os("CARGO_FEATURE_NCCL").is_some() {
        // referenced by the shim, so they stay NEEDED under --as-needed (note §4, problem 7)
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
