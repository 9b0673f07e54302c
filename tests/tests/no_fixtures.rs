//! The shipped `redirect` binary carries no test fixtures: the demo and the
//! sample peers live in this crate (`redirect-demo`, `redirect-sample`), and
//! `redirect` neither lists nor accepts them. Needs no root.

use std::process::Command;

use redirect_tests::redirect_bin;

/// The subcommands that used to live in `redirect` (some hidden from
/// `--help`), and must not come back.
const FIXTURES: [&str; 3] = ["demo", "sample-server", "sample-connect"];

#[test]
fn redirect_has_no_fixture_subcommands() {
    let out = Command::new(redirect_bin())
        .arg("--help")
        .output()
        .expect("running redirect --help");
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).expect("UTF-8 help");
    let listed: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        listed.contains(&"apply"),
        "no subcommands found in:\n{help}"
    );
    for name in FIXTURES {
        assert!(!listed.contains(&name), "`redirect --help` lists {name}");
        let out = Command::new(redirect_bin())
            .arg(name)
            .arg("--help")
            .output()
            .expect("running redirect");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("unrecognized subcommand"),
            "`redirect {name}` is accepted: {err}"
        );
    }
}
