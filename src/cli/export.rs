//! `stasis export NAME [ID] -o FILE`: one checkpoint, verified, as one archive (see
//! `store::archive`), to a file (written aside, fsynced, renamed) or to standard output.

use super::error::Error;
use super::exit_codes;
use crate::config::load_named;
use crate::paths::Dirs;
use crate::store::{archive, verify, CheckpointStore};
use crate::time_fmt::human_bytes;
use std::io::Write;

pub fn run(dirs: &Dirs, name: &str, id: Option<&str>, output: &str, json: bool) -> Result<i32, Error> {
    super::require_root()?;
    let service = load_named(dirs, name)?;
    let store = CheckpointStore::new(&dirs.service(&service.name));
    let cp = match id {
        Some(id) => {
            let listed = store.get(id)?.ok_or_else(|| {
                Error::ExportFailed(format!("{name} has no checkpoint {id}; `stasis checkpoints {name}` lists them"))
            })?;
            listed.checkpoint().ok_or_else(|| {
                Error::ExportFailed(format!("checkpoint {id} of {name} is damaged: its manifest cannot be read"))
            })?
        }
        None => store.latest()?.ok_or_else(|| {
            Error::ExportFailed(format!("{name} has no checkpoint to export; take one with `stasis checkpoint {name}`"))
        })?,
    };
    // An incremental checkpoint holds only the pages written since its parent: alone, it would
    // arrive incomplete. (A pre-copy stop holds its pre-dump and goes as any other.)
    if let Some(parent) = &cp.manifest.parent {
        return Err(Error::ExportFailed(format!(
            "checkpoint {} is incremental (it holds only the pages written since {}), so it cannot be exported alone; export a full one (`stasis checkpoints {name}` shows which have no parent)",
            cp.id, parent.id
        )));
    }
    // A damaged checkpoint is not sent anywhere as if it were intact.
    let images = cp.manifest.images.clone().ok_or_else(|| {
        Error::ExportFailed(format!(
            "checkpoint {} has no image checksums (taken by an older stasis); it cannot be exported",
            cp.id
        ))
    })?;
    verify::verify_images(&cp.dir, &images)
        .map_err(|p| Error::ExportFailed(format!("checkpoint {} failed verification: {p}", cp.id)))?;
    let written = if output == "-" {
        let out = std::io::stdout().lock();
        archive::write(&cp, std::io::BufWriter::new(out))
            .map_err(|e| Error::ExportFailed(format!("failed to write the archive to standard output: {e}")))?
    } else {
        write_file(&cp, std::path::Path::new(output))?
    };
    let size = (output != "-").then(|| std::fs::metadata(output).map(|m| m.len()).unwrap_or(0));
    let report = serde_json::json!({
        "name": service.name, "checkpoint": cp.id, "output": output,
        "image_bytes": written, "archive_bytes": size,
    });
    let summary = format!(
        "exported checkpoint {} of {} ({} of images{}) to {}",
        cp.id,
        service.name,
        human_bytes(written),
        size.map(|s| format!(", archive {}", human_bytes(s))).unwrap_or_default(),
        if output == "-" { "standard output" } else { output }
    );
    // With `-o -` standard output is the archive: everything else goes to stderr.
    match (json, output == "-") {
        (true, false) => super::output::print_json(&report),
        (true, true) => eprintln!("{}", serde_json::to_string_pretty(&report).expect("serializable")),
        (false, false) => println!("{summary}"),
        (false, true) => eprintln!("{summary}"),
    }
    Ok(exit_codes::OK)
}

/// Written beside the target and renamed over it once complete and fsynced: a reader never
/// sees half an archive under the final name.
fn write_file(cp: &crate::store::Checkpoint, path: &std::path::Path) -> Result<u64, Error> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let file_name =
        path.file_name().ok_or_else(|| Error::ExportFailed(format!("{} is not a file name", path.display())))?;
    let tmp = dir.join(format!(".{}.{}.tmp", file_name.to_string_lossy(), std::process::id()));
    let result = (|| {
        // It holds the service's memory: only root may read it.
        let f = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)
        }
        .map_err(|e| Error::io("create", &tmp, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        let n = archive::write(cp, &mut w).map_err(|e| Error::io("write", &tmp, e))?;
        let f = w.into_inner().map_err(|e| Error::io("write", &tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))?;
        crate::store::durable::fsync_dir(dir)?;
        Ok(n)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let _ = std::io::stdout().flush();
    result
}
