//! The layers stay where ARCHITECTURE.md puts them: the compiler keeps `weir-core` and
//! `weir-protocol` pure only as long as their dependencies are, so the suite fails the
//! moment one of them gains a runtime, socket, file or clock dependency, or device-side
//! code (`weir-device`) starts linking the appliance again.

use std::path::{Path, PathBuf};
use std::process::Command;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Crates that do I/O, run an executor, read the clock or the OS's randomness: none may
/// be among the pure crates' (normal, non-dev) dependencies.
const IO_CRATES: &[&str] = &[
    "glommio",
    "io-uring",
    "libc",
    "nix",
    "socket2",
    "mio",
    "tokio",
    "quinn",
    "quinn-proto",
    "quinn-udp",
    "rustls",
    "kafka-protocol",
    "tiny_http",
    "signal-hook",
    "local-sync",
    "futures-lite",
    "futures-channel",
    "tracing",
    "rand",
    "getrandom",
    "weir",
];

/// Names in a `cargo tree` of `package`'s normal dependencies (host target).
fn dependencies(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["tree", "--offline", "--edges", "normal", "--prefix", "none", "--package", package])
        .current_dir(ROOT)
        .output()
        .expect("run cargo tree");
    assert!(output.status.success(), "cargo tree -p {package}: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    let names: Vec<String> =
        text.lines().filter_map(|line| line.split_whitespace().next()).map(str::to_owned).collect();
    assert!(names.iter().any(|name| name == package), "cargo tree printed no {package}:\n{text}");
    names
}

fn assert_no_io_crates(package: &str) {
    let names = dependencies(package);
    let found: Vec<&String> = names.iter().filter(|name| IO_CRATES.contains(&name.as_str())).collect();
    assert!(
        found.is_empty(),
        "{package} depends on {found:?}; keep I/O, runtimes and clocks in the weir crate's shell"
    );
}

#[test]
fn the_core_and_protocol_crates_have_no_io_runtime_or_clock_dependency() {
    assert_no_io_crates("weir-core");
    assert_no_io_crates("weir-protocol");
}

#[test]
fn device_side_code_links_the_protocol_crate_alone() {
    let names = dependencies("weir-device");
    assert!(names.iter().any(|name| name == "weir-protocol"));
    for banned in ["weir", "weir-core", "glommio", "io-uring", "kafka-protocol"] {
        assert!(!names.iter().any(|name| name == banned), "weir-device depends on {banned}");
    }
}

/// Every `.rs` file under `directory`.
fn sources(directory: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(directory).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, found);
        } else if path.extension().is_some_and(|extension| extension == "rs") {
            found.push(path);
        }
    }
}

/// The pure crates' code (tests and the test-only simulator aside) names no file,
/// socket, thread, process or environment API and reads no clock: time is an argument.
#[test]
fn the_pure_crates_read_no_clock_and_touch_no_file() {
    const BANNED: &[&str] = &[
        "std::fs",
        "std::net",
        "std::thread",
        "std::process",
        "std::env",
        "Instant::now",
        "SystemTime::now",
        "unsafe ",
    ];
    let mut files = Vec::new();
    for crate_dir in ["crates/weir-core/src", "crates/weir-protocol/src"] {
        sources(&Path::new(ROOT).join(crate_dir), &mut files);
    }
    assert!(files.len() > 20, "found only {} sources", files.len());
    let mut offences = Vec::new();
    for path in &files {
        let relative = path.strip_prefix(ROOT).unwrap().display().to_string();
        if relative.contains("/sim/") || relative.ends_with("_tests.rs") {
            continue; // compiled only under cfg(test)
        }
        let text = std::fs::read_to_string(path).unwrap();
        for (number, line) in text.lines().enumerate() {
            if line.trim_start() == "#[cfg(test)]" {
                break; // the test module closes every file
            }
            let code = line.split("//").next().unwrap_or("");
            for banned in BANNED {
                if code.contains(banned) {
                    offences.push(format!("{relative}:{}: {banned}", number + 1));
                }
            }
        }
    }
    assert!(offences.is_empty(), "I/O or clock reads in the pure crates:\n{}", offences.join("\n"));
}

/// The appliance's modules (`src/`) as a graph of `crate::…` references outside test
/// modules; module `name` for `src/a/b.rs` or `src/a/b/mod.rs` is `a::b`.
fn module_graph() -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let source_root = Path::new(ROOT).join("src");
    let mut files = Vec::new();
    sources(&source_root, &mut files);
    let name_of = |path: &Path| {
        let relative = path.strip_prefix(&source_root).unwrap().with_extension("");
        let name = relative.to_str().unwrap().replace('/', "::");
        name.strip_suffix("::mod").map(str::to_owned).unwrap_or(name)
    };
    let modules: std::collections::BTreeSet<String> = files.iter().map(|path| name_of(path)).collect();
    let mut graph = std::collections::BTreeMap::new();
    for path in &files {
        let module = name_of(path);
        let text = std::fs::read_to_string(path).unwrap();
        let code = text.split("#[cfg(test)]\nmod tests").next().unwrap();
        let mut uses = std::collections::BTreeSet::new();
        for line in code.lines() {
            let line = line.split("//").next().unwrap();
            let mut rest = line;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let words: Vec<&str> = rest
                    .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
                    .next()
                    .unwrap()
                    .split("::")
                    .collect();
                // The longest prefix of the path that is a module.
                for length in (1..=words.len()).rev() {
                    let candidate = words[..length].join("::");
                    if modules.contains(&candidate) {
                        if candidate != module {
                            uses.insert(candidate);
                        }
                        break;
                    }
                }
            }
        }
        graph.insert(module, uses);
    }
    graph
}

#[test]
fn the_appliance_modules_import_one_another_without_cycles() {
    let graph = module_graph();
    assert!(
        graph.get("shell::quic").is_some_and(|uses| uses.contains("shell::metrics") && uses.contains("certs")),
        "the graph reads no imports"
    );
    // Depth-first search for a back edge; the cycle found is printed.
    fn visit<'a>(
        module: &'a str,
        graph: &'a std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
        state: &mut std::collections::BTreeMap<&'a str, bool>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        state.insert(module, false);
        stack.push(module);
        for next in graph.get(module).into_iter().flatten() {
            match state.get(next.as_str()) {
                Some(false) => {
                    let start = stack.iter().position(|entry| *entry == next).unwrap();
                    let mut cycle: Vec<String> = stack[start..].iter().map(|entry| entry.to_string()).collect();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Some(true) => {}
                None => {
                    if let Some(cycle) = visit(next, graph, state, stack) {
                        return Some(cycle);
                    }
                }
            }
        }
        stack.pop();
        state.insert(module, true);
        None
    }
    let mut state = std::collections::BTreeMap::new();
    for module in graph.keys() {
        if !state.contains_key(module.as_str()) {
            let mut stack = Vec::new();
            if let Some(cycle) = visit(module, &graph, &mut state, &mut stack) {
                panic!("import cycle: {}", cycle.join(" -> "));
            }
        }
    }
}
