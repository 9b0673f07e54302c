//! `cargo xtask image`: an OCI image of redirect, written as an OCI archive
//! (an OCI image layout in a tar file) with no registry and no container
//! tool: a static (musl) `redirect` at /usr/local/bin, with the names
//! `istio-iptables` and `redirect-cni` as symlinks to it, on nothing (a
//! `scratch` image). `ctr images import`, `skopeo` and `umoci` read it; the
//! Dockerfile builds the same contents for users with Docker.
//!
//! Every timestamp is 0 and every file's owner root, so the same binary
//! gives the same image digest.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// The musl target the image's binary is built for.
pub const TARGET: &str = "x86_64-unknown-linux-musl";

/// The files of the image's only layer: (path, contents or symlink target).
pub enum Entry {
    /// A directory.
    Dir(String),
    /// An executable file.
    Exe(String, Vec<u8>),
    /// A symlink to a target.
    Link(String, String),
}

fn dir(p: &str) -> Entry {
    Entry::Dir(p.into())
}

fn link(p: &str, target: &str) -> Entry {
    Entry::Link(p.into(), target.into())
}

/// The layer's entries for a `redirect` binary.
pub fn entries(binary: Vec<u8>) -> Vec<Entry> {
    vec![
        dir("usr/"),
        dir("usr/local/"),
        dir("usr/local/bin/"),
        Entry::Exe("usr/local/bin/redirect".into(), binary),
        link("usr/local/bin/istio-iptables", "redirect"),
        link("usr/local/bin/redirect-cni", "redirect"),
        // Where bpffs and the host's cgroup tree are mounted.
        dir("sys/"),
        dir("sys/fs/"),
        dir("sys/fs/bpf/"),
        dir("host/"),
        dir("tmp/"),
    ]
}

/// What an image runs and how it is labelled.
pub struct Config<'a> {
    pub entrypoint: &'a [&'a str],
    pub path: &'a str,
    pub title: &'a str,
}

/// Files by absolute path, with their contents.
pub type Files = Vec<(String, Vec<u8>)>;

/// The layer of the end-to-end test's images (tests/tests/kubernetes.rs):
/// a static busybox (`sh`, `sleep`) and, when given, `redirect-sample` with
/// the shared libraries it links (`libs`: their absolute paths and
/// contents), as a distroless image would hold them.
pub fn test_entries(busybox: Vec<u8>, sample: Option<(Vec<u8>, Files)>) -> Vec<Entry> {
    let mut e = vec![
        dir("bin/"),
        Entry::Exe("bin/busybox".into(), busybox),
        link("bin/sh", "busybox"),
        link("bin/sleep", "busybox"),
        dir("tmp/"),
    ];
    if let Some((sample, libs)) = sample {
        e.extend([
            dir("usr/"),
            dir("usr/local/"),
            dir("usr/local/bin/"),
            Entry::Exe("usr/local/bin/redirect-sample".into(), sample),
        ]);
        let mut dirs: Vec<String> = e
            .iter()
            .filter_map(|e| match e {
                Entry::Dir(d) => Some(d.clone()),
                _ => None,
            })
            .collect();
        for (path, data) in libs {
            let rel = path.trim_start_matches('/').to_string();
            let mut prefix = String::new();
            for part in rel.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
                prefix.push_str(part);
                prefix.push('/');
                if !dirs.contains(&prefix) {
                    e.push(Entry::Dir(prefix.clone()));
                    dirs.push(prefix.clone());
                }
            }
            e.push(Entry::Exe(rel, data));
        }
    }
    e
}

/// A ustar header block for `name`.
fn header(name: &str, mode: u32, size: u64, kind: u8, link: &str) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |h: &mut [u8; 512], at: usize, len: usize, v: u64| {
        let s = format!("{v:0width$o}", width = len - 1);
        h[at..at + len - 1].copy_from_slice(s.as_bytes());
    };
    octal(&mut h, 100, 8, u64::from(mode));
    octal(&mut h, 108, 8, 0); // uid
    octal(&mut h, 116, 8, 0); // gid
    octal(&mut h, 124, 12, size);
    octal(&mut h, 136, 12, 0); // mtime
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    // The checksum counts its own field as spaces.
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// A tar of `files` (name, mode, contents) or layer `entries`.
fn tar(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        match e {
            Entry::Dir(name) => out.extend_from_slice(&header(name, 0o755, 0, b'5', "")),
            Entry::Link(name, target) => {
                out.extend_from_slice(&header(name, 0o777, 0, b'2', target))
            }
            Entry::Exe(name, data) => {
                out.extend_from_slice(&header(name, 0o755, data.len() as u64, b'0', ""));
                out.extend_from_slice(data);
                out.resize(out.len().div_ceil(512) * 512, 0);
            }
        }
    }
    out.resize(out.len() + 1024, 0);
    out
}

/// A tar of plain files (the archive around the layout).
fn tar_files(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut dirs: Vec<String> = Vec::new();
    for (name, data) in files {
        // Parent directories first, once.
        let mut prefix = String::new();
        for part in name.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
            prefix.push_str(part);
            prefix.push('/');
            if !dirs.contains(&prefix) {
                out.extend_from_slice(&header(&prefix, 0o755, 0, b'5', ""));
                dirs.push(prefix.clone());
            }
        }
        out.extend_from_slice(&header(name, 0o644, data.len() as u64, b'0', ""));
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let mut s = String::from("sha256:");
    for b in d {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The OCI archive of an image named `name:tag` holding `binary`.
pub fn archive(binary: Vec<u8>, name: &str, tag: &str) -> Result<Vec<u8>> {
    let config = Config {
        entrypoint: &["/usr/local/bin/redirect"],
        path: "/usr/local/bin",
        title: "redirect",
    };
    archive_of(&entries(binary), &config, name, tag)
}

/// The OCI archive of an image named `name:tag` whose only layer holds
/// `entries`.
pub fn archive_of(entries: &[Entry], config: &Config, name: &str, tag: &str) -> Result<Vec<u8>> {
    let layer = tar(entries);
    let layer_digest = sha256(&layer);
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {
            "Entrypoint": config.entrypoint,
            "Env": [format!("PATH={}", config.path)],
            "WorkingDir": "/",
            "Labels": {
                "org.opencontainers.image.title": config.title,
                "org.opencontainers.image.version": tag,
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "cargo xtask image"}],
    }))?;
    let config_digest = sha256(&config);
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest,
            "size": layer.len(),
        }],
    }))?;
    let manifest_digest = sha256(&manifest);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {
                "org.opencontainers.image.ref.name": tag,
                "io.containerd.image.name": format!("docker.io/library/{name}:{tag}"),
            },
        }],
    }))?;
    let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
    Ok(tar_files(&[
        (
            "oci-layout".into(),
            br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
        ),
        ("index.json".into(), index),
        (blob(&manifest_digest), manifest),
        (blob(&config_digest), config),
        (blob(&layer_digest), layer),
    ]))
}

/// Writes the archive of `binary` to `out`; returns the manifest's digest
/// line for the log.
pub fn write(binary: &Path, out: &Path, name: &str, tag: &str) -> Result<PathBuf> {
    let data = std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?;
    let archive = archive(data, name, tag)?;
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, &archive).with_context(|| format!("writing {}", out.display()))?;
    Ok(out.to_path_buf())
}

/// The name of the end-to-end test's pause image (the CRI sandbox image).
pub const TEST_PAUSE: &str = "redirect-test-pause";
/// The name of the end-to-end test's app and proxy image.
pub const TEST_APP: &str = "redirect-test-app";

/// Writes the end-to-end test's two images to `dir`: a pause image (busybox
/// sleeping) and an image with `sample` (a dynamically linked
/// `redirect-sample`) and its libraries, found with `ldd`.
pub fn write_test_images(sample: &Path, dir: &Path, tag: &str) -> Result<()> {
    let busybox = std::fs::read("/bin/busybox")
        .context("reading /bin/busybox (Debian's busybox-static or busybox)")?;
    let ldd = std::process::Command::new("ldd")
        .arg(sample)
        .output()
        .context("ldd")?;
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
        // "/lib64/ld-linux-x86-64.so.2 (0x...)"; not linux-vdso.
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
            libs.push((path.to_string(), data));
        }
    }
    if libs.is_empty() {
        bail!("ldd {} found no libraries", sample.display());
    }
    std::fs::create_dir_all(dir)?;
    // The pause image: busybox's sleep as the sandbox's process.
    let pause = archive_of(
        &test_entries(busybox.clone(), None),
        &Config {
            entrypoint: &["/bin/sleep", "2147483647"],
            path: "/bin",
            title: TEST_PAUSE,
        },
        TEST_PAUSE,
        tag,
    )?;
    std::fs::write(dir.join(format!("{TEST_PAUSE}.oci.tar")), pause)?;
    let sample = std::fs::read(sample).with_context(|| format!("reading {}", sample.display()))?;
    let app = archive_of(
        &test_entries(busybox, Some((sample, libs))),
        &Config {
            entrypoint: &["/bin/sleep", "2147483647"],
            path: "/usr/local/bin:/bin",
            title: TEST_APP,
        },
        TEST_APP,
        tag,
    )?;
    std::fs::write(dir.join(format!("{TEST_APP}.oci.tar")), app)?;
    Ok(())
}

/// The index of an archive written by [`archive`], for the tests: the
/// layout parsed back.
#[cfg(test)]
fn read_index(archive: &[u8]) -> Option<serde_json::Value> {
    let mut at = 0;
    while at + 512 <= archive.len() {
        let h = &archive[at..at + 512];
        if h.iter().all(|&b| b == 0) {
            return None;
        }
        let name = String::from_utf8_lossy(&h[..100])
            .trim_end_matches('\0')
            .to_string();
        let size = u64::from_str_radix(
            String::from_utf8_lossy(&h[124..135]).trim_end_matches('\0'),
            8,
        )
        .ok()? as usize;
        if name == "index.json" {
            return serde_json::from_slice(&archive[at + 512..at + 512 + size]).ok();
        }
        at += 512 + size.div_ceil(512) * 512;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_binary_same_digest_and_the_index_names_the_image() {
        let a = archive(b"\x7fELF-not-really".to_vec(), "redirect", "0.1.0").unwrap();
        let b = archive(b"\x7fELF-not-really".to_vec(), "redirect", "0.1.0").unwrap();
        assert_eq!(a, b);
        let index = read_index(&a).unwrap();
        assert_eq!(
            index["manifests"][0]["annotations"]["io.containerd.image.name"],
            "docker.io/library/redirect:0.1.0"
        );
    }

    #[test]
    fn tar_headers_checksum() {
        let h = header("usr/", 0o755, 0, b'5', "");
        let mut copy = h;
        copy[148..156].copy_from_slice(b"        ");
        let sum: u32 = copy.iter().map(|&b| u32::from(b)).sum();
        let stored = u32::from_str_radix(String::from_utf8_lossy(&h[148..154]).trim(), 8).unwrap();
        assert_eq!(sum, stored);
    }
}
