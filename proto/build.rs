//! Compiles the protocol with protox (a pure-Rust protobuf compiler): no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=fedsb");
    let fds = protox::compile(["fedsb/v1/federation.proto"], ["."])?;
    // `bytes` fields decode as `Bytes`: chunks are sliced out of the received buffer, not copied.
    tonic_prost_build::configure().bytes(".").build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
