//! Installing the `redirect-cni` plugin on a node, as istio-cni's installer
//! does: the binary copied into the CNI bin dir, an entry appended to the
//! `plugins` of the conflist the runtime uses (the first configuration file
//! of the conf dir, by name), and both removed again on uninstall.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Map, Value, json};

use crate::cni::ANNOTATIONS_CAPABILITY;

/// The plugin's type (and binary name).
pub const PLUGIN_TYPE: &str = "redirect-cni";

/// The configuration file a runtime uses: the first `.conflist`, `.conf`
/// or `.json` file of `dir` by name (as containerd and kubelet pick it).
pub fn primary_conf(dir: &Path) -> Result<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("--cni-conf-dir {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// Writes `value` to `path` through a temporary file and a rename, so a
/// runtime reading it sees the old or the new file, never half of one.
fn write_atomic(path: &Path, value: &Value) -> Result<()> {
    let tmp = path.with_extension("redirect-tmp");
    let text = serde_json::to_string_pretty(value)? + "\n";
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

/// A conflist's plugins with `redirect-cni` removed, and whether it was
/// there.
fn without_us(plugins: &[Value]) -> (Vec<Value>, bool) {
    let kept: Vec<Value> = plugins
        .iter()
        .filter(|p| p["type"] != PLUGIN_TYPE)
        .cloned()
        .collect();
    let had = kept.len() != plugins.len();
    (kept, had)
}

/// Adds the plugin (with `config`'s keys) at the end of the primary conflist
/// of `conf_dir`, converting a single-plugin `.conf` into a `.conflist`.
/// Returns the file written. Running it again replaces the entry.
pub fn add_to_conflist(conf_dir: &Path, config: &Map<String, Value>) -> Result<PathBuf> {
    let Some(path) = primary_conf(conf_dir)? else {
        bail!(
            "no CNI configuration in {} yet (the pod network's own plugin writes it first)",
            conf_dir.display()
        );
    };
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut conf: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a JSON CNI configuration", path.display()))?;
    let (target, mut list) = if conf.get("plugins").is_some() {
        (path.clone(), conf)
    } else {
        // A single plugin: wrap it into a list (the runtime prefers the
        // .conflist name; the .conf is removed once the list is written).
        let version = conf["cniVersion"].clone();
        let name = conf["name"].clone();
        if let Some(m) = conf.as_object_mut() {
            m.remove("cniVersion");
            m.remove("name");
        }
        (
            path.with_extension("conflist"),
            json!({"cniVersion": version, "name": name, "plugins": [conf]}),
        )
    };
    let plugins = list["plugins"]
        .as_array()
        .with_context(|| format!("{}: plugins is not a list", path.display()))?;
    let (mut plugins, _) = without_us(plugins);
    let mut ours = Map::new();
    ours.insert("type".into(), PLUGIN_TYPE.into());
    ours.insert(
        "capabilities".into(),
        json!({ ANNOTATIONS_CAPABILITY: true }),
    );
    for (k, v) in config {
        ours.insert(k.clone(), v.clone());
    }
    plugins.push(Value::Object(ours));
    list["plugins"] = Value::Array(plugins);
    write_atomic(&target, &list)?;
    if target != path {
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(target)
}

/// Whether the primary conflist of `conf_dir` has the plugin.
pub fn in_conflist(conf_dir: &Path) -> bool {
    let Ok(Some(path)) = primary_conf(conf_dir) else {
        return false;
    };
    fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["plugins"].as_array().cloned())
        .is_some_and(|p| without_us(&p).1)
}

/// Removes the plugin from every conflist of `conf_dir`; returns the files
/// changed.
pub fn remove_from_conflists(conf_dir: &Path) -> Result<Vec<PathBuf>> {
    let mut changed = Vec::new();
    let Ok(entries) = fs::read_dir(conf_dir) else {
        return Ok(changed);
    };
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("conflist") {
            continue;
        }
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let Ok(mut list) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let Some(plugins) = list["plugins"].as_array() else {
            continue;
        };
        let (kept, had) = without_us(plugins);
        if had {
            list["plugins"] = Value::Array(kept);
            write_atomic(&path, &list)?;
            changed.push(path);
        }
    }
    Ok(changed)
}

/// Copies `exe` to `bin_dir/redirect-cni` (atomically, mode 0755).
pub fn copy_binary(exe: &Path, bin_dir: &Path) -> Result<PathBuf> {
    let target = bin_dir.join(PLUGIN_TYPE);
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
    fs::copy(exe, &tmp).with_context(|| {
        format!(
            "copying {} to {} (--cni-bin-dir)",
            exe.display(),
            tmp.display()
        )
    })?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))?;
    fs::rename(&tmp, &target).with_context(|| format!("replacing {}", target.display()))?;
    Ok(target)
}

/// Removes `bin_dir/redirect-cni`, if there.
pub fn remove_binary(bin_dir: &Path) -> Result<()> {
    let target = bin_dir.join(PLUGIN_TYPE);
    match fs::remove_file(&target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", target.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rdt-cniconf-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn config() -> Map<String, Value> {
        json!({"node_pin_dir": "/sys/fs/bpf/redirect/node"})
            .as_object()
            .unwrap()
            .clone()
    }

    #[test]
    fn appended_once_to_the_first_conflist_and_removed() {
        let d = dir("list");
        let bridge = json!({"cniVersion": "1.0.0", "name": "containerd-net", "plugins": [
            {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
            {"type": "portmap", "capabilities": {"portMappings": true}}]});
        fs::write(d.join("10-containerd-net.conflist"), bridge.to_string()).unwrap();
        fs::write(d.join("99-other.conflist"), bridge.to_string()).unwrap();
        for _ in 0..2 {
            let p = add_to_conflist(&d, &config()).unwrap();
            assert_eq!(p, d.join("10-containerd-net.conflist"));
        }
        let v: Value = serde_json::from_str(
            &fs::read_to_string(d.join("10-containerd-net.conflist")).unwrap(),
        )
        .unwrap();
        let plugins = v["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[2]["type"], PLUGIN_TYPE);
        assert_eq!(plugins[2]["capabilities"][ANNOTATIONS_CAPABILITY], true);
        assert_eq!(plugins[2]["node_pin_dir"], "/sys/fs/bpf/redirect/node");
        assert!(in_conflist(&d));
        assert_eq!(remove_from_conflists(&d).unwrap().len(), 1);
        assert!(!in_conflist(&d));
        let v: Value = serde_json::from_str(
            &fs::read_to_string(d.join("10-containerd-net.conflist")).unwrap(),
        )
        .unwrap();
        assert_eq!(v, bridge);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_single_plugin_conf_becomes_a_list() {
        let d = dir("conf");
        let conf =
            json!({"cniVersion": "0.4.0", "name": "net", "type": "bridge", "bridge": "cni0"});
        fs::write(d.join("10-net.conf"), conf.to_string()).unwrap();
        let p = add_to_conflist(&d, &config()).unwrap();
        assert_eq!(p, d.join("10-net.conflist"));
        assert!(!d.join("10-net.conf").exists());
        let v: Value = serde_json::from_str(&fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["plugins"][0]["type"], "bridge");
        assert_eq!(v["plugins"][1]["type"], PLUGIN_TYPE);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn no_configuration_yet_is_an_error() {
        let d = dir("empty");
        let e = add_to_conflist(&d, &config()).unwrap_err().to_string();
        assert!(e.contains("no CNI configuration"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }
}
