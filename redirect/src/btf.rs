//! Just enough of the kernel's BTF (`/sys/kernel/btf/vmlinux`) to find where
//! a field lives in a kernel struct on the running kernel: the connect
//! programs follow `sk->sk_socket->file->f_cred` to the credentials the
//! socket was opened with, as iptables' owner match does, and the offsets
//! differ from kernel to kernel.

use std::path::Path;

use anyhow::{Context as _, Result, bail};

const BTF_MAGIC: u16 = 0xeb9f;

// BTF kinds (`BTF_KIND_*`).
const INT: u32 = 1;
const ARRAY: u32 = 3;
const STRUCT: u32 = 4;
const UNION: u32 = 5;
const ENUM: u32 = 6;
const FUNC_PROTO: u32 = 13;
const VAR: u32 = 14;
const DATASEC: u32 = 15;
const DECL_TAG: u32 = 17;
const ENUM64: u32 = 19;

/// One type of the BTF: its name, kind and, for structs and unions, members.
#[derive(Clone, Debug)]
struct Type {
    name: u32,
    kind: u32,
    /// `(name, type id, bit offset)`, for structs and unions.
    members: Vec<(u32, u32, u32)>,
}

/// Parsed BTF types and strings.
pub struct Btf {
    /// Types by id; id 0 is `void`.
    types: Vec<Type>,
    strings: Vec<u8>,
}

impl Btf {
    /// The running kernel's BTF.
    pub fn kernel() -> Result<Btf> {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        let data = std::fs::read(path).with_context(|| {
            format!(
                "reading {} (a kernel built with CONFIG_DEBUG_INFO_BTF is needed to match \
                 owners as iptables does)",
                path.display()
            )
        })?;
        Btf::parse(&data)
    }

    /// Parses native-endian BTF, as the kernel exposes it.
    pub fn parse(data: &[u8]) -> Result<Btf> {
        let u16_at = |o: usize| -> Result<u16> {
            Ok(u16::from_ne_bytes(
                data.get(o..o + 2).context("BTF truncated")?.try_into()?,
            ))
        };
        let u32_at = |o: usize| -> Result<u32> {
            Ok(u32::from_ne_bytes(
                data.get(o..o + 4).context("BTF truncated")?.try_into()?,
            ))
        };
        if u16_at(0)? != BTF_MAGIC {
            bail!("not BTF (bad magic)");
        }
        let hdr_len = u32_at(4)? as usize;
        let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
        let (str_off, str_len) = (u32_at(16)? as usize, u32_at(20)? as usize);
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .context("BTF string section truncated")?
            .to_vec();
        let mut types = vec![Type {
            name: 0,
            kind: 0,
            members: Vec::new(),
        }];
        let (mut o, end) = (hdr_len + type_off, hdr_len + type_off + type_len);
        while o < end {
            let name = u32_at(o)?;
            let info = u32_at(o + 4)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            o += 12;
            let mut members = Vec::new();
            let extra = match kind {
                INT | VAR | DECL_TAG => 4,
                ARRAY => 12,
                STRUCT | UNION => {
                    for i in 0..vlen {
                        let m = o + 12 * i;
                        let offset = u32_at(m + 8)?;
                        // With kind_flag, the low 24 bits are the bit offset.
                        let bits = if kind_flag {
                            offset & 0xff_ffff
                        } else {
                            offset
                        };
                        members.push((u32_at(m)?, u32_at(m + 4)?, bits));
                    }
                    12 * vlen
                }
                ENUM => 8 * vlen,
                FUNC_PROTO => 8 * vlen,
                DATASEC | ENUM64 => 12 * vlen,
                _ => 0,
            };
            o += extra;
            types.push(Type {
                name,
                kind,
                members,
            });
        }
        Ok(Btf { types, strings })
    }

    fn name(&self, off: u32) -> &[u8] {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        &rest[..rest.iter().position(|b| *b == 0).unwrap_or(rest.len())]
    }

    /// The byte offset of `member` in `struct name`, looking into anonymous
    /// structs and unions.
    pub fn member_offset(&self, name: &str, member: &str) -> Result<u32> {
        let id = self
            .types
            .iter()
            .position(|t| t.kind == STRUCT && self.name(t.name) == name.as_bytes())
            .with_context(|| format!("struct {name} not in the kernel's BTF"))?;
        let bits = self
            .find(id, member.as_bytes(), 0)
            .with_context(|| format!("struct {name} has no member {member} in the kernel's BTF"))?;
        if bits % 8 != 0 {
            bail!("{name}.{member} is a bit field");
        }
        Ok(bits / 8)
    }

    fn find(&self, id: usize, member: &[u8], base: u32) -> Option<u32> {
        let t = self.types.get(id)?;
        for &(name, ty, bits) in &t.members {
            if self.name(name) == member {
                return Some(base + bits);
            }
            if name == 0 {
                let inner = self.resolve(ty as usize);
                if matches!(self.types.get(inner)?.kind, STRUCT | UNION)
                    && let Some(found) = self.find(inner, member, base + bits)
                {
                    return Some(found);
                }
            }
        }
        None
    }

    /// An anonymous member's type: BTF points it straight at its anonymous
    /// struct or union.
    fn resolve(&self, id: usize) -> usize {
        match self.types.get(id) {
            Some(t) if matches!(t.kind, STRUCT | UNION) => id,
            _ => usize::MAX,
        }
    }
}

/// `cfg` with the running kernel's [`owner_path`] and
/// `OWNER_FROM_FILE` set, so the connect hooks match owners as iptables
/// does; unchanged, with a warning, where the kernel's BTF cannot say where
/// the credentials are. What `apply` writes and `apply --dry-run` shows.
pub fn with_owner_path(mut cfg: redirect_common::Config) -> redirect_common::Config {
    match owner_path() {
        Ok(path) => {
            cfg.owner_path = path;
            cfg.flags |= redirect_common::config_flags::OWNER_FROM_FILE;
        }
        Err(e) => tracing::warn!(
            "owners are matched by the real UID/GID of the task calling connect(), not by \
             the credentials the socket was opened with as iptables does: {e:#}"
        ),
    }
    cfg
}

/// `cfg` with `-c`'s offset of `ingress_ifindex` in the running kernel's
/// `struct bpf_sk_lookup_kern` (where `sk_lookup` reads the interface a
/// connection arrives on); unchanged without `-c`. An error on a kernel
/// whose `sk_lookup` does not know the interface (before Linux 5.17).
pub fn with_ifindex_offset(mut cfg: redirect_common::Config) -> Result<redirect_common::Config> {
    if !cfg.excludes_interfaces() {
        return Ok(cfg);
    }
    let found =
        Btf::kernel().and_then(|btf| btf.member_offset("bpf_sk_lookup_kern", "ingress_ifindex"));
    let off = match found {
        Ok(o) => o,
        Err(e) => bail!(
            "--exclude-interfaces needs Linux 5.17 or later, whose sk_lookup knows the \
             interface a connection arrives on; this kernel's does not ({e:#})"
        ),
    };
    cfg.ifindex_offset = u16::try_from(off)
        .ok()
        .filter(|o| *o != 0)
        .with_context(|| format!("bpf_sk_lookup_kern.ingress_ifindex at offset {off}"))?;
    Ok(cfg)
}

/// The path from a `struct sock` to its file's credentials on the running
/// kernel.
pub fn owner_path() -> Result<redirect_common::OwnerPath> {
    let btf = Btf::kernel()?;
    let off = |s: &str, m: &str| -> Result<u16> {
        let o = btf.member_offset(s, m)?;
        u16::try_from(o).with_context(|| format!("{s}.{m} at offset {o}"))
    };
    Ok(redirect_common::OwnerPath {
        sk_socket: off("sock", "sk_socket")?,
        socket_file: off("socket", "file")?,
        file_cred: off("file", "f_cred")?,
        cred_fsuid: off("cred", "fsuid")?,
        cred_fsgid: off("cred", "fsgid")?,
        reserved: [0; 3],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_socket_credentials_path_on_this_kernel() {
        let btf = Btf::kernel().expect("this kernel's BTF");
        for (s, m) in [
            ("sock", "sk_socket"),
            ("socket", "file"),
            ("file", "f_cred"),
            ("cred", "fsuid"),
            ("cred", "fsgid"),
        ] {
            let off = btf.member_offset(s, m).unwrap();
            assert!(off > 0, "{s}.{m}");
        }
        assert!(btf.member_offset("sock", "no_such_member").is_err());
    }

    #[test]
    fn finds_sk_lookup_ingress_ifindex_on_this_kernel() {
        let btf = Btf::kernel().expect("this kernel's BTF");
        let off = btf
            .member_offset("bpf_sk_lookup_kern", "ingress_ifindex")
            .unwrap();
        // The offset user space assumes before it knows the kernel.
        assert_eq!(off, u32::from(crate::policy::SK_LOOKUP_IFINDEX_OFFSET));
    }
}
