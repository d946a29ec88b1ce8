// Shared build script body (each libtorch-linking crate's build.rs `include!`s this file).
// `main` is public so that a crate with more to build can include it in a module and call it.
//
// torch-sys links libtorch but leaves no RPATH in downstream binaries (tch-rs #907, #980), so every crate
// whose binaries or tests link libtorch bakes a RUNPATH to the libtorch it was built against. RUNPATH (not
// RPATH) lets LD_LIBRARY_PATH win, which is how one binary is pointed at another machine's torch (e.g. the
// CUDA build on a GPU machine). See ../shared/notes/libtorch-and-tch.md §2.
pub fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        let lib = std::fs::canonicalize(&lib).unwrap_or_else(|_| lib.into());
        println!("cargo:rustc-link-arg=-Wl,--enable-new-dtags,-rpath,{}", lib.display());
    }
}
