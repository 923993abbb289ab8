//! Incremental checkpoints (issue 23) need the kernel to track dirty pages (soft-dirty). Every
//! test here starts with `common::vm::soft_dirty_here_or_in_vm`: on a kernel with soft-dirty it
//! runs here; on one without (these CI hosts) the whole binary runs once in the test VM
//! (scripts/vm) and each test asserts its own result from there. Never skipped. Only tests that
//! need soft-dirty belong in this file: all of them run in the VM on such hosts.

mod common;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};

/// The kernel these tests run on clears and sets the soft-dirty bit of a page (bit 55 of
/// /proc/self/pagemap) and CRIU agrees it can track memory: what `--track-mem` relies on.
#[test]
fn the_kernel_under_these_tests_tracks_dirty_pages() {
    if !common::vm::soft_dirty_here_or_in_vm("the_kernel_under_these_tests_tracks_dirty_pages") {
        return;
    }
    assert!(common::vm::kernel_tracks_dirty_pages(), "criu check --feature mem_dirty_track fails");
    const PAGE: usize = 4096;
    let mut buf = vec![1u8; 64 * PAGE];
    let soft_dirty = |buf: &[u8], i: usize| -> bool {
        let addr = buf.as_ptr() as usize + i * PAGE;
        let mut pagemap = File::open("/proc/self/pagemap").unwrap();
        pagemap.seek(SeekFrom::Start((addr / PAGE * 8) as u64)).unwrap();
        let mut entry = [0u8; 8];
        pagemap.read_exact(&mut entry).unwrap();
        u64::from_le_bytes(entry) & (1 << 55) != 0
    };
    // Clear every soft-dirty bit of this process, then write to one page only.
    OpenOptions::new().write(true).open("/proc/self/clear_refs").unwrap().write_all(b"4").unwrap();
    let before: Vec<bool> = (0..64).map(|i| soft_dirty(&buf, i)).collect();
    assert!(before.iter().all(|d| !d), "soft-dirty bits still set after clear_refs: {before:?}");
    buf[10 * PAGE] = 2;
    std::hint::black_box(&buf);
    let dirty: Vec<usize> = (0..64).filter(|&i| soft_dirty(&buf, i)).collect();
    assert_eq!(dirty, vec![10], "only the written page is soft-dirty");
    eprintln!("soft-dirty tracking works on {}", std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap().trim());
}
