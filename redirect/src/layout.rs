//! What lives where in a pin dir, and which pin dir a pod gets by default.
//!
//! ```text
//! /sys/fs/bpf/redirect/           default root, one pin dir per pod below it
//!   cgroup-<cgroup id>/           a pin dir (the default name; --pin-dir overrides)
//!     POD                         the pod it belongs to (pod_record.rs)
//!     state/                      connection state, kept across re-apply
//!     gen-<N>/                    one per apply
//!       CONFIG PORTS ...          policy maps
//!       prog_* link_*             programs and links
//!       complete                  pinned last: every link of gen-<N> is in place
//! ```
//!
//! A generation without `complete` was interrupted (the loader was killed
//! between two links) or is being built right now: it may hold some links
//! and not others. It is never "the current generation"; the next `apply`
//! retires it like any older generation, and `remove` removes it.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::{apply::PROGRAMS, fs::check_cgroup};

/// Where the default pin dirs live: `<root>/cgroup-<cgroup id>`.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/redirect";

/// Name of the pod record pinned at the top of a pin dir.
pub const POD_PIN: &str = "POD";

/// Name of the completion marker pinned in a generation's directory.
pub const COMPLETE_PIN: &str = "complete";

/// The default pin dir of the pod whose cgroup v2 directory is `cgroup`:
/// `/sys/fs/bpf/redirect/cgroup-<cgroup id>`, the cgroup id being the
/// directory's inode number. Two pods never share it.
pub fn default_pin_dir(cgroup: &Path) -> Result<PathBuf> {
    check_cgroup(cgroup)?;
    let id = fs::metadata(cgroup)
        .with_context(|| format!("--cgroup {}: cannot read it", cgroup.display()))?
        .ino();
    Ok(Path::new(DEFAULT_PIN_ROOT).join(format!("cgroup-{id}")))
}

/// Whether [`DEFAULT_PIN_ROOT`] itself holds an apply: the default pin dir
/// of versions of redirect before per-pod pin dirs. Pods applied there and
/// in a per-pod pin dir below it would have two sets of programs attached.
pub fn old_default_in_use() -> bool {
    let old = Layout::new(Path::new(DEFAULT_PIN_ROOT));
    old.state_dir().exists() || !old.generations().unwrap_or_default().is_empty()
}

/// The pin directory's layout.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Layout rooted at `pin_dir`.
    pub fn new(pin_dir: &Path) -> Self {
        Layout {
            root: pin_dir.to_path_buf(),
        }
    }

    /// The pin dir itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of the state maps.
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }

    /// The pinned pod record.
    pub fn pod_record(&self) -> PathBuf {
        self.root.join(POD_PIN)
    }

    /// Directory of generation `n`.
    pub fn gen_dir(&self, n: u64) -> PathBuf {
        self.root.join(format!("gen-{n}"))
    }

    /// The completion marker of generation `n`.
    pub fn complete_marker(&self, n: u64) -> PathBuf {
        self.gen_dir(n).join(COMPLETE_PIN)
    }

    /// Existing generations, complete or not, oldest first.
    pub fn generations(&self) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("reading {}", self.root.display())),
        };
        for entry in entries {
            let name = entry?.file_name();
            if let Some(n) = name.to_str().and_then(|s| s.strip_prefix("gen-"))
                && let Ok(n) = n.parse()
            {
                out.push(n);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Whether generation `n` was completed: its marker is pinned. A pin
    /// dir made before markers existed has no pod record either; there a
    /// generation with every link of [`PROGRAMS`] pinned counts as complete.
    pub fn is_complete(&self, n: u64) -> bool {
        if self.complete_marker(n).exists() {
            return true;
        }
        !self.pod_record().exists()
            && PROGRAMS
                .iter()
                .all(|(_, _, short)| self.gen_dir(n).join(format!("link_{short}")).exists())
    }

    /// Generations that were started and never completed, oldest first.
    pub fn incomplete(&self) -> Result<Vec<u64>> {
        Ok(self
            .generations()?
            .into_iter()
            .filter(|g| !self.is_complete(*g))
            .collect())
    }

    /// The generation in force: the newest complete one, if any.
    pub fn current(&self) -> Result<Option<u64>> {
        Ok(self
            .generations()?
            .into_iter()
            .rev()
            .find(|g| self.is_complete(*g)))
    }
}

/// The pin tree of one pod, as `docs/design.md` shows it (between its
/// `pin-layout` markers; `cargo xtask docs` rewrites that block from this,
/// and `redirect/tests/design_doc.rs` fails when the two differ). Built from
/// the code's own lists: the state and policy maps of
/// [`redirect_common::map_names`], the programs of [`PROGRAMS`] in attach
/// order, and the names [`Layout`] gives its entries.
pub fn render_tree() -> String {
    use redirect_common::map_names;
    let names = Layout::new(Path::new(""));
    let file = |p: PathBuf| {
        p.file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into())
    };
    // `gen-<N>`: a generation's directory, its number left open.
    let generation = file(names.gen_dir(0));
    let generation = format!("{}<N>", generation.strip_suffix('0').unwrap_or(&generation));
    let programs: Vec<&str> = PROGRAMS.iter().map(|(_, _, short)| *short).collect();
    let mut rows: Vec<(String, &str)> = vec![
        (
            format!("{DEFAULT_PIN_ROOT}/"),
            "default root (0700), one pin dir per pod below it",
        ),
        // Named as `default_pin_dir` names it.
        (
            "  cgroup-<cgroup id>/".into(),
            "a pod's default pin dir; --pin-dir picks another",
        ),
        (
            format!("    {}", file(names.pod_record())),
            "the pod it belongs to",
        ),
        (
            format!("    {}/", file(names.state_dir())),
            "state maps, kept across re-apply",
        ),
    ];
    rows.extend(wrap("      ", &map_names::STATE));
    rows.push((format!("    {generation}/"), "one per apply"));
    rows.extend(wrap("      ", &map_names::POLICY));
    rows.push((
        "      prog_<name> link_<name>".into(),
        "for each program, in attach order:",
    ));
    rows.extend(wrap("        ", &programs));
    rows.push((
        format!("      {}", file(names.complete_marker(0))),
        "pinned last; the newest complete generation is in force",
    ));
    // The node install (`redirect node install`), by default beside them.
    let node = crate::node::NodeLayout::new(Path::new(""));
    let node_dir = Path::new(crate::node::DEFAULT_NODE_PIN_DIR)
        .strip_prefix(DEFAULT_PIN_ROOT)
        .map_or_else(
            |_| crate::node::DEFAULT_NODE_PIN_DIR.into(),
            |p| p.display().to_string(),
        );
    let node_programs: Vec<String> = PROGRAMS
        .iter()
        .filter(|(_, attach, _)| !attach.on_netns())
        .map(|(_, _, short)| format!("link_{short}"))
        .collect();
    let node_programs: Vec<&str> = node_programs.iter().map(String::as_str).collect();
    rows.push((
        format!("  {node_dir}/"),
        "the node install; --pin-dir picks another",
    ));
    rows.push((
        format!("    {}", file(node.record())),
        "the node record: cgroup, capacities",
    ));
    rows.push((
        format!("    {}/", file(names.state_dir())),
        "state maps, as above, for every pod",
    ));
    rows.push((
        format!("    {}/", file(node.policy_dir())),
        "the policy maps above, one set for every pod",
    ));
    rows.push((format!("    {generation}/"), "one per install"));
    rows.push(("      prog_<name>".into(), "every program, as above"));
    rows.extend(wrap("      ", &node_programs));
    rows.push((
        format!("      {}", file(names.complete_marker(0))),
        "pinned last",
    ));
    rows.push((
        format!("    {}/<netns cookie>/", file(node.pods_dir())),
        "one per registered pod",
    ));
    rows.push((
        format!("      {} link_sk_lookup", crate::pods::RECORD),
        "its record (namespace, policy entries); sk_lookup on its namespace",
    ));
    let width = rows
        .iter()
        .filter(|(_, note)| !note.is_empty())
        .map(|(row, _)| row.len())
        .max()
        .unwrap_or(0)
        + 2;
    let mut out = String::new();
    for (row, note) in rows {
        let line = format!("{row:width$}{note}");
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `words` in rows of at most 72 characters, each starting with `indent`.
fn wrap(indent: &str, words: &[&str]) -> Vec<(String, &'static str)> {
    let mut rows = Vec::new();
    let mut row = String::from(indent);
    for word in words {
        if row.len() > indent.len() && row.len() + 1 + word.len() > 72 {
            rows.push((std::mem::replace(&mut row, indent.into()), ""));
        }
        if row.len() > indent.len() {
            row.push(' ');
        }
        row.push_str(word);
    }
    if row.len() > indent.len() {
        rows.push((row, ""));
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pin_dir_is_per_cgroup() {
        let e = default_pin_dir(Path::new("/nonexistent/cg"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--cgroup /nonexistent/cg"), "{e}");
        if let Some(root) = crate::fs::cgroup2_mount() {
            let id = fs::metadata(&root).unwrap().ino();
            assert_eq!(
                default_pin_dir(&root).unwrap(),
                PathBuf::from(format!("/sys/fs/bpf/redirect/cgroup-{id}"))
            );
        }
    }

    #[test]
    fn generations_in_a_plain_directory() {
        // Outside bpffs, directories stand in for the pins.
        let dir = std::env::temp_dir().join(format!("redirect-layout-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let l = Layout::new(&dir);
        assert_eq!(l.current().unwrap(), None);
        for g in [1, 2, 10] {
            fs::create_dir_all(l.gen_dir(g)).unwrap();
        }
        fs::create_dir(dir.join("gen-x")).unwrap();
        fs::write(l.pod_record(), b"").unwrap();
        fs::write(l.complete_marker(2), b"").unwrap();
        assert_eq!(l.generations().unwrap(), vec![1, 2, 10]);
        assert_eq!(l.incomplete().unwrap(), vec![1, 10]);
        assert_eq!(l.current().unwrap(), Some(2), "gen-10 is not complete");
        // No pod record: a pin dir of an older version, where every link
        // pinned means complete.
        fs::remove_file(l.pod_record()).unwrap();
        for (_, _, short) in PROGRAMS {
            fs::write(l.gen_dir(10).join(format!("link_{short}")), b"").unwrap();
        }
        assert_eq!(l.current().unwrap(), Some(10));
        assert_eq!(l.incomplete().unwrap(), vec![1]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
