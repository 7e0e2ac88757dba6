use which::which;

/// The BPF binary is linked by `bpf-linker`, which cargo does not know about: rebuild when the
/// linker on PATH changes (e.g. after `./x` rebuilt it against another LLVM).
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(_) => println!("cargo:warning=bpf-linker is not on PATH: run ./x to install it"),
    }
}
