//! Compiles the CRIU image schemas `stasis inspect` reads (proto/criu, vendored) into prost
//! types. protox is a protobuf compiler in Rust: no `protoc` on the machine is needed.

fn main() {
    const READ: &[&str] =
        &["inventory.proto", "pstree.proto", "core.proto", "mm.proto", "pagemap.proto", "fdinfo.proto"];
    println!("cargo:rerun-if-changed=proto/criu");
    let files: Vec<String> = READ.iter().map(|f| format!("proto/criu/{f}")).collect();
    let fds = protox::compile(&files, ["proto/criu"]).expect("the vendored CRIU schemas compile");
    prost_build::Config::new().compile_fds(fds).expect("prost generates the image types");
}
