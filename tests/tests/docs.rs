//! The documentation is true to the code: the configuration reference is what the
//! binaries' flag definitions say, every relative link and anchor in the Markdown files
//! leads somewhere, and every log line quoted in them names a module that exists and
//! words that module logs.
//!
//! The link check is ours (pulldown-cmark parses each file as GitHub renders it) rather
//! than `lychee --offline`: that would be one more program to build or download on every
//! CI machine, for a check of relative paths and heading anchors that takes a page.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use pulldown_cmark::{Event, Parser, Tag, TagEnd};
use tests::docs::{binaries, configuration_reference, REGENERATE};
use tests::repo_root;

#[test]
fn the_configuration_reference_is_what_the_binaries_say() {
    let path = repo_root().join("docs/configuration.md");
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    let generated = configuration_reference();
    if committed != generated {
        let first = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(committed.lines().count().min(generated.lines().count()));
        panic!(
            "docs/configuration.md differs from the binaries' flags from line {}:\n  committed: {:?}\n  generated: {:?}\nregenerate it: {REGENERATE}",
            first + 1,
            committed.lines().nth(first),
            generated.lines().nth(first),
        );
    }
}

/// The page promises `--version`: every binary prints its name and version, exit 0.
#[test]
fn every_binary_prints_its_version() {
    let binaries = binaries();
    assert!(binaries.len() >= 7, "{} binaries", binaries.len());
    for command in binaries {
        let name = command.get_name().to_string();
        match command.try_get_matches_from([name.as_str(), "--version"]) {
            Err(shown) if shown.kind() == clap::error::ErrorKind::DisplayVersion => {
                assert_eq!(shown.exit_code(), 0, "{name}");
                assert_eq!(
                    shown.to_string().trim(),
                    format!("{name} {}", env!("CARGO_PKG_VERSION"))
                );
            }
            other => panic!("{name} --version: {other:?}"),
        }
    }
}

/// The Markdown files of the repository (tracked or not), outside what tools install.
fn markdown_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                if !name.starts_with('.') && !["target", "node_modules"].contains(&name.as_str()) {
                    walk(&path, found);
                }
            } else if name.ends_with(".md") {
                found.push(path);
            }
        }
    }
    let mut found = Vec::new();
    walk(&repo_root(), &mut found);
    found.sort();
    found
}

/// GitHub's anchor of a heading: lower case, letters, digits, `-` and `_` kept, spaces
/// to `-`, everything else dropped; a repeated one gets `-1`, `-2`, ...
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// What a Markdown file offers and asks: its headings' anchors, and its links (with
/// the line each is on).
struct Page {
    anchors: BTreeSet<String>,
    links: Vec<(usize, String)>,
}

fn read_page(path: &Path) -> Page {
    let text = std::fs::read_to_string(path).expect("readable");
    let line_of = |offset: usize| text[..offset].matches('\n').count() + 1;
    let mut anchors = BTreeSet::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut links = Vec::new();
    let mut heading: Option<String> = None;
    for (event, range) in Parser::new(&text).into_offset_iter() {
        match event {
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::Text(piece) | Event::Code(piece) => {
                if let Some(heading) = &mut heading {
                    heading.push_str(&piece);
                }
            }
            Event::End(TagEnd::Heading(_)) => {
                let base = slug(&heading.take().unwrap_or_default());
                let count = seen.entry(base.clone()).or_default();
                anchors.insert(match *count {
                    0 => base,
                    n => format!("{base}-{n}"),
                });
                *count += 1;
            }
            Event::Start(Tag::Link { dest_url, .. } | Tag::Image { dest_url, .. }) => {
                links.push((line_of(range.start), dest_url.to_string()));
            }
            _ => {}
        }
    }
    // Raw HTML anchors (`<a id="...">`) count too.
    for piece in text.split("<a id=\"").skip(1) {
        if let Some(end) = piece.find('"') {
            anchors.insert(piece[..end].to_string());
        }
    }
    Page { anchors, links }
}

#[test]
fn every_relative_link_and_anchor_in_the_markdown_files_resolves() {
    let root = repo_root();
    let files = markdown_files();
    assert!(
        files.iter().any(|f| f.ends_with("README.md")) && files.len() > 5,
        "{files:?}"
    );
    let mut pages: BTreeMap<PathBuf, Page> = BTreeMap::new();
    for file in &files {
        pages.insert(file.clone(), read_page(file));
    }
    let mut broken = Vec::new();
    for (file, page) in &pages {
        let shown = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        for (line, link) in &page.links {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (path, anchor) = match link.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (link.as_str(), None),
            };
            let target = if path.is_empty() {
                file.clone()
            } else {
                file.parent().expect("a folder").join(path)
            };
            let Ok(target) = target.canonicalize() else {
                broken.push(format!("{shown}:{line}: {link}: no such file"));
                continue;
            };
            if !target.starts_with(root.canonicalize().expect("root")) {
                broken.push(format!("{shown}:{line}: {link}: outside the repository"));
                continue;
            }
            if let Some(anchor) = anchor {
                let anchors = pages
                    .iter()
                    .find(|(path, _)| path.canonicalize().ok().as_ref() == Some(&target))
                    .map(|(_, page)| &page.anchors);
                match anchors {
                    Some(anchors) if anchors.contains(anchor) => {}
                    Some(_) => broken.push(format!("{shown}:{line}: {link}: no heading #{anchor}")),
                    None => broken.push(format!(
                        "{shown}:{line}: {link}: an anchor into a file that is not Markdown"
                    )),
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// A quoted log line: `… INFO sensor_sim::sensor: summary: 100000 readings …`.
struct Quoted {
    module: String,
    message: String,
}

/// The log lines quoted in `text`: a level, a module path and a colon.
fn quoted_log_lines(text: &str) -> Vec<Quoted> {
    let mut found = Vec::new();
    for line in text.lines() {
        for level in [" INFO ", " WARN ", " ERROR ", " DEBUG "] {
            let Some(at) = line.find(level) else {
                continue;
            };
            let rest = &line[at + level.len()..];
            let Some((module, message)) = rest.split_once(": ") else {
                continue;
            };
            if module.contains("::")
                && module
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c == ':' || c.is_ascii_digit())
            {
                found.push(Quoted {
                    module: module.to_string(),
                    message: message.to_string(),
                });
            }
        }
    }
    found
}

/// The source file of a module path: `sensor_sim::sensor` → `crates/sensor-sim/src/sensor.rs`.
fn source_of(module: &str) -> Option<PathBuf> {
    let mut parts = module.split("::");
    let krate = parts.next()?.replace('_', "-");
    let rest: Vec<&str> = parts.collect();
    let base = repo_root().join("crates").join(krate).join("src");
    let candidates = if rest.is_empty() {
        vec![base.join("lib.rs"), base.join("main.rs")]
    } else {
        let path = rest.join("/");
        vec![
            base.join(format!("{path}.rs")),
            base.join(path).join("mod.rs"),
        ]
    };
    candidates.into_iter().find(|path| path.is_file())
}

#[test]
fn quoted_log_lines_name_a_module_that_logs_them() {
    let mut quoted = 0;
    let mut wrong = Vec::new();
    for file in markdown_files() {
        let text = std::fs::read_to_string(&file).expect("readable");
        for line in quoted_log_lines(&text) {
            quoted += 1;
            let Some(source) = source_of(&line.module) else {
                wrong.push(format!("{}: no module {}", file.display(), line.module));
                continue;
            };
            // The message's words up to the first figure or placeholder.
            let words: String = line
                .message
                .chars()
                .take_while(|c| !c.is_ascii_digit() && !"{…(".contains(*c))
                .collect();
            let code = std::fs::read_to_string(&source).expect("readable");
            if !code.contains(words.trim_end()) {
                wrong.push(format!(
                    "{}: {} does not log {:?}",
                    file.display(),
                    line.module,
                    words.trim_end()
                ));
            }
        }
    }
    assert!(
        quoted > 0,
        "no quoted log line found: is the check still looking?"
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_checks_find_what_they_look_for() {
    assert_eq!(slug("The brokers (`mosquitto/`)"), "the-brokers-mosquitto");
    assert_eq!(slug("`readings`"), "readings");
    assert_eq!(
        slug("Accounts fail closed, no published passwords"),
        "accounts-fail-closed-no-published-passwords"
    );
    let lines = quoted_log_lines(
        "… INFO sensor_sim::sensor: summary: 10 readings sent\nplain text: not a log",
    );
    assert_eq!(lines.len(), 1);
    assert_eq!(
        source_of(&lines[0].module),
        Some(repo_root().join("crates/sensor-sim/src/sensor.rs"))
    );
    assert_eq!(
        source_of("iot_core::sensor"),
        None,
        "the module the README once named"
    );
}
