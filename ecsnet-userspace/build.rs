use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// Builds the datapath (`ecsnet-ebpf`, target bpfel-unknown-none) with the nightly named in
/// `ecsnet-ebpf/bpf-toolchain`; its LLVM must match bpf-linker's (`./x` checks both).
fn main() -> anyhow::Result<()> {
    let toolchain_file = "../ecsnet-ebpf/bpf-toolchain";
    println!("cargo::rerun-if-changed={toolchain_file}");
    let toolchain = std::fs::read_to_string(toolchain_file)
        .with_context(|| format!("reading {toolchain_file}"))?;
    let ebpf = Package {
        name: "ecsnet-ebpf",
        root_dir: "../ecsnet-ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::Custom(toolchain.trim()))
}
