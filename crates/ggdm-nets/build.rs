include!("../../build/torch_link.rs");

fn main() {
    torch_link();
    build_memory_shim();
    #[cfg(feature = "cuda-graphs")]
    build_cuda_graph_shim();
}

/// The libtorch install the crate links against (`LIBTORCH`, resolved), if it is set.
fn libtorch_dir() -> Option<std::path::PathBuf> {
    let libtorch = std::path::PathBuf::from(std::env::var_os("LIBTORCH")?);
    Some(libtorch.canonicalize().unwrap_or(libtorch))
}

/// A C++17 build of `file` against the libtorch headers, with libtorch's C++ ABI.
fn torch_cpp(libtorch: &std::path::Path, file: &str) -> cc::Build {
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file(file)
        .include(libtorch.join("include"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .flag_if_supported("-w");
    build
}

// The memory-statistics shim (csrc/memory.cpp) and the autograd shim (csrc/autograd.cpp): need only
// the libtorch headers. Without LIBTORCH (a libtorch found some other way) they are left out:
// `memory` reports no device statistics, and vector-Jacobian products go through a scalar.
fn build_memory_shim() {
    println!("cargo::rustc-check-cfg=cfg(ddss_memory_shim)");
    println!("cargo::rustc-check-cfg=cfg(ddss_autograd_shim)");
    println!("cargo:rerun-if-changed=csrc/memory.cpp");
    println!("cargo:rerun-if-changed=csrc/autograd.cpp");
    let Some(libtorch) = libtorch_dir() else {
        println!("cargo:warning=LIBTORCH is not set: device memory statistics are unavailable");
        return;
    };
    torch_cpp(&libtorch, "csrc/memory.cpp").compile("ddss_memory");
    println!("cargo:rustc-link-search=native={}", libtorch.join("lib").display());
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-cfg=ddss_memory_shim");
    // The autograd shim (csrc/autograd.cpp): vector-Jacobian products with explicit cotangents.
    torch_cpp(&libtorch, "csrc/autograd.cpp")
        .include(libtorch.join("include/torch/csrc/api/include"))
        .compile("ddss_autograd");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-cfg=ddss_autograd_shim");
}

// The `cuda-graphs` feature: compile the CUDA-graph shim (csrc/cuda_graph.cpp) against the libtorch
// headers and the CUDA runtime headers, and link the libtorch CUDA libraries it calls.
#[cfg(feature = "cuda-graphs")]
fn build_cuda_graph_shim() {
    use std::path::PathBuf;
    println!("cargo:rerun-if-changed=csrc/cuda_graph.cpp");
    println!("cargo:rerun-if-env-changed=CUDA_INCLUDE");
    let libtorch = libtorch_dir()
        .expect("the cuda-graphs feature needs LIBTORCH (run `cargo xtask setup`, or point it at a CUDA libtorch)");
    // CUDA headers: $CUDA_INCLUDE, else the pip layout next to torch (nvidia/cu13/include, from the
    // nvidia-cuda-runtime and nvidia-cuda-crt wheels), else $CUDA_HOME/include.
    let mut candidates = Vec::new();
    if let Ok(dir) = std::env::var("CUDA_INCLUDE") {
        candidates.push(PathBuf::from(dir));
    }
    if let Some(site) = libtorch.parent() {
        candidates.push(site.join("nvidia/cu13/include"));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(dir) = std::env::var(var) {
            candidates.push(PathBuf::from(dir).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    let cuda_include = candidates
        .iter()
        .find(|d| d.join("cuda_runtime_api.h").is_file() && d.join("crt/host_config.h").is_file())
        .unwrap_or_else(|| {
            panic!(
                "the cuda-graphs feature needs the CUDA runtime headers (cuda_runtime_api.h and \
                 crt/host_config.h); looked in {candidates:?}. `cargo xtask setup` installs them into \
                 the project's venv, or set CUDA_INCLUDE"
            )
        });
    torch_cpp(&libtorch, "csrc/cuda_graph.cpp")
        .include(libtorch.join("include/torch/csrc/api/include"))
        .include(cuda_include)
        .compile("ddss_cuda_graph");
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-search=native={}", lib.display());
    for name in ["torch_cuda", "c10_cuda", "c10"] {
        println!("cargo:rustc-link-lib=dylib={name}");
    }
}
