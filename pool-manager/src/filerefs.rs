//! Who else holds a socket, asked of the kernel: the reference count of each of the daemon's
//! open files, read by a BPF iterator over the daemon's own file table.
//!
//! A `struct file` is referenced once by every fd table slot that holds it (any process, any
//! thread with its own table), by every `SCM_RIGHTS` message still in a socket's queue, by
//! every mapping and by every system call in progress on it. A pooled socket whose count is
//! what a file held by the daemon alone has is therefore held by nobody else, with no walk of
//! `/proc`, no waiting and no blind spot: fds in flight in a Unix socket's queue count too,
//! and the daemon needs no view of other processes (no host PID namespace).
//!
//! The program (`iter/task_file`, 19 instructions assembled here) visits each file of the
//! process the link is bound to (ours) and writes `(fd, refcount word)` records into the
//! iterator's output, which we `read()`. It is built for the running kernel: the function it
//! attaches to, the context's layout and the offset of `struct file`'s reference count come
//! from the kernel's BTF ([`crate::btf`]). Since 6.13 the count is a `file_ref_t` that stores
//! references minus one; before, `f_count` stored them. Either way the value a file held only
//! by the daemon shows is measured, not assumed: a control socket the daemon opened and never
//! shared is read in the same pass (the iterator's own transient reference is in both).
//!
//! Needs `CAP_BPF` + `CAP_PERFMON` (or root) and a kernel with BTF and BPF iterators (6.1+
//! for an iterator bound to one process); otherwise [`FileRefs::load`] fails and the caller
//! walks `/proc` instead ([`crate::holders`]).

use crate::btf::{Btf, BtfError};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Errors loading the iterator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileRefsError {
    /// The kernel's BTF lacks what the program needs.
    #[error(transparent)]
    Btf(#[from] BtfError),
    /// A bpf(2) command failed.
    #[error("bpf({cmd}): {source}{log}")]
    Bpf {
        /// Command.
        cmd: &'static str,
        /// Cause.
        source: std::io::Error,
        /// The verifier's log, if any.
        log: String,
    },
    /// Another system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The control socket was not seen by the iterator.
    #[error("the iterator did not report the control socket")]
    NoControl,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_ITER: u32 = 28;
const HELPER_PROBE_READ_KERNEL: i32 = 113;
const HELPER_SEQ_WRITE: i32 = 127;

/// `union bpf_attr` for `BPF_PROG_LOAD` (the prefix up to `attach_btf_obj_fd`).
#[repr(C)]
#[derive(Default)]
struct ProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
    attach_btf_obj_fd: u32,
    _pad: u32,
}

/// `union bpf_attr` for `BPF_LINK_CREATE` with iterator info.
#[repr(C)]
#[derive(Default)]
struct LinkCreate {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    iter_info: u64,
    iter_info_len: u32,
    _pad: u32,
}

/// `union bpf_iter_link_info`, the `task` variant: iterate one process.
#[repr(C)]
#[derive(Default)]
struct IterTask {
    tid: u32,
    pid: u32,
    pid_fd: u32,
    _pad: u32,
}

/// `union bpf_attr` for `BPF_ITER_CREATE`.
#[repr(C)]
#[derive(Default)]
struct IterCreate {
    link_fd: u32,
    flags: u32,
}

/// A bpf(2) command that makes a new fd (the three used here all do), owned at once.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a properly laid out bpf_attr prefix of its exact size; the kernel
    // zero-extends the rest. libc: neither rustix nor nix has bpf(2).
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, (attr as *mut T).cast::<libc::c_void>(), std::mem::size_of::<T>()) };
    let fd = RawFd::try_from(r).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: these commands return a new fd, installed for us and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One BPF instruction.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code) | (u64::from(dst | (src << 4)) << 8) | (u64::from(off as u16) << 16) | (u64::from(imm as u32) << 32)
}

/// Where the program reads: from the context and from `struct file`.
#[derive(Debug, Clone, Copy)]
struct Layout {
    ctx_meta: i16,
    ctx_fd: i16,
    ctx_file: i16,
    file_ref: i32,
    /// `file_ref_t` (6.13+) rather than `f_count`.
    file_ref_t: bool,
}

impl Layout {
    fn of(btf: &Btf) -> Result<Self, BtfError> {
        let ctx = btf.members("bpf_iter__task_file")?;
        // meta, task and file are anonymous unions (for BTF-typed pointers): by position.
        let at = |i: usize| ctx.get(i).map(|m| m.offset as i16).ok_or_else(|| BtfError::Missing("bpf_iter__task_file layout".into()));
        let (file_ref, file_ref_t) = match btf.offset_of("file", "f_ref") {
            Ok(o) => (o, true),
            Err(_) => (btf.offset_of("file", "f_count")?, false),
        };
        Ok(Layout { ctx_meta: at(0)?, ctx_fd: btf.offset_of("bpf_iter__task_file", "fd")? as i16, ctx_file: at(3)?, file_ref: file_ref as i32, file_ref_t })
    }

    /// The program: for each file, write `(fd as u64, refcount word as u64)`.
    fn program(self) -> Vec<u64> {
        let (r0, r1, r2, r3, r6, r7, r8, r10) = (0, 1, 2, 3, 6, 7, 8, 10);
        vec![
            insn(0xbf, r6, r1, 0, 0),                         // r6 = ctx
            insn(0x79, r7, r6, self.ctx_file, 0),             // r7 = ctx->file
            insn(0x15, r7, 0, 14, 0),                         // if r7 == 0 goto out
            insn(0x61, r8, r6, self.ctx_fd, 0),               // r8 = ctx->fd
            insn(0x7b, r10, r8, -16, 0),                      // *(u64 *)(fp - 16) = r8
            insn(0xbf, r1, r10, 0, 0),                        // r1 = fp
            insn(0x07, r1, 0, 0, -8),                         // r1 -= 8
            insn(0xb7, r2, 0, 0, 8),                          // r2 = 8
            insn(0xbf, r3, r7, 0, 0),                         // r3 = file
            insn(0x07, r3, 0, 0, self.file_ref),              // r3 += offset of the count
            insn(0x85, 0, 0, 0, HELPER_PROBE_READ_KERNEL),    // probe_read_kernel(fp - 8, 8, r3)
            insn(0x79, r1, r6, self.ctx_meta, 0),             // r1 = ctx->meta
            insn(0x79, r1, r1, 0, 0),                         // r1 = meta->seq
            insn(0xbf, r2, r10, 0, 0),                        // r2 = fp
            insn(0x07, r2, 0, 0, -16),                        // r2 -= 16
            insn(0xb7, r3, 0, 0, 16),                         // r3 = 16
            insn(0x85, 0, 0, 0, HELPER_SEQ_WRITE),            // seq_write(seq, fp - 16, 16)
            insn(0xb7, r0, 0, 0, 0),                          // out: r0 = 0
            insn(0x95, 0, 0, 0, 0),                           // exit
        ]
    }
}

/// The loaded iterator, bound to this process.
#[derive(Debug)]
pub struct FileRefs {
    link: OwnedFd,
    _prog: OwnedFd,
    /// A socket only this process ever holds: the reference value of "held by us alone".
    control: OwnedFd,
    file_ref_t: bool,
    /// The read buffer, kept between passes.
    buf: std::sync::Mutex<Vec<u8>>,
}

impl FileRefs {
    /// Build the program for this kernel, load it and bind an iterator to this process.
    ///
    /// # Errors
    /// See [`FileRefsError`]; the caller falls back to walking `/proc`.
    pub fn load() -> Result<Self, FileRefsError> {
        let btf = Btf::from_kernel()?;
        let layout = Layout::of(&btf)?;
        let attach_btf_id = btf.func_id("bpf_iter_task_file")?;
        let insns = layout.program();
        let license = c"GPL";
        let mut log = vec![0u8; 64 * 1024];
        let mut load = ProgLoad {
            prog_type: BPF_PROG_TYPE_TRACING,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: 1,
            log_size: log.len() as u32,
            log_buf: log.as_mut_ptr() as u64,
            expected_attach_type: BPF_TRACE_ITER,
            attach_btf_id,
            ..ProgLoad::default()
        };
        load.prog_name[..8].copy_from_slice(b"wp_frefs");
        let prog = bpf(BPF_PROG_LOAD, &mut load).map_err(|source| {
            let end = log.iter().position(|b| *b == 0).unwrap_or(0);
            let text = String::from_utf8_lossy(&log[..end]).trim().to_owned();
            FileRefsError::Bpf { cmd: "PROG_LOAD", source, log: if text.is_empty() { text } else { format!("\nverifier: {text}") } }
        })?;
        let mut task = IterTask { pid: std::process::id(), ..IterTask::default() };
        let mut link = LinkCreate {
            prog_fd: prog.as_raw_fd() as u32,
            attach_type: BPF_TRACE_ITER,
            iter_info: (&mut task as *mut IterTask) as u64,
            iter_info_len: std::mem::size_of::<IterTask>() as u32,
            ..LinkCreate::default()
        };
        let link = bpf(BPF_LINK_CREATE, &mut link).map_err(|source| FileRefsError::Bpf { cmd: "LINK_CREATE", source, log: String::new() })?;
        use rustix::net::{socket_with, AddressFamily, SocketFlags, SocketType};
        let control = socket_with(AddressFamily::INET, SocketType::STREAM, SocketFlags::CLOEXEC, None)
            .map_err(|e| FileRefsError::Sys { what: "control socket", source: e.into() })?;
        let me = FileRefs { link, _prog: prog, control, file_ref_t: layout.file_ref_t, buf: std::sync::Mutex::new(vec![0u8; 64 * 1024]) };
        me.held(&[])?;
        Ok(me)
    }

    /// One pass of the iterator over this process's files: `visit(fd, refcount word)` for each.
    fn each_file(&self, mut visit: impl FnMut(RawFd, u64)) -> Result<(), FileRefsError> {
        let mut create = IterCreate { link_fd: self.link.as_raw_fd() as u32, flags: 0 };
        let it = bpf(BPF_ITER_CREATE, &mut create).map_err(|source| FileRefsError::Bpf { cmd: "ITER_CREATE", source, log: String::new() })?;
        let mut buf = self.buf.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            match rustix::io::read(&it, &mut buf[..]) {
                Ok(0) => return Ok(()),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(FileRefsError::Sys { what: "reading the iterator", source: e.into() }),
                // The program writes whole 16-byte records and seq_file never splits one.
                Ok(n) => {
                    for r in buf[..n].chunks_exact(16) {
                        let fd = u64::from_le_bytes(r[..8].try_into().unwrap_or_default()) as RawFd;
                        visit(fd, u64::from_le_bytes(r[8..].try_into().unwrap_or_default()));
                    }
                }
            }
        }
    }

    /// Which of `fds` (open in this process) someone else also holds: their count is above
    /// the control socket's. An fd the iterator did not see counts as held (nothing proved).
    ///
    /// # Errors
    /// The iterator could not be read (the caller proves nothing then).
    pub fn held(&self, fds: &[RawFd]) -> Result<Vec<bool>, FileRefsError> {
        let wanted: HashMap<RawFd, usize> = fds.iter().enumerate().map(|(i, fd)| (*fd, i)).collect();
        let control = self.control.as_raw_fd();
        let (mut alone, mut seen) = (None, vec![None; fds.len()]);
        self.each_file(|fd, count| {
            if fd == control {
                alone = Some(count);
            } else if let Some(&i) = wanted.get(&fd) {
                seen[i] = Some(count);
            }
        })?;
        let alone = alone.ok_or(FileRefsError::NoControl)?;
        Ok(seen.into_iter().map(|c| c != Some(alone)).collect())
    }

    /// Whether the kernel stores `file_ref_t` (6.13+) rather than `f_count` (for logs).
    #[must_use]
    pub fn kind(&self) -> &'static str {
        if self.file_ref_t {
            "file_ref_t"
        } else {
            "f_count"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn refs() -> Option<FileRefs> {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIP: needs root (BPF)");
            return None;
        }
        Some(FileRefs::load().expect("BPF iterator loads on this kernel"))
    }

    #[test]
    fn a_socket_only_we_hold_is_alone_and_a_dup_or_a_message_in_flight_is_not() {
        let Some(r) = refs() else { return };
        let (a, b) = UnixStream::pair().unwrap();
        let s: OwnedFd = std::net::TcpListener::bind("127.0.0.1:0").unwrap().into();
        assert_eq!(r.held(&[s.as_raw_fd()]).unwrap(), vec![false], "alone");
        let d = s.try_clone().unwrap();
        assert_eq!(r.held(&[s.as_raw_fd()]).unwrap(), vec![true], "dup'ed: two table slots");
        drop(d);
        assert_eq!(r.held(&[s.as_raw_fd()]).unwrap(), vec![false]);
        // In flight: sent with SCM_RIGHTS, not yet received.
        wire::unix::send(a.as_raw_fd(), b"x", Some(s.as_raw_fd()), 0).unwrap();
        assert_eq!(r.held(&[s.as_raw_fd()]).unwrap(), vec![true], "in a socket's queue");
        drop(b);
        assert_eq!(r.held(&[s.as_raw_fd()]).unwrap(), vec![false], "the queue went with its socket");
        assert_eq!(r.held(&[9999]).unwrap(), vec![true], "an fd we do not have proves nothing");
    }
}
