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
    if target.ends_with("-linux-gnu") {
        let dir = out.join("static-unwind");
        std::fs::create_dir_all(&dir).expect("creating OUT_DIR/static-unwind");
        std::fs::write(dir.join("libgcc_s.so"), "/* warmpool: static unwinder, see preload/build.rs */\nGROUP ( -lgcc_eh -lgcc )\n")
            .expect("writing the linker script");
        println!("cargo:rustc-link-search=native={}", dir.display());
    }
    // Only the dynamic symbols (the interposed calls) matter to a process loading us.
    println!("cargo:rustc-cdylib-link-arg=-Wl,--strip-all");
    println!("cargo:rerun-if-changed=build.rs");
}
