//! `stasis`: process checkpoint manager. The binary is also the namespace init and CRIU's
//! action script; those hidden roles are dispatched before anything else starts.

mod cli;
mod config;
mod criu;
mod error;
mod exit_codes;
#[cfg(test)]
mod fuzz;
mod paths;
mod proc_maps;
mod process;
mod store;
mod supervisor;
mod text;
mod time_fmt;

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The namespace init must stay tiny and must not start a runtime: it becomes part of
    // every checkpoint image.
    if args.get(1).is_some_and(|a| a == process::ns_init::ARGV_MARKER) {
        process::ns_init::main(&args[2..]);
    }
    std::process::exit(cli::run(args));
}
