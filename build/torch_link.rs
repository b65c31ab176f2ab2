// Shared build script for every crate whose binaries or tests link libtorch (included with
// `include!` from each crate's build.rs, whose `main` calls `torch_link()`).
//
// * rpath: binaries find libtorch at run time without LD_LIBRARY_PATH. `LIBTORCH` comes from
//   `.cargo/config.toml` ([env], pointing at the `.libtorch` link that `cargo xtask setup` makes);
//   the link is resolved so the rpath stays valid for every clone on the machine.
// * CUDA: when the libtorch install has `libtorch_cuda.so`, link it with `--no-as-needed`;
//   otherwise the linker drops it (nothing references it directly) and tch reports no CUDA.
fn torch_link() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Ok(libtorch) = std::env::var("LIBTORCH") else {
        return;
    };
    let lib = std::path::Path::new(&libtorch).join("lib");
    let lib = lib.canonicalize().unwrap_or(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-search=native={}", lib.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-ltorch");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
