//! `stasis-init`: the init of a service's PID namespace, and nothing else: no runtime, no CLI.
//! Every checkpoint maps it, so it is kept small; the supervisor runs it from a
//! content-addressed copy under the state dir (see `process/init_binary.rs`).

#[path = "../process/ns_init.rs"]
// Shared with the supervisor, which uses the constants this binary does not need.
#[allow(dead_code)]
mod ns_init;

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == ns_init::ARGV_MARKER) {
        ns_init::main(&args[2..]);
    }
    eprintln!("stasis-init: refusing to run: this is the init of a service's PID namespace, started by the stasis supervisor, not by hand");
    std::process::exit(2);
}
