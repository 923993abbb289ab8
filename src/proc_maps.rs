//! `/proc/PID/maps` read by columns. The kernel prints `start-end perms offset major:minor
//! inode`, pads with spaces to a fixed column, then the path as `d_path` gives it with only a
//! newline escaped (`\012`). A path is therefore everything after the padding, spaces included:
//! splitting on whitespace and joining again with one space made `lib  x.so` read as `lib x.so`,
//! a name the service could fill with anything.
//!
//! The path stays a label: a backslash is not escaped by the kernel, so a file really named
//! `a\012b` reads as `a` newline `b`. Whoever must read the mapped file opens it through
//! `/proc/PID/map_files/` (see `map_files_entry`) and checks the device and inode given here.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// What the kernel appends to the path of a file that was unlinked while mapped.
const DELETED: &[u8] = b" (deleted)";

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: [u8; 4],
    pub offset: u64,
    pub major: u32,
    pub minor: u32,
    pub inode: u64,
    /// The file's path with `\012` decoded, without the ` (deleted)` suffix; None for an
    /// anonymous mapping or a name that is not a path (`[heap]`, `[stack]`, ...).
    pub path: Option<PathBuf>,
    /// The kernel marked the file unlinked (` (deleted)`).
    pub deleted: bool,
}

impl Mapping {
    pub fn executable(&self) -> bool {
        self.perms[2] == b'x'
    }

    /// The device number as `fstat` reports it (`st_dev`).
    pub fn dev(&self) -> u64 {
        libc::makedev(self.major, self.minor)
    }

    /// The name of this mapping's entry in `/proc/PID/map_files/`.
    pub fn map_files_entry(&self) -> String {
        format!("{:x}-{:x}", self.start, self.end)
    }
}

/// Every line of a maps file that parses; a line that does not is skipped (a newer kernel's
/// format must not make a dump fail, and nothing is read through a line that did not parse).
pub fn parse(text: &[u8]) -> Vec<Mapping> {
    text.split(|&b| b == b'\n').filter_map(parse_line).collect()
}

fn column<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let end = rest.iter().position(|&b| b == b' ')?;
    let (word, tail) = rest.split_at(end);
    *rest = &tail[1..];
    (!word.is_empty()).then_some(word)
}

fn hex(word: &[u8]) -> Option<u64> {
    u64::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()
}

/// One line, without its newline.
pub fn parse_line(line: &[u8]) -> Option<Mapping> {
    let mut rest = line;
    let (start, end) = {
        let range = column(&mut rest)?;
        let dash = range.iter().position(|&b| b == b'-')?;
        (hex(&range[..dash])?, hex(&range[dash + 1..])?)
    };
    let perms: [u8; 4] = column(&mut rest)?.try_into().ok()?;
    let offset = hex(column(&mut rest)?)?;
    let (major, minor) = {
        let dev = column(&mut rest)?;
        let colon = dev.iter().position(|&b| b == b':')?;
        (hex(&dev[..colon])? as u32, hex(&dev[colon + 1..])? as u32)
    };
    // The inode is the last column the kernel always ends with a space; an anonymous mapping
    // may have nothing after it.
    let (inode_word, mut name) = match rest.iter().position(|&b| b == b' ') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let inode = std::str::from_utf8(inode_word).ok()?.parse().ok()?;
    // The padding: d_path never starts with a space, so the name starts at the first non-space.
    while let [b' ', tail @ ..] = name {
        name = tail;
    }
    let (name, deleted) = match name.strip_suffix(DELETED) {
        Some(n) => (n, true),
        None => (name, false),
    };
    let path = (name.first() == Some(&b'/')).then(|| PathBuf::from(OsString::from_vec(unescape(name))));
    Some(Mapping { start, end, perms, offset, major, minor, inode, path, deleted })
}

/// Decodes the kernel's `\ooo` escapes (it writes only `\012`); anything else stays as it is.
fn unescape(name: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len());
    let mut i = 0;
    while i < name.len() {
        if name[i] == b'\\' && i + 4 <= name.len() {
            let digits = &name[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits.iter().fold(0u32, |a, d| a * 8 + u32::from(d - b'0'));
                if v <= 0xff {
                    out.push(v as u8);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(name[i]);
        i += 1;
    }
    out
}

/// The maps line the kernel would print (64-bit padding), for tests.
#[cfg(test)]
pub fn render(m: &Mapping) -> Vec<u8> {
    let p = |b: u8, c: u8| if b == c { c } else { b'-' };
    let mut line = format!(
        "{:08x}-{:08x} {}{}{}{} {:08x} {:02x}:{:02x} {} ",
        m.start,
        m.end,
        p(m.perms[0], b'r') as char,
        p(m.perms[1], b'w') as char,
        p(m.perms[2], b'x') as char,
        m.perms[3] as char,
        m.offset,
        m.major,
        m.minor,
        m.inode
    )
    .into_bytes();
    if let Some(path) = &m.path {
        while line.len() < 73 {
            line.push(b' ');
        }
        line.push(b' ');
        for &b in std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()) {
            if b == b'\n' {
                line.extend_from_slice(b"\\012");
            } else {
                line.push(b);
            }
        }
        if m.deleted {
            line.extend_from_slice(DELETED);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names_with_spaces_and_newlines_are_read_whole() {
        let text = b"55d0c0a00000-55d0c0a02000 r-xp 00001000 fe:01 1234                       /tmp/d/lib  x.so\n\
7f0000000000-7f0000001000 rw-p 00000000 00:00 0 \n\
7f0000001000-7f0000002000 r-xp 00000000 08:02 99                         /tmp/a\\012b (deleted)\n\
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]\n";
        let m = parse(text);
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].path.as_deref(), Some(std::path::Path::new("/tmp/d/lib  x.so")));
        assert!(m[0].executable() && !m[0].deleted);
        assert_eq!((m[0].start, m[0].end, m[0].offset, m[0].inode), (0x55d0c0a00000, 0x55d0c0a02000, 0x1000, 1234));
        assert_eq!(m[0].dev(), libc::makedev(0xfe, 1));
        assert_eq!(m[0].map_files_entry(), "55d0c0a00000-55d0c0a02000");
        assert_eq!((m[1].path.clone(), m[1].inode), (None, 0));
        assert_eq!(m[2].path.as_deref(), Some(std::path::Path::new("/tmp/a\nb")));
        assert!(m[2].deleted);
        assert_eq!(m[3].path, None, "[stack] is not a path");
        assert!(parse_line(b"garbage").is_none());
        assert!(parse_line(b"").is_none());
    }

    #[test]
    fn this_process_maps_its_own_executable() {
        let me = std::fs::canonicalize("/proc/self/exe").unwrap();
        let maps = parse(&std::fs::read("/proc/self/maps").unwrap());
        assert!(maps.iter().any(|m| m.executable() && m.path.as_deref() == Some(me.as_path())), "{me:?}");
    }

    fn name() -> impl Strategy<Value = Vec<u8>> {
        // Spaces, newlines, backslashes and digits are the interesting bytes; the rest is any
        // byte but NUL and '/'.
        let byte = prop_oneof![Just(b' '), Just(b'\n'), Just(b'\\'), Just(b'0'), Just(b'1'), 1u8..=255u8];
        proptest::collection::vec(byte, 1..40).prop_filter("a file name", |v| !v.contains(&b'/'))
    }

    proptest! {
        #[test]
        fn fuzz_maps_lines_never_panic(line in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse(&line);
        }

        #[test]
        fn fuzz_maps_names_round_trip(
            n in name(), start in any::<u32>(), len in 1u32..1 << 20, inode in 1u64.., deleted in any::<bool>(),
            x in any::<bool>(), major in 0u32..256, minor in 0u32..256,
        ) {
            // A literal backslash followed by three octal digits is where the kernel's format is
            // ambiguous (see the module doc): such names are not expected to round-trip.
            let ambiguous = n.windows(4).any(|w| w[0] == b'\\' && w[1..].iter().all(|d| (b'0'..=b'7').contains(d)));
            // A name ending in " (deleted)" is ambiguous the same way.
            prop_assume!(!ambiguous && !n.ends_with(DELETED));
            let mut path = b"/srv/".to_vec();
            path.extend_from_slice(&n);
            let m = Mapping {
                start: u64::from(start) << 12,
                end: (u64::from(start) << 12) + (u64::from(len) << 12),
                perms: [b'r', b'-', if x { b'x' } else { b'-' }, b'p'],
                offset: 0,
                major,
                minor,
                inode,
                path: Some(PathBuf::from(OsString::from_vec(path))),
                deleted,
            };
            prop_assert_eq!(parse_line(&render(&m)), Some(m));
        }
    }
}
