//! `stasis import FILE|-`: adds a checkpoint from an archive of `stasis export`, as the newest
//! of its service, once it is proven intact and fit for this host. The archive is read into a
//! private staging directory first (its service is named inside it), then moved into the
//! service's store through the usual commit protocol (pending directory, fsync, manifest,
//! rename); a refusal leaves nothing behind.

use super::error::Error;
use super::exit_codes;
use super::output::print_json;
use crate::config::{check_name, load_named};
use crate::criu::Criu;
use crate::paths::Dirs;
use crate::process::init_binary;
use crate::store::durable::create_dir_with_mode;
use crate::store::identity::{self, HashCache};
use crate::store::{archive, CheckpointStore};
use std::path::{Path, PathBuf};

pub fn run(dirs: &Dirs, file: &str, as_name: Option<&str>, json: bool) -> Result<i32, Error> {
    super::require_root()?;
    if let Some(n) = as_name {
        check_name(n)?;
    }
    let staging = Staging::new(&dirs.state_dir)?;
    let input: Box<dyn std::io::Read> = if file == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::fs::File::open(file).map_err(|e| Error::io("open", file, e))?)
    };
    let read = archive::read(std::io::BufReader::with_capacity(1 << 20, input), &staging.dir)
        .map_err(|e| Error::ImportRefused(format!("{}: {e}; nothing was added", shown(file))))?;
    let name = as_name.unwrap_or(&read.header.service);
    check_name(name).map_err(|_| {
        Error::ImportRefused(format!("the archive names service {name:?}, which is not a valid name; use --as NAME"))
    })?;
    let service = load_named(dirs, name).map_err(|e| {
        Error::ImportRefused(format!(
            "{e}; a checkpoint is added to a service configured on this host: write {} first (the same command, user and directory as where it was taken), or pick one with --as NAME",
            dirs.service_file(name).display()
        ))
    })?;
    let mut warnings = Vec::new();
    fits_this_host(dirs, &read.manifest, &mut warnings)?;
    if read.manifest.config_digest.as_deref().is_some_and(|d| d != service.digest()) {
        warnings.push(format!(
            "{} differs from the service file the checkpoint was taken under; the restored process keeps the command, user, directory and environment it had then",
            service.file.display()
        ));
    }

    let paths = dirs.service(&service.name);
    create_dir_with_mode(&paths.root, 0o700)?;
    let store = CheckpointStore::new(&paths);
    store.check_private()?;
    let generation = store.take_generation()?;
    let pending = store.begin(generation)?;
    let moved = (|| {
        std::fs::remove_dir(pending.images_dir()).map_err(|e| Error::io("prepare", pending.images_dir(), e))?;
        std::fs::rename(staging.dir.join("images"), pending.images_dir())
            .map_err(|e| Error::io("move the images into", pending.images_dir(), e))?;
        let chunks = staging.dir.join(crate::store::chunks::DIR);
        if chunks.is_dir() {
            let to = pending.dir.join(crate::store::chunks::DIR);
            std::fs::rename(&chunks, &to).map_err(|e| Error::io("move the chunk hashes into", &to, e))?;
        }
        let mut draft = read.manifest.clone();
        draft.id = pending.id.clone();
        draft.generation = Some(generation);
        draft.service = service.name.clone();
        draft.timings = None;
        draft.unknown.insert(
            "imported_from".into(),
            serde_json::json!({ "checkpoint": read.header.checkpoint, "service": read.header.service, "exported_at": read.header.exported_at }),
        );
        pending.write_draft(&draft)?;
        Ok::<_, Error>(())
    })();
    if let Err(e) = moved {
        pending.discard();
        return Err(e);
    }
    let cp = match pending.finalize() {
        Ok(cp) => cp,
        Err(e) => {
            pending.discard();
            return Err(e.into());
        }
    };
    // Written by the import, hashed again by the commit: the two must agree.
    if cp.manifest.images != read.manifest.images {
        let _ =
            store.quarantine(&cp.id, "its images on disk differ from the archive's manifest right after the import");
        return Err(Error::ImportRefused(format!(
            "{}: the images written differ from the archive's manifest; moved aside to quarantine",
            shown(file)
        )));
    }
    let report = serde_json::json!({
        "name": service.name,
        "checkpoint": cp.id,
        "imported_from": { "checkpoint": read.header.checkpoint, "service": read.header.service },
        "size_bytes": cp.manifest.size_bytes,
        "warnings": warnings,
    });
    if json {
        print_json(&report);
    } else {
        println!(
            "imported checkpoint {} of {} (exported as {} of {}); `stasis start {}` restores it",
            cp.id, service.name, read.header.checkpoint, read.header.service, service.name
        );
        for w in &warnings {
            eprintln!("stasis: warning: {}", crate::text::escape_lines(w));
        }
    }
    Ok(exit_codes::OK)
}

/// What must match between the host that took the checkpoint and this one: a CRIU at least as
/// new, and every executable the tree maps, byte for byte, at the same path. The kernel may
/// differ (a warning: CRIU checks what it needs at the restore).
fn fits_this_host(dirs: &Dirs, m: &crate::store::Manifest, warnings: &mut Vec<String>) -> Result<(), Error> {
    let criu = Criu::get_cached(&dirs.criu_version_cache())?;
    let nums = |s: &str| s.split('.').map(|p| p.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>();
    if nums(&criu.version) < nums(&m.criu_version) {
        return Err(Error::ImportRefused(format!(
            "the checkpoint was dumped by CRIU {} and this host has CRIU {}, which may not read its images; install CRIU {} or newer (scripts/setup)",
            m.criu_version, criu.version, m.criu_version
        )));
    }
    let kernel = nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default();
    if let Some(k) = m.kernel_version.as_deref().filter(|k| *k != kernel) {
        warnings.push(format!(
            "it was taken on kernel {k} and this host runs {kernel}; CRIU checks at the restore what it needs"
        ));
    }
    // This host's init copy first: it is one of the files the checkpoint maps.
    let mut cache = HashCache::load(dirs.hash_cache());
    init_binary::install(&dirs.init_binaries(), &mut cache)?;
    let result = match &m.executables {
        Some(recorded) => {
            identity::compare(recorded, &mut cache, Some(std::time::Instant::now() + identity::CLI_DEADLINE))
        }
        None => Err(identity::Mismatch {
            path: m.init_binary.clone(),
            detail: "the checkpoint records no executables (taken by an older stasis)".into(),
        }),
    };
    cache.save();
    result.map_err(|mm| {
        Error::ImportRefused(format!(
            "the checkpoint does not fit this host: {} {} (the same binaries must be at the same paths; the init copy lives in the state directory, which must be the same path too)",
            mm.path.display(),
            mm.detail
        ))
    })
}

fn shown(file: &str) -> String {
    if file == "-" {
        "standard input".into()
    } else {
        file.to_string()
    }
}

/// A private directory for an archive being read; removed with everything in it when dropped.
struct Staging {
    dir: PathBuf,
}

impl Staging {
    fn new(state_dir: &Path) -> Result<Staging, Error> {
        let parent = state_dir.join("import");
        create_dir_with_mode(state_dir, 0o700)?;
        create_dir_with_mode(&parent, 0o700)?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = parent.join(format!(".incoming-{}-{nanos}", std::process::id()));
        create_dir_with_mode(&dir.join("images"), 0o700)?;
        Ok(Staging { dir })
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
