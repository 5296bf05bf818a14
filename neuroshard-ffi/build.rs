//! Regenerates `include/neuroshard.h` from this crate's `extern "C"` items on every build, so
//! the committed header can be checked for staleness (`git diff --exit-code`).

fn main() {
    let crate_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let header = std::path::Path::new(&crate_dir).join("../include/neuroshard.h");
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let config =
        cbindgen::Config::from_file(std::path::Path::new(&crate_dir).join("cbindgen.toml"))
            .expect("cbindgen.toml is valid");
    match cbindgen::generate_with_config(&crate_dir, config) {
        Ok(bindings) => {
            bindings.write_to_file(header);
        }
        // A syntax error in the sources: let rustc report it instead.
        Err(e) => println!("cargo:warning=cbindgen: {e}"),
    }
}
