//! A small reader of the running kernel's BTF (`/sys/kernel/btf/vmlinux`): just what the
//! file-reference iterator ([`crate::filerefs`]) needs to be built for this kernel and no
//! other — the id of a function and the byte offsets of struct members. Never hard-code a
//! kernel structure's layout: it changes between releases and configurations.
//!
//! Format (include/uapi/linux/btf.h): a header, then `type_len` bytes of types, each a
//! 12-byte `btf_type` followed by kind-specific data, with ids counted from 1 in order; then
//! the string section that names point into.

use std::collections::HashMap;

/// Errors reading BTF.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BtfError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Not BTF, or a layout this reader does not know.
    #[error("malformed BTF: {0}")]
    Malformed(&'static str),
    /// A name the caller needs is not there.
    #[error("{0} not found in the kernel's BTF")]
    Missing(String),
}

const MAGIC: u16 = 0xeb9f;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_FUNC: u32 = 12;

/// A struct member: its name (empty for an anonymous union) and byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Name.
    pub name: String,
    /// Offset from the start of the struct, in bytes (bit-fields: rounded down).
    pub offset: u32,
}

/// The parts of a BTF blob this reader keeps: functions by name, structs' members by name.
#[derive(Debug, Default)]
pub struct Btf {
    funcs: HashMap<String, u32>,
    structs: HashMap<String, Vec<Member>>,
}

fn u16_at(b: &[u8], at: usize) -> Result<u16, BtfError> {
    b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]])).ok_or(BtfError::Malformed("truncated"))
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, BtfError> {
    b.get(at..at + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]])).ok_or(BtfError::Malformed("truncated"))
}

fn name_at(strings: &[u8], off: u32) -> String {
    let s = strings.get(off as usize..).unwrap_or_default();
    let end = s.iter().position(|b| *b == 0).unwrap_or(s.len());
    String::from_utf8_lossy(&s[..end]).into_owned()
}

/// Bytes of kind-specific data after a `btf_type` of `kind` with `vlen` entries.
fn extra_len(kind: u32, vlen: usize) -> Result<usize, BtfError> {
    Ok(match kind {
        // INT, VAR, DECL_TAG: one u32.
        1 | 14 | 17 => 4,
        // PTR, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT, FUNC, FLOAT, TYPE_TAG: nothing.
        2 | 7 | 8 | 9 | 10 | 11 | 12 | 16 | 18 => 0,
        // ARRAY: type, index type, count.
        3 => 12,
        // STRUCT, UNION, DATASEC, ENUM64: 12 bytes per entry.
        4 | 5 | 15 | 19 => 12 * vlen,
        // ENUM, FUNC_PROTO: 8 bytes per entry.
        6 | 13 => 8 * vlen,
        _ => return Err(BtfError::Malformed("unknown type kind")),
    })
}

impl Btf {
    /// The running kernel's BTF.
    ///
    /// # Errors
    /// The file is missing (a kernel without `CONFIG_DEBUG_INFO_BTF`) or malformed.
    pub fn from_kernel() -> Result<Self, BtfError> {
        let path = "/sys/kernel/btf/vmlinux";
        let bytes = std::fs::read(path).map_err(|source| BtfError::Read { path: path.into(), source })?;
        Self::parse(&bytes)
    }

    /// Parse a BTF blob (little-endian, as on the machines we build for).
    ///
    /// # Errors
    /// Not BTF or truncated.
    pub fn parse(b: &[u8]) -> Result<Self, BtfError> {
        if u16_at(b, 0)? != MAGIC {
            return Err(BtfError::Malformed("bad magic (or a big-endian blob)"));
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let types = b.get(hdr_len + type_off..hdr_len + type_off + type_len).ok_or(BtfError::Malformed("type section"))?;
        let strings = b.get(hdr_len + str_off..hdr_len + str_off + str_len).ok_or(BtfError::Malformed("string section"))?;
        let mut btf = Btf::default();
        let (mut at, mut id) = (0usize, 1u32);
        while at < types.len() {
            let (name_off, info) = (u32_at(types, at)?, u32_at(types, at + 4)?);
            let (kind, vlen, bitfields) = ((info >> 24) & 0x1f, (info & 0xffff) as usize, info >> 31 == 1);
            let body = at + 12;
            match kind {
                KIND_FUNC => {
                    btf.funcs.insert(name_at(strings, name_off), id);
                }
                KIND_STRUCT | KIND_UNION if name_off != 0 => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = body + 12 * i;
                        let bits = u32_at(types, m + 8)?;
                        let bits = if bitfields { bits & 0x00ff_ffff } else { bits };
                        members.push(Member { name: name_at(strings, u32_at(types, m)?), offset: bits / 8 });
                    }
                    btf.structs.insert(name_at(strings, name_off), members);
                }
                _ => {}
            }
            at = body + extra_len(kind, vlen)?;
            id += 1;
        }
        Ok(btf)
    }

    /// The type id of the function `name`.
    ///
    /// # Errors
    /// [`BtfError::Missing`].
    pub fn func_id(&self, name: &str) -> Result<u32, BtfError> {
        self.funcs.get(name).copied().ok_or_else(|| BtfError::Missing(format!("function {name}")))
    }

    /// The members of struct (or union) `name`, in order.
    ///
    /// # Errors
    /// [`BtfError::Missing`].
    pub fn members(&self, name: &str) -> Result<&[Member], BtfError> {
        self.structs.get(name).map(Vec::as_slice).ok_or_else(|| BtfError::Missing(format!("struct {name}")))
    }

    /// The byte offset of member `member` of struct `name`.
    ///
    /// # Errors
    /// [`BtfError::Missing`].
    pub fn offset_of(&self, name: &str, member: &str) -> Result<u32, BtfError> {
        self.members(name)?.iter().find(|m| m.name == member).map(|m| m.offset).ok_or_else(|| BtfError::Missing(format!("{name}.{member}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made blob: `struct s { int a; union { int x; } ; int c; }` and `void f(void)`.
    fn blob() -> Vec<u8> {
        let strings = b"\0s\0a\0c\0f\0int\0".to_vec();
        let (s_s, s_a, s_c, s_f, s_int) = (1u32, 3u32, 5u32, 7u32, 9u32);
        let mut t = Vec::new();
        let mut ty = |name: u32, info: u32, size: u32, extra: &[u32]| {
            for v in [name, info, size].iter().chain(extra) {
                t.extend_from_slice(&v.to_le_bytes());
            }
        };
        ty(s_int, 1 << 24, 4, &[32]); // 1: int
        ty(0, (KIND_UNION << 24) | 1, 4, &[0, 1, 0]); // 2: anonymous union { int }
        ty(s_s, (KIND_STRUCT << 24) | 3, 12, &[s_a, 1, 0, 0, 2, 32, s_c, 1, 64]); // 3: struct s
        ty(0, 13 << 24, 0, &[]); // 4: func proto void(void)
        ty(s_f, KIND_FUNC << 24, 4, &[]); // 5: func f
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&[1, 0]);
        for v in [24u32, 0, t.len() as u32, t.len() as u32, strings.len() as u32] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&t);
        b.extend_from_slice(&strings);
        b
    }

    #[test]
    fn reads_functions_and_member_offsets() {
        let btf = Btf::parse(&blob()).unwrap();
        assert_eq!(btf.func_id("f").unwrap(), 5);
        assert_eq!(btf.offset_of("s", "a").unwrap(), 0);
        assert_eq!(btf.offset_of("s", "c").unwrap(), 8);
        assert_eq!(btf.members("s").unwrap()[1], Member { name: String::new(), offset: 4 });
        assert!(matches!(btf.offset_of("s", "zz"), Err(BtfError::Missing(_))));
        assert!(matches!(Btf::parse(&blob()[..30]), Err(BtfError::Malformed(_))));
    }

    #[test]
    fn reads_this_kernel() {
        let Ok(btf) = Btf::from_kernel() else {
            eprintln!("SKIP: no /sys/kernel/btf/vmlinux");
            return;
        };
        assert!(btf.func_id("bpf_iter_task_file").is_ok());
        let file = btf.members("file").unwrap();
        assert!(file.iter().any(|m| m.name == "f_ref" || m.name == "f_count"), "{file:?}");
    }
}
