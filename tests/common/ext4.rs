//! A small loop-mounted ext4 filesystem a test can fill (needs root, as CI has).
//! Unmounted (lazily) on Drop, even when the test panics.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn sh(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().unwrap_or_else(|error| panic!("{program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

pub struct Ext4 {
    pub point: PathBuf,
}

impl Ext4 {
    /// Makes an image of `size` (e.g. "12M") at `image`, without a journal, and mounts
    /// it at `point`.
    pub fn mount(image: &Path, size: &str, point: &Path) -> Ext4 {
        sh("truncate", &["-s", size, image.to_str().unwrap()]);
        sh("mkfs.ext4", &["-q", "-F", "-m", "0", "-b", "4096", "-O", "^has_journal", image.to_str().unwrap()]);
        std::fs::create_dir_all(point).unwrap();
        sh("mount", &["-o", "loop", image.to_str().unwrap(), point.to_str().unwrap()]);
        Ext4 { point: point.to_owned() }
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.point).status();
    }
}
