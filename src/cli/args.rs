//! The command line. `--help` on each command is the quick reference; docs/ has the manual.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

const AFTER_HELP: &str = "\
Service files live in the config dir as NAME.yaml, e.g. /etc/stasis/services/redis.yaml:
    command: [\"/usr/bin/redis-server\", \"--port\", \"6390\", \"--save\", \"\", \"--appendonly\", \"no\"]
    user: redis
    kill_port: 7390

Typical use:
    stasis start redis          restore the latest fresh, verified checkpoint, or cold-launch
    telnet 127.0.0.1 7390       checkpoint and stop (same as `stasis stop redis`)
    stasis status redis --json  state, pid, where it started from, latest checkpoint
    stasis stop --all           checkpoint every running service (before a reboot)
    stasis restart redis        checkpoint, stop and restore it (--cold: without its memory)
    stasis checkpoints redis    its checkpoints (fresh or stale) and the quarantined ones
    stasis metrics              Prometheus text for every service

Exit codes: 0 ok, 2 usage, 3 bad config, 4 already running, 5 checkpoint failed,
6 start failed, 7 host not ready (root, CRIU, port), 8 not running, 9 store damaged or full,
10 restore refused (start --from, on_incompatible: fail).
See docs/exit-codes.md.";

#[derive(Debug, Parser)]
#[command(name = "stasis", version, about = "Keep a Linux service's memory across restarts and reboots, with CRIU checkpoints.", after_help = AFTER_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub dirs: DirArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct DirArgs {
    /// Directory of service files (NAME.yaml).
    #[arg(long, global = true, env = "STASIS_CONFIG_DIR", default_value = crate::paths::DEFAULT_CONFIG_DIR, value_name = "DIR")]
    pub config_dir: PathBuf,
    /// Where checkpoints, logs and status live (root-only).
    #[arg(long, global = true, env = "STASIS_STATE_DIR", default_value = crate::paths::DEFAULT_STATE_DIR, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Where locks and control sockets live.
    #[arg(long, global = true, env = "STASIS_RUN_DIR", default_value = crate::paths::DEFAULT_RUN_DIR, value_name = "DIR")]
    pub run_dir: PathBuf,
    /// Directory of CRIU option files named by a service's `criu.config` [default: /etc/stasis/criu-configs,
    /// then /usr/share/stasis/criu-configs, then PREFIX/share/stasis/criu-configs beside the binary,
    /// then the source checkout's criu-configs/].
    #[arg(long, global = true, env = "STASIS_CRIU_CONFIG_DIR", value_name = "DIR")]
    pub criu_config_dir: Option<PathBuf>,
    /// The host's settings (max_concurrent_dumps, max_concurrent_restores); missing means defaults.
    #[arg(long, global = true, env = "STASIS_HOST_CONFIG", default_value = crate::config::host::DEFAULT_HOST_CONFIG, value_name = "FILE")]
    pub host_config: PathBuf,
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The new service's name (letters a-z, digits, '-', '_', '.').
    pub name: String,
    /// The service user.
    #[arg(long)]
    pub user: String,
    /// Create the user as a system user without a login shell (useradd --system) if it does not exist.
    #[arg(long)]
    pub create_user: bool,
    /// The service's group [default: the user's primary group].
    #[arg(long)]
    pub group: Option<String>,
    /// Loopback TCP port whose connections checkpoint and stop the service.
    #[arg(long, value_name = "PORT")]
    pub kill_port: u16,
    /// Working directory [default: STATE_DIR/work/NAME, created and owned by the user].
    #[arg(long, value_name = "DIR")]
    pub working_dir: Option<PathBuf>,
    /// Environment variable for the service (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub environment: Vec<String>,
    /// CRIU option file to use (a NAME.conf in the CRIU config dir).
    #[arg(long, value_name = "NAME")]
    pub criu_config: Option<String>,
    /// Replace an existing service file.
    #[arg(long)]
    pub force: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a service: restore its latest fresh checkpoint, or cold-launch it.
    ///
    /// Returns once the service runs. A checkpoint is restored only if it is fresh (the service
    /// has not run since it was taken; `restore_stale: true` allows stale ones), every image
    /// matches its checksum, and the executables it maps are unchanged on disk. Damaged
    /// checkpoints are quarantined and the previous allowed one is tried; a checkpoint that does
    /// not fit the program is kept and marked incompatible; then the service is cold-launched,
    /// and `fallback_reason` (here and in `status`) says why. A restore that fails because of
    /// the host (a port in use, no memory) keeps the checkpoint and fails with exit 6.
    Start {
        /// The service: NAME.yaml in the config dir.
        #[arg(required_unless_present = "all")]
        name: Option<String>,
        /// Start every configured service that is not running, at once (restores share the
        /// host's max_concurrent_restores slots): a line per service, a summary, exit 6 naming the
        /// ones that failed; with --json {"services": [{"name", "ok", "started_from", "checkpoint",
        /// "bytes", "seconds", "error", "fallback_reason"}]}.
        #[arg(long, conflicts_with_all = ["name", "from", "foreground"])]
        all: bool,
        /// Restore this checkpoint (an id from `stasis checkpoints NAME`), even a stale one;
        /// if it cannot be restored nothing is started (exit 10).
        #[arg(long, value_name = "ID")]
        from: Option<String>,
        /// With --from: the checkpoint may be a quarantined one. It is verified first (the
        /// manifest's own checksum, every image against its checksum, the programs it maps
        /// unchanged) and moved back into the store; one that fails stays quarantined and the
        /// error says why (exit 10). Example: stasis start redis --from 00000042-20261204T191500.123Z --force
        #[arg(long, requires = "from")]
        force: bool,
        /// Run the supervisor in the foreground (for systemd or debugging) instead of in the background.
        #[arg(long)]
        foreground: bool,
        /// Print the result as one JSON document on stdout (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Checkpoint a service and stop it, through its kill port (as `telnet 127.0.0.1 PORT` would).
    ///
    /// Prints the supervisor's lines as they come; exits 0 once the checkpoint is durable and the
    /// service is gone. If the dump fails the service keeps running (exit 5).
    ///
    /// With --no-checkpoint it is the ordinary stop instead (for a service CRIU cannot dump, or
    /// whose memory is not wanted): SIGTERM to every process of the service, SIGKILL after
    /// `stop_timeout_secs`, no checkpoint. Existing checkpoints are older than the run that
    /// ended, so the next `start` cold-starts unless `restore_stale: true`; the output says so.
    ///
    /// Example: stasis stop redis --no-checkpoint
    Stop {
        /// The service: NAME.yaml in the config dir.
        #[arg(required_unless_present = "all")]
        name: Option<String>,
        /// Checkpoint and stop every running service at once, through the host's dump scheduler
        /// (max_concurrent_dumps): a progress bar on a terminal, a line per service as it finishes
        /// (name, OK/ERROR, size, seconds), a summary, exit 5 naming the ones that failed; with
        /// --json {"services": [{"name", "ok", "checkpoint", "bytes", "seconds", "error"}]}.
        #[arg(long, conflicts_with = "name")]
        all: bool,
        /// Stop without a checkpoint: SIGTERM, then SIGKILL after `stop_timeout_secs` (root only).
        /// --json: {"name", "stopped", "checkpoint": null, "how", "newest_checkpoint",
        /// "next_start", "note", "lines"}.
        #[arg(long, conflicts_with = "all")]
        no_checkpoint: bool,
        /// Print the result as one JSON document on stdout (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Stop a service with a checkpoint and start it again from that checkpoint.
    ///
    /// The same as `stasis stop NAME` then `stasis start NAME`: the service keeps its memory. If
    /// the checkpoint fails the service keeps running and is not restarted (exit 5). A service
    /// that is not running is started. --cold stops it without a checkpoint (SIGTERM, SIGKILL
    /// after `stop_timeout_secs`) and cold-starts it: fresh memory, checkpoints kept (stale).
    ///
    /// Example: stasis restart redis; stasis restart redis --cold
    ///
    /// --json: {"name", "stopped": {"checkpoint", "cold", "was_running"}, "start": {what `start --json` prints}}.
    Restart {
        /// The service: NAME.yaml in the config dir.
        name: String,
        /// Without a checkpoint, and start with fresh memory.
        #[arg(long)]
        cold: bool,
        /// Print the result as one JSON document on stdout (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Take a checkpoint and leave the service running.
    Checkpoint {
        /// The service: NAME.yaml in the config dir.
        name: String,
        /// Print the result as one JSON document on stdout (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Show a service's state; without NAME, every service in the config dir.
    ///
    /// --json fields: name; state (running, stopped, or failed: the service exited by itself, could
    /// not start, or its supervisor died); pid (host PID of the service's main process); started_from
    /// (checkpoint or cold); checkpoint (the latest good checkpoint, or null); checkpoint_fresh (whether
    /// the service has not run since that checkpoint, so the next start restores it); fallback_reason (why the
    /// last start cold-launched although a checkpoint existed); also restored_checkpoint, init_pid,
    /// supervisor_pid, kill_port, since, message.
    Status {
        /// The service: NAME.yaml in the config dir.
        name: Option<String>,
        /// Print the result as one JSON document on stdout (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// List the services in the config dir with their state.
    List {
        /// Print the result as one JSON document on stdout (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// List a service's checkpoints, oldest first, and its quarantined ones; delete or prune them.
    ///
    /// The newest good one is marked with a star. Each is fresh (the service has not run since; `start`
    /// restores it) or stale (with the reason), and may be marked incompatible (the executables
    /// it maps changed on disk). Quarantined ones are listed with the reason; bring one back with
    /// `stasis start NAME --from ID --force` (verified first). --json fields per checkpoint: id,
    /// generation, path, valid, latest, fresh, stale_reason, incompatible, network_lock (the
    /// nftables table holding its TCP connections until it is restored), created_at, kind,
    /// size_bytes, problem; per quarantined one: id, path, reason, valid, problem.
    ///
    /// --delete and --prune need the service stopped (its supervisor may dump or restore at any
    /// moment), release each deleted checkpoint's network-lock table, and refuse without --force
    /// to delete the only fresh checkpoint or the last good one.
    ///
    /// Example: stasis checkpoints redis --delete 00000042-20261204T191500.123Z; stasis checkpoints redis --prune 1
    #[command(group(clap::ArgGroup::new("doomed").args(["delete", "prune"])))]
    Checkpoints {
        /// The service: NAME.yaml in the config dir.
        name: String,
        /// Delete this checkpoint (an id from the list; a quarantined one too).
        #[arg(long, value_name = "ID", conflicts_with = "prune")]
        delete: Option<String>,
        /// Keep the KEEP newest good checkpoints and delete the older ones (damaged ones too).
        #[arg(long, value_name = "KEEP")]
        prune: Option<usize>,
        /// With --delete or --prune: also delete the only fresh checkpoint or the last good one.
        #[arg(long, requires = "doomed")]
        force: bool,
        /// Print the result as one JSON document on stdout (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Tell whether the service can be checkpointed now, and if not what blocks it.
    ///
    /// A dry run: CRIU dumps the running service (which keeps running) into a scratch directory,
    /// which is then thrown away; no checkpoint is added and nothing is counted. A failure names
    /// the cause and the fix when CRIU's log shows a known one (exit 5).
    Doctor {
        /// The service: NAME.yaml in the config dir.
        name: String,
        /// Print the result as one JSON document on stdout (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Show what a checkpoint holds: processes, memory, open files, sockets, namespaces.
    ///
    /// Read from CRIU's images directly (no crit), with the CRIU and kernel versions it was
    /// taken with, whether it is fresh, and whether it fits the programs on disk now.
    Inspect {
        /// The service: NAME.yaml in the config dir.
        name: String,
        /// The checkpoint [default: the newest good one].
        id: Option<String>,
        /// Print the result as one JSON document on stdout (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Write one checkpoint as a single archive (tar + zstd, checksummed) to move it to another host.
    ///
    /// The archive holds the manifest first, then every image; `stasis import` on the other host
    /// checks all of it before adding it. `-o -` writes to standard output, for a pipe:
    /// `stasis export redis -o - | ssh other-host stasis import -`. Both hosts need the same CRIU
    /// (or a newer one where it is imported), the same binaries at the same paths, and the same
    /// state directory (see docs/how-it-works.md, "Moving a checkpoint to another host").
    Export {
        /// The service: NAME.yaml in the config dir.
        name: String,
        /// The checkpoint [default: the newest good one].
        id: Option<String>,
        /// Where to write the archive; `-` for standard output.
        #[arg(short, long, value_name = "FILE")]
        output: String,
        /// Print the result as one JSON document (on stderr with `-o -`, else on stdout).
        #[arg(long)]
        json: bool,
    },
    /// Add a checkpoint from an archive written by `stasis export`, as the service's newest.
    ///
    /// Refused (exit 11, nothing added) if the archive is damaged or not an export, if the
    /// service is not configured on this host, if this host's CRIU is older than the one that
    /// dumped it, or if a binary the checkpoint maps differs here. The next `stasis start NAME`
    /// restores it.
    Import {
        /// The archive; `-` for standard input.
        file: String,
        /// Add it to this service instead of the one named inside.
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
        /// Print the result as one JSON document on stdout (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Print a service's log: its stdout/stderr and what the supervisor did.
    Logs {
        /// The service: NAME.yaml in the config dir.
        name: String,
        /// Only the last N lines.
        #[arg(short = 'n', long, value_name = "N")]
        lines: Option<usize>,
        /// Keep printing new lines as they arrive.
        #[arg(short, long)]
        follow: bool,
    },
    /// Check service files without starting anything: all in the config dir, or the NAMEs/paths given.
    Validate {
        /// Service names or paths to service files [default: every NAME.yaml in the config dir].
        targets: Vec<String>,
        /// Print the result as one JSON document on stdout (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Set up a new service: write NAME.yaml (validated), create its user and directories.
    ///
    /// Example: stasis add redis --user redis --kill-port 7390 -- /usr/bin/redis-server --port 6390 --save ''
    Add(AddArgs),
    /// Remove a service's file (it must be stopped). Its checkpoints are kept unless --purge.
    Remove {
        /// The service: NAME.yaml in the config dir.
        name: String,
        /// Also delete its state dir (STATE/services/NAME: checkpoints, quarantine, logs,
        /// status), releasing the checkpoints' network-lock tables. Never its working directory
        /// or anything else outside that dir (another service may use it); those are named.
        #[arg(long)]
        purge: bool,
    },
    /// Print every service's metrics in the Prometheus text format (stasis_up, checkpoint age,
    /// size and durations, restore and cold-start counts, failures).
    ///
    /// For node_exporter's textfile collector, set `metrics_file: /path/stasis.prom` in the host
    /// config (/etc/stasis/stasis.yaml): the supervisors rewrite it atomically after every start,
    /// checkpoint and stop.
    Metrics,
    /// Find CRIU network-lock tables whose checkpoint no longer exists; --yes deletes them.
    ///
    /// Each checkpoint taken by a stop holds an nftables table `inet CRIU-...` (its TCP
    /// connections) until it is restored or deleted. Tables of checkpoints deleted by hand stay
    /// for good and slow every later dump on the host. Retention, quarantine and `checkpoints
    /// --delete` release their own; this finds the rest. A table is deleted only if this state
    /// dir recorded it as its own (when the dump took it) and its checkpoint is gone; tables of
    /// other state dirs or of other programs are listed as not ours and never deleted.
    /// --json: {"orphaned_tables", "kept_tables", "not_ours_tables", "deleted"}.
    Gc {
        /// Delete the orphaned tables instead of only listing them.
        #[arg(long)]
        yes: bool,
        /// Print the result as one JSON document on stdout (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Print an LSB init script for hosts without systemd: `start` runs `stasis start`, `stop` is the kill port.
    ///
    /// Install it with: stasis init-script NAME > /etc/init.d/stasis-NAME && chmod 755 /etc/init.d/stasis-NAME
    InitScript { name: String },
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout.
    Completions { shell: clap_complete::Shell },
    /// Write man pages (stasis.1 and one per command) into DIR.
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Run a supervisor (used by `start`).
    #[command(name = "__supervise", hide = true)]
    Supervise {
        name: String,
        #[arg(long)]
        from: Option<String>,
        /// Cold-start, whatever checkpoints there are (`restart --cold`).
        #[arg(long, conflicts_with = "from")]
        cold: bool,
    },
}
