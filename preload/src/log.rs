//! Diagnostics to stderr, only when `WARMPOOL_LOG` is set. Formats into a stack buffer and
//! writes with one `write(2)`: no allocation, no locks. Never used on the close path.

use std::io::Write;
use std::sync::atomic::Ordering;

pub(crate) fn enabled() -> bool {
    crate::LOG.load(Ordering::Relaxed)
}

pub(crate) fn emit(args: std::fmt::Arguments<'_>) {
    emit_sized::<256>(args);
}

/// [`emit`] into a buffer of `N` bytes (the line is cut to fit).
pub(crate) fn emit_sized<const N: usize>(args: std::fmt::Arguments<'_>) {
    let mut buf = [0u8; N];
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(cur, "warmpool[{}]: ", std::process::id());
    let _ = cur.write_fmt(args);
    let mut n = cur.position() as usize;
    if n >= buf.len() {
        n = buf.len() - 1;
    }
    buf[n] = b'\n';
    crate::sys::write_stderr(&buf[..=n]);
}

macro_rules! wlog {
    ($($t:tt)*) => {
        if $crate::log::enabled() {
            $crate::log::emit(format_args!($($t)*));
        }
    };
}
pub(crate) use wlog;

/// Make a panic inside the library silent (it is caught, and the program's own call runs):
/// std's default hook would print to the program's stderr. The hook belongs to this
/// library's copy of std only. Installed once, when the library first does real work (its
/// link to the daemon), so that processes that never connect pay nothing for it.
pub(crate) fn quiet_panics() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            wlog!("internal error (the program's own call runs instead): {info}");
        }));
    });
}
