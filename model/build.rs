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
}
