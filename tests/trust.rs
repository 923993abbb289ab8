//! When a checkpoint may be trusted: every image is verified against the manifest (its listing
//! and sizes before CRIU runs, its content as CRIU reads it: damage is quarantined, never
//! resumed; tests/streamed_restore.rs has each kind of image), a changed executable or shared library is
//! refused (`on_incompatible`), only fresh checkpoints are restored unless `restore_stale` or
//! `start --from`, rollback to the previous checkpoint, retention (`keep_checkpoints`, with the
//! nftables locks and init copies of deleted checkpoints), a restore failure that is not the
//! images' fault keeps the checkpoint, a damaged init copy is re-created, `dump_timeout`, and
//! `validate` of the new keys. Every port is picked free at run time.

mod common;
use common::*;
use nix::sys::signal::Signal;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[test]
fn every_kind_of_image_damage_is_caught() {
    let env = Env::new();
    // Every restore served and checked as CRIU reads it; a small plain checkpoint is otherwise
    // checked in a pass before CRIU runs (the last case below).
    let host_config = env.path().join("stasis.yaml");
    std::fs::write(&host_config, "restore: {verify_first_below: 0}\n").unwrap();
    let (name, [kill, http_port]) = ("damage", free_ports::<2>());
    env.write_service(name, &notes_yaml(kill, http_port, ""));
    assert_eq!(env.start(name)["started_from"], "cold");

    type Damage = fn(&Path) -> String;
    // The first two are damaged content, caught as CRIU reads it; the others are caught before
    // CRIU runs, from the listing and the sizes alone.
    let cases: [(&str, Damage); 5] = [
        ("bit flip in the largest pages image", |images| {
            let p = largest_image(images, "pages-");
            let len = std::fs::metadata(&p).unwrap().len();
            flip_bit(&p, len / 2);
            file_name(&p)
        }),
        ("bit flip in a core image", |images| {
            let p = largest_image(images, "core-");
            let len = std::fs::metadata(&p).unwrap().len();
            flip_bit(&p, len / 2);
            file_name(&p)
        }),
        ("the largest pages image one byte short", |images| {
            let p = largest_image(images, "pages-");
            let len = std::fs::metadata(&p).unwrap().len();
            std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - 1).unwrap();
            file_name(&p)
        }),
        ("a missing fs image", |images| {
            let p = images_with_prefix(images, "fs-").into_iter().next().expect("an fs-*.img in the checkpoint");
            assert!(p.is_file(), "{} exists before it is deleted", p.display());
            std::fs::remove_file(&p).unwrap();
            file_name(&p)
        }),
        ("an extra image file", |images| {
            let p = images.join("extra.img");
            assert!(!p.exists(), "CRIU wrote no extra.img of its own");
            std::fs::write(&p, b"not from this dump").unwrap();
            file_name(&p)
        }),
    ];

    for (i, (what, damage)) in cases.into_iter().enumerate() {
        eprintln!("--- {what}");
        wait_for("service", || http_json(http_port));
        http(http_port, "POST", "/notes", what).expect("post a note");
        let id = stop_id(&env, name);
        let cp = env.service_dir(name).join("checkpoints").join(&id);
        assert_eq!(row(&checkpoints(&env, name), &id)["fresh"], true, "{what}: a clean stop is fresh");
        let file = damage(&cp.join("images"));

        let started = env.start(name);
        assert_eq!(started["started_from"], "cold", "{what}: not restored");
        let reason = started["fallback_reason"].as_str().unwrap_or_else(|| panic!("{what}: a fallback reason"));
        assert!(reason.contains(&id), "{what}: the reason names the checkpoint: {reason}");
        assert!(reason.contains(&file), "{what}: the reason names {file}: {reason}");
        assert!(!cp.exists(), "{what}: the checkpoint left checkpoints/");
        let q = quarantine_of(&env, name, &id).unwrap_or_else(|| panic!("{what}: {id} is quarantined"));
        assert!(q.join("quarantine-reason.txt").is_file(), "{what}: the reason is kept");
        if i < 2 {
            assert!(reason.contains("during the restore"), "{what}: caught as CRIU read it: {reason}");
            assert!(q.join("restore.log").exists(), "{what}: CRIU was reading the images");
        } else {
            assert!(reason.contains("before restore"), "{what}: {reason}");
            assert!(!q.join("restore.log").exists(), "{what}: CRIU never ran on the damaged images");
        }
        let after = wait_for("cold-started service", || http_json(http_port));
        assert_eq!(after["notes"], json!([]), "{what}: a cold start has fresh state");
    }

    // The default: this small plain checkpoint is read whole before CRIU runs, so a flipped
    // byte is caught before CRIU reads anything.
    std::fs::remove_file(&host_config).unwrap();
    http(http_port, "POST", "/notes", "checked first").expect("post a note");
    let id = stop_id(&env, name);
    let cp = env.service_dir(name).join("checkpoints").join(&id);
    let p = largest_image(&cp.join("images"), "pages-");
    let mut bytes = std::fs::read(&p).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(&p, &bytes).unwrap();
    let started = env.start(name);
    assert_eq!(started["started_from"], "cold", "a flipped byte is never restored");
    let reason = started["fallback_reason"].as_str().expect("a fallback reason");
    assert!(reason.contains("before restore") && reason.contains(&file_name(&p)), "{reason}");
    let q = quarantine_of(&env, name, &id).expect("quarantined");
    assert!(!q.join("restore.log").exists(), "CRIU never ran on the damaged images");
    env.ok(&["stop", name]);
}

/// One flipped bit in the manifest must never turn verification off: a renamed or missing key
/// that its format requires, a broken checksum or an emptied image hash make it damaged, and a
/// damaged manifest is never restored (the images behind it are changed too, as an attacker or
/// a bad disk would leave them).
#[test]
fn a_damaged_manifest_is_never_trusted() {
    let env = Env::new();
    let [kill, http_port] = free_ports::<2>();
    let name = "manifest";
    env.write_service(name, &notes_yaml(kill, http_port, ""));
    env.start(name);

    type Damage = fn(&mut Value);
    let cases: [(&str, Damage); 5] = [
        ("\"images\" renamed", |m| rename_key(m, "images", "imagez")),
        ("\"images\" removed", |m| {
            m.as_object_mut().unwrap().remove("images");
        }),
        ("\"executables\" renamed", |m| rename_key(m, "executables", "executablez")),
        ("the manifest's own checksum broken", |m| {
            let sum = m["manifest_checksum"].as_str().expect("a format 3 manifest carries its checksum").to_string();
            let flipped = if sum.starts_with('0') { format!("1{}", &sum[1..]) } else { format!("0{}", &sum[1..]) };
            m["manifest_checksum"] = flipped.into();
        }),
        ("an image hash emptied", |m| {
            m["images"][0]["hash"] = "".into();
        }),
    ];
    for (what, damage) in cases {
        eprintln!("--- {what}");
        wait_for("service", || http_json(http_port));
        http(http_port, "POST", "/notes", what).expect("post a note");
        let id = stop_id(&env, name);
        let cp = env.service_dir(name).join("checkpoints").join(&id);
        // The memory is changed too: only the manifest's checks stand between it and a restore.
        let pages = largest_image(&cp.join("images"), "pages-");
        flip_bit(&pages, std::fs::metadata(&pages).unwrap().len() / 2);
        let manifest = cp.join("manifest.json");
        let mut m = read_json(&manifest);
        damage(&mut m);
        std::fs::write(&manifest, serde_json::to_vec_pretty(&m).unwrap()).unwrap();

        let from = env.run(&["start", name, "--from", &id]);
        assert_ne!(from.status.code(), Some(0), "{what}: --from refuses it");
        assert!(String::from_utf8_lossy(&from.stderr).contains("manifest"), "{what}: --from says why");
        assert_ne!(env.status(name)["state"], "running", "{what}: --from started nothing");
        assert!(http_json(http_port).is_none(), "{what}: nothing answers");

        let started = env.start(name);
        assert_eq!(started["started_from"], "cold", "{what}: never restored: {started}");
        let reason = started["fallback_reason"].as_str().unwrap_or_else(|| panic!("{what}: a fallback reason"));
        assert!(
            reason.contains(&id) && reason.contains("manifest"),
            "{what}: the reason names {id}'s manifest: {reason}"
        );
        assert!(!env.service_dir(name).join("checkpoints").join(&id).join("images").join("restore.log").exists());
        let listed = checkpoints(&env, name);
        let row = row(&listed, &id);
        assert_ne!(row["fresh"], true, "{what}: a damaged checkpoint is not offered: {row}");
        assert_eq!(wait_for("cold-started service", || http_json(http_port))["notes"], json!([]), "{what}");
    }
    env.ok(&["stop", name]);
}

fn rename_key(m: &mut Value, from: &str, to: &str) {
    let obj = m.as_object_mut().unwrap();
    let v = obj.remove(from).unwrap_or_else(|| panic!("the manifest has {from}"));
    obj.insert(to.to_string(), v);
}

#[test]
fn a_changed_executable_or_library_is_refused() {
    let env = Env::new();
    let (name, [kill]) = ("native", free_ports::<1>());
    let dir = env.path().canonicalize().unwrap();
    let lib = dir.join("libstasistest.so");
    let prog = dir.join("prog");

    // The library in two builds of the same size, the live one being build-A.
    std::fs::write(dir.join("lib-A.c"), lib_source("build-A")).unwrap();
    std::fs::write(dir.join("lib-B.c"), lib_source("build-B")).unwrap();
    gcc(&["-shared", "-fPIC", "-O1", "-o"], &lib, &dir.join("lib-A.c"), &[]);
    let lib_b = dir.join("libstasistest.so.B");
    gcc(&["-shared", "-fPIC", "-O1", "-o"], &lib_b, &dir.join("lib-B.c"), &[]);
    // The program in two builds of the same size, linked against the library.
    let link = [format!("-L{}", dir.display()), "-lstasistest".to_string(), format!("-Wl,-rpath,{}", dir.display())];
    let link: Vec<&str> = link.iter().map(String::as_str).collect();
    std::fs::write(dir.join("prog-A.c"), prog_source("prog-A")).unwrap();
    std::fs::write(dir.join("prog-B.c"), prog_source("prog-B")).unwrap();
    let (prog_a, prog_b) = (dir.join("prog.A"), dir.join("prog.B"));
    gcc(&["-O1", "-o"], &prog_a, &dir.join("prog-A.c"), &link);
    gcc(&["-O1", "-o"], &prog_b, &dir.join("prog-B.c"), &link);
    for (a, b) in [(&lib, &lib_b), (&prog_a, &prog_b)] {
        let (ca, cb) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        assert_eq!(ca.len(), cb.len(), "{} and {} have the same size", a.display(), b.display());
        assert_ne!(ca, cb, "{} and {} differ", a.display(), b.display());
    }
    replace_file(&prog_a, &prog);
    for p in [&lib, &lib_b, &prog_a, &prog_b, &prog] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let yaml = format!("command: [\"{}\"]\nuser: stasis-example\nkill_port: {kill}\n", prog.display());
    env.write_service(name, &yaml);
    assert_eq!(env.start(name)["started_from"], "cold");
    wait_for("prog-A with build-A", || env.log(name).contains("prog-A build-A heartbeat").then_some(()));

    // Case A: the program is replaced by a rebuild of the same size.
    let c1 = stop_id(&env, name);
    let c1_dir = env.service_dir(name).join("checkpoints").join(&c1);
    let c1_table = nft_table_of(&c1_dir).expect("the dump log names CRIU's run id");
    assert!(nft_table_exists(&c1_table), "{c1} holds its connections in {c1_table} until it is restored");
    replace_file(&prog_b, &prog);
    let started = env.start(name);
    assert_eq!(started["started_from"], "cold", "a changed program is not restored");
    let reason = started["fallback_reason"].as_str().expect("a fallback reason");
    assert!(reason.contains(&prog.display().to_string()), "the reason names the program: {reason}");
    let r = row(&checkpoints(&env, name), &c1).clone();
    assert!(r["incompatible"].as_str().is_some_and(|s| !s.is_empty()), "{c1} is marked incompatible: {r}");
    assert!(c1_dir.is_dir(), "an incompatible checkpoint is kept, not quarantined");
    assert!(
        !nft_table_exists(&c1_table),
        "the service ran on cold, so nothing will carry on {c1}'s connections: {c1_table} was released"
    );
    wait_for("prog-B with build-A", || env.log(name).contains("prog-B build-A heartbeat").then_some(()));

    // Case B: only the library changes, in place, same inode, same mtime.
    let c2 = stop_id(&env, name);
    let orig = dir.join("libstasistest.so.orig");
    assert!(Command::new("cp").arg("-p").arg(&lib).arg(&orig).status().unwrap().success());
    let before = std::fs::metadata(&lib).unwrap();
    let bytes_b = std::fs::read(&lib_b).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&lib).unwrap();
    f.write_all_at(&bytes_b, 0).unwrap();
    f.set_len(bytes_b.len() as u64).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert!(Command::new("touch").arg("-r").arg(&orig).arg(&lib).status().unwrap().success());
    let after = std::fs::metadata(&lib).unwrap();
    assert_eq!(after.ino(), before.ino(), "the library was rewritten in place");
    assert_eq!((after.mtime(), after.mtime_nsec()), (before.mtime(), before.mtime_nsec()), "same mtime");
    assert_eq!(std::fs::read(&lib).unwrap(), bytes_b, "the library is now build-B");
    let started = env.start(name);
    assert_eq!(started["started_from"], "cold", "a changed library is not restored");
    let reason = started["fallback_reason"].as_str().expect("a fallback reason");
    assert!(reason.contains(&lib.display().to_string()), "the reason names the library: {reason}");
    let r = row(&checkpoints(&env, name), &c2).clone();
    assert!(r["incompatible"].as_str().is_some_and(|s| !s.is_empty()), "{c2} is marked incompatible: {r}");
    wait_for("prog-B with build-B", || env.log(name).contains("prog-B build-B heartbeat").then_some(()));

    // Case C: `on_incompatible: fail` refuses to start at all.
    env.write_service(name, &format!("{yaml}on_incompatible: fail\n"));
    let c3 = stop_id(&env, name);
    replace_file(&prog_a, &prog);
    let out = env.run(&["start", name]);
    assert_eq!(out.status.code(), Some(10), "on_incompatible: fail: exit 10");
    assert_ne!(env.status(name)["state"], "running", "nothing was started");
    assert!(env.service_dir(name).join("checkpoints").join(&c3).is_dir(), "{c3} is kept");

    // Back to the default: a cold start, then two checkpoints push the old ones out.
    env.write_service(name, &yaml);
    assert_eq!(env.start(name)["started_from"], "cold");
    for _ in 0..2 {
        stop_id(&env, name);
        assert_eq!(env.start(name)["started_from"], "checkpoint", "an unchanged program is restored");
    }
    assert!(!c1_dir.exists(), "{c1} was deleted by retention");
    env.ok(&["stop", name]);
}

#[test]
fn killing_the_supervisor_after_a_restore_makes_the_next_start_cold_with_the_reason() {
    let env = Env::new();
    let (name, [kill, http_port]) = ("crashed", free_ports::<2>());
    env.write_service(name, &notes_yaml(kill, http_port, ""));
    env.start(name);
    wait_for("service", || http_json(http_port));
    http(http_port, "POST", "/notes", "before the crash").unwrap();
    let a = stop_id(&env, name);
    let restored = env.start(name);
    assert_eq!(restored["started_from"], "checkpoint");
    assert_eq!(restored["checkpoint"], a.as_str());
    wait_for("restored service", || http_json(http_port));

    kill_service_tree(&env, name);
    let started = env.start(name);
    assert_eq!(started["started_from"], "cold", "a checkpoint the service already ran on from is stale");
    let reason = started["fallback_reason"].as_str().expect("a fallback reason");
    assert!(reason.contains(&a) && reason.contains("stale"), "{reason}");
    let st = env.status(name);
    assert_eq!(st["fallback_reason"].as_str(), Some(reason), "status has the same reason");
    assert_eq!((&st["checkpoint"], &st["checkpoint_fresh"]), (&json!(a), &json!(false)), "status: {st}");
    let ra = row(&checkpoints(&env, name), &a).clone();
    assert_eq!(ra["fresh"], false, "{ra}");
    assert!(ra["stale_reason"].as_str().is_some_and(|s| !s.is_empty()), "{ra}");
    assert_eq!(wait_for("cold service", || http_json(http_port))["notes"], json!([]));

    let b = stop_id(&env, name);
    let list = checkpoints(&env, name);
    assert_eq!(row(&list, &b)["fresh"], true, "a clean stop is fresh");
    assert_eq!(row(&list, &b)["stale_reason"], Value::Null);
    assert_eq!(row(&list, &a)["fresh"], false, "{a} stays stale");
    assert_eq!(env.status(name)["checkpoint_fresh"], true, "status: the next start restores {b}");

    let from: Value = serde_json::from_str(&env.ok(&["start", name, "--from", &a, "--json"])).unwrap();
    assert_eq!(from["started_from"], "checkpoint");
    assert_eq!(from["checkpoint"], a.as_str(), "--from restores the named checkpoint, stale or not");
    assert_eq!(wait_for("restored service", || http_json(http_port))["notes"], json!(["before the crash"]));
    env.ok(&["stop", name]);
}

#[test]
fn restore_stale_allows_a_stale_checkpoint() {
    let env = Env::new();
    let (name, [kill, http_port]) = ("stale", free_ports::<2>());
    env.write_service(name, &notes_yaml(kill, http_port, "restore_stale: true\n"));
    env.start(name);
    wait_for("service", || http_json(http_port));
    http(http_port, "POST", "/notes", "first").unwrap();
    let v: Value = serde_json::from_str(&env.ok(&["checkpoint", name, "--json"])).unwrap();
    let k = v["checkpoint"].as_str().expect("checkpoint --json names the checkpoint").to_string();
    http(http_port, "POST", "/notes", "second").unwrap();
    let rk = row(&checkpoints(&env, name), &k).clone();
    assert_eq!(rk["kind"], "keep-running");
    assert_eq!(rk["fresh"], false, "a keep-running checkpoint is stale at once: {rk}");

    kill_service_tree(&env, name);
    let started = env.start(name);
    assert_eq!(started["started_from"], "checkpoint", "restore_stale: true restores it anyway");
    assert_eq!(started["checkpoint"], k.as_str());
    assert_eq!(wait_for("restored service", || http_json(http_port))["notes"], json!(["first"]));
    env.ok(&["stop", name]);
}

#[test]
fn a_damaged_newest_checkpoint_rolls_back_to_the_previous_one() {
    let env = Env::new();
    let (name, [kill, http_port]) = ("rollback", free_ports::<2>());
    env.write_service(name, &notes_yaml(kill, http_port, "restore_stale: true\n"));
    env.start(name);
    wait_for("service", || http_json(http_port));
    http(http_port, "POST", "/notes", "one").unwrap();
    let a = stop_id(&env, name);
    assert_eq!(env.start(name)["checkpoint"], a.as_str());
    wait_for("restored service", || http_json(http_port));
    http(http_port, "POST", "/notes", "two").unwrap();
    let b = stop_id(&env, name);
    let b_dir = env.service_dir(name).join("checkpoints").join(&b);
    let pages = largest_image(&b_dir.join("images"), "pages-");
    flip_bit(&pages, std::fs::metadata(&pages).unwrap().len() / 2);

    let started = env.start(name);
    assert_eq!(started["started_from"], "checkpoint", "the previous checkpoint is restored");
    assert_eq!(started["checkpoint"], a.as_str());
    let reason = started["fallback_reason"].as_str().expect("a reason for not restoring the newest");
    assert!(reason.contains(&b), "the reason names {b}: {reason}");
    assert!(!b_dir.exists(), "the damaged {b} left checkpoints/");
    assert_eq!(wait_for("restored service", || http_json(http_port))["notes"], json!(["one"]));
    env.ok(&["stop", name]);
}

#[test]
fn retention_keeps_the_newest_checkpoints_and_drops_unused_init_copies() {
    let env = Env::new();
    let (name, [kill, http_port]) = ("retention", free_ports::<2>());
    env.write_service(name, &notes_yaml(kill, http_port, "keep_checkpoints: 2\n"));
    env.start(name);
    let fake = env.state_dir().join("bin").join("stasis-init-000000000000000000000000");
    assert!(fake.parent().unwrap().is_dir(), "the first start made STATE/bin");
    std::fs::write(&fake, b"#!/bin/sh\n# an init copy no checkpoint uses\n").unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Copies younger than an hour are spared (another build may be about to exec one): age it.
    let two_days_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 86400);
    std::fs::File::options().write(true).open(&fake).unwrap().set_modified(two_days_ago).unwrap();
    let young = env.state_dir().join("bin").join("stasis-init-111111111111111111111111");
    std::fs::write(&young, b"#!/bin/sh\n# just installed by another build\n").unwrap();

    let mut ids = Vec::new();
    for i in 0..4 {
        wait_for("service", || http_json(http_port));
        http(http_port, "POST", "/notes", &format!("note {i}")).unwrap();
        ids.push(stop_id(&env, name));
        assert_eq!(env.start(name)["started_from"], "checkpoint");
    }
    let on_disk: BTreeSet<String> = env
        .checkpoint_dirs(name)
        .iter()
        .map(|p| file_name(p))
        .filter(|n| !n.starts_with('.') || n.starts_with(".incomplete"))
        .collect();
    let newest: BTreeSet<String> = ids[2..].iter().cloned().collect();
    assert_eq!(on_disk, newest, "only the 2 newest of {ids:?} are kept");
    assert!(!fake.exists(), "an init copy that no checkpoint references is deleted");
    assert!(young.exists(), "a copy installed within the hour is kept");
    let manifest = read_json(&env.service_dir(name).join("checkpoints").join(&ids[3]).join("manifest.json"));
    let init = PathBuf::from(manifest["init_binary"].as_str().expect("the manifest names its init copy"));
    assert_ne!(init, fake);
    assert!(init.is_file(), "the init copy in use is kept: {}", init.display());

    let list = checkpoints(&env, name);
    let rows = list["checkpoints"].as_array().unwrap();
    let ids_listed: Vec<&str> = rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids_listed, ids[2..].iter().map(String::as_str).collect::<Vec<_>>(), "oldest first");
    let gens: Vec<u64> = rows.iter().map(|r| r["generation"].as_u64().expect("a generation")).collect();
    assert!(gens.windows(2).all(|w| w[0] < w[1]), "generations strictly increase: {gens:?}");
    let counter = list["generation"].as_u64().expect("the service's generation counter");
    assert!(counter >= *gens.last().unwrap(), "counter {counter} vs {gens:?}");
    env.ok(&["stop", name]);
}

#[test]
fn a_port_in_use_restore_failure_keeps_the_checkpoint() {
    let env = Env::new();
    let (name, [kill, http_port]) = ("busyport", free_ports::<2>());
    env.write_service(name, &notes_yaml(kill, http_port, ""));
    env.start(name);
    wait_for("service", || http_json(http_port));
    http(http_port, "POST", "/notes", "survives").unwrap();
    let a = stop_id(&env, name);

    let squatter = std::net::TcpListener::bind(("127.0.0.1", http_port)).expect("bind the service's port");
    let out = env.run(&["start", name]);
    assert_eq!(out.status.code(), Some(6), "the restore failed and nothing started: exit 6");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use") && err.contains("kept"), "{err}");
    assert_ne!(env.status(name)["state"], "running");
    assert!(env.service_dir(name).join("checkpoints").join(&a).is_dir(), "{a} is still in checkpoints/");
    assert!(quarantine_of(&env, name, &a).is_none(), "{a} was not quarantined");
    assert_eq!(row(&checkpoints(&env, name), &a)["fresh"], true, "a failed restore did not run the service");

    drop(squatter);
    let started = env.start(name);
    assert_eq!(started["started_from"], "checkpoint");
    assert_eq!(started["checkpoint"], a.as_str());
    assert_eq!(wait_for("restored service", || http_json(http_port))["notes"], json!(["survives"]));
    env.ok(&["stop", name]);
}

#[test]
fn a_truncated_init_copy_is_recreated() {
    let env = Env::new();
    let (name, [kill, http_port]) = ("initcopy", free_ports::<2>());
    let full = std::fs::metadata(INIT_BIN).unwrap().len();
    env.write_service(name, &notes_yaml(kill, http_port, ""));
    env.start(name);
    wait_for("service", || http_json(http_port));
    http(http_port, "POST", "/notes", "kept").unwrap();
    let a = stop_id(&env, name);
    let manifest = read_json(&env.service_dir(name).join("checkpoints").join(&a).join("manifest.json"));
    let init = PathBuf::from(manifest["init_binary"].as_str().expect("the manifest names its init copy"));
    truncate_to_half(&init);

    let started = env.start(name);
    assert_eq!(started["started_from"], "checkpoint", "the checkpoint is restored with a re-created init copy");
    assert_eq!(started["checkpoint"], a.as_str());
    assert_eq!(wait_for("restored service", || http_json(http_port))["notes"], json!(["kept"]));
    assert_eq!(std::fs::metadata(&init).unwrap().len(), full, "the init copy has its full size again");
    // Nothing may map the copy while it is damaged again.
    env.ok(&["stop", name]);

    let (other, [kill2, http2]) = ("initcopy2", free_ports::<2>());
    env.write_service(other, &notes_yaml(kill2, http2, ""));
    truncate_to_half(&init);
    assert_eq!(env.start(other)["started_from"], "cold");
    assert_eq!(wait_for("cold service", || http_json(http2))["notes"], json!([]));
    assert_eq!(std::fs::metadata(&init).unwrap().len(), full, "the init copy has its full size again");
    env.ok(&["stop", other]);
}

#[test]
fn a_dump_that_exceeds_dump_timeout_is_ended_and_the_service_resumed() {
    let env = Env::new();
    let (name, [kill, http_port]) = ("hang", free_ports::<2>());
    let hang = env.path().join("hang.sh");
    std::fs::write(&hang, "#!/bin/sh\n[ \"$CRTOOLS_SCRIPT_ACTION\" = post-dump ] && exec sleep 600\nexit 0\n").unwrap();
    std::fs::set_permissions(&hang, std::fs::Permissions::from_mode(0o755)).unwrap();
    // No service file may name an action script (CRIU runs it as root): the test wraps the
    // real CRIU, as root may, and hands it to the supervisor through STASIS_CRIU.
    let real = which::which_in("criu", Some("/usr/local/sbin:/usr/sbin:/sbin"), "/").expect("criu");
    let criu = env.path().join("criu-hang");
    std::fs::write(&criu, format!("#!/bin/sh\nexec {} \"$@\" --action-script {}\n", real.display(), hang.display()))
        .unwrap();
    std::fs::set_permissions(&criu, std::fs::Permissions::from_mode(0o755)).unwrap();
    env.write_service(name, &notes_yaml(kill, http_port, "dump_timeout: 3s\n"));

    let cmd = |args: &[&str]| {
        let mut c = env.cmd(args);
        c.env("STASIS_CRIU", &criu);
        c
    };
    let run = |args: &[&str]| logged(args, cmd(args));
    let sleeps_before = hang_sleeps();
    let _cleanup = KillOnDrop(&env, name);
    assert_eq!(run(&["start", name, "--json"]).status.code(), Some(0));
    wait_for("service", || http_json(http_port));
    http(http_port, "POST", "/notes", "kept").unwrap();

    // The stop hangs in the post-dump script until dump_timeout ends it.
    let mut stop = cmd(&["stop", name]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut hung = None;
    while hung.is_none() && stop.try_wait().unwrap().is_none() {
        hung = hang_sleeps().difference(&sleeps_before).next().copied();
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = stop.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    eprintln!("$ stasis stop {name}\n  exit {:?}\n  {}", out.status.code(), text.trim());
    let hung = hung.expect("the dump hung in hang.sh's `sleep 600`");
    assert_eq!(out.status.code(), Some(5), "the dump failed: exit 5");
    assert!(text.contains("dump_timeout"), "the failure names dump_timeout: {text}");
    wait_for("the hang script's sleep to be ended", || (!is_hang_sleep(hung)).then_some(()));
    assert!(hang_sleeps().difference(&sleeps_before).next().is_none(), "no `sleep 600` is left");

    let st: Value = serde_json::from_slice(&run(&["status", name, "--json"]).stdout).unwrap();
    assert_eq!(st["state"], "running", "the service survived the dump that timed out");
    assert_eq!(wait_for("service still answering", || http_json(http_port))["notes"], json!(["kept"]));
    let list: Value = serde_json::from_slice(&run(&["checkpoints", name, "--json"]).stdout).unwrap();
    let rows = list["checkpoints"].as_array().expect("a checkpoints list");
    assert!(rows.iter().all(|r| r["fresh"] != true), "no fresh checkpoint from the failed dump: {rows:?}");

    let supervisor = pid_in(&st["supervisor_pid"]).expect("a supervisor pid");
    verified_signal(supervisor, &["__supervise", &env.state_dir().display().to_string()], Signal::SIGTERM);
    wait_for("the service to stop", || {
        let st: Value = serde_json::from_slice(&cmd(&["status", name, "--json"]).output().unwrap().stdout).ok()?;
        (st["state"] == "stopped").then_some(())
    });
}

#[test]
fn validate_reports_the_new_keys() {
    let env = Env::new();
    let [kill_good, kill_seconds, kill_bad, kill_badtype] = free_ports::<4>();
    env.write_service(
        "good",
        &format!("command: [\"/bin/true\"]\nuser: nobody\nkill_port: {kill_good}\nrestore_stale: true\nkeep_checkpoints: 5\non_incompatible: fail\ndump_timeout: \"2s\"\n"),
    );
    env.write_service(
        "seconds",
        &format!("command: [\"/bin/true\"]\nuser: nobody\nkill_port: {kill_seconds}\nkeep_checkpoints: 1000\non_incompatible: cold\ndump_timeout: 90\n"),
    );
    env.ok(&["validate", "good"]);
    env.ok(&["validate", "seconds"]);

    env.write_service(
        "bad",
        &format!("command: [\"/bin/true\"]\nuser: nobody\nkill_port: {kill_bad}\nkeep_checkpoints: 0\non_incompatible: maybe\ndump_timeout: \"soon\"\n"),
    );
    let v: Value = serde_json::from_str(&env.expect_code(&["validate", "bad", "--json"], 3)).unwrap();
    assert_eq!(v[0]["ok"], false);
    let problems = v[0]["problems"].as_array().expect("problems");
    let keys: BTreeSet<&str> = problems.iter().map(|p| p["key"].as_str().unwrap()).collect();
    for key in ["keep_checkpoints", "on_incompatible", "dump_timeout"] {
        assert!(keys.contains(key), "{key} is reported: {problems:?}");
    }
    assert_eq!(keys, BTreeSet::from(["keep_checkpoints", "on_incompatible", "dump_timeout"]), "{problems:?}");
    assert!(problems.iter().all(|p| !p["message"].as_str().unwrap_or("").is_empty()), "{problems:?}");

    env.write_service(
        "badtype",
        &format!("command: [\"/bin/true\"]\nuser: nobody\nkill_port: {kill_badtype}\nrestore_stale: \"yes\"\n"),
    );
    let v: Value = serde_json::from_str(&env.expect_code(&["validate", "badtype", "--json"], 3)).unwrap();
    let problems = v[0]["problems"].as_array().expect("problems");
    assert!(problems.iter().any(|p| p["key"] == "restore_stale"), "the type error names restore_stale: {problems:?}");
}

#[test]
fn a_hundred_mixed_cycles_leave_no_lock_table_of_a_checkpoint_that_will_not_be_restored() {
    let env = Env::new();
    let (name, [kill, http_port]) = ("mixed", free_ports::<2>());
    env.write_service(name, &notes_yaml(kill, http_port, ""));
    env.start(name);
    // Every table any dump made, including those of checkpoints since deleted.
    let table_of = |id: &str| nft_table_of(&env.service_dir(name).join("checkpoints").join(id)).expect("a run id");
    let mut tables = Vec::new();
    for i in 0..100 {
        wait_for("service", || http_json(http_port));
        let id = stop_id(&env, name);
        tables.push(table_of(&id));
        match i % 3 {
            // A plain cycle.
            0 => assert_eq!(env.start(name)["started_from"], "checkpoint"),
            // A crash after the restore: the next start is cold.
            1 => {
                assert_eq!(env.start(name)["started_from"], "checkpoint");
                wait_for("service", || http_json(http_port));
                kill_service_tree(&env, name);
                assert_eq!(env.start(name)["started_from"], "cold");
            }
            // Damaged images: quarantine, then cold.
            _ => {
                let images = env.service_dir(name).join("checkpoints").join(&id).join("images");
                let p = largest_image(&images, "pages-");
                flip_bit(&p, std::fs::metadata(&p).unwrap().len() / 2);
                assert_eq!(env.start(name)["started_from"], "cold");
            }
        }
    }
    wait_for("service", || http_json(http_port));
    let last = stop_id(&env, name);
    tables.push(table_of(&last));
    let held: BTreeSet<String> = tables.into_iter().filter(|t| nft_table_exists(t)).collect();
    let expected: BTreeSet<String> = [table_of(&last)].into_iter().collect();
    assert_eq!(held, expected, "only the checkpoint the next start restores ({last}) holds a table");
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// `stasis stop NAME --json`, asserting exit 0; returns the checkpoint id.
fn stop_id(env: &Env, name: &str) -> String {
    let v: Value = serde_json::from_str(&env.ok(&["stop", name, "--json"])).expect("stop --json prints JSON");
    assert_eq!(v["stopped"], true, "{v}");
    v["checkpoint"].as_str().expect("stop --json names the checkpoint").to_string()
}

fn checkpoints(env: &Env, name: &str) -> Value {
    serde_json::from_str(&env.ok(&["checkpoints", name, "--json"])).expect("checkpoints --json prints JSON")
}

/// The row of checkpoint `id` in `checkpoints --json`.
fn row<'a>(list: &'a Value, id: &str) -> &'a Value {
    list["checkpoints"]
        .as_array()
        .and_then(|rows| rows.iter().find(|r| r["id"] == id))
        .unwrap_or_else(|| panic!("{id} is listed: {list}"))
}

/// The quarantine directory of checkpoint `id` (`quarantine/ID` or `quarantine/ID-n`).
fn quarantine_of(env: &Env, name: &str, id: &str) -> Option<PathBuf> {
    std::fs::read_dir(env.service_dir(name).join("quarantine")).ok()?.filter_map(Result::ok).map(|e| e.path()).find(
        |p| {
            let n = file_name(p);
            n == id || n.strip_prefix(id).is_some_and(|rest| rest.starts_with('-'))
        },
    )
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))).unwrap()
}

fn file_name(p: &Path) -> String {
    p.file_name().unwrap().to_string_lossy().to_string()
}

/// Flips the lowest bit of the byte at `offset`, in place.
fn flip_bit(path: &Path, offset: u64) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    f.write_all_at(&[b[0] ^ 1], offset).unwrap();
    f.sync_all().unwrap();
}

fn truncate_to_half(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(path).unwrap().set_len(len / 2).unwrap();
    assert_eq!(std::fs::metadata(path).unwrap().len(), len / 2);
}

/// `PREFIX*.img` files of an images dir, sorted by name.
fn images_with_prefix(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let n = file_name(p);
            n.starts_with(prefix) && n.ends_with(".img")
        })
        .collect();
    v.sort();
    v
}

/// The largest `PREFIX*.img` of an images dir.
fn largest_image(dir: &Path, prefix: &str) -> PathBuf {
    images_with_prefix(dir, prefix)
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap_or_else(|| panic!("a {prefix}*.img in {}", dir.display()))
}

/// SIGKILLs the verified supervisor, then the verified namespace init (and with it the whole
/// tree), as a crash or power loss would, and waits until they are gone.
fn kill_service_tree(env: &Env, name: &str) {
    let st = env.status(name);
    let state_dir = env.state_dir().display().to_string();
    let supervisor = pid_in(&st["supervisor_pid"]).expect("a supervisor pid");
    let init = pid_in(&st["init_pid"]).expect("an init pid");
    verified_kill(supervisor, &["__supervise", &state_dir]);
    verified_kill(init, &["__ns-init", &state_dir]);
    wait_for("the supervisor and the tree to be gone", || (is_gone(supervisor) && is_gone(init)).then_some(()));
    wait_for("status to see the dead supervisor", || (env.status(name)["state"] != "running").then_some(()));
}

/// For a service started without `env.start` (so the harness does not know it): kills what
/// is left of it, after verifying the pids, if the test ends early.
struct KillOnDrop<'a>(&'a Env, &'a str);
impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let status = std::fs::read(self.0.service_dir(self.1).join("status.json")).unwrap_or_default();
        let v: Value = serde_json::from_slice(&status).unwrap_or_default();
        let state_dir = self.0.state_dir().display().to_string();
        for (key, marker) in [("supervisor_pid", "__supervise"), ("init_pid", "__ns-init")] {
            if let Some(pid) = pid_in(&v[key]) {
                signal_if_ours(pid, &[marker, &state_dir], Signal::SIGKILL);
            }
        }
    }
}

fn is_hang_sleep(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == b"sleep\x00600\x00")
}

/// Every process whose command line is `sleep 600` (what hang.sh execs).
fn hang_sleeps() -> BTreeSet<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| is_hang_sleep(*pid))
        .collect()
}

/// The nftables table (`CRIU-<first 21 chars of the run id>`) a checkpoint's dump left.
fn nft_table_of(checkpoint_dir: &Path) -> Option<String> {
    let log = std::fs::read_to_string(checkpoint_dir.join("dump.log")).ok()?;
    // Over RPC the log names criu's own run id first, then the request's, which names the table.
    let id = log
        .lines()
        .filter(|l| !l.contains("Dump CRIU run id"))
        .filter_map(|l| l.split_once("CRIU run id = ").map(|(_, id)| id.trim().to_string()))
        .last()?;
    Some(format!("CRIU-{}", id.chars().take(21).collect::<String>()))
}

fn nft_table_exists(name: &str) -> bool {
    Command::new("nft")
        .args(["list", "table", "inet", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run nft")
        .success()
}

/// Replaces `to` by a copy of `from` through a rename, as a package upgrade does.
fn replace_file(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

fn gcc(flags: &[&str], out: &Path, src: &Path, after: &[&str]) {
    let ok = Command::new("gcc").args(flags).arg(out).arg(src).args(after).status().expect("run gcc").success();
    assert!(ok, "gcc {flags:?} {} {} {after:?}", out.display(), src.display());
}

/// `build()` returns `tag`; both tags must have the same length so both builds have one size.
fn lib_source(tag: &str) -> String {
    format!("const char *build(void) {{ return \"{tag}\"; }}\n")
}

fn prog_source(tag: &str) -> String {
    format!(
        "#include <stdio.h>\n#include <unistd.h>\nconst char *build(void);\nint main(void) {{\n    unsigned long n = 0;\n    for (;;) {{\n        printf(\"{tag} %s heartbeat %lu\\n\", build(), ++n);\n        fflush(stdout);\n        usleep(100000);\n    }}\n}}\n"
    )
}
