//! Property-based fuzzing of what stasis reads from outside: service files, manifests (and the
//! image checks driven by them), the kill-port line protocol and `/proc/net/tcp` lines. Each
//! target must never panic, whatever the input. CI runs a short round; a long one:
//! `FUZZ_CASES=200000 cargo test --release fuzz_ -- --nocapture` (docs/security.md).

use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256)
}

/// YAML-looking text: keys stasis knows, near misses, odd scalars, nesting, broken syntax.
fn yamlish() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("command".to_string()),
        Just("user".to_string()),
        Just("kill_port".to_string()),
        Just("criu".to_string()),
        Just("environment".to_string()),
        Just("keep_checkpoints".to_string()),
        Just("dump_timeout".to_string()),
        Just("kill_port_users".to_string()),
        "[a-z_]{1,12}",
    ];
    let value = prop_oneof![
        "[ -~]{0,20}",
        Just("[\"/bin/true\"]".to_string()),
        Just("{config: default, options: [\"--tcp-close\"]}".to_string()),
        Just("-1".to_string()),
        Just("99999999999999999999".to_string()),
        Just("~".to_string()),
        Just("\"\\u0000\"".to_string()),
        Just("*anchor".to_string()),
        Just("&a [1, *a]".to_string()),
    ];
    prop::collection::vec((key, value, 0usize..3), 0..8).prop_map(|entries| {
        entries.into_iter().map(|(k, v, indent)| format!("{}{k}: {v}\n", "  ".repeat(indent))).collect()
    })
}

/// Runs `check` on generated inputs: one round of `FUZZ_CASES` (default 256), repeated with
/// fresh seeds until `FUZZ_SECONDS` have passed (default: one round). Panics are failures;
/// proptest shrinks them to a minimal input.
fn fuzz<S: Strategy>(strategy: S, check: impl Fn(S::Value)) {
    let seconds: u64 = std::env::var("FUZZ_SECONDS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let mut rounds = 0u64;
    loop {
        let config = ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() };
        let mut runner = proptest::test_runner::TestRunner::new(config);
        if let Err(e) = runner.run(&strategy, |v| {
            check(v);
            Ok(())
        }) {
            panic!("{e}");
        }
        rounds += 1;
        if std::time::Instant::now() >= deadline {
            break;
        }
    }
    if seconds > 0 {
        eprintln!("fuzz: {rounds} rounds of {} cases in {seconds} s", cases());
    }
}

fn dirs() -> crate::paths::Dirs {
    crate::paths::Dirs::new(
        "/nonexistent/conf".into(),
        "/nonexistent/state".into(),
        "/nonexistent/run".into(),
        Some("/nonexistent/criu".into()),
        "/nonexistent/stasis.yaml".into(),
    )
}

#[test]
fn fuzz_service_file_parser() {
    let dirs = dirs();
    fuzz(prop_oneof![yamlish(), "(?s).{0,200}"], |text: String| {
        let _ = crate::config::parse_and_validate_for_fuzzing(&dirs, &text);
    });
}

const GOOD_MANIFEST: &[u8] = br#"{"format":2,"id":"00000001-x","generation":1,"service":"s","kind":"stop","created_at":"t","stasis_version":"0","criu_version":"4.2.1","init_binary":"/i","stdout_pipe_inode":1,"size_bytes":1,"images":[{"path":"images/../../etc/passwd","size":3,"hash":"00"}],"executables":[{"path":"/bin/sh","size":1,"mtime_ns":1,"dev":1,"inode":1,"hash":"x"}]}"#;

#[test]
fn fuzz_manifest_reader() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("images")).unwrap();
    std::fs::write(d.path().join("images/pages-1.img"), b"abc").unwrap();
    let strategy = (prop::collection::vec(any::<u8>(), 0..400), 0usize..2000, any::<u8>());
    fuzz(strategy, |(bytes, at, delta): (Vec<u8>, usize, u8)| {
        let _ = serde_json::from_slice::<crate::store::Manifest>(&bytes);
        // A real-looking manifest damaged at one place, then used to check images.
        let mut m = GOOD_MANIFEST.to_vec();
        let i = at % m.len();
        m[i] = m[i].wrapping_add(delta.max(1));
        if let Ok(m) = serde_json::from_slice::<crate::store::Manifest>(&m) {
            let _ = crate::store::verify::verify_images(d.path(), m.images.as_deref().unwrap_or(&[]));
        }
    });
}

#[test]
fn fuzz_kill_port_protocol() {
    fuzz(("(?s).{0,120}", prop::collection::vec(any::<u8>(), 0..64)), |(line, raw): (String, Vec<u8>)| {
        if let Some(Ok(text)) = crate::supervisor::protocol::parse_final(&line) {
            let _ = crate::supervisor::protocol::checkpoint_id(&text);
        }
        if !raw.is_empty() {
            let request = crate::supervisor::protocol::classify(&raw);
            // Only the exact line stops a service; every other byte string refuses or waits.
            if request == crate::supervisor::protocol::Request::Stop {
                assert!(raw == b"stop\n" || raw == b"stop\r\n", "{raw:?}");
            }
        }
        let rendered = crate::supervisor::protocol::final_line(&Err(line.clone()));
        // Whatever the error text, the verdict is the last line and it parses as an error.
        let last = rendered.lines().last().unwrap_or_default();
        assert!(matches!(crate::supervisor::protocol::parse_final(last), Some(Err(_))), "{rendered:?}");
    });
}

#[test]
fn fuzz_proc_net_tcp_lines() {
    let a: std::net::SocketAddrV4 = "127.0.0.1:7400".parse().unwrap();
    let b: std::net::SocketAddrV4 = "127.0.0.1:50000".parse().unwrap();
    fuzz("(?s)[ -~\n]{0,300}", |table: String| {
        let _ = crate::supervisor::peer_lookup_for_fuzzing(&table, a, b);
    });
}
