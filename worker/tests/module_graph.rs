//! Dependencies between the worker's modules point one way (CONVENTIONS.md,
//! "Seams"): this test reads every `crate::...` path in `worker/src/**/*.rs`,
//! builds the graph between the first-level modules (`agent`, `run`, `pool`,
//! `sandbox`, `consumer`, `metrics`, ...) and fails on a cycle, naming it.
//! The Daytona provider's files are held to the same rule among themselves
//! (`super::...` between the files of `sandbox/daytona`).
//!
//! A path in a comment does not count; a path anywhere in code does (a `use`
//! line or an inline `crate::a::b::C`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Edges allowed to close a cycle, each with why. Empty: none is.
const ALLOWED: &[(&str, &str)] = &[];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            out.push(path);
        }
    }
}

/// The file's code with line comments (and doc comments) removed.
fn code_of(text: &str) -> String {
    text.lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("//") {
                ""
            } else {
                match line.find(" // ") {
                    Some(at) => &line[..at],
                    None => line,
                }
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn ident_at(code: &str) -> String {
    code.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// The first segments after each `prefix` in `code`: `crate::a::b` and
/// `crate::{a::b, c}` give `a` (and `c`).
fn targets(code: &str, prefix: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices(prefix) {
        // `foo_crate::x` is another path; only a whole `crate::` counts.
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    ',' if depth == 1 => item_start = true,
                    c if c.is_whitespace() => {}
                    _ if depth == 1 && item_start => {
                        item_start = false;
                        let name = ident_at(&group[i..]);
                        if !name.is_empty() {
                            found.insert(name);
                        }
                    }
                    _ => {}
                }
            }
        } else {
            let name = ident_at(rest);
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// A cycle in `graph`, if there is one, as the path that closes it.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut done, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

fn without_allowed(
    mut graph: BTreeMap<String, BTreeSet<String>>,
) -> BTreeMap<String, BTreeSet<String>> {
    for (from, to) in ALLOWED {
        if let Some(edges) = graph.get_mut(*from) {
            edges.remove(*to);
        }
    }
    graph
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Module graph of the files under `root`, keyed by the first path segment
/// below `root` (a file `a.rs` or a folder `a/`), following `prefix` paths.
fn graph_under(root: &Path, prefix: &str, skip: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(root, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(root).expect("under root");
        let first = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("a file name");
        let module = first.trim_end_matches(".rs").to_owned();
        if skip.contains(&module.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let edges = graph.entry(module.clone()).or_default();
        for target in targets(&code_of(&text), prefix) {
            if target != module && !skip.contains(&target.as_str()) {
                edges.insert(target);
            }
        }
    }
    graph
}

#[test]
fn the_worker_s_top_level_modules_import_each_other_without_a_cycle() {
    // `lib.rs` declares the modules and `bin/` holds the binaries: neither is
    // a layer anyone imports.
    let graph = without_allowed(graph_under(&src(), "crate::", &["lib", "bin"]));
    assert!(
        graph.contains_key("agent") && graph.contains_key("sandbox"),
        "the walk found the modules: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import cycle between the worker's modules: {}\nwhole graph: {graph:#?}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_daytona_provider_s_files_import_each_other_without_a_cycle() {
    let root = src().join("sandbox").join("daytona");
    // `mod.rs` is the provider itself, on top of its files.
    let graph = without_allowed(graph_under(&root, "super::", &["mod"]));
    assert!(
        graph.contains_key("shell"),
        "the walk found the files: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import cycle between sandbox/daytona's files: {}\nwhole graph: {graph:#?}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_cycle_check_sees_grouped_inline_and_commented_paths() {
    let code = code_of(
        "use crate::{agent::x, pool};\n// use crate::metrics;\nlet a = crate::run::f();\nlet s = shoal_crate::no;\n",
    );
    let found: Vec<_> = targets(&code, "crate::").into_iter().collect();
    assert_eq!(found, ["agent", "pool", "run"]);
    let mut graph = BTreeMap::new();
    graph.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    graph.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(
        find_cycle(&graph),
        Some(vec!["a".to_owned(), "b".to_owned(), "a".to_owned()])
    );
}
