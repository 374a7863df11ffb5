//! Every link in `README.md` and `docs/**/*.md` resolves inside the
//! repository.
//!
//! The test reads the markdown files as text (std only), takes the links
//! `[text](target)` and the definitions `[label]: target` outside fenced
//! code blocks and inline code, and checks each target that is not
//! `http://`, `https://` or `mailto:`: the path, relative to the file that
//! links, must name an existing file or directory inside the repository
//! (no `..` past its root, no absolute path), and an `#anchor` must match a
//! heading of the markdown file it points into (GitHub's slugs: lowercase,
//! punctuation other than `-` and `_` dropped, spaces as `-`, `-1`, `-2`
//! for repeated headings). The failure lists every broken link with its file
//! and line.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

/// The repository's root: the `cli` crate's parent directory.
fn repo_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    root.canonicalize().unwrap_or(root)
}

/// `README.md` and every `*.md` under `docs/`, sorted.
fn markdown_files(root: &Path) -> Vec<PathBuf> {
    let mut files = vec![root.join("README.md")];
    let mut dirs = vec![root.join("docs")];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The opening fence of a fenced code block: its character and length.
fn fence_open(line: &str) -> Option<(char, usize)> {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return None;
    }
    let rest = &line[indent..];
    let c = rest.chars().next().filter(|c| *c == '`' || *c == '~')?;
    let n = rest.chars().take_while(|x| *x == c).count();
    // A backtick fence's info string cannot hold a backtick.
    (n >= 3 && !(c == '`' && rest[n..].contains('`'))).then_some((c, n))
}

/// Whether `line` closes a block opened by `open`.
fn fence_close(line: &str, open: (char, usize)) -> bool {
    let indent = line.len() - line.trim_start_matches(' ').len();
    if indent > 3 {
        return false;
    }
    let rest = line[indent..].trim_end();
    let n = rest.chars().take_while(|x| *x == open.0).count();
    n >= open.1 && n == rest.chars().count()
}

/// The file's lines with fenced code blocks (fences included) emptied, so
/// line numbers stay as they are.
fn without_fences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut open: Option<(char, usize)> = None;
    for line in text.lines() {
        match open {
            Some(f) => {
                if fence_close(line, f) {
                    open = None;
                }
                out.push(String::new());
            }
            None => match fence_open(line) {
                Some(f) => {
                    open = Some(f);
                    out.push(String::new());
                }
                None => out.push(line.to_string()),
            },
        }
    }
    out
}

/// `line` with inline code spans (backtick runs of equal length and what
/// they enclose) replaced by spaces.
fn without_code_spans(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = chars.clone();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|c| **c == '`').count();
        let mut j = i + run;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let n = chars[j..].iter().take_while(|c| **c == '`').count();
                if n == run {
                    close = Some(j + n);
                    break;
                }
                j += n;
            } else {
                j += 1;
            }
        }
        match close {
            Some(end) => {
                for c in &mut out[i..end] {
                    *c = ' ';
                }
                i = end;
            }
            None => i += run,
        }
    }
    out.into_iter().collect()
}

/// One link found in a file.
#[derive(Debug, PartialEq)]
struct Link {
    /// 1-based line of the link's target.
    line: usize,
    text: String,
    target: String,
}

/// The index of the bracket closing the one at `open`, on the same
/// paragraph (a blank line ends the search).
fn matching(chars: &[char], open: usize, left: char, right: char) -> Option<usize> {
    let mut depth = 0;
    let mut i = open;
    while i < chars.len() {
        let c = chars[i];
        if c == '\\' {
            i += 2;
            continue;
        }
        if c == '\n' && chars.get(i + 1) == Some(&'\n') {
            return None;
        }
        if c == left {
            depth += 1;
        } else if c == right {
            depth -= 1;
            if depth == 0 {
                return Some(i);
            }
        }
        i += 1;
    }
    None
}

/// The target inside `(...)`: without `<...>` and without a title.
fn clean_target(inside: &str) -> String {
    let t = inside.trim();
    if let Some(rest) = t.strip_prefix('<') {
        return rest.split('>').next().unwrap_or_default().to_string();
    }
    t.split_whitespace().next().unwrap_or_default().to_string()
}

/// Every inline link and link definition of a markdown text, outside code.
fn links(text: &str) -> Vec<Link> {
    let lines: Vec<String> = without_fences(text).iter().map(|l| without_code_spans(l)).collect();
    let mut found = Vec::new();
    // Definitions: `[label]: target` at the start of a line.
    for (n, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        if line.len() - t.len() > 3 || !t.starts_with('[') {
            continue;
        }
        if let Some(end) = t.find("]:") {
            let label = &t[1..end];
            if !label.is_empty() && !label.contains(']') {
                found.push(Link { line: n + 1, text: label.to_string(), target: clean_target(&t[end + 2..]) });
            }
        }
    }
    // Inline links (and images): `[text](target)`, the text possibly over
    // several lines of one paragraph.
    let joined = lines.join("\n");
    let chars: Vec<char> = joined.chars().collect();
    let mut line_of = Vec::with_capacity(chars.len());
    let mut line = 1;
    for c in &chars {
        line_of.push(line);
        if *c == '\n' {
            line += 1;
        }
    }
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\\' {
            i += 2;
            continue;
        }
        if chars[i] != '[' {
            i += 1;
            continue;
        }
        let Some(close) = matching(&chars, i, '[', ']') else {
            i += 1;
            continue;
        };
        if chars.get(close + 1) != Some(&'(') {
            i += 1;
            continue;
        }
        let Some(end) = matching(&chars, close + 1, '(', ')') else {
            i += 1;
            continue;
        };
        let text: String = chars[i + 1..close].iter().collect();
        let inside: String = chars[close + 2..end].iter().collect();
        found.push(Link {
            line: line_of[close + 1],
            text: text.split_whitespace().collect::<Vec<_>>().join(" "),
            target: clean_target(&inside),
        });
        // Links inside the text (an image in a link) are found too.
        i += 1;
    }
    found.sort_by_key(|l| l.line);
    found
}

/// GitHub's anchor for a heading's text.
fn slug(heading: &str) -> String {
    // A link in a heading shows its text only.
    let mut text = String::new();
    let chars: Vec<char> = heading.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '[' {
            if let Some(close) = matching(&chars, i, '[', ']') {
                if chars.get(close + 1) == Some(&'(') {
                    if let Some(end) = matching(&chars, close + 1, '(', ')') {
                        text.extend(&chars[i + 1..close]);
                        i = end + 1;
                        continue;
                    }
                }
            }
        }
        text.push(chars[i]);
        i += 1;
    }
    text.trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The text of an ATX heading (`# Title ##`), if `line` is one.
fn atx_heading(line: &str) -> Option<String> {
    let t = line.trim_start_matches(' ');
    if line.len() - t.len() > 3 {
        return None;
    }
    let level = t.chars().take_while(|c| *c == '#').count();
    if !(1..=6).contains(&level) {
        return None;
    }
    let rest = &t[level..];
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        return None;
    }
    let rest = rest.trim();
    // An optional closing run of `#`, after a space.
    let stripped = rest.trim_end_matches('#');
    let text = if stripped.is_empty() || stripped.ends_with([' ', '\t']) { stripped.trim_end() } else { rest };
    Some(text.to_string())
}

/// Every anchor a markdown text defines: its headings' slugs (repeated ones
/// numbered as GitHub does) and `<a id=...>`/`<a name=...>` anchors.
fn anchors(text: &str) -> Vec<String> {
    let lines = without_fences(text);
    let mut headings = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        if let Some(h) = atx_heading(line) {
            headings.push(h);
            continue;
        }
        // A setext heading: a line of `=` or `-` under a paragraph line.
        let t = line.trim();
        let underline = !t.is_empty() && (t.chars().all(|c| c == '=') || t.chars().all(|c| c == '-'));
        if underline && line.len() - line.trim_start().len() <= 3 && n > 0 {
            let above = lines[n - 1].trim();
            if !above.is_empty() && atx_heading(&lines[n - 1]).is_none() && !above.starts_with(['-', '*', '>', '|']) {
                headings.push(above.to_string());
            }
        }
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut out = Vec::new();
    for h in headings {
        let base = slug(&h);
        let count = seen.entry(base.clone()).or_insert(0);
        out.push(if *count == 0 { base.clone() } else { format!("{base}-{count}") });
        *count += 1;
    }
    for line in &lines {
        for attr in ["id=\"", "name=\""] {
            let mut rest = line.as_str();
            while let Some(at) = rest.find("<a ") {
                rest = &rest[at + 3..];
                let tag = rest.split('>').next().unwrap_or_default();
                if let Some(start) = tag.find(attr) {
                    if let Some(len) = tag[start + attr.len()..].find('"') {
                        out.push(tag[start + attr.len()..start + attr.len() + len].to_string());
                    }
                }
            }
        }
    }
    out
}

/// `%XX` escapes decoded (link paths may escape spaces and the like).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `rel` joined to `dir` and normalized without touching the disk; `None`
/// if a `..` climbs above `root`.
fn resolve(root: &Path, dir: &Path, rel: &str) -> Option<PathBuf> {
    let mut parts: Vec<std::ffi::OsString> = Vec::new();
    let base = dir.strip_prefix(root).ok()?;
    for c in base.components().chain(Path::new(rel).components()) {
        match c {
            Component::Normal(p) => parts.push(p.to_os_string()),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    let mut path = root.to_path_buf();
    path.extend(parts);
    Some(path)
}

/// Why `target`, linked from `file`, is broken; `None` if it resolves.
fn check(root: &Path, file: &Path, target: &str, cache: &mut HashMap<PathBuf, Vec<String>>) -> Option<String> {
    let lower = target.to_ascii_lowercase();
    if ["http://", "https://", "mailto:"].iter().any(|s| lower.starts_with(s)) {
        return None;
    }
    if target.is_empty() {
        return Some("empty target".into());
    }
    let (path, anchor) = match target.split_once('#') {
        Some((p, a)) => (p, Some(a)),
        None => (target, None),
    };
    let path = percent_decode(path);
    let resolved = if path.is_empty() {
        file.to_path_buf()
    } else {
        if path.starts_with('/') {
            return Some("an absolute path (write it relative to this file)".into());
        }
        if path.contains("://") || path.starts_with("file:") {
            return Some("a scheme other than http, https or mailto".into());
        }
        let dir = file.parent().unwrap_or(root);
        let Some(resolved) = resolve(root, dir, &path) else {
            return Some("climbs out of the repository".into());
        };
        if !resolved.exists() {
            return Some(format!(
                "no such file or directory: {}",
                resolved.strip_prefix(root).unwrap_or(&resolved).display()
            ));
        }
        match resolved.canonicalize() {
            Ok(real) if real.starts_with(root) => {}
            _ => return Some("leads out of the repository (through a symlink)".into()),
        }
        resolved
    };
    let anchor = anchor?;
    if anchor.is_empty() {
        return None;
    }
    let page = if resolved.is_dir() { resolved.join("README.md") } else { resolved };
    if page.extension().is_none_or(|e| e != "md") {
        let line_anchor = anchor
            .strip_prefix('L')
            .is_some_and(|r| r.split("-L").all(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit())));
        return (!line_anchor).then(|| format!("#{anchor} points into a file that is not markdown"));
    }
    let known = cache.entry(page.clone()).or_insert_with(|| match std::fs::read_to_string(&page) {
        Ok(text) => anchors(&text),
        Err(_) => Vec::new(),
    });
    let wanted = percent_decode(anchor);
    if known.contains(&wanted) {
        None
    } else {
        Some(format!("no heading with anchor #{wanted} in {}", page.strip_prefix(root).unwrap_or(&page).display()))
    }
}

#[test]
fn every_link_in_the_readme_and_docs_resolves_inside_the_repository() {
    let root = repo_root();
    let files = markdown_files(&root);
    assert!(files.len() > 1, "no docs/ markdown found under {}", root.display());
    let mut cache = HashMap::new();
    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        let text = match std::fs::read_to_string(file) {
            Ok(t) => t,
            Err(e) => {
                broken.push(format!("{}: cannot read: {e}", file.display()));
                continue;
            }
        };
        for link in links(&text) {
            checked += 1;
            if let Some(why) = check(&root, file, &link.target, &mut cache) {
                let name = file.strip_prefix(&root).unwrap_or(file).display().to_string();
                broken.push(format!("{name}:{}: [{}]({}): {why}", link.line, link.text, link.target));
            }
        }
    }
    assert!(checked > 0, "no links found: is the link parser broken?");
    assert!(broken.is_empty(), "{} broken link(s) of {checked}:\n{}", broken.len(), broken.join("\n"));
}

#[test]
fn slugs_follow_githubs_rules() {
    assert_eq!(slug("Running a cluster on several machines"), "running-a-cluster-on-several-machines");
    assert_eq!(slug("`ferry job submit`: flags"), "ferry-job-submit-flags");
    assert_eq!(slug("Ports (and firewalls)"), "ports-and-firewalls");
    assert_eq!(slug("ferry_raft_term, snake_case"), "ferry_raft_term-snake_case");
    assert_eq!(slug("See [the guide](guide.md) now"), "see-the-guide-now");
    assert_eq!(slug("Gray variants / CAS"), "gray-variants--cas");
    let text = "# Top\n\n## Notes\n\n```\n## Not a heading\n```\n\n## Notes\n\nSetext\n------\n";
    assert_eq!(anchors(text), ["top", "notes", "notes-1", "setext"]);
}

#[test]
fn links_in_code_are_ignored_and_wrapped_link_text_is_found() {
    let text = "See [a](a.md) and `[b](b.md)`.\n\n```sh\n[c](c.md)\n```\n\nA [wrapped\nlink](d.md#x \"title\").\n\n[e]: e.md\n";
    let found: Vec<(usize, String)> = links(text).into_iter().map(|l| (l.line, l.target)).collect();
    assert_eq!(found, [(1, "a.md".to_string()), (8, "d.md#x".to_string()), (10, "e.md".to_string())], "{text}");
}
