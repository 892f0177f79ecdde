//! A whole appliance for the QUIC tests: a device PKI from `weir certs` in
//! `ROOT/certs`, a config in `ROOT/weir.toml` (data in `ROOT/data`, admin and QUIC on
//! loopback port 0) and a real `weir serve` ([`Server`]) on it. Devices are the
//! aioquic device (an independent QUIC stack) or whatever the caller points at
//! `quic`. Needs `#[path = "common/server.rs"] mod server;` beside it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

use crate::server::{weir, Server};

/// `weir certs` for `devices` into `directory` (a CA and one certificate per device).
pub fn make_certs(directory: &Path, devices: &[&str]) {
    let mut command = weir();
    command.arg("certs");
    for device in devices {
        command.args(["--device", device]);
    }
    let output = command.arg("--dir").arg(directory).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

pub struct Appliance {
    pub server: Server,
    /// host:port of the QUIC listener.
    pub quic: String,
    pub root: PathBuf,
}

impl Appliance {
    /// `weir serve --cores cores` on a config with `quic` in its `[quic]` section,
    /// `extra` (whole sections) after it, and the `topics` (name, partitions). The PKI
    /// must already be in `root/certs` (see [`make_certs`]).
    pub fn start(root: &Path, quic: &str, extra: &str, topics: &[(&str, u32)], cores: usize) -> Appliance {
        let config = root.join("weir.toml");
        let mut text = format!(
            "data_dir = {:?}\n[admin]\nlisten = \"127.0.0.1:0\"\n[kafka_api]\nlisten = \"127.0.0.1:0\"\n[quic]\nlisten = \"127.0.0.1:0\"\ncerts_dir = {:?}\ngenerate_dev_certs = false\n{quic}\n{extra}\n",
            root.join("data").display(),
            root.join("certs").display()
        );
        for (name, partitions) in topics {
            text.push_str(&format!("[[topics]]\nname = \"{name}\"\npartitions = {partitions}\n"));
        }
        std::fs::write(&config, text).unwrap();
        let server = Server::start(&config, cores);
        let quic = server.quic.clone().expect("the QUIC address is logged");
        Appliance { server, quic, root: root.to_owned() }
    }

    pub fn certs(&self) -> PathBuf {
        self.root.join("certs")
    }

    /// The value of one metric line (`name` with its labels, as exposed); 0 when absent.
    pub fn metric(&self, name: &str) -> f64 {
        let (code, text) = self.server.get("/metrics");
        assert_eq!(code, 200, "{text}");
        text.lines()
            .find_map(|line| line.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .map_or(0.0, |value| value.trim().parse().unwrap())
    }

    /// The aioquic device as `device`, run with `args` to the end.
    pub fn aioquic(&self, device: &str, args: &[&str]) -> Output {
        self.server.aioquic_device(&self.certs(), device).args(args).output().unwrap()
    }

    /// SIGINT; weir must stop cleanly (exit 0).
    pub fn stop(self) {
        assert_eq!(self.server.stop(), Some(0), "weir stops cleanly");
    }
}
