//! `stasis add` and `stasis remove`: setting a service up (file, user, directories) and taking
//! it away again, without ever deleting checkpoints unless asked to.

use super::args::AddArgs;
use super::error::Error;
use super::exit_codes;
use crate::config::{check_name, load_service, CriuSection, ServiceFile};
use crate::paths::Dirs;
use crate::store::durable::{create_dir_with_mode, write_atomic};
use crate::supervisor::{lock, StartError};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

pub fn add(dirs: &Dirs, a: AddArgs) -> Result<i32, Error> {
    super::require_root()?;
    check_name(&a.name)?;
    let file = dirs.service_file(&a.name);
    if file.exists() && !a.force {
        return Err(Error::Refused(format!(
            "{} already exists; edit it, or pass --force to replace it (checkpoints are kept either way)",
            file.display()
        )));
    }
    let mut environment = BTreeMap::new();
    for kv in &a.environment {
        let (k, v) = kv.split_once('=').ok_or_else(|| Error::Refused(format!("--env {kv:?} must be KEY=VALUE")))?;
        environment.insert(k.to_string(), v.to_string());
    }
    if a.create_user && nix::unistd::User::from_name(&a.user).ok().flatten().is_none() {
        create_system_user(&a.user, &dirs.state_dir.join("work").join(&a.name))?;
        println!("created system user {} (no login shell)", a.user);
    }
    let user = nix::unistd::User::from_name(&a.user).ok().flatten().ok_or_else(|| {
        Error::Refused(format!("user {:?} does not exist; pass --create-user to create it as a system user", a.user))
    })?;
    let working_dir = match &a.working_dir {
        Some(d) => d.clone(),
        None => dirs.state_dir.join("work").join(&a.name),
    };
    if !working_dir.exists() {
        create_dir_with_mode(&working_dir, 0o750)?;
        let gid = match &a.group {
            Some(g) => nix::unistd::Group::from_name(g).ok().flatten().map(|g| g.gid),
            None => Some(user.gid),
        };
        nix::unistd::chown(&working_dir, Some(user.uid), gid)
            .map_err(|e| Error::io("chown", &working_dir, std::io::Error::from(e)))?;
        println!("created working directory {} (owned by {})", working_dir.display(), a.user);
    }
    create_dir_with_mode(&dirs.service(&a.name).root, 0o700)?;

    let service = ServiceFile {
        command: a.command,
        user: a.user,
        group: a.group,
        kill_port: a.kill_port,
        working_dir: Some(working_dir.display().to_string()),
        environment,
        criu: CriuSection { config: a.criu_config, options: Vec::new() },
        ..Default::default()
    };
    let yaml = serde_yaml::to_string(&service).expect("service file serializes");
    let text = format!("# Written by `stasis add`; see docs/configuration.md for every key.\n{yaml}");
    std::fs::create_dir_all(&dirs.config_dir).map_err(|e| Error::io("create", &dirs.config_dir, e))?;
    // Validate before it becomes visible: stage it in a private directory beside the config
    // dir's files, check it there, then rename it into place.
    let stage = dirs.config_dir.join(format!(".stasis-add-{}", std::process::id()));
    create_dir_with_mode(&stage, 0o700)?;
    let staged = stage.join(format!("{}.yaml", a.name));
    let checked = write_atomic(&staged, text.as_bytes())
        .map_err(Error::from)
        .and_then(|_| load_service(dirs, &staged.display().to_string()).map_err(Error::from))
        .and_then(|_| {
            set_mode(&staged, 0o644);
            std::fs::rename(&staged, &file).map_err(|e| Error::io("write", &file, e))
        });
    let _ = std::fs::remove_dir_all(&stage);
    checked?;
    println!("wrote {}", file.display());
    if Path::new("/run/systemd/system").is_dir() {
        println!("next: systemctl enable --now stasis@{}", a.name);
    } else {
        println!("next: stasis start {}   (or install an init script: stasis init-script {})", a.name, a.name);
    }
    Ok(exit_codes::OK)
}

pub fn remove(dirs: &Dirs, name: &str, purge: bool) -> Result<i32, Error> {
    super::require_root()?;
    check_name(name)?;
    let file = dirs.service_file(name);
    let paths = dirs.service(name);
    if let Some(pid) = lock::holder(&paths.lock) {
        return Err(StartError::AlreadyRunning { service: name.to_string(), pid }.into());
    }
    // Read before the file goes, to name the working directory that is kept.
    let working_dir = crate::config::load_named(dirs, name).ok().map(|s| s.working_dir);
    match std::fs::remove_file(&file) {
        Ok(()) => println!("removed {}", file.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => println!("{} did not exist", file.display()),
        Err(e) => return Err(Error::io("remove", &file, e)),
    }
    if purge {
        purge_state(dirs, name)?;
        // What stasis created for this service alone goes: its state dir, and the working
        // directory `add` made under STATE/work unless another service works in it (or a
        // service file cannot be read to tell). A working directory the service file names may
        // be another service's too, or hold its data: it is kept.
        let default_work = dirs.state_dir.join("work").join(name);
        if default_work.is_dir() && !used_by_another(dirs, name, &default_work) {
            std::fs::remove_dir_all(&default_work).map_err(|e| Error::io("remove", &default_work, e))?;
            println!("removed {}", default_work.display());
        }
        let kept: BTreeSet<_> = working_dir
            .into_iter()
            .filter(|d| d != Path::new("/"))
            .chain([default_work])
            .filter(|d| d.exists())
            .collect();
        for d in kept {
            println!(
                "kept working directory {} (another service may use it; remove it by hand if none does)",
                d.display()
            );
        }
    } else if paths.root.exists() {
        println!("kept checkpoints and logs in {} (remove them with --purge)", paths.root.display());
    }
    Ok(exit_codes::OK)
}

/// Whether a service other than `name` has its working directory in `dir`, or may have: a
/// service file that cannot be read counts as one.
fn used_by_another(dirs: &Dirs, name: &str, dir: &Path) -> bool {
    let Ok(files) = crate::config::discover(dirs) else { return true };
    files.iter().any(|f| match crate::config::service_name_from_path(f) {
        Ok(other) if other == name => false,
        Ok(other) => crate::config::load_named(dirs, &other).map_or(true, |s| s.working_dir.starts_with(dir)),
        Err(_) => true,
    })
}

/// Deletes STATE/services/NAME after releasing the network locks of its checkpoints (they will
/// never be restored) and forgetting their owner records.
fn purge_state(dirs: &Dirs, name: &str) -> Result<(), Error> {
    let paths = dirs.service(name);
    for dir in [paths.checkpoints(), paths.quarantine()] {
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.filter_map(Result::ok) {
                let never = crate::criu::network_lock::LockEnd::NeverRestored;
                let _ = crate::criu::network_lock::end(&dirs.state_dir, &e.path(), never);
            }
        }
    }
    if paths.root.exists() {
        std::fs::remove_dir_all(&paths.root).map_err(|e| Error::io("remove", &paths.root, e))?;
        println!("removed {}", paths.root.display());
    }
    Ok(())
}

fn create_system_user(user: &str, home: &Path) -> Result<(), Error> {
    let status = Command::new("useradd")
        .args(["--system", "--user-group", "--no-create-home", "--shell", "/usr/sbin/nologin", "--home-dir"])
        .arg(home)
        .arg(user)
        .status()
        .map_err(|e| Error::io("run", "useradd", e))?;
    if !status.success() {
        return Err(Error::Refused(format!("failed to create user {user}: useradd exited with {status}")));
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode));
}
