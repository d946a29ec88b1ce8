mod rpath {
    include!("../scripts/build_rpath.rs");
}

/// The RUNPATH of every libtorch-linking crate, plus the C++ shims (csrc/: autocast, MKL packed linear, releasing a gradient) compiled against
/// the headers of the libtorch torch-sys links (../shared/notes/libtorch-and-tch.md §2, §4.3).
fn main() {
    rpath::main();
    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    println!("cargo:rerun-if-changed=csrc/mkl_linear.cpp");
    println!("cargo:rerun-if-changed=csrc/grad.cpp");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports DEP_TCH_LIBTORCH_LIB");
    let root = std::fs::canonicalize(&lib).unwrap_or_else(|_| lib.into());
    let include = root.parent().expect("libtorch lib dir has a parent").join("include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/autocast.cpp")
        .file("csrc/mkl_linear.cpp")
        .file("csrc/grad.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .warnings(false)
        .compile("whet_autocast");
    cuda_graph_shim(&root, &include);
}

/// The CUDA-graph shim (csrc/cuda_graph.cpp) as a shared library that the binary carries and loads at run time
/// once CUDA is up (`model::cuda_graph`): its libtorch_cuda / c10_cuda / cudart symbols then resolve against
/// the libraries the CUDA preload brought in, so the same binary still runs where there is no CUDA. It needs
/// the CUDA runtime headers (in the wheel's nvidia/cu13/include) and the crt and cccl headers
/// (`scripts/libtorch.sh` unpacks them into WHET_CUDA_INCLUDE; the cuda flavour has them in place). Without
/// them the crate builds without the shim and CUDA graphs report themselves unavailable.
fn cuda_graph_shim(lib: &std::path::Path, include: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc/cuda_graph.cpp");
    println!("cargo:rerun-if-env-changed=WHET_CUDA_INCLUDE");
    println!("cargo:rustc-check-cfg=cfg(whet_cuda_graph_shim)");
    let nvidia = lib.parent().and_then(|t| t.parent()).map(|p| p.join("nvidia/cu13/include"));
    let extra = std::env::var_os("WHET_CUDA_INCLUDE").map(std::path::PathBuf::from);
    let dirs: Vec<std::path::PathBuf> = nvidia.into_iter().chain(extra).collect();
    let has = |h: &str| dirs.iter().any(|d| d.join(h).exists());
    if let Some(missing) = ["cuda_runtime_api.h", "crt/host_config.h", "nv/target"].into_iter().find(|h| !has(h)) {
        println!("cargo:warning=building without the CUDA-graph shim: no {missing} (run scripts/libtorch.sh, or set WHET_CUDA_INCLUDE)");
        return;
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("libwhet_cuda_graph.so");
    let compiler = cc::Build::new().cpp(true).get_compiler();
    let mut cmd = compiler.to_command();
    cmd.args(["-std=c++17", "-fPIC", "-shared", "-O2", "-D_GLIBCXX_USE_CXX11_ABI=1", "-w"])
        .arg(format!("-I{}", include.display()))
        .arg(format!("-I{}", include.join("torch/csrc/api/include").display()));
    for d in &dirs {
        cmd.arg(format!("-I{}", d.display()));
    }
    cmd.arg("csrc/cuda_graph.cpp").arg("-o").arg(&out);
    let status = cmd.status().expect("run the C++ compiler for csrc/cuda_graph.cpp");
    assert!(status.success(), "compiling csrc/cuda_graph.cpp failed: {status}");
    println!("cargo:rustc-cfg=whet_cuda_graph_shim");
    println!("cargo:rustc-env=WHET_CUDA_GRAPH_SO={}", out.display());
}
