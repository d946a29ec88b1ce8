include!("../scripts/build_rpath.rs");
