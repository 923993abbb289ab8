//! What a supervisor lets go of when its service runs and it has nothing to do. Starting a
//! service runs most of stasis (configuration, trust checks, the restore engine, CRIU's
//! conversation), and every page of code that ran stays mapped: about 5 MiB of the program's
//! text and read-only data, and the libraries', most of it never used again while it waits.
//! Those pages are clean copies of files in the page cache, so dropping them from the
//! supervisor's page tables loses nothing: the code that runs later is mapped again from the
//! cache (a minor fault), and the rest may leave memory when the kernel needs room.

use crate::proc_maps::parse_line;

/// Drops the clean, read-only, private file mappings of this process (program text, read-only
/// data, libraries) from its resident set; returns the bytes of mappings given back.
pub fn shed_clean_mappings() -> u64 {
    let Ok(smaps) = std::fs::read("/proc/self/smaps") else { return 0 };
    let mut shed = 0;
    for (start, end) in clean_read_only(&smaps) {
        // SAFETY: the range is a private, read-only file mapping without one anonymous (copied
        // on write) page: MADV_DONTNEED only unmaps pages that are identical to the file's, and
        // the next access maps them again from it. Writable, shared and relocated (RELRO)
        // mappings are never touched.
        if unsafe { libc::madvise(start as *mut libc::c_void, (end - start) as usize, libc::MADV_DONTNEED) } == 0 {
            shed += end - start;
        }
    }
    shed
}

/// The mappings of `smaps` that are file-backed, private, not writable and hold no anonymous
/// page (a page the process wrote, as the dynamic linker does to RELRO before it is made
/// read-only).
fn clean_read_only(smaps: &[u8]) -> Vec<(u64, u64)> {
    let mut found = Vec::new();
    let mut current = None;
    for line in smaps.split(|b| *b == b'\n') {
        if let Some(rest) = line.strip_prefix(b"Anonymous:") {
            let anon = std::str::from_utf8(rest).ok().and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok());
            if let (Some(range), Some(0)) = (current.take(), anon) {
                found.push(range);
            }
            continue;
        }
        let Some(m) = line.first().filter(|b| b.is_ascii_hexdigit()).and_then(|_| parse_line(line)) else {
            continue;
        };
        let private_read_only = m.perms[0] == b'r' && m.perms[1] != b'w' && m.perms[3] == b'p';
        current = (private_read_only && m.path.is_some() && m.inode != 0 && !m.deleted).then_some((m.start, m.end));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_clean_private_read_only_file_mappings_are_shed() {
        let smaps = b"\
55d0c0000000-55d0c0100000 r--p 00000000 fd:01 123 /usr/bin/stasis
Rss: 100 kB
Anonymous: 0 kB
55d0c0100000-55d0c0500000 r-xp 00100000 fd:01 123 /usr/bin/stasis
Anonymous: 0 kB
55d0c0500000-55d0c0600000 r--p 00500000 fd:01 123 /usr/bin/stasis
Anonymous: 64 kB
55d0c0600000-55d0c0610000 rw-p 00600000 fd:01 123 /usr/bin/stasis
Anonymous: 0 kB
55d0c1000000-55d0c1100000 rw-p 00000000 00:00 0 [heap]
Anonymous: 1024 kB
7f0000000000-7f0000100000 r--s 00000000 fd:01 456 /some/shared
Anonymous: 0 kB
7f0000200000-7f0000300000 r-xp 00000000 fd:01 789 /usr/lib/libc.so.6
Anonymous: 0 kB
7ffc00000000-7ffc00002000 r-xp 00000000 00:00 0 [vdso]
Anonymous: 0 kB
";
        assert_eq!(
            clean_read_only(smaps),
            vec![(0x55d0c0000000, 0x55d0c0100000), (0x55d0c0100000, 0x55d0c0500000), (0x7f0000200000, 0x7f0000300000)],
            "text and read-only data of files, never RELRO with copied pages, writable, shared or special mappings"
        );
    }

    #[test]
    fn shedding_keeps_this_process_working() {
        let before = std::fs::read_to_string("/proc/self/status").unwrap();
        let shed = shed_clean_mappings();
        assert!(shed > 0, "a test binary has clean code mappings to shed");
        // Code, read-only data and libraries come back as they are used.
        let after = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(before.contains("VmRSS") && after.contains("VmRSS"));
        assert_eq!(format!("{:?}", vec![1, 2, 3].iter().map(|x| x * 2).collect::<Vec<_>>()), "[2, 4, 6]");
    }
}
