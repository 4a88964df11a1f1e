//! Builds the target programs the end-to-end tests run (see
//! targets/build_targets.rs) and tells the tests where they are.

include!("targets/build_targets.rs");

fn main() {
    let manifest = std::path::PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = std::path::PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets it")).join("targets");
    let src = manifest.join("targets");
    println!("cargo:rerun-if-changed={}", src.display());
    match build_targets(&src, &out) {
        Ok(_) => println!("cargo:rustc-env=FLAMEWATCH_TARGETS_DIR={}", out.display()),
        Err(e) => panic!("building test targets: {e}"),
    }
}
