//! Incremental dumps need soft-dirty tracking, which the kernels of the hosts that run this suite
//! may not have (Linux 6.18 in Firecracker: `CONFIG_MEM_SOFT_DIRTY` is not set). So they run in
//! the test VM (scripts/vm: Debian's 6.1 kernel, which has it, under qemu's software emulation,
//! with the project's CRIU inside). This test builds the VM (cached; rebuilt when an input
//! changes) and runs tests/vm/soft-dirty in it: `criu check --feature mem_dirty_track`, a
//! `criu pre-dump --track-mem` then `criu dump --track-mem --prev-images-dir` of a python3
//! process that writes fewer pages than the pre-dump, and a restore whose memory checks out.
//!
//! It fails, never skips, when the VM cannot be built or booted: that is the only place where
//! incremental dumps are tested on such a host.

mod common;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
/// The whole run, boot included (a boot takes ~25 s under emulation, the test ~20 s).
const DEADLINE_SECS: &str = "600";

fn show(what: &str, out: &std::process::Output) {
    eprintln!(
        "$ {what}\n  exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    );
}

#[test]
fn incremental_dump_in_the_soft_dirty_vm() {
    common::require_host();
    let started = Instant::now();

    let build = Command::new(format!("{REPO}/scripts/vm/build")).output().expect("run scripts/vm/build");
    show("scripts/vm/build", &build);
    assert!(build.status.success(), "scripts/vm/build failed: the VM for the soft-dirty tests could not be built");
    let built = started.elapsed();

    // CRIU's logs and images come back here when the test inside fails.
    let results = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vm-soft-dirty");
    let _ = std::fs::remove_dir_all(&results);
    std::fs::create_dir_all(&results).unwrap();
    let script = format!("{REPO}/tests/vm/soft-dirty");
    let run = Command::new(format!("{REPO}/scripts/vm/run"))
        .args(["--timeout", DEADLINE_SECS, "--results"])
        .arg(&results)
        .args(["--", &script])
        .output()
        .expect("run scripts/vm/run");
    show("scripts/vm/run -- tests/vm/soft-dirty", &run);
    match run.status.code() {
        Some(0) => {}
        Some(124) => panic!("the VM run passed its {DEADLINE_SECS} s deadline (qemu was killed)"),
        Some(125) => panic!("the VM could not be booted or gave no exit status (scripts/vm/run's stderr above)"),
        other => {
            panic!("tests/vm/soft-dirty failed in the VM (exit {other:?}); logs and images in {}", results.display())
        }
    }
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("mem_dirty_track is supported"), "criu check --feature mem_dirty_track did not pass");
    assert!(
        stdout.lines().any(|l| l.starts_with("soft-dirty: ok: ")),
        "tests/vm/soft-dirty exited 0 without its final ok line"
    );
    eprintln!(
        "vm_soft_dirty: build/reuse {:.1} s, whole test {:.1} s",
        built.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}
