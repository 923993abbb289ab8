//! Compiles the CRIU schemas (proto/criu, vendored) into prost types: the image files
//! `stasis inspect` reads, the RPC messages `criu swrk` speaks, and the image streamer's. protox is a protobuf compiler
//! in Rust: no `protoc` on the machine is needed. The two sets are separate modules: both define
//! a message named `criu_opts` (an image's and the RPC's), in no package.

fn main() {
    const IMAGES: &[&str] =
        &["inventory.proto", "pstree.proto", "core.proto", "mm.proto", "pagemap.proto", "fdinfo.proto"];
    println!("cargo:rerun-if-changed=proto/criu");
    compile(IMAGES, "images");
    compile(&["rpc.proto", "img-streamer.proto"], "rpc");
}

fn compile(protos: &[&str], into: &str) {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join(into);
    std::fs::create_dir_all(&out).expect("the output directory can be made");
    let files: Vec<String> = protos.iter().map(|f| format!("proto/criu/{f}")).collect();
    let fds = protox::compile(&files, ["proto/criu"]).expect("the vendored CRIU schemas compile");
    prost_build::Config::new().out_dir(&out).compile_fds(fds).expect("prost generates the types");
}
