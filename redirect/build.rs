//! Builds the eBPF programs (`redirect-ebpf`) with the nightly toolchain and
//! `bpf-linker` through aya-build, unless the `loader` feature is off (a
//! proxy linking only `original_dst` needs no eBPF toolchain).

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_LOADER");
    if std::env::var_os("CARGO_FEATURE_LOADER").is_none() {
        return Ok(());
    }
    if which_bpf_linker().is_none() {
        anyhow::bail!(
            "bpf-linker is not on PATH: run `cargo xtask setup` (installs bpf-linker 0.10.4 \
             and the nightly rust-src component), or `cargo install bpf-linker --version 0.10.4 --locked`"
        );
    }
    let ebpf = aya_build::Package {
        name: "redirect-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../redirect-ebpf"),
        ..Default::default()
    };
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../redirect-common/src")
    );
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::default())
}

fn which_bpf_linker() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
}
