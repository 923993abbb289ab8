//! `stasis`: process checkpoint manager, a thin binary over the library (src/lib.rs). It is
//! also the namespace init of a tree started without the small `stasis-init` copy; that hidden
//! role is dispatched before anything else starts.

fn main() {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    // The namespace init must stay tiny and must not start a runtime: it becomes part of
    // every checkpoint image.
    if args.get(1).is_some_and(|a| a == stasis::process::ns_init::ARGV_MARKER) {
        stasis::process::ns_init::main(&args[2..]);
    }
    std::process::exit(stasis::cli::run(args));
}
