//! Compiles `proto/*.proto` with protox, a pure-Rust protobuf compiler, so the
//! server builds without a system `protoc`, into the prost types and, from
//! the same descriptors, their proto3 JSON serde implementations (pbjson)
//! for the `relay.v1.json` subprotocol; records the git commit for the
//! build-info metric.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // The commit in relay_build_info; "unknown" outside a git checkout.
    println!("cargo:rerun-if-changed=.git/HEAD");
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=RELAY_GIT_COMMIT={commit}");
    let descriptors = protox::compile(["proto/relay.proto", "proto/cluster.proto"], ["proto"])?;
    let files = descriptors.file.clone();
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    // Strict, as the proto3 JSON mapping allows: unknown fields and enum
    // values the schema does not name are errors, not silently dropped.
    let mut json = pbjson_build::Builder::new();
    for file in files {
        json.register_file_descriptor(file);
    }
    json.build(&[".relay.v1"])?;
    Ok(())
}
