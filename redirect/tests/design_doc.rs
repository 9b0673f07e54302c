//! `docs/design.md` shows the pin layout as [`redirect::layout::render_tree`]
//! renders it from the code's own lists of maps and programs. This test fails
//! when the block between the `pin-layout` markers differs from the
//! rendering. `cargo xtask docs` runs it with `REDIRECT_UPDATE_DOCS=1`, which
//! rewrites the block instead.
#![cfg(feature = "loader")]

use std::{fs, path::PathBuf};

const BEGIN: &str = "<!-- pin-layout:begin";
const END: &str = "<!-- pin-layout:end -->";

fn design_md() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/design.md")
}

/// What belongs between the markers: the rendering, in a `text` fence.
fn block() -> String {
    format!("```text\n{}```\n", redirect::layout::render_tree())
}

/// `text` with what lies between the marker lines replaced by `block`.
fn splice(text: &str, block: &str) -> Result<String, String> {
    let begin = text
        .find(BEGIN)
        .ok_or_else(|| format!("no line starting with `{BEGIN}`"))?;
    let body = begin
        + text[begin..]
            .find('\n')
            .ok_or("nothing after the begin marker")?
        + 1;
    let end = body
        + text[body..]
            .find(END)
            .ok_or_else(|| format!("no `{END}` after the begin marker"))?;
    Ok(format!("{}{block}{}", &text[..body], &text[end..]))
}

#[test]
fn design_md_pin_layout_is_the_rendering() {
    let path = design_md();
    let text = fs::read_to_string(&path).expect("reading docs/design.md");
    let want = splice(&text, &block()).unwrap_or_else(|e| panic!("docs/design.md: {e}"));
    if want == text {
        return;
    }
    if std::env::var_os("REDIRECT_UPDATE_DOCS").is_some() {
        fs::write(&path, &want).expect("writing docs/design.md");
        eprintln!("docs/design.md: pin layout rewritten");
        return;
    }
    panic!(
        "docs/design.md: the pin layout block differs from redirect::layout::render_tree(); \
         run `cargo xtask docs` to regenerate it. It should read:\n{}",
        block()
    );
}

#[test]
fn splice_replaces_only_the_block() {
    let text = "a\n<!-- pin-layout:begin x -->\nold\nlines\n<!-- pin-layout:end -->\nb\n";
    assert_eq!(
        splice(text, "new\n").unwrap(),
        "a\n<!-- pin-layout:begin x -->\nnew\n<!-- pin-layout:end -->\nb\n"
    );
    assert!(splice("no markers\n", "x\n").is_err());
}
