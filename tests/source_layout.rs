//! Checks on the shape of the source tree, with no VM:
//! - no file under `vmm/src` is over 500 lines;
//! - the `use crate::…` (and inline `crate::…`, `super::…`) paths of
//!   production code under `vmm/src` make no cycle between top-level
//!   folders (modules) nor between files;
//! - `guest_access`, `devices` and `heki` do not import the layers above them;
//! - every file a doc names (`ARCHITECTURE.md`, `docs/*.md`) exists.
//!
//! Test code (`#[cfg(test)]` modules and files) is left out of the import
//! graph: a test may assemble layers that production code keeps apart.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 500;

/// Files allowed over the limit or in a cycle while work on them is in
/// progress on another branch (then listed here, and removed when it merges).
const OTHERS_AREAS: &[&str] = &[];

fn in_others_area(file: &str) -> bool {
    OTHERS_AREAS.iter().any(|area| if area.ends_with('/') { file.starts_with(area) } else { file == *area })
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("read_dir").map(|e| e.expect("entry").path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// A source file's module path: `heki/runtime.rs` → `["heki", "runtime"]`.
fn module_of(file: &str) -> Vec<String> {
    let mut parts: Vec<String> = file.trim_end_matches(".rs").split('/').map(String::from).collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts
}

/// Removes comments and string literals (so a path in prose is no import).
fn code_only(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    for line in source.lines() {
        let mut in_str = false;
        let mut prev = ' ';
        let mut kept = String::new();
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if !in_str && c == '/' && chars.get(i + 1) == Some(&'/') {
                break;
            }
            if c == '"' && prev != '\\' && !(prev == '\'' && chars.get(i + 1) == Some(&'\'')) {
                in_str = !in_str;
            } else if !in_str {
                kept.push(c);
            }
            prev = if prev == '\\' && c == '\\' { ' ' } else { c };
            i += 1;
        }
        out.push_str(&kept);
        out.push('\n');
    }
    out
}

/// The code outside `#[cfg(test)]` items, and the names of the child
/// modules declared test-only (`#[cfg(test)] mod x;`).
fn production_code(code: &str) -> (String, BTreeSet<String>) {
    let mut out = String::new();
    let mut test_children = BTreeSet::new();
    let lines: Vec<&str> = code.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        let is_test_attr = line.starts_with("#[cfg(") && line.contains("test") && !line.contains("not(test");
        if is_test_attr && !line.contains("feature") {
            // The item that follows: a `mod x;` line, or a braced block.
            let mut j = i + 1;
            while j < lines.len() && lines[j].trim().starts_with("#[") {
                j += 1;
            }
            let Some(item) = lines.get(j).map(|l| l.trim()) else { break };
            if item.ends_with(';') {
                if let Some(name) = item.trim_end_matches(';').split_whitespace().last()
                    && item.contains("mod ")
                {
                    test_children.insert(name.to_string());
                }
                i = j + 1;
                continue;
            }
            let mut depth = 0i32;
            let mut opened = false;
            while j < lines.len() {
                for c in lines[j].chars() {
                    if c == '{' {
                        depth += 1;
                        opened = true;
                    } else if c == '}' {
                        depth -= 1;
                    }
                }
                j += 1;
                if opened && depth <= 0 {
                    break;
                }
            }
            i = j;
            continue;
        }
        out.push_str(lines[i]);
        out.push('\n');
        i += 1;
    }
    (out, test_children)
}

/// Expands `use` trees into full paths: `a::{b, c::D}` → `a::b`, `a::c::D`.
fn expand_tree(tree: &str, prefix: &str, out: &mut Vec<String>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head = tree[..open].trim().trim_end_matches("::");
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let base = join(prefix, head);
        let mut depth = 0;
        let mut start = 0;
        for (k, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    expand_tree(&inner[start..k], &base, out);
                    start = k + 1;
                }
                _ => {}
            }
        }
        expand_tree(&inner[start..], &base, out);
    } else if !tree.is_empty() {
        let path = tree.split(" as ").next().unwrap_or(tree).trim();
        out.push(join(prefix, path));
    }
}

fn join(prefix: &str, rest: &str) -> String {
    match (prefix.is_empty(), rest.is_empty()) {
        (true, _) => rest.to_string(),
        (_, true) => prefix.to_string(),
        _ => format!("{prefix}::{rest}"),
    }
}

struct SourceFile {
    module: Vec<String>,
    /// Paths it uses (absolute, from the crate root), and whether through `pub use`.
    uses: Vec<(Vec<String>, bool)>,
}

/// Absolute module path of `path` (which may start with `crate`, `super`, `self`).
fn absolute(path: &str, module: &[String]) -> Option<Vec<String>> {
    let mut segs: Vec<&str> = path.split("::").map(str::trim).filter(|s| !s.is_empty()).collect();
    let mut base: Vec<String> = match segs.first().copied() {
        Some("crate") => Vec::new(),
        Some("super") => {
            // `super` of `a/b.rs` is `a`; of `a/b/mod.rs` it is `a` as well.
            let mut m = module.to_vec();
            m.pop();
            m
        }
        Some("self") => module.to_vec(),
        _ => return None,
    };
    segs.remove(0);
    while segs.first() == Some(&"super") {
        base.pop();
        segs.remove(0);
    }
    base.extend(segs.iter().map(|s| s.to_string()));
    Some(base)
}

fn parse(file: &str, source: &str) -> (SourceFile, BTreeSet<String>) {
    let module = module_of(file);
    let (code, test_children) = production_code(&code_only(source));
    let mut uses = Vec::new();
    // `use` statements, possibly over several lines.
    let mut statement = String::new();
    let mut in_use = false;
    let mut public = false;
    for line in code.lines() {
        let trimmed = line.trim();
        if !in_use {
            let rest = trimmed.strip_prefix("pub use ").map(|r| (r, true)).or_else(|| {
                trimmed.strip_prefix("pub(crate) use ").map(|r| (r, true)).or_else(|| {
                    trimmed
                        .strip_prefix("pub(super) use ")
                        .map(|r| (r, true))
                        .or_else(|| trimmed.strip_prefix("use ").map(|r| (r, false)))
                })
            });
            if let Some((rest, p)) = rest {
                in_use = true;
                public = p;
                statement.clear();
                statement.push_str(rest);
            }
        } else {
            statement.push(' ');
            statement.push_str(trimmed);
        }
        if in_use && statement.trim_end().ends_with(';') {
            in_use = false;
            let mut paths = Vec::new();
            expand_tree(statement.trim_end().trim_end_matches(';'), "", &mut paths);
            for p in paths {
                // A child module named without `self::` (edition 2018+).
                let p = match p.split("::").next() {
                    Some("crate" | "super" | "self") => p,
                    Some(first) if is_child(first, &code) => format!("self::{p}"),
                    _ => continue,
                };
                if let Some(abs) = absolute(&p, &module) {
                    uses.push((abs, public));
                }
            }
        }
    }
    // Inline paths in code: `crate::a::b::f(...)`.
    for (k, _) in code.match_indices("crate::") {
        if code[..k].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let tail: String = code[k..].chars().take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':').collect();
        if let Some(abs) = absolute(tail.trim_end_matches(':'), &module) {
            uses.push((abs, false));
        }
    }
    (SourceFile { module, uses }, test_children)
}

fn is_child(name: &str, code: &str) -> bool {
    code.lines().any(|l| {
        let l = l.trim();
        (l.starts_with("mod ") || l.starts_with("pub mod ") || l.starts_with("pub(crate) mod "))
            && l.trim_end_matches(';').split_whitespace().last() == Some(name)
    })
}

struct Graph {
    /// file → (file it imports, an example path)
    file_edges: BTreeMap<String, BTreeMap<String, String>>,
}

fn build_graph(src: &Path) -> (Graph, Vec<(String, usize)>) {
    let mut paths = Vec::new();
    rust_files(src, &mut paths);
    let mut sizes = Vec::new();
    let mut parsed = BTreeMap::new();
    let mut test_only: BTreeSet<Vec<String>> = BTreeSet::new();
    for path in &paths {
        let rel = path.strip_prefix(src).expect("under src").to_string_lossy().replace('\\', "/");
        let source = std::fs::read_to_string(path).expect("read source");
        sizes.push((rel.clone(), source.lines().count()));
        let (file, test_children) = parse(&rel, &source);
        for child in test_children {
            let mut m = file.module.clone();
            m.push(child);
            test_only.insert(m);
        }
        parsed.insert(rel, file);
    }
    let by_module: BTreeMap<Vec<String>, String> =
        parsed.iter().map(|(rel, f)| (f.module.clone(), rel.clone())).collect();
    // Resolve each used path to the file that defines it, following `pub use` re-exports.
    let reexports: BTreeMap<(String, String), Vec<String>> = parsed
        .iter()
        .flat_map(|(rel, f)| {
            f.uses
                .iter()
                .filter(|(_, public)| *public)
                .filter_map(move |(p, _)| p.last().map(|name| ((rel.clone(), name.clone()), p.clone())))
        })
        .collect();
    let resolve = |path: &[String]| -> Option<String> {
        let mut path = path.to_vec();
        for _ in 0..8 {
            let (len, file) = (0..=path.len()).rev().find_map(|n| by_module.get(&path[..n]).map(|f| (n, f.clone())))?;
            match path.get(len).and_then(|name| reexports.get(&(file.clone(), name.clone()))) {
                Some(target) if target != &path && len < path.len() => {
                    let mut next = target.clone();
                    next.extend(path[len + 1..].iter().cloned());
                    path = next;
                }
                _ => return Some(file),
            }
        }
        None
    };
    let mut file_edges: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (rel, file) in &parsed {
        if rel == "lib.rs" || test_only.iter().any(|t| file.module.starts_with(t)) {
            continue;
        }
        for (path, public) in &file.uses {
            // A module's re-export of its own child is plumbing, not a dependency.
            if *public && path.starts_with(&file.module) {
                continue;
            }
            if let Some(target) = resolve(path)
                && &target != rel
                && target != "lib.rs"
            {
                file_edges.entry(rel.clone()).or_default().entry(target).or_insert_with(|| path.join("::"));
            }
        }
    }
    (Graph { file_edges }, sizes)
}

/// Every distinct cycle of `edges`, each printed once.
fn all_cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut seen: BTreeSet<BTreeSet<String>> = BTreeSet::new();
    edges
        .keys()
        .filter_map(|start| find_cycle(edges, start))
        .filter(|cycle| seen.insert(cycle.iter().cloned().collect()))
        .collect()
}

/// A cycle through `start`, if any (a list of nodes, `start` first and last).
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<Vec<String>> {
    let mut stack = vec![(start.to_string(), vec![start.to_string()])];
    let mut seen = BTreeSet::new();
    while let Some((node, trail)) = stack.pop() {
        for next in edges.get(&node).into_iter().flatten() {
            if next == start {
                let mut cycle = trail.clone();
                cycle.push(start.to_string());
                return Some(cycle);
            }
            if seen.insert(next.clone()) {
                let mut t = trail.clone();
                t.push(next.clone());
                stack.push((next.clone(), t));
            }
        }
    }
    None
}

fn folder(file: &str) -> String {
    match file.split_once('/') {
        Some((top, _)) => top.to_string(),
        None => file.trim_end_matches(".rs").to_string(),
    }
}

fn vmm_src() -> PathBuf {
    repo().join("vmm/src")
}

#[test]
fn no_vmm_source_file_is_over_500_lines() {
    let (_, sizes) = build_graph(&vmm_src());
    let long: Vec<String> = sizes
        .iter()
        .filter(|(file, lines)| *lines > MAX_LINES && !in_others_area(file))
        .map(|(file, lines)| format!("vmm/src/{file}: {lines} lines"))
        .collect();
    assert!(long.is_empty(), "files over {MAX_LINES} lines (split them):\n{}", long.join("\n"));
}

#[test]
fn no_import_cycle_between_vmm_folders() {
    let (graph, _) = build_graph(&vmm_src());
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut why: BTreeMap<(String, String), String> = BTreeMap::new();
    for (from, targets) in &graph.file_edges {
        for (to, path) in targets {
            let (a, b) = (folder(from), folder(to));
            if a != b && !in_others_area(from) {
                edges.entry(a.clone()).or_default().insert(b.clone());
                why.entry((a, b)).or_insert_with(|| format!("{from} uses {path} ({to})"));
            }
        }
    }
    let mut cycles = Vec::new();
    for cycle in all_cycles(&edges) {
        {
            let hops: Vec<String> = cycle
                .windows(2)
                .map(|w| format!("  {} → {}: {}", w[0], w[1], why[&(w[0].clone(), w[1].clone())]))
                .collect();
            cycles.push(format!("{}\n{}", cycle.join(" → "), hops.join("\n")));
        }
    }
    assert!(cycles.is_empty(), "import cycles between folders of vmm/src:\n{}", cycles.join("\n"));
}

#[test]
fn no_import_cycle_between_vmm_files() {
    let (graph, _) = build_graph(&vmm_src());
    let edges: BTreeMap<String, BTreeSet<String>> = graph
        .file_edges
        .iter()
        .filter(|(from, _)| !in_others_area(from))
        .map(|(from, to)| (from.clone(), to.keys().cloned().collect()))
        .collect();
    let cycles: Vec<String> = all_cycles(&edges)
        .into_iter()
        .map(|cycle| {
            let hops: Vec<String> =
                cycle.windows(2).map(|w| format!("  {} uses {}", w[0], graph.file_edges[&w[0]][&w[1]])).collect();
            format!("{}\n{}", cycle.join(" → "), hops.join("\n"))
        })
        .collect();
    assert!(cycles.is_empty(), "import cycles between files of vmm/src:\n{}", cycles.join("\n"));
}

/// Layers that must not reach up: (folder, folders it must not import, why).
const LAYER_RULES: &[(&str, &[&str], &str)] = &[
    (
        "guest_access",
        &["heki", "devices", "api", "config"],
        "the checked view of guest memory sits below heki and the devices",
    ),
    ("devices", &["heki"], "devices see guest memory through guest_access only"),
    ("heki", &["api", "config", "devices"], "heki takes plain settings and traits, never the API, config or devices"),
];

#[test]
fn lower_layers_never_import_upper_ones() {
    let (graph, _) = build_graph(&vmm_src());
    let mut broken = Vec::new();
    for (from, targets) in &graph.file_edges {
        for (layer, forbidden, why) in LAYER_RULES {
            if folder(from) != *layer {
                continue;
            }
            for (to, path) in targets {
                if forbidden.contains(&folder(to).as_str()) && !in_others_area(from) {
                    broken.push(format!("{from} uses {path} ({to}): {why}"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
}

/// Every file of the repository, relative to its root (no build output).
fn repo_files() -> Vec<String> {
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if path.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    walk(&path, root, out);
                }
            } else {
                out.push(path.strip_prefix(root).expect("under root").to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(&repo(), &repo(), &mut out);
    out
}

/// A name in backquotes that points into this repository: a Rust file, or
/// a path under one of the repository's top-level folders.
fn repo_reference(token: &str, top_level: &BTreeSet<String>) -> bool {
    if token.ends_with(".rs") {
        return true;
    }
    let known_ext = [".md", ".sh", ".toml", ".c", ".py", ".json", ".yaml"].iter().any(|e| token.ends_with(e));
    known_ext && token.split('/').next().is_some_and(|first| top_level.contains(first)) && token.contains('/')
}

#[test]
fn every_file_the_docs_name_exists() {
    let files = repo_files();
    let top_level: BTreeSet<String> =
        files.iter().filter_map(|f| f.split_once('/').map(|(top, _)| top.to_string())).collect();
    let mut docs = vec![repo().join("ARCHITECTURE.md")];
    let mut in_docs: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .expect("docs/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    in_docs.sort();
    docs.extend(in_docs);
    let mut missing = Vec::new();
    for doc in &docs {
        let text = std::fs::read_to_string(doc).expect("read doc");
        for (n, quoted) in text.split('`').enumerate() {
            // Odd pieces are inside backquotes; take the last word (`heki/pins.rs` `check_crs`).
            if n % 2 == 0 || quoted.contains(char::is_whitespace) {
                continue;
            }
            let token = quoted.trim_end_matches(['.', ',', ':', ')']);
            if !repo_reference(token, &top_level) {
                continue;
            }
            let found = files.iter().any(|f| f == token || f.ends_with(&format!("/{token}")));
            if !found {
                let name = doc.strip_prefix(repo()).unwrap_or(doc).display().to_string();
                missing.push(format!("{name}: `{token}`"));
            }
        }
    }
    assert!(missing.is_empty(), "files named in the docs that do not exist:\n{}", missing.join("\n"));
}
