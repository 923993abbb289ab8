//! What a dump or a restore asks of CRIU (sent over RPC by criu::requests). Options that
//! stasis depends on are set in the request; everything tunable lives in the service's
//! `criu-configs/*.conf` and `criu.options`, both held to the allowlist of
//! `config::criu_options` when the service is loaded. CRIU reads that config file after the
//! request's fields, so a spelling of an option stasis sets would win: that is what the
//! allowlist rules out.

use std::path::PathBuf;

#[derive(Debug, Clone)]
pub struct DumpArgs {
    /// Host PID of the service's namespace init: the root of the dumped tree.
    pub pid: i32,
    pub images_dir: PathBuf,
    /// Holds `dump.log`.
    pub work_dir: PathBuf,
    pub config_file: PathBuf,
    pub options: Vec<String>,
    pub leave_running: bool,
    /// CRIU clears the tree's soft-dirty bits (`track_mem`), so that the next dump can leave
    /// every page not written since in this one.
    pub track_mem: bool,
    /// The parent's images, relative to `images_dir` (`parent_img`): the pages not written
    /// since it are left there. CRIU links it as `images_dir/parent` and reads its
    /// `inventory.img` (when it was dumped, to tell a reused pid).
    pub parent_img: Option<String>,
    /// Where the page server puts the pages, and which pagemaps the parent has.
    pub pages: super::page_server::Pages,
}

pub const DUMP_LOG: &str = "dump.log";
/// A pre-copy stop's pre-dump log, beside the dump's.
pub const PRE_DUMP_LOG: &str = "pre-dump.log";
pub const RESTORE_LOG: &str = "restore.log";

#[derive(Debug, Clone)]
pub struct RestoreArgs {
    pub images_dir: PathBuf,
    /// Holds `restore.log`.
    pub work_dir: PathBuf,
    pub config_file: PathBuf,
    pub options: Vec<String>,
    /// The inode of the pipe the dumped service wrote its stdout/stderr to.
    pub stdout_pipe_inode: Option<u64>,
    /// Images served by stasis's image streamer (criu::streamer) instead of read from
    /// `images_dir`: its private directory, open as this descriptor, which CRIU is given as
    /// `/proc/OUR_PID/fd/N` with `stream` in its config file.
    pub streamed_from: Option<std::os::fd::RawFd>,
    /// `restore: lazy`: private anonymous memory left to the lazy-pages daemon (criu::lazy).
    pub lazy_pages: bool,
}
