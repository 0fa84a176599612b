//! Builds the kernel programs (`shim-ebpf`) for `bpfel-unknown-none` with the
//! nightly toolchain and `bpf-linker` (see ../shared/TOOLCHAIN.md; `scripts/setup-ebpf.sh`
//! installs both), and leaves the object in OUT_DIR for `include_bytes`. Without that
//! toolchain the build still succeeds: the object is empty and kernel assist reports that it
//! was built without it. Set `WARMPOOL_REQUIRE_EBPF=1` (CI does) to make that an error.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"));
    let programs = manifest.join("../shim-ebpf");
    println!("cargo:rerun-if-changed={}", programs.join("src").display());
    println!("cargo:rerun-if-changed={}", programs.join("Cargo.toml").display());
    println!("cargo:rerun-if-changed={}", manifest.join("../shim-common/src").display());
    println!("cargo:rerun-if-env-changed=WARMPOOL_REQUIRE_EBPF");
    let object = out.join("warmpool-shim.o");
    let target_dir = out.join("ebpf-target");
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build", "--release", "-Z", "build-std=core", "--target", "bpfel-unknown-none"])
        .arg("--manifest-path")
        .arg(programs.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer build's settings must not leak into the nested, differently-targeted one.
    for (k, _) in std::env::vars() {
        if k.starts_with("CARGO") || k.starts_with("RUSTC") || k == "RUSTFLAGS" || k == "RUSTUP_TOOLCHAIN" || k == "RUSTDOC" {
            cmd.env_remove(k);
        }
    }
    let built = match cmd.output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")),
        Err(e) => Err(format!("running rustup: {e}")),
    };
    let elf = target_dir.join("bpfel-unknown-none/release/warmpool-shim");
    match built.and_then(|()| std::fs::copy(&elf, &object).map_err(|e| format!("{}: {e}", elf.display()))) {
        Ok(_) => {}
        Err(why) => {
            if std::env::var("WARMPOOL_REQUIRE_EBPF").is_ok_and(|v| v == "1") {
                panic!("building the eBPF programs failed:\n{why}");
            }
            println!("cargo:warning=eBPF programs not built (kernel assist disabled): {}", why.lines().last().unwrap_or(""));
            std::fs::write(&object, b"").expect("write empty object");
        }
    }
}
