//! Architecture invariants of ARCHITECTURE.md that a reading of the sources can check.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The lines of `path` that are code, not comments.
fn code_lines(path: &Path) -> Vec<(usize, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect()
}

/// Every code line of `files` that `matches`, as `path:line: text`.
fn code_matching(files: &[PathBuf], matches: impl Fn(&str) -> bool) -> Vec<String> {
    files
        .iter()
        .flat_map(|f| {
            code_lines(f)
                .into_iter()
                .filter(|(_, line)| matches(line))
                .map(move |(n, line)| format!("{}:{n}: {}", f.display(), line.trim()))
        })
        .collect()
}

fn tracker_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tracker/src")
}

#[test]
fn the_io_engines_know_nothing_of_change_tracking() {
    let io = tracker_src().join("io");
    let files = rust_files(&io);
    assert!(files.len() >= 3, "{files:?}");
    let found = code_matching(&files, |l| {
        l.contains("crate::track") || l.contains("ChangeLog")
    });
    assert!(
        found.is_empty(),
        "tracker/src/io must not use the tracking layer (track::volume layers it):\n{}",
        found.join("\n")
    );
}

#[test]
fn unsafe_code_lives_only_in_the_uring_engine_and_sys() {
    let src = tracker_src();
    let allowed = [src.join("io/uring.rs"), src.join("sys.rs")];
    let others: Vec<PathBuf> = rust_files(&src)
        .into_iter()
        .filter(|f| !allowed.contains(f))
        .collect();
    let found = code_matching(&others, |l| l.contains("unsafe ") || l.contains("unsafe{"));
    assert!(
        found.is_empty(),
        "unsafe outside uring.rs and sys.rs:\n{}",
        found.join("\n")
    );
    for f in &allowed {
        let lines = code_lines(f);
        let blocks = lines.iter().filter(|(_, l)| l.contains("unsafe {")).count();
        let text = std::fs::read_to_string(f).unwrap();
        assert!(
            blocks > 0,
            "{}: no unsafe block left: update ARCHITECTURE.md",
            f.display()
        );
        assert!(
            text.matches("SAFETY:").count() >= blocks,
            "{}: every unsafe block has a SAFETY: comment",
            f.display()
        );
    }
}
