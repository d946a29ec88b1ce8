//! The trainer's layout stays as README's "Layout of the trainer" describes it: dependencies point one way
//! between its parts (a part uses only the parts below it), no two modules use each other through any chain
//! (a circle), and no function is longer than [`MAX_FN_LINES`] lines. The check reads `trainer/src`:
//! every `crate::…`, `super::…` and child-module path outside comments and outside inline `mod tests`, with
//! `pub use` re-exports followed to the module that defines the name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The parts, top to bottom: each may use only the parts after it.
const LAYERS: &[&str] = &["cli", "recipe", "stages", "training", "observe", "algo", "settings"];

/// The longest a function may be (issue 17: functions read as their phases).
const MAX_FN_LINES: usize = 120;

/// A module: its path from the crate root (`["stages", "grpo", "run"]`; the root is `[]`) and its source.
struct Module {
    path: Vec<String>,
    file: PathBuf,
    /// The source with comments blanked (strings kept: serde's `default = "crate::…"` paths are uses too).
    code: String,
    /// The source with comments and string and char literals blanked (for braces).
    bare: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn modules() -> Vec<Module> {
    let mut out = vec![];
    let mut stack = vec![src_dir()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src_dir()).unwrap();
            let mut path: Vec<String> = rel.with_extension("").iter().map(|s| s.to_string_lossy().into_owned()).collect();
            if matches!(path.last().map(String::as_str), Some("mod" | "main")) {
                path.pop();
            }
            let text = std::fs::read_to_string(&p).unwrap();
            let (code, bare) = blank(&text);
            out.push(Module { path, file: p, code, bare });
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// (comments blanked, comments and literals blanked), newlines kept so that line numbers hold.
fn blank(src: &str) -> (String, String) {
    let c: Vec<char> = src.chars().collect();
    let (mut code, mut bare) = (String::with_capacity(src.len()), String::with_capacity(src.len()));
    let keep = |ch: char| if ch == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(k).copied().unwrap_or('\0');
        let rest = |k: usize| at(i + k);
        if c[i] == '/' && rest(1) == '/' {
            while i < c.len() && c[i] != '\n' {
                code.push(' ');
                bare.push(' ');
                i += 1;
            }
        } else if c[i] == '/' && rest(1) == '*' {
            let mut depth = 0;
            loop {
                if i >= c.len() {
                    break;
                }
                if c[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                } else if c[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    code.push_str("  ");
                    bare.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                    continue;
                }
                code.push(keep(c[i]));
                bare.push(keep(c[i]));
                i += 1;
            }
        } else if c[i] == 'r' && (rest(1) == '"' || (rest(1) == '#' && (rest(2) == '"' || rest(2) == '#'))) && (i == 0 || !(c[i - 1].is_alphanumeric() || c[i - 1] == '_')) {
            // raw string r"…", r#"…"#
            let mut hashes = 0;
            let mut j = i + 1;
            while c[j] == '#' {
                hashes += 1;
                j += 1;
            }
            let close: String = std::iter::once('"').chain(std::iter::repeat_n('#', hashes)).collect();
            let body_start = j + 1;
            let text: String = c[body_start..].iter().collect();
            let end = body_start + text.find(&close).map(|b| text[..b].chars().count()).unwrap_or(c.len() - body_start) + close.chars().count();
            for &ch in &c[i..end.min(c.len())] {
                code.push(ch);
                bare.push(keep(ch));
            }
            i = end;
        } else if c[i] == '"' || (c[i] == '\'' && (rest(1) == '\\' || rest(2) == '\'')) {
            // a string, or a char literal ('{', '\n', '\u{7f}'; a lifetime 'a has no closing quote there)
            let (start, quote) = (i, c[i]);
            i += 1;
            while i < c.len() && c[i] != quote {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            for &ch in &c[start..i.min(c.len())] {
                code.push(ch);
                bare.push(keep(ch));
            }
        } else {
            code.push(c[i]);
            bare.push(c[i]);
            i += 1;
        }
    }
    (code, bare)
}

/// `code` without its inline `#[cfg(test)] mod tests { … }` blocks (they use their own file's items).
fn without_tests(code: &str, bare: &str) -> String {
    let mut out = code.to_string();
    let mut from = 0;
    while let Some(k) = bare[from..].find("#[cfg(test)]") {
        let at = from + k;
        let after = bare[at..].trim_start_matches("#[cfg(test)]").trim_start();
        if !after.starts_with("mod ") {
            from = at + 1;
            continue;
        }
        let Some(open) = bare[at..].find('{').map(|o| at + o) else { break };
        let close = matching_brace(bare, open);
        let blanked: String = out[at..=close].chars().map(|ch| if ch == '\n' { '\n' } else { ' ' }).collect();
        out.replace_range(at..=close, &blanked);
        from = close;
    }
    out
}

/// The byte index of the `}` closing the `{` at `open`.
fn matching_brace(bare: &str, open: usize) -> usize {
    let mut depth = 0;
    for (i, ch) in bare[open..].char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return open + i;
                }
            }
            _ => {}
        }
    }
    bare.len() - 1
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

/// The paths a module's code names: every `crate::a::b…`, `super::…`, `self::…` and `child::…` (a child
/// module declared with `mod child;`), with `{…}` groups expanded, as absolute segment lists.
fn paths(m: &Module, code: &str) -> Vec<(Vec<String>, usize)> {
    let children: BTreeSet<String> = code
        .lines()
        .filter_map(|l| {
            let l = l.trim().trim_start_matches("pub ").trim_start_matches("pub(crate) ");
            l.strip_prefix("mod ").and_then(|r| r.strip_suffix(';')).map(str::to_string)
        })
        .collect();
    let chars: Vec<char> = code.chars().collect();
    let mut out = vec![];
    let mut line = 1;
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\n' {
            line += 1;
        }
        let boundary = i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == ':');
        if boundary && is_ident(chars[i]) {
            let mut j = i;
            while j < chars.len() && is_ident(chars[j]) {
                j += 1;
            }
            let word: String = chars[i..j].iter().collect();
            let starts = word == "crate" || word == "super" || word == "self" || children.contains(&word);
            if starts && chars.get(j) == Some(&':') && chars.get(j + 1) == Some(&':') {
                let base: Vec<String> = match word.as_str() {
                    "crate" => vec![],
                    "super" => m.path[..m.path.len().saturating_sub(1)].to_vec(),
                    "self" => m.path.clone(),
                    child => m.path.iter().cloned().chain([child.to_string()]).collect(),
                };
                let (found, end) = expand(&chars, j + 2, &base, &m.path);
                out.extend(found.into_iter().map(|p| (p, line)));
                for &ch in &chars[i..end] {
                    if ch == '\n' {
                        line += 1;
                    }
                }
                i = end;
                continue;
            }
            i = j;
            continue;
        }
        i += 1;
    }
    out
}

/// Reads a path's tail from `at` (after `::`): segments, `super`, and `{a, b::c}` groups; returns the full
/// paths and where the path ends.
fn expand(c: &[char], mut at: usize, base: &[String], here: &[String]) -> (Vec<Vec<String>>, usize) {
    let mut path = base.to_vec();
    loop {
        while at < c.len() && c[at].is_whitespace() {
            at += 1;
        }
        if c.get(at) == Some(&'{') {
            let mut out = vec![];
            at += 1;
            loop {
                while at < c.len() && (c[at].is_whitespace() || c[at] == ',') {
                    at += 1;
                }
                if at >= c.len() || c[at] == '}' {
                    return (out, at + 1);
                }
                let (found, end) = expand(c, at, &path, here);
                out.extend(found);
                at = end;
            }
        }
        let mut j = at;
        while j < c.len() && (is_ident(c[j]) || c[j] == '*') {
            j += 1;
        }
        let seg: String = c[at..j].iter().collect();
        match seg.as_str() {
            "" | "*" => return (vec![path], j),
            "self" if c.get(j) != Some(&':') => return (vec![path], j),
            "super" => {
                path.pop();
            }
            s => path.push(s.to_string()),
        }
        let _ = here;
        if c.get(j) == Some(&':') && c.get(j + 1) == Some(&':') {
            at = j + 2;
        } else {
            return (vec![path], j);
        }
    }
}

/// `pub use` re-exports of each module: (module path, name) → the path it stands for.
fn reexports(mods: &[Module]) -> BTreeMap<(Vec<String>, String), Vec<String>> {
    let mut out = BTreeMap::new();
    for m in mods {
        let code = without_tests(&m.code, &m.bare);
        for stmt in code.split(';') {
            let s = stmt.trim();
            let Some(rest) = s.strip_prefix("pub use ").or_else(|| s.strip_prefix("pub(crate) use ")) else { continue };
            let text = format!("self::{rest}");
            let chars: Vec<char> = text.chars().collect();
            let (found, _) = expand(&chars, 6, &m.path, &m.path);
            for p in found {
                if let Some(name) = p.last() {
                    out.insert((m.path.clone(), name.clone()), p.clone());
                }
            }
        }
    }
    out
}

/// The module a path names: its longest prefix that is a module, with re-exports followed.
fn resolve(path: &[String], known: &BTreeSet<Vec<String>>, re: &BTreeMap<(Vec<String>, String), Vec<String>>) -> Option<Vec<String>> {
    let mut path = path.to_vec();
    for _ in 0..8 {
        let k = (0..=path.len()).rev().find(|&k| known.contains(&path[..k].to_vec()))?;
        let module = path[..k].to_vec();
        match path.get(k).and_then(|name| re.get(&(module.clone(), name.clone()))) {
            Some(target) if target != &path[..=k] => {
                let mut next = target.clone();
                next.extend(path[k + 1..].iter().cloned());
                path = next;
            }
            _ => return Some(module),
        }
    }
    None
}

/// Every module's uses of other modules: module → (used module → the first line naming it).
fn dependency_graph(mods: &[Module]) -> BTreeMap<Vec<String>, BTreeMap<Vec<String>, usize>> {
    let known: BTreeSet<Vec<String>> = mods.iter().map(|m| m.path.clone()).collect();
    let re = reexports(mods);
    let mut g = BTreeMap::new();
    for m in mods {
        let code = without_tests(&m.code, &m.bare);
        let mut uses: BTreeMap<Vec<String>, usize> = BTreeMap::new();
        for (p, line) in paths(m, &code) {
            if let Some(target) = resolve(&p, &known, &re) {
                if target != m.path && !target.is_empty() {
                    uses.entry(target).or_insert(line);
                }
            }
        }
        g.insert(m.path.clone(), uses);
    }
    g
}

fn show(p: &[String]) -> String {
    if p.is_empty() {
        "main".into()
    } else {
        p.join("::")
    }
}

#[test]
fn parts_use_only_the_parts_below_them() {
    let mods = modules();
    let tops: BTreeSet<&str> = mods.iter().filter_map(|m| m.path.first().map(String::as_str)).collect();
    let unknown: Vec<&&str> = tops.iter().filter(|t| !LAYERS.contains(t)).collect();
    assert!(unknown.is_empty(), "top-level modules missing from LAYERS (place them in the order): {unknown:?}");
    let layer = |p: &[String]| p.first().and_then(|t| LAYERS.iter().position(|l| l == t));
    let mut bad = vec![];
    for (from, uses) in dependency_graph(&mods) {
        let Some(lf) = layer(&from) else { continue };
        for (to, line) in uses {
            if layer(&to).is_some_and(|lt| lt < lf) {
                bad.push(format!("{} (line {line}) uses {}, a part above it", show(&from), show(&to)));
            }
        }
    }
    assert!(bad.is_empty(), "dependencies must point down {LAYERS:?}:\n  {}", bad.join("\n  "));
}

#[test]
fn no_module_circles() {
    let g = dependency_graph(&modules());
    // depth-first search for a back edge; report the circle
    fn visit(n: &Vec<String>, g: &BTreeMap<Vec<String>, BTreeMap<Vec<String>, usize>>, state: &mut BTreeMap<Vec<String>, u8>, stack: &mut Vec<Vec<String>>, found: &mut Vec<String>) {
        state.insert(n.clone(), 1);
        stack.push(n.clone());
        for to in g.get(n).into_iter().flat_map(|u| u.keys()) {
            match state.get(to).copied().unwrap_or(0) {
                0 => visit(to, g, state, stack, found),
                1 => {
                    let at = stack.iter().position(|x| x == to).unwrap();
                    let circle: Vec<String> = stack[at..].iter().chain([to]).map(|p| show(p)).collect();
                    found.push(circle.join(" → "));
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.clone(), 2);
    }
    let (mut state, mut found) = (BTreeMap::new(), vec![]);
    for n in g.keys() {
        if !state.contains_key(n) {
            visit(n, &g, &mut state, &mut vec![], &mut found);
        }
    }
    assert!(found.is_empty(), "module circles:\n  {}", found.join("\n  "));
}

#[test]
fn functions_are_at_most_max_lines() {
    let mut long = vec![];
    for m in modules() {
        let bare = &m.bare;
        let b = bare.as_bytes();
        let mut from = 0;
        while let Some(k) = bare[from..].find("fn ") {
            let at = from + k;
            from = at + 3;
            if at > 0 && is_ident(b[at - 1] as char) {
                continue;
            }
            let name: String = bare[at + 3..].chars().take_while(|&ch| is_ident(ch)).collect();
            if name.is_empty() {
                continue; // `fn(…)`, a function pointer type
            }
            // the body: the first `{` before any `;` (a declaration without a body)
            let Some(end) = bare[at..].find(['{', ';']).map(|e| at + e) else { continue };
            if b[end] == b';' {
                continue;
            }
            let close = matching_brace(bare, end);
            let lines = bare[at..=close].matches('\n').count() + 1;
            if lines > MAX_FN_LINES {
                let line = bare[..at].matches('\n').count() + 1;
                long.push(format!("{}:{line} fn {name}: {lines} lines", m.file.strip_prefix(src_dir()).unwrap().display()));
            }
        }
    }
    assert!(long.is_empty(), "functions over {MAX_FN_LINES} lines (split them into their phases):\n  {}", long.join("\n  "));
}

/// The checks above must be able to fail: a use of an upper part, a circle and a long function are found in
/// sources made up for the purpose.
#[test]
fn the_checks_see_what_they_look_for() {
    let m = |path: &[&str], src: &str| {
        let (code, bare) = blank(src);
        Module { path: path.iter().map(|s| s.to_string()).collect(), file: PathBuf::from("x.rs"), code, bare }
    };
    let mods = vec![
        m(&["a"], "pub mod b;\npub use b::Thing;\n// crate::c::ignored in a comment\nfn f() { let s = \"{\"; }\n"),
        m(&["a", "b"], "use crate::c::{self, Other};\npub struct Thing;\n#[cfg(test)]\nmod tests { use crate::d::X; }\n"),
        m(&["c"], "use crate::a::Thing;\nfn g() -> char { '}' }\n"),
        m(&["d"], "#[serde(default = \"crate::a::b::f\")]\nstruct S;\n"),
    ];
    let g = dependency_graph(&mods);
    let names = |p: &[&str]| g[&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()].keys().map(|k| show(k)).collect::<Vec<_>>();
    // the re-export `a::Thing` is followed to `a::b`; comments and inline tests do not count; strings do
    assert_eq!(names(&["c"]), vec!["a::b"]);
    assert_eq!(names(&["a", "b"]), vec!["c"]);
    assert_eq!(names(&["a"]), vec!["a::b"]);
    assert_eq!(names(&["d"]), vec!["a::b"]);
    // a circle: a::b → c → a::b
    assert!(g[&vec!["c".to_string()]].contains_key(&vec!["a".to_string(), "b".to_string()]));
    // braces inside string and char literals do not end a function
    let long = format!("fn long() {{\n    let a = '}}';\n{}}}\n", "    let x = \"}\";\n".repeat(MAX_FN_LINES));
    let (_, bare) = blank(&long);
    let close = matching_brace(&bare, bare.find('{').unwrap());
    assert_eq!(bare[..=close].matches('\n').count() + 1, MAX_FN_LINES + 3);
}
