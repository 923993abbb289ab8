//! Bringing a quarantined checkpoint back on purpose: `stasis start NAME --from ID --force`.
//! A checkpoint is quarantined when its verification or its restore failed; the failure may
//! have been the host's (a directory missing after a reboot) or passing (a disk error). It comes
//! back only after the whole proof a restore needs: the manifest's own checksum and required
//! keys, every image against its checksum, the service it belongs to, and every executable it
//! maps unchanged on disk. One that fails any of it stays in quarantine and the error says why.

use super::verb_error::VerbError;
use crate::config::Service;
use crate::paths::Dirs;
use crate::store::identity::{compare, HashCache};
use crate::store::verify::verify_images;
use crate::store::{CheckpointStore, QuarantinedCheckpoint};
use std::time::{Duration, Instant};

/// How long the executables may take to hash (a big binary read for the first time).
const FIT_DEADLINE: Duration = Duration::from_secs(300);

/// Before `start --from ID`: when ID is only in quarantine, refuses it without `force`, and
/// with it verifies it and moves it back into the store. Returns what was done, to be said.
pub fn prepare_from(dirs: &Dirs, service: &Service, id: &str, force: bool) -> Result<Option<String>, VerbError> {
    let store = CheckpointStore::new(&dirs.service(&service.name));
    if store.get(id)?.is_some() {
        return Ok(None);
    }
    let Some(q) = store.find_quarantined(id) else { return Ok(None) };
    let reason = q.reason.clone().unwrap_or_else(|| "no reason recorded".into());
    let first_line = reason.lines().next().unwrap_or_default().to_string();
    if !force {
        return Err(VerbError::Quarantined { service: service.name.clone(), id: id.to_string(), reason: first_line });
    }
    // No supervisor may start from, or quarantine, this service's checkpoints meanwhile.
    let _lock = super::prune::hold_lock(dirs, service)?;
    // Read again under the lock: what was seen before it may have moved.
    let q = store.find_quarantined(id).ok_or_else(|| VerbError::NoSuchCheckpoint {
        service: service.name.clone(),
        id: id.to_string(),
        dir: store.dir().to_path_buf(),
    })?;
    let proof = verify(dirs, service, &q)?;
    let back = store.unquarantine(&q)?;
    Ok(Some(format!(
        "brought checkpoint {} back from quarantine ({proof}); it had been quarantined because: {first_line}",
        back.id
    )))
}

/// The whole proof a restore needs; Ok says what was checked.
fn verify(dirs: &Dirs, service: &Service, q: &QuarantinedCheckpoint) -> Result<String, VerbError> {
    let damaged = |problem: String| VerbError::StillDamaged { id: q.id().to_string(), problem, dir: q.dir.clone() };
    let manifest = q.manifest.as_ref().map_err(|e| damaged(format!("its manifest cannot be trusted: {e}")))?;
    if manifest.service != service.name {
        return Err(damaged(format!("it is a checkpoint of {:?}, not of {}", manifest.service, service.name)));
    }
    let (Some(images), Some(executables)) = (&manifest.images, &manifest.executables) else {
        return Err(damaged(format!(
            "its manifest (format {}) records no checksums, so nothing proves its images",
            manifest.format
        )));
    };
    verify_images(&q.dir, images).map_err(|p| damaged(p.to_string()))?;
    let mut cache = HashCache::load(dirs.hash_cache());
    let fits = compare(executables, &mut cache, Some(Instant::now() + FIT_DEADLINE));
    cache.save();
    fits.map_err(|m| VerbError::DoesNotFit {
        id: q.id().to_string(),
        path: m.path,
        detail: m.detail,
        dir: q.dir.clone(),
    })?;
    Ok(format!(
        "verified: its manifest's checksum, {} images against their checksums, {} executables unchanged",
        images.len(),
        executables.len()
    ))
}
