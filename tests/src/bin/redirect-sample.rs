//! `redirect-sample`: the sample peers the demo and the tests run inside a
//! throwaway pod (`redirect_tests::peer`).
//!
//! - `server`: a sample transparent proxy: accepts, asks `SO_ORIGINAL_DST`,
//!   answers one JSON line saying what it saw;
//! - `connect`: a sample client: connects, prints what it saw as JSON;
//! - `probe`: TCP and UDP (unconnected and connected) in one process, one
//!   JSON line per target.
//!
//! The server also answers UDP (`--udp`): one datagram back per datagram,
//! from the address it came to.

use clap::{Parser, Subcommand};
use redirect_tests::peer;

#[derive(Parser)]
#[command(
    name = "redirect-sample",
    about = "sample peers for redirect's demo and tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A sample transparent proxy: accepts, asks SO_ORIGINAL_DST, answers one
    /// line saying what it saw; over UDP (--udp), answers each datagram with
    /// one. Prints `ready` once it listens.
    Server(peer::ServerArgs),
    /// A sample client: connects, prints what it saw as JSON.
    Connect(peer::ConnectArgs),
    /// A sample client for TCP and UDP: `tcp:`, `udp:` (sendto/recvfrom) or
    /// `udp-connected:` (connect/send/recvfrom) targets, one JSON line each.
    Probe(peer::ProbeArgs),
}

fn main() {
    let r = match Cli::parse().command {
        Cmd::Server(args) => peer::run_server(&args),
        Cmd::Connect(args) => peer::print_connects(&args),
        Cmd::Probe(args) => peer::print_probes(&args),
    };
    if let Err(err) = r {
        eprintln!("redirect-sample: error: {err:#}");
        std::process::exit(1);
    }
}
