//! weir-relay as a user runs it, between a UDP client and a UDP echo server on
//! 127.0.0.1: losses add up in its counters, the same seed loses the same datagrams,
//! rebinding moves the relay's source port while replies keep coming back, and bad
//! flags are refused with exit code 2. Every run is bounded by --seconds.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn relay() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weir-relay"))
}

/// An echo server on a free loopback port; it notes every datagram's payload and
/// source address. Stops after `seconds`.
/// Every datagram the echo server received: payload and source address.
type Seen = Arc<Mutex<Vec<(Vec<u8>, SocketAddr)>>>;

fn echo_server(seconds: u64) -> (SocketAddr, Seen) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let address = socket.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let kept = seen.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut buffer = [0u8; 2048];
        while Instant::now() < deadline {
            if let Ok((length, from)) = socket.recv_from(&mut buffer) {
                kept.lock().unwrap().push((buffer[..length].to_vec(), from));
                let _ = socket.send_to(&buffer[..length], from);
            }
        }
    });
    (address, seen)
}

/// Starts the relay towards `to` and returns it with the address it listens on.
fn start(to: SocketAddr, extra: &[&str]) -> (Child, SocketAddr) {
    let mut child = relay()
        .args(["--listen", "127.0.0.1:0", "--to", &to.to_string()])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap()).read_line(&mut line).unwrap();
    let address = line
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no listening line: {line:?}"))
        .parse()
        .unwrap();
    (child, address)
}

/// SIGTERM, then the counters line.
fn stop(child: Child) -> serde_json::Value {
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{:?}", output.status);
    let stdout = String::from_utf8(output.stdout).unwrap();
    serde_json::from_str(stdout.lines().last().unwrap()).unwrap_or_else(|error| panic!("{error}: {stdout:?}"))
}

/// Sends `count` numbered datagrams one at a time (each waits up to 20 ms for its
/// echo, so they pass the relay in order) and returns the numbers echoed back.
fn ping(relay: SocketAddr, count: u32) -> BTreeSet<u32> {
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut echoed = BTreeSet::new();
    let mut buffer = [0u8; 64];
    for index in 0..count {
        client.send_to(&index.to_be_bytes(), relay).unwrap();
        while let Ok(length) = client.recv(&mut buffer) {
            echoed.insert(u32::from_be_bytes(buffer[..length].try_into().unwrap()));
            if echoed.contains(&index) {
                break;
            }
        }
    }
    echoed
}

fn numbers(seen: &Seen) -> Vec<u32> {
    seen.lock().unwrap().iter().map(|(payload, _)| u32::from_be_bytes(payload[..4].try_into().unwrap())).collect()
}

#[test]
fn losses_in_both_directions_add_up_in_the_counters() {
    let (server, seen) = echo_server(60);
    let (child, address) = start(server, &["--seed", "1", "--loss", "0.3", "--seconds", "60"]);
    let echoed = ping(address, 1000);
    std::thread::sleep(Duration::from_millis(100));
    let counters = stop(child);
    let reached_server = numbers(&seen).len() as u64;
    let echoed = echoed.len() as u64;
    assert_eq!(counters["received_from_clients"], 1000, "{counters}");
    assert_eq!(counters["received_from_server"], reached_server, "{counters}");
    assert_eq!(counters["dropped"], (1000 - reached_server) + (reached_server - echoed), "{counters}");
    assert_eq!(counters["forwarded"], reached_server + echoed, "{counters}");
    assert_eq!(counters["sessions"], 1);
    let lost = counters["dropped"].as_f64().unwrap() / (1000 + reached_server) as f64;
    assert!((0.25..0.35).contains(&lost), "loss rate {lost}: {counters}");
}

#[test]
fn the_same_seed_loses_the_same_datagrams() {
    let run = |seed: &str| {
        let (server, seen) = echo_server(60);
        let (child, address) = start(server, &["--seed", seed, "--loss", "0.2", "--seconds", "60"]);
        ping(address, 300);
        std::thread::sleep(Duration::from_millis(50));
        stop(child);
        numbers(&seen)
    };
    let first = run("77");
    assert!(first.len() > 200 && first.len() < 280, "{}", first.len());
    assert_eq!(first, run("77"));
    assert_ne!(first, run("78"));
}

#[test]
fn rebinding_moves_the_source_port_and_replies_still_come_back() {
    let (server, seen) = echo_server(60);
    let (child, address) = start(server, &["--seed", "3", "--rebind-every-s", "0.3", "--seconds", "60"]);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buffer = [0u8; 64];
    // A reply already on its way to a socket that a rebind replaced is lost, as
    // behind a real NAT; the client then sends again, like QUIC would.
    for index in 0u32..30 {
        let echoed = (0..3).any(|_| {
            client.send_to(&index.to_be_bytes(), address).unwrap();
            client.recv(&mut buffer).is_ok_and(|length| buffer[..length] == index.to_be_bytes())
        });
        assert!(echoed, "datagram {index} was never echoed through the current socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    let counters = stop(child);
    let ports: BTreeSet<u16> = seen.lock().unwrap().iter().map(|(_, from)| from.port()).collect();
    let rebinds = counters["rebinds"].as_u64().unwrap();
    assert!(rebinds >= 3, "{counters}");
    // One new source port per rebind (the last rebind may come too late for a datagram).
    let ports_used = ports.len() as u64;
    assert!(ports_used == rebinds + 1 || ports_used == rebinds, "{ports:?}, {counters}");
}

#[test]
fn delay_and_a_cut_are_applied() {
    let (server, seen) = echo_server(60);
    let (child, address) = start(
        server,
        &["--seed", "4", "--delay-ms", "100", "--cut-at-s", "0.5", "--cut-for-s", "0.5", "--seconds", "60"],
    );
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    client.set_read_timeout(Some(Duration::from_millis(400))).unwrap();
    let mut buffer = [0u8; 64];
    let sent = Instant::now();
    client.send_to(b"rtt", address).unwrap();
    client.recv(&mut buffer).unwrap();
    let round_trip = sent.elapsed();
    assert!(round_trip >= Duration::from_millis(200), "two delayed legs: {round_trip:?}");
    // Inside the cut nothing passes; after it, traffic flows again.
    std::thread::sleep(Duration::from_millis(700) - round_trip.min(Duration::from_millis(600)));
    client.send_to(b"cut", address).unwrap();
    assert!(client.recv(&mut buffer).is_err(), "nothing passes during the cut");
    std::thread::sleep(Duration::from_millis(500));
    client.send_to(b"after", address).unwrap();
    let length = client.recv(&mut buffer).unwrap();
    assert_eq!(&buffer[..length], b"after");
    let counters = stop(child);
    assert_eq!(counters["cut_dropped"], 1, "{counters}");
    let payloads: Vec<Vec<u8>> = seen.lock().unwrap().iter().map(|(payload, _)| payload.clone()).collect();
    assert_eq!(payloads, [b"rtt".to_vec(), b"after".to_vec()]);
}

#[test]
fn bad_flags_are_refused_with_exit_code_2() {
    let to = "127.0.0.1:9";
    let cases: [(&[&str], &str); 4] = [
        (&["--loss", "1.5"], "--loss 1.5 is not a probability"),
        (&["--cut-at-s", "5"], "--cut-for-s"),
        (&["--rebind-every-s", "0.01"], "--rebind-every-s must be at least 0.1"),
        (&["--seconds=-1"], "--seconds -1 is not in"),
    ];
    for (extra, expected) in cases {
        let output = relay().args(["--listen", "127.0.0.1:0", "--to", to, "--seed", "1"]).args(extra).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    }
    let output = relay().args(["--listen", "127.0.0.1:0", "--to", "127.0.0.1:0", "--seed", "1"]).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("not an address to send to"));
}
