//! The module graph read from the `use` lines and paths of `src/`: no two
//! sibling modules depend on each other, directly or around a cycle, and
//! nothing below the front ends imports them.
//!
//! A dependency between two files is counted between the siblings that
//! contain them under their closest common ancestor (so `engine/kv.rs` →
//! `engine/cpu/attn.rs` is `kv → cpu` inside `engine`); a file's use of its
//! own ancestors or descendants (`super::Error`) is not one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Module = Vec<String>;

/// Every module of the crate, with its file and whether it is a folder
/// module (`mod.rs`, `lib.rs`).
fn modules(src: &Path) -> BTreeMap<Module, PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = vec![];
    walk(src, &mut files);
    files
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(src).unwrap().with_extension("");
            let mut parts: Module = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            (parts, p)
        })
        .collect()
}

/// The source without comments and string literals, and without the unit
/// tests at the end of a file.
fn code(text: &str) -> String {
    let text = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default();
    let (mut out, mut chars) = (String::new(), text.chars().peekable());
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                let mut prev = ' ';
                for c in chars.by_ref() {
                    if prev == '*' && c == '/' {
                        break;
                    }
                    prev = c;
                }
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    if !escaped && c == '"' {
                        break;
                    }
                    escaped = !escaped && c == '\\';
                }
                out.push_str("\"\"");
            }
            // A char literal like '"' would open a string above.
            '\'' if chars.clone().nth(1) == Some('\'') => {
                chars.next();
                chars.next();
            }
            c => out.push(c),
        }
    }
    out
}

/// Paths named in `use` trees (`a::{b, c::d}` → `a::b`, `a::c::d`).
fn use_paths(tree: &str, prefix: &[String], out: &mut Vec<Vec<String>>) {
    let tree = tree.trim();
    if let Some(open) = tree.find('{') {
        let head: Vec<String> = tree[..open]
            .split("::")
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        let mut pre = prefix.to_vec();
        pre.extend(head);
        let body = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        let (mut depth, mut start) = (0, 0);
        for (i, c) in body.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    use_paths(&body[start..i], &pre, out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        use_paths(&body[start..], &pre, out);
    } else {
        let tree = tree.split(" as ").next().unwrap_or_default();
        let mut p = prefix.to_vec();
        p.extend(
            tree.split("::")
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from),
        );
        if !p.is_empty() {
            out.push(p);
        }
    }
}

/// Every `crate::…`, `super::…` and `self::…` path a file names.
fn references(code: &str) -> Vec<Vec<String>> {
    let mut out = vec![];
    for stmt in code.split(';') {
        if let Some(i) = stmt.find("use ")
            && (i == 0 || !stmt.as_bytes()[i - 1].is_ascii_alphanumeric())
        {
            use_paths(&stmt[i + 4..], &[], &mut out);
        }
    }
    let bytes = code.as_bytes();
    for start in ["crate::", "super::", "self::"] {
        let mut from = 0;
        while let Some(i) = code[from..].find(start) {
            let at = from + i;
            from = at + start.len();
            if at > 0 && (bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_') {
                continue;
            }
            let end = code[at..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                .map_or(code.len(), |e| at + e);
            out.push(
                code[at..end]
                    .split("::")
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
            );
        }
    }
    out
}

/// The module a path lands in (its longest prefix that is a module).
fn resolve(from: &Module, path: &[String], mods: &BTreeMap<Module, PathBuf>) -> Option<Module> {
    let (mut base, rest): (Module, &[String]) = match path.first().map(String::as_str) {
        Some("crate") => (vec![], &path[1..]),
        Some("self") => (from.clone(), &path[1..]),
        Some("super") => {
            let mut base = from.clone();
            let mut rest = path;
            while rest.first().map(String::as_str) == Some("super") {
                base.pop();
                rest = &rest[1..];
            }
            (base, rest)
        }
        _ => return None,
    };
    base.extend(rest.iter().cloned());
    while !base.is_empty() && !mods.contains_key(&base) {
        base.pop();
    }
    Some(base)
}

struct Graph {
    /// parent → (from sibling → to sibling → an example).
    edges: BTreeMap<Module, BTreeMap<String, BTreeMap<String, String>>>,
}

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mods = modules(&src);
    let mut edges: BTreeMap<Module, BTreeMap<String, BTreeMap<String, String>>> = BTreeMap::new();
    for (m, file) in &mods {
        let text = code(&std::fs::read_to_string(file).unwrap());
        for r in references(&text) {
            let Some(t) = resolve(m, &r, &mods) else {
                continue;
            };
            let k = m.iter().zip(&t).take_while(|(a, b)| a == b).count();
            if k == m.len() || k == t.len() {
                continue; // an ancestor or a descendant
            }
            edges
                .entry(m[..k].to_vec())
                .or_default()
                .entry(m[k].clone())
                .or_default()
                .entry(t[k].clone())
                .or_insert_with(|| format!("{} uses {}", m.join("/"), r.join("::")));
        }
    }
    Graph { edges }
}

/// Sibling modules that depend on each other, with an example per edge.
fn cycles(g: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<Vec<String>> {
    // Kosaraju on a few dozen nodes.
    let nodes: BTreeSet<&String> = g.keys().chain(g.values().flat_map(|e| e.keys())).collect();
    let reach = |from: &String| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.clone()];
        while let Some(n) = stack.pop() {
            for next in g.get(&n).into_iter().flat_map(|e| e.keys()) {
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        seen
    };
    let mut out: Vec<Vec<String>> = vec![];
    for n in &nodes {
        let r = reach(n);
        if !r.contains(*n) || out.iter().any(|c| c.contains(n)) {
            continue;
        }
        let comp: Vec<String> = nodes
            .iter()
            .filter(|m| r.contains(**m) && reach(m).contains(*n))
            .map(|m| (*m).clone())
            .collect();
        let mut lines = comp.clone();
        for a in &comp {
            for (b, why) in g.get(a).into_iter().flatten() {
                if comp.contains(b) {
                    lines.push(format!("  {a} → {b}: {why}"));
                }
            }
        }
        out.push(lines);
    }
    out
}

#[test]
fn no_module_depends_on_a_sibling_that_depends_back() {
    let g = graph();
    let mut found = vec![];
    for (parent, edges) in &g.edges {
        for c in cycles(edges) {
            found.push(format!("in `{}`: {}", parent.join("::"), c.join("\n")));
        }
    }
    assert!(found.is_empty(), "module cycles:\n{}", found.join("\n"));
}

#[test]
fn nothing_below_the_front_ends_imports_them() {
    let g = graph();
    let above = ["api", "app", "cli"];
    let bad: Vec<String> = g
        .edges
        .get(&vec![])
        .into_iter()
        .flatten()
        .filter(|(from, _)| !above.contains(&from.as_str()))
        .flat_map(|(_, to)| to.iter())
        .filter(|(to, _)| to.as_str() == "api")
        .map(|(_, why)| why.clone())
        .collect();
    assert!(
        bad.is_empty(),
        "imports of api/ from below it:\n{}",
        bad.join("\n")
    );
}

#[test]
fn the_graph_reader_sees_known_edges() {
    // Guards the reader itself: if it stopped parsing `use` lines, the two
    // tests above would pass vacuously.
    let g = graph();
    let top = &g.edges[&vec![]];
    assert!(top["api"].contains_key("router"), "{top:?}");
    assert!(top["scheduler"].contains_key("engine"), "{top:?}");
    let engine = &g.edges[&vec!["engine".to_string()]];
    assert!(engine["forward"].contains_key("host"), "{engine:?}");
    let mut planted = BTreeMap::new();
    planted.insert(
        "a".to_string(),
        BTreeMap::from([("b".to_string(), String::new())]),
    );
    planted.insert(
        "b".to_string(),
        BTreeMap::from([("a".to_string(), String::new())]),
    );
    assert_eq!(cycles(&planted).len(), 1);
}
