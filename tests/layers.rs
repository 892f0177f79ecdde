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
