//! `include/neuroshard.h` is what the pinned cbindgen generates from this crate's sources.
//!
//! When the committed header is stale this test writes the fresh one in its place and fails,
//! so a developer only has to commit the rewritten file (and CI, on a clean clone, fails).

use std::path::Path;

#[test]
fn committed_header_matches_the_sources() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("neuroshard-ffi/cbindgen.toml parses");
    let bindings =
        cbindgen::generate_with_config(crate_dir, config).expect("cbindgen reads the sources");
    let mut fresh = Vec::new();
    bindings.write(&mut fresh);

    let header = crate_dir.join("../include/neuroshard.h");
    let committed = std::fs::read(&header).unwrap_or_default();
    if committed != fresh {
        std::fs::write(&header, &fresh).expect("include/neuroshard.h is writable");
        panic!(
            "include/neuroshard.h was stale and has been regenerated from neuroshard-ffi: \
             review and commit it"
        );
    }
}
