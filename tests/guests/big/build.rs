//! 16 MiB of pseudo-random bytes for the guest's data section: incompressible, so the component
//! and its precompiled artifact are both multi-megabyte, like a componentize-py tool.

fn main() {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut data = Vec::with_capacity(16 << 20);
    while data.len() < 16 << 20 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR")).join("data.bin");
    std::fs::write(out, data).expect("write data.bin");
    println!("cargo::rerun-if-changed=build.rs");
}
