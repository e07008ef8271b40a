//! Compiles `expertmesh/v1/*.proto` (and the OTLP trace-export subset in `otlp/`) with protox
//! (pure Rust), so building needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "expertmesh/v1/tensor.proto",
        "expertmesh/v1/expert.proto",
        "expertmesh/v1/engine.proto",
        "expertmesh/v1/inference.proto",
        "otlp/trace_export.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["."])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    Ok(())
}
