//! `stasis inspect NAME [ID]`: what a checkpoint holds, read from CRIU's images natively
//! (processes, memory by kind, open files, sockets, namespaces), with its versions, its
//! freshness, and whether it fits the programs on disk now.

use super::error::Error;
use super::exit_codes;
use super::output::print_json;
use crate::config::load_named;
use crate::criu::Criu;
use crate::paths::Dirs;
use crate::store::identity::{self, HashCache};
use crate::store::images::{self, ImageSummary};
use crate::store::{CheckpointStore, Freshness};
use crate::time_fmt::human_bytes;
use serde::Serialize;

#[derive(Serialize)]
struct Report {
    name: String,
    checkpoint: String,
    kind: crate::store::DumpKind,
    created_at: String,
    generation: Option<u64>,
    fresh: bool,
    stale_reason: Option<String>,
    size_bytes: u64,
    criu_version: String,
    kernel_version: Option<String>,
    /// This host now, to compare with.
    host: Host,
    /// Whether every executable the checkpoint maps is the same file content on disk now.
    fits_programs_on_disk: bool,
    misfit: Option<String>,
    /// An incremental checkpoint: its chain, itself first, down to the full checkpoint (its
    /// memory figures below count only the pages it holds itself).
    chain: Vec<String>,
    /// Why the chain cannot be restored (a parent missing, replaced or damaged), from the
    /// manifests; the images are read only by a restore.
    chain_problem: Option<String>,
    #[serde(flatten)]
    images: ImageSummary,
}

#[derive(Serialize)]
struct Host {
    criu_version: Option<String>,
    kernel_version: String,
}

pub fn run(dirs: &Dirs, name: &str, id: Option<&str>, json: bool) -> Result<i32, Error> {
    super::require_root()?;
    let service = load_named(dirs, name)?;
    let store = CheckpointStore::new(&dirs.service(&service.name));
    let cp = match id {
        Some(id) => store
            .get(id)?
            .ok_or_else(|| {
                Error::Refused(format!("{name} has no checkpoint {id}; `stasis checkpoints {name}` lists them"))
            })?
            .checkpoint()
            .ok_or_else(|| {
                Error::Refused(format!("checkpoint {id} of {name} is damaged: its manifest cannot be read"))
            })?,
        None => store.latest()?.ok_or_else(|| {
            Error::Refused(format!("{name} has no checkpoint; take one with `stasis checkpoint {name}`"))
        })?,
    };
    let m = &cp.manifest;
    // Compressed or sealed images are read from a plain copy (in RAM when sealed).
    let plain = match (&m.compression, &m.encryption) {
        (None, None) => None,
        (_, encryption) => {
            let key = match encryption {
                Some(e) => Some(
                    crate::store::seal::Key::matching(service.encryption_key_file.as_deref(), &e.key_id, &service.file)
                        .map_err(|why| Error::Refused(format!("failed to read checkpoint {}: {why}", cp.id)))?,
                ),
                None => None,
            };
            Some(crate::store::compress::PlainImages::new(&cp.dir, &cp.images_dir(), key.as_ref())?)
        }
    };
    let summary = images::summarize(plain.as_ref().map_or(&cp.images_dir(), |p| &p.dir))
        .map_err(|e| Error::Refused(format!("failed to read the images of checkpoint {}: {e}", cp.id)))?;
    let (fresh, stale_reason) = match store.generations().freshness(m.generation, m.kind) {
        Freshness::Fresh => (true, None),
        Freshness::Stale(why) => (false, Some(why)),
    };
    let mut cache = HashCache::load(dirs.hash_cache());
    let misfit = match &m.executables {
        Some(recorded) => {
            identity::compare(recorded, &mut cache, Some(std::time::Instant::now() + identity::CLI_DEADLINE))
                .err()
                .map(|mm| format!("{} {}", mm.path.display(), mm.detail))
        }
        None => Some("the checkpoint records no executables (taken by an older stasis)".into()),
    };
    cache.save();
    let (chain, chain_problem) = match crate::store::chain::resolve(&store, &cp) {
        Ok(links) => (links.into_iter().map(|c| c.id).collect(), None),
        Err(e) => (vec![cp.id.clone()], Some(e.to_string())),
    };
    let report = Report {
        name: service.name.clone(),
        checkpoint: cp.id.clone(),
        kind: m.kind,
        created_at: m.created_at.clone(),
        generation: m.generation,
        fresh,
        stale_reason,
        size_bytes: m.size_bytes,
        criu_version: m.criu_version.clone(),
        kernel_version: m.kernel_version.clone(),
        host: Host {
            criu_version: Criu::get_cached(&dirs.criu_version_cache()).ok().map(|c| c.version),
            kernel_version: nix::sys::utsname::uname()
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
        },
        fits_programs_on_disk: misfit.is_none(),
        misfit,
        chain,
        chain_problem,
        images: summary,
    };
    if json {
        print_json(&report);
    } else {
        print_human(&report);
    }
    Ok(exit_codes::OK)
}

fn print_human(r: &Report) {
    let kind = serde_json::to_value(r.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    println!("checkpoint {} of {} ({kind}, {}), {}", r.checkpoint, r.name, r.created_at, human_bytes(r.size_bytes));
    match &r.stale_reason {
        None => println!("  fresh: the next start restores it"),
        Some(why) => println!("  stale: {}", crate::text::escape_lines(why)),
    }
    println!(
        "  taken with CRIU {} on kernel {}; this host: CRIU {}, kernel {}",
        r.criu_version,
        r.kernel_version.as_deref().unwrap_or("?"),
        r.host.criu_version.as_deref().unwrap_or("missing"),
        r.host.kernel_version
    );
    match &r.misfit {
        None => println!("  fits the programs on disk now"),
        Some(why) => println!("  does NOT fit the programs on disk now: {}", crate::text::escape_lines(why)),
    }
    if r.chain.len() > 1 {
        println!(
            "  incremental: holds the pages written since {} (chain of {}: {})",
            r.chain[1],
            r.chain.len(),
            r.chain.join(" <- ")
        );
    }
    if let Some(why) = &r.chain_problem {
        println!("  cannot be restored: {}", crate::text::escape_lines(why));
    }
    let m = &r.images.memory;
    println!(
        "  memory saved: {} (anonymous {}, file-backed {}, shared {})",
        human_bytes(m.total),
        human_bytes(m.anonymous),
        human_bytes(m.file_backed),
        human_bytes(m.shared)
    );
    if !r.images.namespaces.is_empty() {
        let ns: Vec<String> = r.images.namespaces.iter().map(|(k, v)| format!("{k} {v}")).collect();
        println!("  namespaces: {}", ns.join(", "));
    }
    println!("  processes:");
    for p in &r.images.processes {
        println!(
            "    pid {} (parent {}) {} uid {} threads {} memory {}: {}",
            p.pid,
            p.ppid,
            crate::text::escape_controls(&p.comm),
            p.uid.map(|u| u.to_string()).unwrap_or_else(|| "?".into()),
            p.threads,
            human_bytes(p.memory_bytes),
            crate::text::escape_controls(&p.command_line.join(" "))
        );
        for f in &p.files {
            println!("      fd {}: {}", f.fd, crate::text::escape_controls(&f.what));
        }
    }
    if !r.images.sockets.is_empty() {
        println!("  sockets:");
        for s in &r.images.sockets {
            println!(
                "    {} {} {}{}",
                s.protocol,
                s.state,
                crate::text::escape_controls(&s.local),
                s.remote.as_deref().map(|x| format!(" -> {}", crate::text::escape_controls(x))).unwrap_or_default()
            );
        }
    }
}
