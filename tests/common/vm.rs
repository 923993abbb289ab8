//! Tests that need a kernel with soft-dirty tracking (CRIU's `pre-dump`, `--track-mem`): on a
//! host whose kernel has none (Linux 6.18 in Firecracker: `CONFIG_MEM_SOFT_DIRTY` is not set) they
//! run in the test VM (scripts/vm: Debian's 6.1 kernel under qemu's software emulation, the
//! repository shared read-only at the same path, the project's CRIU inside). Never skipped.
//!
//! ```ignore
//! #[test]
//! fn an_incremental_checkpoint_restores() {
//!     if !common::vm::soft_dirty_here_or_in_vm("an_incremental_checkpoint_restores") {
//!         return; // it ran, and passed, in the VM
//!     }
//!     // ... the test, on a kernel that tracks dirty pages
//! }
//! ```
//!
//! The first such test of a test binary runs that same binary again inside the VM, with the
//! same arguments (filters included), so one boot serves all its tests; each test then asserts
//! its own result from that run. Keep such tests in binaries of their own (tests/incremental.rs):
//! every test of the binary runs in the VM, so a test that boots the VM itself must not be there.

use super::REPO;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// The deadline of the whole in-VM run of one test binary, boot included.
/// `STASIS_VM_TEST_TIMEOUT` (seconds) overrides it.
const VM_TEST_TIMEOUT_SECS: u64 = 1800;

/// Whether this kernel tracks dirty pages for CRIU (`criu check --feature mem_dirty_track`).
pub fn kernel_tracks_dirty_pages() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let criu = which::which_in("criu", Some("/usr/local/sbin:/usr/sbin:/sbin:/usr/local/bin:/usr/bin"), "/")
            .expect("CRIU is missing: run scripts/setup (scripts/test does) to build and install it");
        let out = Command::new(criu).args(["check", "--feature", "mem_dirty_track"]).output().expect("run criu check");
        out.status.success()
    })
}

/// Whether this process runs inside the test VM (scripts/vm/run sets STASIS_VM=1).
pub fn inside_vm() -> bool {
    std::env::var_os("STASIS_VM").is_some()
}

/// True: the kernel here tracks dirty pages; go on with the test. False: it does not, and the
/// test (named `test`, as libtest names it) already ran and passed in the VM; return. Panics
/// when it failed there, did not run there, or the VM could not be built or booted.
pub fn soft_dirty_here_or_in_vm(test: &str) -> bool {
    if kernel_tracks_dirty_pages() {
        return true;
    }
    assert!(
        !inside_vm(),
        "inside the test VM, but its kernel does not track dirty pages (criu check --feature mem_dirty_track fails)"
    );
    let run = VM_RUN.get_or_init(run_this_binary_in_vm);
    match run.results.get(test).map(String::as_str) {
        Some("ok") => false,
        Some(outcome) => {
            panic!("{test}: {outcome} in the soft-dirty VM\n{}", run.section_of(test).unwrap_or(&run.output))
        }
        None => panic!(
            "{test} did not run in the soft-dirty VM (no result line for it; the name passed to \
             soft_dirty_here_or_in_vm must be the test's libtest name)\n{}",
            run.output
        ),
    }
}

struct VmRun {
    /// libtest name -> "ok" / "FAILED" / "ignored"
    results: HashMap<String, String>,
    /// the guest's stdout and stderr, and scripts/vm/run's stderr
    output: String,
}

impl VmRun {
    /// libtest's `---- NAME stdout ----` section of a failed test.
    fn section_of(&self, test: &str) -> Option<&str> {
        let head = format!("---- {test} stdout ----");
        let start = self.output.find(&head)?;
        let rest = &self.output[start..];
        let end = rest[head.len()..].find("\n---- ").map(|e| e + head.len()).or_else(|| rest.find("\nfailures:\n"));
        Some(end.map_or(rest, |e| &rest[..e]))
    }
}

static VM_RUN: OnceLock<VmRun> = OnceLock::new();

fn run_this_binary_in_vm() -> VmRun {
    let exe = std::env::current_exe().expect("current_exe");
    let build = Command::new(format!("{REPO}/scripts/vm/build")).output().expect("run scripts/vm/build");
    assert!(
        build.status.success(),
        "scripts/vm/build failed: the soft-dirty VM could not be built\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    // libtest's arguments of this run, minus those that hide the per-test result lines.
    let mut args: Vec<String> = Vec::new();
    let mut given = std::env::args().skip(1);
    while let Some(a) = given.next() {
        match a.as_str() {
            "-q" | "--quiet" => {}
            "--format" => {
                given.next();
            }
            _ if a.starts_with("--format=") => {}
            _ => args.push(a),
        }
    }
    args.extend(["--format".into(), "pretty".into(), "--color".into(), "never".into()]);
    let timeout = std::env::var("STASIS_VM_TEST_TIMEOUT").unwrap_or_else(|_| VM_TEST_TIMEOUT_SECS.to_string());
    let mut cmd = Command::new(format!("{REPO}/scripts/vm/run"));
    // TMPDIR inside is a sparse 16 GiB disk: the tests' directories and checkpoint images are on
    // a disk (as on a host), and GiB-sized services fit (/tmp is RAM). The guest's memory is
    // STASIS_VM_MEM (default 2G), read by scripts/vm/run from this environment.
    cmd.args(["--timeout", &timeout, "--scratch", "16G"]);
    if !exe.starts_with(REPO) {
        // A target directory outside the checkout: share it too.
        cmd.arg("--share").arg(exe.parent().unwrap());
    }
    let results_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vm-results");
    std::fs::create_dir_all(&results_dir).unwrap();
    cmd.arg("--results").arg(&results_dir).arg("--").arg(&exe).args(&args);
    eprintln!("running {} {} in the soft-dirty VM", exe.display(), args.join(" "));
    let out = cmd.output().expect("run scripts/vm/run");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let output = format!("--- in the VM (exit {:?}):\n{stdout}\n--- scripts/vm/run:\n{stderr}", out.status.code());
    eprintln!("{output}");
    match out.status.code() {
        Some(124) => panic!("the VM run passed its {timeout} s deadline (qemu was killed)\n{output}"),
        Some(125) => panic!("the soft-dirty VM could not be booted or gave no exit status\n{output}"),
        _ => {}
    }
    let mut results = HashMap::new();
    for line in stdout.lines() {
        // "test NAME ... ok" (libtest's pretty format)
        if let Some((name, outcome)) = line.strip_prefix("test ").and_then(|l| l.split_once(" ... ")) {
            results.insert(name.to_string(), outcome.trim().to_string());
        }
    }
    VmRun { results, output }
}
