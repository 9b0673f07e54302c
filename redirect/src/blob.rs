//! Records on bpffs: bpffs holds only BPF objects and directories, so a
//! record of any length is a BPF array made by the loader (read by no
//! program), its bytes cut into equal chunks, and pinned once written.

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use aya::maps::MapInfo;

use crate::sys;

/// Largest chunk (array value) of a record.
const MAX_CHUNK: usize = 64 << 10;
/// Largest record.
pub const MAX_RECORD: usize = 64 << 20;

/// Creates an array named `name` holding `bytes` (length first) and pins it
/// at `path`.
pub fn pin(path: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let total = bytes.len() + 8;
    if total > MAX_RECORD {
        bail!(
            "{}: a record of {} bytes is more than the {} MiB redirect keeps",
            path.display(),
            bytes.len(),
            MAX_RECORD >> 20
        );
    }
    // Round the chunk up to 8 bytes; small records are one chunk.
    let chunk = total.min(MAX_CHUNK).div_ceil(8) * 8;
    let chunks = total.div_ceil(chunk);
    let mut all = Vec::with_capacity(chunk * chunks);
    all.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    all.extend_from_slice(bytes);
    all.resize(chunk * chunks, 0);
    let fd = sys::array_create(name, chunk as u32, chunks as u32)
        .with_context(|| format!("creating the record map for {}", path.display()))?;
    for (i, c) in all.chunks(chunk).enumerate() {
        sys::map_update(&fd, &(i as u32).to_ne_bytes(), c)
            .with_context(|| format!("writing the record {}", path.display()))?;
    }
    // Pinned once written: nobody sees a partial record.
    sys::obj_pin(&fd, path).with_context(|| format!("pinning the record {}", path.display()))
}

/// The bytes of the record pinned at `path`.
pub fn read(path: &Path) -> Result<Vec<u8>> {
    let info = MapInfo::from_pin(path)
        .with_context(|| format!("opening the record {}", path.display()))?;
    let (chunk, chunks) = (info.value_size() as usize, info.max_entries() as usize);
    let fd = sys::obj_get(path, 0).with_context(|| format!("opening {}", path.display()))?;
    let mut all = vec![0u8; chunk * chunks];
    for (i, c) in all.chunks_mut(chunk).enumerate() {
        sys::map_lookup(&fd, &(i as u32).to_ne_bytes(), c)
            .with_context(|| format!("reading the record {}", path.display()))?;
    }
    let Some(len) = all.get(..8) else {
        bail!("{}: an empty record", path.display());
    };
    let len = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
    if len > all.len() - 8 {
        bail!("{}: a record cut short", path.display());
    }
    all.truncate(len + 8);
    all.drain(..8);
    Ok(all)
}

#[cfg(test)]
mod tests {
    #[test]
    fn chunks_cover_the_record() {
        for len in [0usize, 1, 7, 8, 100, 64 << 10, (64 << 10) + 1, 300_000] {
            let total = len + 8;
            let chunk = total.min(super::MAX_CHUNK).div_ceil(8) * 8;
            let chunks = total.div_ceil(chunk);
            assert!(
                chunk * chunks >= total && chunk <= super::MAX_CHUNK,
                "{len}"
            );
            assert!(chunk * chunks - total < chunk, "{len}");
        }
    }
}
