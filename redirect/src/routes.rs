//! The routes of the current thread's network namespace, read over
//! rtnetlink (`RTM_GETROUTE` dump), for `-c`: which interface a
//! destination's route leaves through. Only the main table is kept (the
//! kernel's `local` table is what the loader adds itself: 127/8, `::1` and
//! the namespace's addresses). `/proc/net/ipv6_route` would mix every
//! table, and `/proc/net/route` prints metrics in a base of its own.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{Context as _, Result, bail};

use crate::policy::{Cidr, Route};

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const RT_TABLE_MAIN: u32 = 254;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_PRIORITY: u16 = 6;
const RTA_MULTIPATH: u16 = 9;
const RTA_TABLE: u16 = 15;
const RTN_UNICAST: u8 = 1;
/// `RTN_BLACKHOLE`, `RTN_UNREACHABLE`, `RTN_PROHIBIT`: routes that leave
/// through no interface.
const RTN_REJECTS: [u8; 3] = [6, 7, 8];
/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDR: usize = 16;
/// `sizeof(struct rtmsg)`.
const RTMSG: usize = 12;

/// The main table's IPv4 and IPv6 routes of the current thread's network
/// namespace, each with the name of the interface it leaves through
/// (`interfaces`: name and ifindex).
pub fn main_routes(interfaces: &[(String, u32)]) -> Result<Vec<Route>> {
    // SAFETY: a new socket, owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("reading the routes: netlink socket");
    }
    // SAFETY: fd is a socket this thread just opened.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut out = Vec::new();
    for (seq, family) in [(1u32, libc::AF_INET), (2, libc::AF_INET6)] {
        let mut req = [0u8; NLMSG_HDR + RTMSG];
        req[0..4].copy_from_slice(&((NLMSG_HDR + RTMSG) as u32).to_ne_bytes());
        req[4..6].copy_from_slice(&RTM_GETROUTE.to_ne_bytes());
        req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        req[8..12].copy_from_slice(&seq.to_ne_bytes());
        req[NLMSG_HDR] = family as u8;
        // SAFETY: sending a buffer we own, of its length.
        let n = unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
        if n != req.len() as isize {
            return Err(io::Error::last_os_error()).context("reading the routes: netlink send");
        }
        let mut buf = vec![0u8; 64 * 1024];
        'dump: loop {
            // SAFETY: receiving into a buffer we own, of its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).context("reading the routes: netlink recv");
            }
            match parse_dump(&buf[..n as usize], interfaces, &mut out)? {
                Dump::More => {}
                Dump::Done => break 'dump,
            }
        }
    }
    Ok(out)
}

/// Whether a dump goes on after a datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Dump {
    /// More datagrams follow.
    More,
    /// `NLMSG_DONE` was seen.
    Done,
}

/// Adds the main-table routes of one datagram of an `RTM_GETROUTE` dump to
/// `out`.
pub fn parse_dump(
    mut b: &[u8],
    interfaces: &[(String, u32)],
    out: &mut Vec<Route>,
) -> Result<Dump> {
    let u16_at = |b: &[u8], o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
    let u32_at = |b: &[u8], o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    while b.len() >= NLMSG_HDR {
        let len = u32_at(b, 0) as usize;
        if len < NLMSG_HDR || len > b.len() {
            bail!(
                "reading the routes: a netlink message of {len} bytes in {}",
                b.len()
            );
        }
        let (msg, rest) = b.split_at(len);
        b = rest.get(align(len) - len..).unwrap_or(&[]);
        match u16_at(msg, 4) {
            NLMSG_DONE => return Ok(Dump::Done),
            NLMSG_ERROR => {
                let err = if msg.len() >= NLMSG_HDR + 4 {
                    u32_at(msg, NLMSG_HDR) as i32
                } else {
                    0
                };
                if err != 0 {
                    return Err(io::Error::from_raw_os_error(-err))
                        .context("reading the routes: netlink");
                }
            }
            RTM_NEWROUTE if msg.len() >= NLMSG_HDR + RTMSG => {
                if let Some(r) = route(&msg[NLMSG_HDR..], interfaces) {
                    out.push(r);
                }
            }
            _ => {}
        }
    }
    Ok(Dump::More)
}

fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// One `RTM_NEWROUTE` body (`struct rtmsg` and its attributes), if it is a
/// unicast or rejecting route of the main table to a destination prefix.
fn route(m: &[u8], interfaces: &[(String, u32)]) -> Option<Route> {
    let (family, dst_len, src_len, table, kind) = (m[0], m[1], m[2], m[4], m[7]);
    let reject = RTN_REJECTS.contains(&kind);
    // A source-specific route (IPv6 subtrees) applies to some sources only.
    if (kind != RTN_UNICAST && !reject) || src_len != 0 {
        return None;
    }
    let mut table = u32::from(table);
    let (mut dst, mut oif, mut metric) = (None, None, 0u32);
    let mut a = &m[RTMSG..];
    while a.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([a[0], a[1]]));
        let kind = u16::from_ne_bytes([a[2], a[3]]);
        if len < 4 || len > a.len() {
            break;
        }
        let v = &a[4..len];
        let word = || {
            v.get(..4)
                .map(|w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]]))
        };
        match kind {
            RTA_DST => dst = Some(v.to_vec()),
            RTA_OIF => oif = word(),
            RTA_PRIORITY => metric = word().unwrap_or(0),
            RTA_TABLE => table = word().unwrap_or(table),
            // struct rtnexthop {len u16, flags u8, hops u8, ifindex i32}:
            // the first next hop's interface.
            RTA_MULTIPATH if oif.is_none() && v.len() >= 8 => {
                oif = Some(u32::from_ne_bytes([v[4], v[5], v[6], v[7]]));
            }
            _ => {}
        }
        a = a.get(align(len)..).unwrap_or(&[]);
    }
    if table != RT_TABLE_MAIN {
        return None;
    }
    let addr = match (family as i32, dst.as_deref()) {
        (libc::AF_INET, None) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        (libc::AF_INET, Some(d)) => IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(d).ok()?)),
        (libc::AF_INET6, None) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        (libc::AF_INET6, Some(d)) => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(d).ok()?)),
        _ => return None,
    };
    let dev = if reject {
        None
    } else {
        let i = oif?;
        interfaces
            .iter()
            .find(|(_, x)| *x == i)
            .map(|(n, _)| n.clone())
    };
    Some(Route {
        dst: Cidr {
            addr,
            prefix: dst_len,
        },
        dev,
        metric,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One `RTM_NEWROUTE` message: rtmsg fields and attributes.
    fn msg(family: u8, dst_len: u8, table: u8, kind: u8, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
        let mut body = vec![family, dst_len, 0, 0, table, 4, 0, kind, 0, 0, 0, 0];
        for (t, v) in attrs {
            let len = 4 + v.len();
            body.extend_from_slice(&(len as u16).to_ne_bytes());
            body.extend_from_slice(&t.to_ne_bytes());
            body.extend_from_slice(v);
            body.resize(align(body.len()), 0);
        }
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDR + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&RTM_NEWROUTE.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&body);
        m
    }

    fn word(x: u32) -> Vec<u8> {
        x.to_ne_bytes().to_vec()
    }

    #[test]
    fn keeps_the_main_tables_routes_with_their_interface_and_metric() {
        let ifs = vec![("eth0".to_string(), 2), ("net1".to_string(), 3)];
        let v4 = libc::AF_INET as u8;
        let v6 = libc::AF_INET6 as u8;
        let mut dump = Vec::new();
        // default via eth0; 10.210.0.0/16 via net1, metric 100,000,000.
        dump.extend(msg(v4, 0, 254, 1, &[(RTA_OIF, word(2))]));
        dump.extend(msg(
            v4,
            16,
            254,
            1,
            &[
                (RTA_DST, vec![10, 210, 0, 0]),
                (RTA_OIF, word(3)),
                (RTA_PRIORITY, word(100_000_000)),
            ],
        ));
        // Another table: left out, the u8 field or RTA_TABLE saying so.
        dump.extend(msg(
            v4,
            16,
            100,
            1,
            &[(RTA_DST, vec![10, 240, 0, 0]), (RTA_OIF, word(3))],
        ));
        dump.extend(msg(
            v6,
            64,
            252,
            1,
            &[
                (
                    RTA_DST,
                    Ipv6Addr::new(0xfd00, 0x240, 0, 0, 0, 0, 0, 0)
                        .octets()
                        .to_vec(),
                ),
                (RTA_OIF, word(3)),
                (RTA_TABLE, word(1000)),
            ],
        ));
        // The local table, and a local route: the loader adds those.
        dump.extend(msg(
            v4,
            32,
            255,
            2,
            &[(RTA_DST, vec![10, 0, 0, 5]), (RTA_OIF, word(2))],
        ));
        // An unreachable route (no interface); a multipath one.
        dump.extend(msg(v4, 8, 254, 7, &[(RTA_DST, vec![10, 0, 0, 0])]));
        dump.extend(msg(
            v6,
            64,
            254,
            1,
            &[
                (
                    RTA_DST,
                    Ipv6Addr::new(0xfd00, 0x210, 0, 0, 0, 0, 0, 0)
                        .octets()
                        .to_vec(),
                ),
                (
                    RTA_MULTIPATH,
                    [
                        16u16.to_ne_bytes().to_vec(),
                        vec![0, 0],
                        word(3),
                        vec![0; 8],
                    ]
                    .concat(),
                ),
            ],
        ));
        let mut out = Vec::new();
        assert_eq!(parse_dump(&dump, &ifs, &mut out).unwrap(), Dump::More);
        let got: Vec<(String, Option<&str>, u32)> = out
            .iter()
            .map(|r| (r.dst.to_string(), r.dev.as_deref(), r.metric))
            .collect();
        assert_eq!(
            got,
            vec![
                ("0.0.0.0/0".to_string(), Some("eth0"), 0),
                ("10.210.0.0/16".to_string(), Some("net1"), 100_000_000),
                ("10.0.0.0/8".to_string(), None, 0),
                ("fd00:210::/64".to_string(), Some("net1"), 0),
            ]
        );
        let mut done = Vec::new();
        done.extend_from_slice(&20u32.to_ne_bytes());
        done.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        done.extend_from_slice(&[0; 14]);
        assert_eq!(parse_dump(&done, &ifs, &mut out).unwrap(), Dump::Done);
        assert!(parse_dump(&[1, 0, 0, 0, 0, 0], &ifs, &mut out).is_ok());
        let mut bad = done.clone();
        bad[0] = 200;
        assert!(parse_dump(&bad, &ifs, &mut out).is_err());
    }

    #[test]
    fn reads_this_namespace() {
        let ifs = crate::netns::interfaces().unwrap();
        let routes = main_routes(&ifs).unwrap();
        // Every route here names an interface the namespace has, or none.
        for r in &routes {
            if let Some(d) = &r.dev {
                assert!(ifs.iter().any(|(n, _)| n == d), "{r:?}");
            }
        }
    }
}
