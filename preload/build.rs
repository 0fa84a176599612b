//! Link the unwinder statically: std's unwinding (which `catch_unwind`, the library's fail-open
//! guard, needs) asks for `-lgcc_s`, and loading libgcc_s.so.1 into every process cost about
//! 70 µs per process on our test VM (see README, "What every process pays"). A linker script
//! named `libgcc_s.so` in a directory searched first turns that request into GCC's static
//! unwinder (`libgcc_eh.a`, position-independent, as `gcc -shared -static-libgcc` uses it).
//! Only this crate's link sees the directory.

use std::path::PathBuf;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target = std::env::var("TARGET").unwrap_or_default();
    // glibc: GCC's libgcc_eh.a. musl: the host's libgcc_eh.a is built against glibc (it calls
    // `_dl_find_object`, which musl lacks), so Rust's own LLVM libunwind.a for the musl target
    // (position-independent, needs only `dl_iterate_phdr`) takes its place.
    let script = if target.ends_with("-linux-gnu") {
        Some("GROUP ( -lgcc_eh -lgcc )".to_string())
    } else if target.ends_with("-linux-musl") {
        musl_unwind(&target).map(|a| format!("INPUT ( {} )", a.display()))
    } else {
        None
    };
    if let Some(script) = script {
        let dir = out.join("static-unwind");
        std::fs::create_dir_all(&dir).expect("creating OUT_DIR/static-unwind");
        std::fs::write(dir.join("libgcc_s.so"), format!("/* warmpool: static unwinder, see preload/build.rs */\n{script}\n"))
            .expect("writing the linker script");
        println!("cargo:rustc-link-search=native={}", dir.display());
    }
    // Only the dynamic symbols (the interposed calls) matter to a process loading us.
    println!("cargo:rustc-cdylib-link-arg=-Wl,--strip-all");
    println!("cargo:rerun-if-changed=build.rs");
}

/// `<sysroot>/lib/rustlib/<target>/lib/self-contained/libunwind.a`, shipped with the rustup
/// target; None (the link then asks for libgcc_s.so.1 as before) if it is not there.
fn musl_unwind(target: &str) -> Option<PathBuf> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = std::process::Command::new(rustc).args(["--print", "sysroot"]).output().ok()?;
    let sysroot = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    let a = sysroot.join("lib/rustlib").join(target).join("lib/self-contained/libunwind.a");
    a.is_file().then_some(a)
}
