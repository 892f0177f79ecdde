//! The doctor's probes: the thin part that touches the host. Each function gathers raw
//! facts (an errno, a magic number, a limit) for `verdict` to judge and decides
//! nothing. Probes leave the host as they found it: scratch files and directories they
//! create are removed, sockets are closed.
//!
//! The libc calls no safe crate wraps (`statfs`, `statvfs`, `statx`, `getrlimit`, the
//! reuseport socket) live in `shell::sys`, weir's one module allowed `unsafe`.

use std::collections::BTreeSet;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::DIRECT_IO_ALIGNMENT_BYTES;
use crate::doctor::verdict::{
    DirPresence, DirectIoOutcome, IoUringSetup, PortFacts, PortHolder, PortProtocol, ReuseportOutcome, IO_URING_OPCODES,
};
pub use crate::shell::sys::{filesystem_magic, memlock_limits, mounted_read_only};
use crate::shell::sys::{parse_cpu_list, reuseport_socket, statx_dio_align};

/// Capability bits (linux/capability.h).
const CAP_IPC_LOCK: u32 = 14;
const CAP_SYS_ADMIN: u32 = 21;

/// Sets up a plain ring and probes the opcodes, then an IOPOLL ring as glommio's poll
/// ring is; returns the errno of the first `io_uring_setup` that fails.
pub fn io_uring_setup() -> Result<IoUringSetup, i32> {
    let errno = |error: io::Error| error.raw_os_error().unwrap_or(libc::EIO);
    let ring: io_uring::IoUring = io_uring::IoUring::new(8).map_err(errno)?;
    let mut probe = io_uring::Probe::new();
    let missing_opcodes = match ring.submitter().register_probe(&mut probe) {
        Ok(()) => {
            IO_URING_OPCODES.iter().filter(|(code, _)| !probe.is_supported(*code)).map(|(_, name)| *name).collect()
        }
        // IORING_REGISTER_PROBE arrived in 5.6: an older kernel lacks most opcodes too.
        Err(_) => IO_URING_OPCODES.iter().map(|(_, name)| *name).collect(),
    };
    drop(ring);
    let iopoll_errno = io_uring::IoUring::<io_uring::squeue::Entry, io_uring::cqueue::Entry>::builder()
        .setup_iopoll()
        .build(8)
        .err()
        .map(errno);
    Ok(IoUringSetup { missing_opcodes, iopoll_errno })
}

/// Reads an integer sysctl from /proc/sys (`kernel/io_uring_disabled`).
pub fn sysctl_integer(key: &str) -> Option<i64> {
    std::fs::read_to_string(Path::new("/proc/sys").join(key)).ok()?.trim().parse().ok()
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|text| text.trim().to_owned()).unwrap_or_default()
}

/// What /proc/self/status says about this process.
#[derive(Debug, Clone, Default)]
pub struct ProcessStatus {
    pub seccomp_mode: Option<u32>,
    pub effective_capabilities: u64,
    pub group_ids: BTreeSet<u32>,
    pub affinity: BTreeSet<usize>,
}

impl ProcessStatus {
    pub fn cap_ipc_lock(&self) -> bool {
        self.effective_capabilities & (1 << CAP_IPC_LOCK) != 0
    }
    pub fn cap_sys_admin(&self) -> bool {
        self.effective_capabilities & (1 << CAP_SYS_ADMIN) != 0
    }
}

pub fn process_status() -> ProcessStatus {
    let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    parse_process_status(&text)
}

pub fn parse_process_status(text: &str) -> ProcessStatus {
    let mut status = ProcessStatus::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        let value = value.trim();
        match key {
            "Seccomp" => status.seccomp_mode = value.parse().ok(),
            "CapEff" => status.effective_capabilities = u64::from_str_radix(value, 16).unwrap_or(0),
            "Gid" | "Groups" => {
                status.group_ids.extend(value.split_whitespace().filter_map(|id| id.parse::<u32>().ok()))
            }
            "Cpus_allowed_list" => status.affinity = parse_cpu_list(value),
            _ => {}
        }
    }
    status
}

pub fn cpus(kind: &str) -> BTreeSet<usize> {
    std::fs::read_to_string(format!("/sys/devices/system/cpu/{kind}"))
        .map(|text| parse_cpu_list(text.trim()))
        .unwrap_or_default()
}

/// Makes sure `path` is a directory, creating it (and missing parents) if needed;
/// returns what it found and the directories it created, deepest last, for
/// [`remove_created`].
pub fn prepare_directory(path: &Path) -> (DirPresence, Vec<PathBuf>) {
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_dir() => return (DirPresence::Exists, Vec::new()),
        Ok(_) => return (DirPresence::NotADirectory, Vec::new()),
        Err(_) => {}
    }
    let mut missing = Vec::new();
    let mut cursor = Some(path);
    while let Some(directory) = cursor {
        if directory.as_os_str().is_empty() || directory.exists() {
            break;
        }
        missing.push(directory.to_owned());
        cursor = directory.parent();
    }
    missing.reverse();
    match std::fs::create_dir_all(path) {
        Ok(()) => (DirPresence::Creatable, missing),
        Err(error) => {
            remove_created(&missing);
            let read_only_mount = error.raw_os_error() == Some(libc::EROFS);
            (DirPresence::CannotCreate { error: error.to_string(), read_only_mount }, Vec::new())
        }
    }
}

/// Removes the directories [`prepare_directory`] created, if they are still empty.
pub fn remove_created(created: &[PathBuf]) {
    for directory in created.iter().rev() {
        let _ = std::fs::remove_dir(directory);
    }
}

fn scratch_path(directory: &Path, what: &str) -> PathBuf {
    directory.join(format!(".weir-doctor-{what}-{}", std::process::id()))
}

/// Creates, syncs and removes a scratch file.
pub fn write_scratch(directory: &Path) -> Result<(), String> {
    let path = scratch_path(directory, "write");
    let outcome = std::fs::write(&path, b"weir doctor").and_then(|()| std::fs::File::open(&path)?.sync_all());
    let removed = std::fs::remove_file(&path);
    outcome.and(removed).map_err(|error| error.to_string())
}

/// An aligned O_DIRECT write, fdatasync and read back of one page in a scratch file.
/// Plain `std::fs` with `O_DIRECT` and a page-aligned slice of a larger buffer: no
/// io_uring, so this works (and tells the truth) even where io_uring is denied.
pub fn direct_io_round_trip(directory: &Path) -> DirectIoOutcome {
    let path = scratch_path(directory, "direct-io");
    let outcome = direct_io_on(&path);
    let _ = std::fs::remove_file(&path);
    outcome
}

fn direct_io_on(path: &Path) -> DirectIoOutcome {
    let alignment = DIRECT_IO_ALIGNMENT_BYTES as usize;
    let errno = |error: &io::Error| error.raw_os_error().unwrap_or(libc::EIO);
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(file) => file,
        Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
            return DirectIoOutcome::OpenRefused { errno: libc::EINVAL }
        }
        Err(error) => return DirectIoOutcome::Other { error: format!("create {}: {error}", path.display()) },
    };
    let mut written = vec![0u8; 2 * alignment];
    let start = written.as_ptr().align_offset(alignment);
    for (index, byte) in written[start..start + alignment].iter_mut().enumerate() {
        *byte = (index % 251) as u8 | 1;
    }
    if let Err(error) = file.write_all_at(&written[start..start + alignment], 0) {
        return DirectIoOutcome::IoFailed { operation: "write", errno: errno(&error) };
    }
    if let Err(error) = file.sync_data() {
        return DirectIoOutcome::IoFailed { operation: "fdatasync", errno: errno(&error) };
    }
    let mut read = vec![0u8; 2 * alignment];
    let read_start = read.as_ptr().align_offset(alignment);
    if let Err(error) = file.read_exact_at(&mut read[read_start..read_start + alignment], 0) {
        return DirectIoOutcome::IoFailed { operation: "read", errno: errno(&error) };
    }
    if read[read_start..read_start + alignment] != written[start..start + alignment] {
        return DirectIoOutcome::Mismatch;
    }
    DirectIoOutcome::Works
}

/// Bytes an unprivileged writer may still use on the filesystem holding `path`.
pub use crate::shell::sys::available_bytes;

/// `statx(STATX_DIOALIGN)` of a scratch file in `directory` (filesystems report it for
/// regular files only): (memory alignment, offset alignment) in bytes, or `None` when
/// the kernel or the filesystem does not report them.
pub fn direct_io_alignment(directory: &Path) -> io::Result<Option<(u32, u32)>> {
    let path = scratch_path(directory, "statx");
    std::fs::write(&path, b"")?;
    let reported = statx_dio_align(&path);
    let _ = std::fs::remove_file(&path);
    reported
}

/// Bytes the files under `path` occupy on disk (one level of partition directories).
pub fn used_bytes(path: &Path) -> u64 {
    fn walk(path: &Path, depth: u32) -> u64 {
        let Ok(entries) = std::fs::read_dir(path) else { return 0 };
        let mut total = 0u64;
        for entry in entries.flatten() {
            let Ok(metadata) = entry.metadata() else { continue };
            if metadata.is_dir() && depth > 0 {
                total += walk(&entry.path(), depth - 1);
            } else if metadata.is_file() {
                total += std::os::unix::fs::MetadataExt::blocks(&metadata) * 512;
            }
        }
        total
    }
    walk(path, 1)
}

/// (GSO segments, GRO segments) quinn-udp finds on a loopback UDP socket; 1 is none.
pub fn udp_offload() -> io::Result<(usize, usize)> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let state = quinn_udp::UdpSocketState::new((&socket).into())?;
    Ok((state.max_gso_segments(), state.gro_segments()))
}

/// Asks a loopback UDP socket for the QUIC sockets' buffers, as serve does; returns
/// what `getsockopt` reports (twice the usable size, capped by the kernel).
pub fn udp_buffers_granted(receive_bytes: u64, send_bytes: u64) -> io::Result<(u64, u64)> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let (receive, send) = crate::shell::quic::set_socket_buffers(&socket, receive_bytes as usize, send_bytes as usize)?;
    Ok((receive as u64, send as u64))
}

/// Makes a SO_REUSEPORT group of `group_size` UDP sockets on a loopback port, attaches
/// serve's own steering program (`shell::sys::attach_reuseport_steering`), and sends
/// one short-header datagram per socket naming it as its connection id's core; counts
/// those that arrived where they were steered.
pub fn reuseport_cbpf(group_size: usize) -> io::Result<ReuseportOutcome> {
    const WAIT: Duration = Duration::from_millis(500);
    assert!((2..=1024).contains(&group_size));
    let first = reuseport_socket(0)?;
    let port = first.local_addr()?.port();
    let mut group = vec![first];
    for _ in 1..group_size {
        group.push(reuseport_socket(port)?);
    }
    crate::shell::sys::attach_reuseport_steering(&group[0])
        .map_err(|error| io::Error::new(error.kind(), format!("setsockopt(SO_ATTACH_REUSEPORT_CBPF): {error}")))?;
    let sender = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let target = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
    for index in 0..group_size as u32 {
        let mut datagram = [0x40u8; 24];
        datagram[1..5].copy_from_slice(&index.to_be_bytes());
        sender.send_to(&datagram, target)?;
    }
    let mut steered_right = 0;
    for (index, socket) in group.iter().enumerate() {
        socket.set_nonblocking(true)?;
        let deadline = Instant::now() + WAIT;
        let mut buffer = [0u8; 64];
        let mut received = false;
        loop {
            match socket.recv(&mut buffer) {
                Ok(length) => {
                    received = true;
                    let named = buffer
                        .get(1..5)
                        .filter(|_| length >= 5)
                        .map(|word| u32::from_be_bytes([word[0], word[1], word[2], word[3]]) as usize);
                    if named == Some(index) {
                        steered_right += 1;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    if received || Instant::now() >= deadline {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(error) => return Err(error),
            }
        }
    }
    Ok(ReuseportOutcome { group_size, port, steered_right })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_status_parses() {
        let status = parse_process_status(
            "Name:\tweir\nGid:\t0\t0\t0\t0\nGroups:\t27 100 \nCapEff:\t000001fffeffffff\nSeccomp:\t2\nCpus_allowed_list:\t0-1\n",
        );
        assert_eq!(status.seccomp_mode, Some(2));
        assert!(status.cap_ipc_lock() && status.cap_sys_admin());
        assert_eq!(status.group_ids, [0, 27, 100].into_iter().collect());
        assert_eq!(status.affinity, [0, 1].into_iter().collect());
    }

    #[test]
    fn this_host_probes() {
        let directory = std::env::temp_dir();
        assert!(filesystem_magic(&directory).is_ok());
        assert!(available_bytes(&directory).unwrap() > 0);
        assert!(memlock_limits().is_ok());
        assert!(!kernel_release().is_empty());
    }
}

/// Whether `address` can be bound for `protocol` now (a plain bind, without
/// SO_REUSEPORT, so a port weir holds is busy), and if not, which processes hold a
/// socket on its port.
pub fn listen_port(protocol: PortProtocol, address: SocketAddr) -> PortFacts {
    if address.port() == 0 {
        return PortFacts::AnyPort;
    }
    let bound = match protocol {
        PortProtocol::Udp => UdpSocket::bind(address).map(drop),
        PortProtocol::Tcp => std::net::TcpListener::bind(address).map(drop),
    };
    match bound {
        Ok(()) => PortFacts::Free,
        Err(error) if error.kind() == io::ErrorKind::AddrInUse => {
            PortFacts::InUse { holders: port_holders(protocol, address.port()) }
        }
        Err(error) => PortFacts::Unknown { error: error.to_string() },
    }
}

/// The processes with a socket on `port`: the socket inodes from `/proc/net`, then the
/// processes whose descriptors point at them (`/proc/PID/fd/N -> socket:[INODE]`).
fn port_holders(protocol: PortProtocol, port: u16) -> Vec<PortHolder> {
    let tables = match protocol {
        PortProtocol::Udp => ["/proc/net/udp", "/proc/net/udp6"],
        PortProtocol::Tcp => ["/proc/net/tcp", "/proc/net/tcp6"],
    };
    let mut inodes = BTreeSet::new();
    for table in tables {
        if let Ok(text) = std::fs::read_to_string(table) {
            inodes.extend(socket_inodes_on_port(&text, port, protocol == PortProtocol::Tcp));
        }
    }
    let mut holders = Vec::new();
    let Ok(processes) = std::fs::read_dir("/proc") else { return holders };
    for process in processes.flatten() {
        let Some(pid) = process.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else { continue };
        let Ok(descriptors) = std::fs::read_dir(process.path().join("fd")) else { continue };
        let holds = descriptors.flatten().any(|descriptor| {
            std::fs::read_link(descriptor.path()).ok().is_some_and(|target| {
                let target = target.to_string_lossy();
                target
                    .strip_prefix("socket:[")
                    .and_then(|rest| rest.strip_suffix(']'))
                    .and_then(|inode| inode.parse::<u64>().ok())
                    .is_some_and(|inode| inodes.contains(&inode))
            })
        });
        if holds {
            let command = std::fs::read_to_string(process.path().join("comm")).unwrap_or_default().trim().to_owned();
            let executable = std::fs::read_link(process.path().join("exe"))
                .ok()
                .and_then(|path| path.file_name().map(|name| name.to_string_lossy().into_owned()))
                .unwrap_or_default();
            // A rebuilt or upgraded binary reads "weir (deleted)".
            let executable = executable.trim_end_matches(" (deleted)").to_owned();
            holders.push(PortHolder { pid, command, executable });
        }
    }
    holders
}

/// The socket inodes bound to `port` in a `/proc/net/{udp,tcp}[6]` table (listening
/// sockets only when `listening_only`: TCP state 0A). Its lines read `sl local_address
/// rem_address st ... uid timeout inode`, the address as hex `IP:PORT`.
pub fn socket_inodes_on_port(table: &str, port: u16, listening_only: bool) -> Vec<u64> {
    const TCP_LISTEN: &str = "0A";
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
            let state = *fields.get(3)?;
            let inode: u64 = fields.get(9)?.parse().ok()?;
            (local_port == port && inode != 0 && (!listening_only || state == TCP_LISTEN)).then_some(inode)
        })
        .collect()
}

#[cfg(test)]
mod port_tests {
    use super::*;

    #[test]
    fn socket_inodes_are_found_by_port_and_tcp_by_listening_state() {
        let udp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  112: 00000000:1151 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 81234 2 0000000000000000 0
  113: 0100007F:1151 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 81235 2 0000000000000000 0
  114: 00000000:1152 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 81236 2 0000000000000000 0
";
        assert_eq!(socket_inodes_on_port(udp, 4433, false), [81234, 81235]);
        assert_eq!(socket_inodes_on_port(udp, 4434, false), [81236]);
        assert!(socket_inodes_on_port(udp, 9, false).is_empty());
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:24F8 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 90001 1 0000000000000000 100 0 0 10 0
   1: 0100007F:24F8 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 90002 1 0000000000000000 20 4 30 10 -1
";
        assert_eq!(socket_inodes_on_port(tcp, 9464, true), [90001], "a connection on the port is no listener");
        // The real table of this host parses, and a socket this test binds is in it.
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        let table = std::fs::read_to_string("/proc/net/udp").unwrap();
        assert_eq!(socket_inodes_on_port(&table, port, false).len(), 1);
        match listen_port(PortProtocol::Udp, socket.local_addr().unwrap()) {
            PortFacts::InUse { holders } => {
                assert!(holders.iter().any(|holder| holder.pid == std::process::id()), "{holders:?}")
            }
            other => panic!("expected the port in use, got {other:?}"),
        }
        drop(socket);
        assert_eq!(listen_port(PortProtocol::Udp, format!("127.0.0.1:{port}").parse().unwrap()), PortFacts::Free);
    }
}
