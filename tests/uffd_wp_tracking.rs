//! The premise of a dirty-page tracker for kernels without soft-dirty (issue 23, item 5): this
//! kernel tracks written pages with userfaultfd write-protection in async mode
//! (`UFFD_FEATURE_WP_ASYNC`: a write to a protected page is not stopped, the kernel just
//! unprotects it) and reports them with the `PAGEMAP_SCAN` ioctl (`PAGE_IS_WRITTEN`),
//! re-protecting them in the same call (`PM_SCAN_WP_MATCHING`). What CRIU's `--track-mem` does
//! with soft-dirty bits, done this way: register once, then each scan says exactly which pages
//! were written since the last one. The test is its own tracked process.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const PAGE: usize = 4096;

const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
// _IOWR(0xAA, nr, size) and _IOWR('f', 16, struct pm_scan_arg).
const UFFDIO_API: u64 = 0xC018_AA3F;
const UFFDIO_REGISTER: u64 = 0xC020_AA00;
const UFFDIO_WRITEPROTECT: u64 = 0xC018_AA06;
const PAGEMAP_SCAN: u64 = 0xC060_6610;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

fn ioctl<T>(fd: i32, request: u64, arg: &mut T) -> i64 {
    // SAFETY: `arg` is the #[repr(C)] struct the request takes, alive for the call.
    let r = unsafe { libc::ioctl(fd, request as _, arg as *mut T) };
    assert!(r >= 0, "ioctl {request:#x}: {}", std::io::Error::last_os_error());
    r as i64
}

/// The pages of `region` written since the last scan, re-protected by the scan itself.
fn written_and_reprotect(pagemap: &std::fs::File, base: u64, len: u64) -> Vec<usize> {
    let mut regions = vec![PageRegion::default(); 4096];
    let mut arg = PmScanArg {
        size: std::mem::size_of::<PmScanArg>() as u64,
        flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
        start: base,
        end: base + len,
        vec: regions.as_mut_ptr() as u64,
        vec_len: regions.len() as u64,
        category_mask: PAGE_IS_WRITTEN,
        return_mask: PAGE_IS_WRITTEN,
        ..Default::default()
    };
    let n = ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) as usize;
    assert_eq!(arg.walk_end, base + len, "the scan walked the whole range");
    regions[..n].iter().flat_map(|r| ((r.start - base) as usize / PAGE)..((r.end - base) as usize / PAGE)).collect()
}

#[test]
fn this_kernel_tracks_written_pages_with_uffd_wp_async_and_pagemap_scan() {
    const PAGES: usize = 16384; // 64 MiB
    let len = PAGES * PAGE;
    // SAFETY: a new private anonymous mapping, unmapped at the end.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(base, libc::MAP_FAILED);
    // SAFETY: the mapping above, `len` bytes.
    let mem = unsafe { std::slice::from_raw_parts_mut(base as *mut u8, len) };
    mem.iter_mut().step_by(PAGE).for_each(|b| *b = 1);

    // SAFETY: userfaultfd has no memory arguments; the descriptor is owned below.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) } as i32;
    assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
    // SAFETY: a new descriptor nothing else owns.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut api = UffdioApi { api: UFFD_API, features: UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED, ioctls: 0 };
    ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api);
    assert_ne!(api.features & UFFD_FEATURE_WP_ASYNC, 0, "the kernel offers UFFD_FEATURE_WP_ASYNC");
    let range = || UffdioRange { start: base as u64, len: len as u64 };
    ioctl(
        uffd.as_raw_fd(),
        UFFDIO_REGISTER,
        &mut UffdioRegister { range: range(), mode: UFFDIO_REGISTER_MODE_WP, ioctls: 0 },
    );
    ioctl(
        uffd.as_raw_fd(),
        UFFDIO_WRITEPROTECT,
        &mut UffdioWriteprotect { range: range(), mode: UFFDIO_WRITEPROTECT_MODE_WP },
    );

    let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    assert!(written_and_reprotect(&pagemap, base as u64, len as u64).is_empty(), "nothing written since protecting");
    // Two rounds: 1% of the pages, then others; each scan sees exactly its round's writes
    // (async: the writes never stopped), and protects them again for the next.
    for round in 0..2usize {
        let mut want: Vec<usize> = (0..PAGES / 100).map(|i| (i * 97 + round * 13) % PAGES).collect();
        want.sort_unstable();
        want.dedup();
        for &p in &want {
            mem[p * PAGE + 7] = round as u8 + 2;
        }
        let started = std::time::Instant::now();
        let got = written_and_reprotect(&pagemap, base as u64, len as u64);
        eprintln!(
            "round {round}: {} of {PAGES} pages written, found by one scan in {:?}",
            got.len(),
            started.elapsed()
        );
        assert_eq!(got, want, "round {round}: exactly the written pages");
    }
    assert!(mem.iter().step_by(PAGE).all(|&b| b >= 1), "every page kept its contents");
    drop(uffd);
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(base, len) };
}
