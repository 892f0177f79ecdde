//! The doctor's judgement, and nothing else: each function takes the facts a probe
//! gathered (numbers, errnos, sets of CPUs) and returns one [`Check`] — ok, warn or
//! fail, what was seen, and the exact fix. No I/O and no clock here, so every verdict is
//! unit-tested with made-up hosts, including the ones this machine is not.
//!
//! The trade-off: a probe reports raw facts (an errno, a filesystem magic number)
//! rather than conclusions, so telling apart causes that look the same to the program
//! (EPERM from seccomp, from `kernel.io_uring_disabled` or from `io_uring_group`) is
//! done here, in one place, from all the facts together.

use std::collections::BTreeSet;

use crate::config::{CoreSelection, DIRECT_IO_ALIGNMENT_BYTES};
use crate::doctor::{Check, Status};

/// Where the packaged sysctl drop-in lands.
pub const SYSCTL_DROP_IN: &str = "/etc/sysctl.d/60-weir.conf";
/// Where the package installs the Docker/Podman seccomp profile.
pub const SECCOMP_PROFILE: &str = "/usr/share/weir/seccomp.json";

/// glommio refuses to build a reactor below this RLIMIT_MEMLOCK (its `MIN_MEMLOCK_LIMIT`),
/// whatever the capabilities.
pub const GLOMMIO_MEMLOCK_BYTES_MIN: u64 = 512 << 10;
/// glommio registers each executor's DMA pool with each of its three rings (main, poll,
/// latency); the kernel charges every registration.
pub const GLOMMIO_RINGS_PER_EXECUTOR: u64 = 3;
/// glommio rounds the DMA pool up to a page and to at least this.
pub const GLOMMIO_IO_MEMORY_BYTES_MIN: u64 = 64 << 10;

/// io_uring opcodes glommio 0.9 checks for at start (it exits the process when one is
/// missing) plus the ones weir's shell submits through it.
pub const IO_URING_OPCODES: &[(u8, &str)] = &[
    (io_uring::opcode::Nop::CODE, "NOP"),
    (io_uring::opcode::Readv::CODE, "READV"),
    (io_uring::opcode::Writev::CODE, "WRITEV"),
    (io_uring::opcode::Fsync::CODE, "FSYNC"),
    (io_uring::opcode::ReadFixed::CODE, "READ_FIXED"),
    (io_uring::opcode::WriteFixed::CODE, "WRITE_FIXED"),
    (io_uring::opcode::PollAdd::CODE, "POLL_ADD"),
    (io_uring::opcode::PollRemove::CODE, "POLL_REMOVE"),
    (io_uring::opcode::SendMsg::CODE, "SENDMSG"),
    (io_uring::opcode::RecvMsg::CODE, "RECVMSG"),
    (io_uring::opcode::Timeout::CODE, "TIMEOUT"),
    (io_uring::opcode::TimeoutRemove::CODE, "TIMEOUT_REMOVE"),
    (io_uring::opcode::Accept::CODE, "ACCEPT"),
    (io_uring::opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    (io_uring::opcode::LinkTimeout::CODE, "LINK_TIMEOUT"),
    (io_uring::opcode::Connect::CODE, "CONNECT"),
    (io_uring::opcode::Fallocate::CODE, "FALLOCATE"),
    (io_uring::opcode::OpenAt::CODE, "OPENAT"),
    (io_uring::opcode::Close::CODE, "CLOSE"),
    (io_uring::opcode::Statx::CODE, "STATX"),
    (io_uring::opcode::Read::CODE, "READ"),
    (io_uring::opcode::Write::CODE, "WRITE"),
    (io_uring::opcode::Send::CODE, "SEND"),
    (io_uring::opcode::Recv::CODE, "RECV"),
];

fn ok(name: &'static str, saw: String) -> Check {
    Check { name, status: Status::Ok, saw, fix: None }
}

fn warn(name: &'static str, saw: String, fix: String) -> Check {
    Check { name, status: Status::Warn, saw, fix: Some(fix) }
}

fn fail(name: &'static str, saw: String, fix: String) -> Check {
    Check { name, status: Status::Fail, saw, fix: Some(fix) }
}

/// A check that cannot run yet, with the reason.
pub fn skip(name: &'static str, reason: &str) -> Check {
    Check { name, status: Status::Skip, saw: reason.to_owned(), fix: None }
}

pub use crate::config::bytes_text;

fn errno_text(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOSYS => "ENOSYS",
        libc::EINVAL => "EINVAL",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EROFS => "EROFS",
        libc::ENOSPC => "ENOSPC",
        _ => "",
    };
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    if name.is_empty() {
        text
    } else {
        format!("{name} ({text})")
    }
}

/// `6.1.0-18-amd64` -> (6, 1).
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

// ---------------------------------------------------------------------------------------
// io_uring

/// What setting up rings and probing opcodes gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoUringSetup {
    /// Opcodes of [`IO_URING_OPCODES`] the kernel does not support.
    pub missing_opcodes: Vec<&'static str>,
    /// Setting up a ring with IORING_SETUP_IOPOLL (glommio's poll ring): the errno if it failed.
    pub iopoll_errno: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoUringFacts {
    /// A plain ring and the opcode probe, or the errno of `io_uring_setup`.
    pub setup: Result<IoUringSetup, i32>,
    /// `kernel.io_uring_disabled` (absent before Linux 6.6).
    pub io_uring_disabled: Option<i64>,
    /// `kernel.io_uring_group` (absent before Linux 6.6).
    pub io_uring_group: Option<i64>,
    /// This process's group ids (real, effective and supplementary).
    pub group_ids: BTreeSet<u32>,
    pub cap_sys_admin: bool,
    /// The `Seccomp:` field of /proc/self/status: 0 none, 1 strict, 2 filter.
    pub seccomp_mode: Option<u32>,
    pub kernel_release: String,
}

const SECCOMP_FIX: &str = "run the container with weir's profile instead of the default one: \
    docker run --security-opt seccomp=/usr/share/weir/seccomp.json ... (podman run takes the same flag; \
    the profile is firmware-config/seccomp/weir.json); never seccomp=unconfined";
const KERNEL_FIX: &str = "upgrade the kernel: glommio needs Linux 5.8 or newer (a 6.1+ LTS kernel is recommended)";

pub fn io_uring(facts: &IoUringFacts) -> Check {
    const NAME: &str = "io_uring";
    let kernel = &facts.kernel_release;
    let old_kernel = kernel_version(kernel).is_some_and(|version| version < (5, 8));
    match &facts.setup {
        Ok(setup) if !setup.missing_opcodes.is_empty() => fail(
            NAME,
            format!(
                "kernel {kernel} lacks io_uring opcodes glommio needs: {} (glommio would exit the process at start)",
                setup.missing_opcodes.join(", ")
            ),
            KERNEL_FIX.to_owned(),
        ),
        Ok(IoUringSetup { iopoll_errno: Some(errno), .. }) => fail(
            NAME,
            format!(
                "a plain ring works but an IOPOLL ring (glommio's poll ring) fails with {} on kernel {kernel}",
                errno_text(*errno)
            ),
            KERNEL_FIX.to_owned(),
        ),
        Ok(_) => ok(
            NAME,
            format!(
                "rings set up (plain and IOPOLL); all {} opcodes glommio and weir use are supported (kernel {kernel})",
                IO_URING_OPCODES.len()
            ),
        ),
        Err(errno) if *errno == libc::EPERM => io_uring_denied(facts),
        Err(errno) if *errno == libc::ENOSYS && facts.seccomp_mode == Some(2) => fail(
            NAME,
            "io_uring_setup: ENOSYS under a seccomp filter (Seccomp: 2 in /proc/self/status): \
             the filter hides io_uring"
                .to_owned(),
            SECCOMP_FIX.to_owned(),
        ),
        Err(errno) if *errno == libc::ENOSYS || old_kernel => fail(
            NAME,
            format!(
                "io_uring_setup: {}: kernel {kernel} has no usable io_uring (older than 5.8, or built without \
                 CONFIG_IO_URING)",
                errno_text(*errno)
            ),
            KERNEL_FIX.to_owned(),
        ),
        Err(errno) if *errno == libc::ENOMEM => fail(
            NAME,
            format!(
                "io_uring_setup: ENOMEM on kernel {kernel}: before Linux 5.12 ring memory is charged to \
                 RLIMIT_MEMLOCK"
            ),
            "raise the locked-memory limit: LimitMEMLOCK=infinity in the systemd unit, or docker run --ulimit \
             memlock=-1"
                .to_owned(),
        ),
        Err(errno) => fail(
            NAME,
            format!("io_uring_setup: {} on kernel {kernel}", errno_text(*errno)),
            "look for the denial in `dmesg` or the audit log; weir cannot run without io_uring".to_owned(),
        ),
    }
}

fn io_uring_denied(facts: &IoUringFacts) -> Check {
    const NAME: &str = "io_uring";
    match (facts.io_uring_disabled, facts.io_uring_group) {
        (Some(2), _) => fail(
            NAME,
            "io_uring_setup: EPERM: kernel.io_uring_disabled = 2 switches io_uring off for every process".to_owned(),
            format!(
                "sysctl -w kernel.io_uring_disabled=0 and persist it in {SYSCTL_DROP_IN} (or set it to 1 with \
                 kernel.io_uring_group = the gid of weir's group)"
            ),
        ),
        (Some(1), group) if !facts.cap_sys_admin => {
            let group = group.unwrap_or(-1);
            if group < 0 {
                fail(
                    NAME,
                    "io_uring_setup: EPERM: kernel.io_uring_disabled = 1 and kernel.io_uring_group = -1: only \
                     CAP_SYS_ADMIN processes may create rings"
                        .to_owned(),
                    format!(
                        "sysctl -w kernel.io_uring_group=$(getent group weir | cut -d: -f3) (persist it in \
                         {SYSCTL_DROP_IN}), or kernel.io_uring_disabled=0"
                    ),
                )
            } else if !facts.group_ids.contains(&(group as u32)) {
                let groups: Vec<String> = facts.group_ids.iter().map(u32::to_string).collect();
                fail(
                    NAME,
                    format!(
                        "io_uring_setup: EPERM: kernel.io_uring_disabled = 1 and this process (groups {}) is not in \
                         kernel.io_uring_group = {group}",
                        groups.join(", ")
                    ),
                    format!(
                        "run weir in group {group}: SupplementaryGroups= in the systemd unit (or usermod -aG), or set \
                         kernel.io_uring_group to weir's group"
                    ),
                )
            } else {
                fail(
                    NAME,
                    format!(
                        "io_uring_setup: EPERM although this process is in kernel.io_uring_group = {group}: something \
                         else (seccomp mode {:?}, a security module) denies it",
                        facts.seccomp_mode
                    ),
                    "look for the denial in `dmesg` or the audit log".to_owned(),
                )
            }
        }
        _ if facts.seccomp_mode == Some(2) => fail(
            NAME,
            "io_uring_setup: EPERM from a seccomp filter (Seccomp: 2 in /proc/self/status; io_uring is enabled in \
             the kernel): the container's profile denies io_uring, as Docker's default profile does \
             (moby/moby#46762)"
                .to_owned(),
            SECCOMP_FIX.to_owned(),
        ),
        _ => fail(
            NAME,
            "io_uring_setup: EPERM with io_uring enabled in the kernel and no seccomp filter: a security module \
             (SELinux, AppArmor) or a sandbox denies it"
                .to_owned(),
            "look for the denial in `dmesg` or the audit log and allow io_uring for weir".to_owned(),
        ),
    }
}

// ---------------------------------------------------------------------------------------
// The data directory

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirPresence {
    Exists,
    /// It did not exist; the probe created it (and removes it again afterwards).
    Creatable,
    NotADirectory,
    CannotCreate {
        error: String,
        /// The failure was EROFS: the filesystem is mounted read-only.
        read_only_mount: bool,
    },
}

/// The fix for a data directory on a read-only mount: ownership and modes cannot help.
fn read_only_fix(path: &str) -> String {
    format!(
        "{path} is on a read-only mount, so chown or chmod cannot help: remount it read-write (`mount -o \
         remount,rw \"$(findmnt -no TARGET -T {path})\"`, and make it so in /etc/fstab), or point data_dir at a \
         writable filesystem; under systemd keep ReadWritePaths={path}; in a container mount the volume without \
         :ro"
    )
}

pub fn data_dir_presence(path: &str, presence: &DirPresence) -> Check {
    const NAME: &str = "data_dir";
    match presence {
        DirPresence::Exists => ok(NAME, format!("{path} exists")),
        DirPresence::Creatable => ok(NAME, format!("{path} does not exist yet; it can be created (serve creates it)")),
        DirPresence::NotADirectory => {
            fail(NAME, format!("{path} exists and is not a directory"), "point data_dir at a directory".to_owned())
        }
        DirPresence::CannotCreate { error, read_only_mount: true } => {
            fail(NAME, format!("{path} does not exist and cannot be created: {error}"), read_only_fix(path))
        }
        DirPresence::CannotCreate { error, read_only_mount: false } => fail(
            NAME,
            format!("{path} does not exist and cannot be created: {error}"),
            format!("mkdir -p {path} && chown weir:weir {path} (the package creates /var/lib/weir)"),
        ),
    }
}

/// Who holds the data directory's lock (`weir.lock`, see `shell::dir_lock`): doctor
/// runs beside a serving weir too, so a holder is a warning that names it, not a failure.
pub fn data_dir_owner(path: &str, holder_pid: Option<u32>) -> Check {
    const NAME: &str = "data_dir.owner";
    match holder_pid {
        None => ok(NAME, format!("no weir process holds {path}")),
        Some(pid) => warn(
            NAME,
            format!("weir (PID {pid}) is serving {path}; a second `weir serve` on it is refused (exit 8)"),
            format!(
                "nothing to do if PID {pid} is the weir service; otherwise stop it (`kill {pid}`) or give the new \
                 config its own data_dir"
            ),
        ),
    }
}

/// `read_only_mount`: `statvfs` reports `ST_RDONLY` for the data directory's filesystem.
pub fn data_dir_writable(path: &str, result: &Result<(), String>, read_only_mount: bool) -> Check {
    const NAME: &str = "data_dir.writable";
    match result {
        Ok(()) => ok(NAME, format!("created, synced and removed a scratch file in {path}")),
        Err(error) if read_only_mount || error.contains(&errno_text(libc::EROFS)) || error.contains("os error 30") => {
            fail(NAME, format!("cannot write in {path}: {error}"), read_only_fix(path))
        }
        // A full disk is no reason not to start: weir refuses appends (or drops, per
        // log.disk_full_policy) and shipping plus retention free the space.
        Err(error) if error.contains("No space left on device") => warn(
            NAME,
            format!("{path} is full: {error}; appends are refused (or dropped, per log.disk_full_policy) until shipping and retention free space"),
            "free space under data_dir, or bring the upstream back so shipped segments can be deleted".to_owned(),
        ),
        Err(error) => fail(
            NAME,
            format!("cannot write in {path}: {error}"),
            format!(
                "chown -R weir:weir {path}; under systemd keep ReadWritePaths={path}; in a container mount it \
                 read-write"
            ),
        ),
    }
}

// ---------------------------------------------------------------------------------------
// The listening ports

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    Udp,
    Tcp,
}

impl PortProtocol {
    fn as_str(self) -> &'static str {
        match self {
            PortProtocol::Udp => "UDP",
            PortProtocol::Tcp => "TCP",
        }
    }
}

/// A process holding a socket on a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortHolder {
    pub pid: u32,
    /// `/proc/PID/comm`.
    pub command: String,
    /// The file name of `/proc/PID/exe` (empty when unreadable).
    pub executable: String,
}

impl PortHolder {
    fn is_weir(&self) -> bool {
        self.executable == "weir" || self.command == "weir"
    }
}

/// What binding a listen address found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortFacts {
    /// Port 0: the kernel picks a free port at start.
    AnyPort,
    Free,
    /// The bind failed with EADDRINUSE; who holds the port (empty: not visible here).
    InUse {
        holders: Vec<PortHolder>,
    },
    Unknown {
        error: String,
    },
}

/// Whether weir can listen on `address` (`field`: `quic.listen` or `admin.listen`), and
/// when it cannot, who holds the port. `data_dir_holder`: the PID holding this config's
/// data directory lock, so a weir already serving this very config is told apart from
/// another one.
pub fn listen_port(
    name: &'static str,
    field: &str,
    protocol: PortProtocol,
    address: &str,
    facts: &PortFacts,
    data_dir_holder: Option<u32>,
) -> Check {
    let proto = protocol.as_str();
    let port = address.rsplit(':').next().unwrap_or(address);
    let sharing = match protocol {
        // weir's QUIC sockets set SO_REUSEPORT: a second weir joins the group and the
        // kernel splits the devices between two processes and two logs.
        PortProtocol::Udp => {
            "a second weir would share the port through SO_REUSEPORT and split the devices between two processes"
        }
        PortProtocol::Tcp => "`weir serve` would exit 4 (the admin port is taken)",
    };
    match facts {
        PortFacts::AnyPort => ok(name, format!("{field} {address}: port 0, the kernel picks a free port at start")),
        PortFacts::Free => ok(name, format!("{proto} {address} is free")),
        PortFacts::Unknown { error } => warn(
            name,
            format!("cannot tell whether {proto} {address} is free: {error}"),
            format!("check {field}; `ss -lnp 'sport = :{port}'` lists what listens there"),
        ),
        PortFacts::InUse { holders } if holders.is_empty() => fail(
            name,
            format!("{proto} {address} is in use by a process not visible here (another user or network namespace)"),
            format!("find it with `ss -lnp 'sport = :{port}'` (as root); stop it, or set {field} to a free port"),
        ),
        PortFacts::InUse { holders } => {
            let serving_here = holders.iter().find(|holder| holder.is_weir() && Some(holder.pid) == data_dir_holder);
            let other_weir = holders.iter().find(|holder| holder.is_weir() && Some(holder.pid) != data_dir_holder);
            if let (Some(weir), None) = (serving_here, other_weir) {
                let pid = weir.pid;
                return warn(
                    name,
                    format!(
                        "weir (PID {pid}) already listens on {proto} {address}: it is the weir serving this config's \
                         data_dir, so this weir is running"
                    ),
                    format!(
                        "nothing to do if PID {pid} is the weir service; to run a second weir, give it its own \
                         data_dir and {field}"
                    ),
                );
            }
            if let Some(weir) = other_weir {
                let pid = weir.pid;
                return fail(
                    name,
                    format!(
                        "another weir (PID {pid}, not the one serving this data_dir) already listens on {proto} \
                         {address}: {sharing}"
                    ),
                    format!("stop it (`kill {pid}`), or set {field} to a port of its own"),
                );
            }
            let named: Vec<String> = holders
                .iter()
                .map(|holder| {
                    format!("{} (PID {})", if holder.command.is_empty() { "?" } else { &holder.command }, holder.pid)
                })
                .collect();
            fail(
                name,
                format!("{proto} {address} is in use by {}", named.join(", ")),
                format!("stop {}, or set {field} to a free port", named.join(", ")),
            )
        }
    }
}

/// The filesystem type of the data directory, from `statfs`'s `f_type`.
pub fn filesystem_name(magic: i64) -> &'static str {
    match magic {
        0xEF53 => "ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0xF2F5_2010 => "f2fs",
        0x2FC1_2FC1 => "zfs",
        0x0102_1994 => "tmpfs",
        0x8584_58F6 => "ramfs",
        0x794C_7630 => "overlayfs",
        0x6969 => "nfs",
        0x6573_5546 => "fuse",
        0xFF53_4D42 => "cifs",
        0xFE53_4D42 => "smb2",
        0x0102_1997 => "9p",
        0x7371_7368 => "squashfs",
        0x4D44 => "vfat",
        0x5346_544E => "ntfs",
        0x00C3_6400 => "ceph",
        _ => "unknown",
    }
}

pub fn data_dir_filesystem(path: &str, magic: Result<i64, String>) -> Check {
    const NAME: &str = "data_dir.filesystem";
    let magic = match magic {
        Ok(magic) => magic,
        Err(error) => {
            return warn(NAME, format!("statfs {path}: {error}"), "check the path; ext4 or xfs is expected".into())
        }
    };
    let name = filesystem_name(magic);
    let disk_fix = format!(
        "put data_dir on an ext4 or xfs filesystem on the NVMe device (the package uses /var/lib/weir); in a \
         container mount a host volume there: -v /var/lib/weir:{path}"
    );
    match name {
        "ext4" | "xfs" => ok(NAME, format!("{path} is on {name} (magic {magic:#x})")),
        "btrfs" | "f2fs" => ok(
            NAME,
            format!("{path} is on {name} (magic {magic:#x}): O_DIRECT works; ext4 and xfs are what weir is measured on"),
        ),
        "tmpfs" | "ramfs" => fail(
            NAME,
            format!(
                "{path} is on {name}: memory, not disk: every record weir acknowledges as durable is lost at reboot \
                 or power loss (and before Linux 6.6 tmpfs refuses O_DIRECT outright)"
            ),
            disk_fix,
        ),
        "overlayfs" => warn(
            NAME,
            format!(
                "{path} is on overlayfs, a container's writable layer: the log is lost with the container, and \
                 O_DIRECT depends on the layer below"
            ),
            disk_fix,
        ),
        "nfs" | "cifs" | "smb2" | "9p" | "fuse" | "ceph" => warn(
            NAME,
            format!("{path} is on {name}, a network or userspace filesystem: fdatasync latency and O_DIRECT semantics are not a local disk's"),
            disk_fix,
        ),
        "squashfs" => fail(NAME, format!("{path} is on squashfs, which is read-only"), disk_fix),
        _ => warn(NAME, format!("{path} is on {name} (magic {magic:#x}), which weir is not tested on"), disk_fix),
    }
}

/// What the O_DIRECT round trip saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectIoOutcome {
    Works,
    /// `open(O_DIRECT)` failed: the filesystem refuses direct I/O.
    OpenRefused {
        errno: i32,
    },
    /// An aligned write or read failed.
    IoFailed {
        operation: &'static str,
        errno: i32,
    },
    /// The bytes read back differ from the bytes written.
    Mismatch,
    /// Something else (creating the scratch file without O_DIRECT, say).
    Other {
        error: String,
    },
}

pub fn direct_io(path: &str, outcome: &DirectIoOutcome) -> Check {
    const NAME: &str = "data_dir.direct_io";
    let fix =
        "put data_dir on ext4 or xfs on a local disk (tmpfs before Linux 6.6, some overlayfs and FUSE mounts refuse \
               O_DIRECT)"
            .to_owned();
    let alignment = DIRECT_IO_ALIGNMENT_BYTES;
    match outcome {
        DirectIoOutcome::Works => ok(
            NAME,
            format!("an aligned {alignment}-byte O_DIRECT write, fdatasync and read of a scratch file in {path} returned the same bytes"),
        ),
        DirectIoOutcome::OpenRefused { errno } => {
            fail(NAME, format!("open(O_DIRECT) in {path} fails: {}: the filesystem refuses direct I/O", errno_text(*errno)), fix)
        }
        DirectIoOutcome::IoFailed { operation, errno } if *errno == libc::ENOSPC => warn(
            NAME,
            format!("an aligned {alignment}-byte O_DIRECT {operation} in {path} fails: {}: the disk is full", errno_text(*errno)),
            "free space under data_dir (see data_dir.writable)".to_owned(),
        ),
        DirectIoOutcome::IoFailed { operation, errno } => fail(
            NAME,
            format!("an aligned {alignment}-byte O_DIRECT {operation} in {path} fails: {}", errno_text(*errno)),
            fix,
        ),
        DirectIoOutcome::Mismatch => fail(
            NAME,
            format!("an O_DIRECT read in {path} returned different bytes than were written"),
            "the storage under data_dir is broken or lies: check the device (smartctl, dmesg)".to_owned(),
        ),
        DirectIoOutcome::Other { error } => fail(NAME, format!("direct I/O probe in {path}: {error}"), fix),
    }
}

/// `statx(STATX_DIOALIGN)`: (memory alignment, offset alignment), or `None` when the
/// kernel or filesystem does not report it (before Linux 6.1, or a filesystem without).
pub fn direct_io_alignment(path: &str, reported: &Result<Option<(u32, u32)>, String>) -> Check {
    const NAME: &str = "data_dir.direct_io_alignment";
    let alignment = DIRECT_IO_ALIGNMENT_BYTES;
    match reported {
        Ok(Some((0, 0))) => fail(
            NAME,
            format!("statx(STATX_DIOALIGN) on {path} says direct I/O is not supported here"),
            "put data_dir on ext4 or xfs on a local disk".to_owned(),
        ),
        Ok(Some((memory, offset)))
            if (*offset as u64) <= alignment
                && alignment.is_multiple_of((*offset as u64).max(1))
                && (*memory as u64) <= alignment
                && alignment.is_multiple_of((*memory as u64).max(1)) =>
        {
            ok(
                NAME,
                format!("kernel reports offset alignment {offset} B, memory alignment {memory} B; weir aligns both to {alignment} B"),
            )
        }
        Ok(Some((memory, offset))) => fail(
            NAME,
            format!(
                "kernel reports offset alignment {offset} B, memory alignment {memory} B: weir's {alignment}-byte \
                 aligned writes would fail with EINVAL"
            ),
            "use a device and filesystem with a logical block size of at most 4096 bytes".to_owned(),
        ),
        Ok(None) => ok(
            NAME,
            format!(
                "the kernel does not report the direct I/O alignment for {path} (statx STATX_DIOALIGN needs Linux 6.1 \
                 and filesystem support); the O_DIRECT probe above is what counts"
            ),
        ),
        Err(error) => warn(NAME, format!("statx {path}: {error}"), "check the path".to_owned()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpaceFacts {
    /// Bytes an unprivileged writer may still use on the filesystem (`f_bavail`).
    pub available_bytes: u64,
    /// Bytes the data directory already holds.
    pub used_bytes: u64,
    pub partitions: u64,
    pub partition_bytes_max: u64,
    pub preallocate_bytes: u64,
    pub segment_bytes_max: u64,
}

pub fn free_space(path: &str, facts: Result<SpaceFacts, String>) -> Check {
    const NAME: &str = "data_dir.free_space";
    let facts = match facts {
        Ok(facts) => facts,
        Err(error) => return warn(NAME, format!("statvfs {path}: {error}"), "check the path".to_owned()),
    };
    // Retention holds a partition under its budget, but only after a segment has been
    // written past it, so allow one preallocation step each on top.
    let budget = facts.partitions.saturating_mul(facts.partition_bytes_max.saturating_add(facts.preallocate_bytes));
    let still_needed = budget.saturating_sub(facts.used_bytes);
    let saw = format!(
        "{} available; the disk budget is {} ({} partitions x log.partition_bytes_max {} + one preallocation step), {} \
         of it already used",
        bytes_text(facts.available_bytes),
        bytes_text(budget),
        facts.partitions,
        bytes_text(facts.partition_bytes_max),
        bytes_text(facts.used_bytes)
    );
    if facts.available_bytes >= still_needed {
        ok(NAME, saw)
    } else {
        let partition_bytes_fit = ((facts.available_bytes + facts.used_bytes) / facts.partitions.max(1))
            .saturating_sub(facts.preallocate_bytes)
            / 4096
            * 4096;
        let segments = if partition_bytes_fit < 2 * facts.segment_bytes_max {
            format!(
                " and log.segment_bytes_max to at most half of that ({})",
                bytes_text(partition_bytes_fit / 2 / 4096 * 4096)
            )
        } else {
            String::new()
        };
        warn(
            NAME,
            format!("{saw}: the disk fills before retention frees anything, and appends are then refused as disk full"),
            format!(
                "free space, or lower log.partition_bytes_max to at most {} (what fits per partition){segments}",
                bytes_text(partition_bytes_fit)
            ),
        )
    }
}

// ---------------------------------------------------------------------------------------
// Locked memory

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemlockFacts {
    /// The soft RLIMIT_MEMLOCK; `None` is unlimited.
    pub soft_bytes: Option<u64>,
    pub hard_bytes: Option<u64>,
    pub cap_ipc_lock: bool,
    pub cores: u64,
    pub io_memory_bytes: u64,
}

/// Locked memory glommio's executors register: each core's DMA pool, in each of its rings.
pub fn memlock_needed_bytes(cores: u64, io_memory_bytes: u64) -> u64 {
    let pool = io_memory_bytes.div_ceil(4096).saturating_mul(4096).max(GLOMMIO_IO_MEMORY_BYTES_MIN);
    pool.saturating_mul(GLOMMIO_RINGS_PER_EXECUTOR).saturating_mul(cores)
}

pub fn memlock(facts: &MemlockFacts) -> Check {
    const NAME: &str = "memlock";
    let needed = memlock_needed_bytes(facts.cores, facts.io_memory_bytes);
    let limit = |bytes: Option<u64>| bytes.map_or("unlimited".to_owned(), bytes_text);
    let fix = format!(
        "raise the limit to at least {}: LimitMEMLOCK=infinity in the systemd unit (the packaged unit has it), \
         docker run --ulimit memlock=-1, or `ulimit -l unlimited` in a shell",
        bytes_text(needed.max(GLOMMIO_MEMLOCK_BYTES_MIN))
    );
    let soft = facts.soft_bytes.unwrap_or(u64::MAX);
    let needs = format!(
        "{} = {} cores x engine.io_memory_bytes {} x {GLOMMIO_RINGS_PER_EXECUTOR} rings",
        bytes_text(needed),
        facts.cores,
        bytes_text(facts.io_memory_bytes)
    );
    if soft < GLOMMIO_MEMLOCK_BYTES_MIN {
        return fail(
            NAME,
            format!(
                "RLIMIT_MEMLOCK is {} (hard {}): glommio refuses to start an executor below {}",
                limit(facts.soft_bytes),
                limit(facts.hard_bytes),
                bytes_text(GLOMMIO_MEMLOCK_BYTES_MIN)
            ),
            fix,
        );
    }
    if facts.cap_ipc_lock {
        return ok(
            NAME,
            format!(
                "RLIMIT_MEMLOCK is {}; CAP_IPC_LOCK is held, so the registered DMA buffers ({needs}) are not charged \
                 against it",
                limit(facts.soft_bytes)
            ),
        );
    }
    if soft >= needed {
        ok(
            NAME,
            format!(
                "RLIMIT_MEMLOCK is {}, enough for the registered DMA buffers ({needs}); the kernel charges them to \
                 the user, shared with its other processes",
                limit(facts.soft_bytes)
            ),
        )
    } else {
        warn(
            NAME,
            format!(
                "RLIMIT_MEMLOCK is {} without CAP_IPC_LOCK, below the {needs}: glommio skips registering its DMA \
                 buffers ('registering buffers ... Skipping') and writes take the slower unregistered path",
                limit(facts.soft_bytes)
            ),
            fix,
        )
    }
}

// ---------------------------------------------------------------------------------------
// Cores

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreFacts {
    pub selection: CoreSelection,
    /// CPUs the kernel knows (`/sys/devices/system/cpu/present`).
    pub present: BTreeSet<usize>,
    pub online: BTreeSet<usize>,
    /// This process's affinity mask.
    pub affinity: BTreeSet<usize>,
}

fn cpu_list(cpus: &BTreeSet<usize>) -> String {
    if cpus.is_empty() {
        return "none".to_owned();
    }
    cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")
}

/// Why each configured core can or cannot carry an executor. With an explicit list a
/// core outside the usable set makes the config invalid (exit 2); this check says which
/// of the three reasons it is. With `"all"` the affinity mask silently narrows the set,
/// which is worth a warning.
pub fn cores(facts: &CoreFacts) -> Check {
    const NAME: &str = "cores";
    let usable: BTreeSet<usize> = facts.online.intersection(&facts.affinity).copied().collect();
    match &facts.selection {
        CoreSelection::All => {
            let excluded: BTreeSet<usize> = facts.online.difference(&facts.affinity).copied().collect();
            if usable.is_empty() {
                fail(
                    NAME,
                    format!(
                        "engine.cores = \"all\" but no online CPU ({}) is in this process's affinity mask ({})",
                        cpu_list(&facts.online),
                        cpu_list(&facts.affinity)
                    ),
                    "widen the affinity: CPUAffinity= in the unit, taskset, or docker --cpuset-cpus".to_owned(),
                )
            } else if excluded.is_empty() {
                ok(
                    NAME,
                    format!(
                        "engine.cores = \"all\": one pinned executor on each of CPUs {} (all online, all in the affinity \
                         mask)",
                        cpu_list(&usable)
                    ),
                )
            } else {
                warn(
                    NAME,
                    format!(
                        "engine.cores = \"all\" resolves to CPUs {} only: this process's affinity mask excludes online \
                         CPUs {}",
                        cpu_list(&usable),
                        cpu_list(&excluded)
                    ),
                    format!(
                        "if weir should use CPUs {}, widen the affinity (CPUAffinity= in the unit, taskset -c, docker \
                         --cpuset-cpus); otherwise list the cores explicitly in engine.cores",
                        cpu_list(&excluded)
                    ),
                )
            }
        }
        CoreSelection::List(list) => {
            let mut problems = Vec::new();
            for core in list {
                if !facts.present.contains(core) {
                    problems.push(format!("CPU {core} does not exist (present: {})", cpu_list(&facts.present)));
                } else if !facts.online.contains(core) {
                    problems.push(format!("CPU {core} is offline"));
                } else if !facts.affinity.contains(core) {
                    problems.push(format!(
                        "CPU {core} is online but this process's affinity mask ({}) excludes it",
                        cpu_list(&facts.affinity)
                    ));
                }
            }
            if problems.is_empty() {
                let listed: BTreeSet<usize> = list.iter().copied().collect();
                ok(NAME, format!("CPUs {} exist, are online and in the affinity mask", cpu_list(&listed)))
            } else {
                fail(
                    NAME,
                    format!("engine.cores: {}", problems.join("; ")),
                    format!(
                        "list only usable CPUs in engine.cores (usable here: {}), bring an offline CPU up (echo 1 > \
                         /sys/devices/system/cpu/cpuN/online), or widen the affinity (CPUAffinity=, taskset, \
                         --cpuset-cpus)",
                        cpu_list(&usable)
                    ),
                )
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// UDP

/// The UDP socket buffers the `[quic]` config asks for, the kernel's caps, and what a
/// real socket was granted when it asked (Linux reports twice the usable size).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpBufferFacts {
    pub receive_wanted_bytes: u64,
    pub send_wanted_bytes: u64,
    pub rmem_max: Option<u64>,
    pub wmem_max: Option<u64>,
    /// (SO_RCVBUF, SO_SNDBUF) as `getsockopt` reported them after asking.
    pub granted: Result<(u64, u64), String>,
}

pub fn udp_buffers(facts: &UdpBufferFacts) -> Check {
    const NAME: &str = "udp.buffers";
    let (receive_wanted, send_wanted) = (facts.receive_wanted_bytes, facts.send_wanted_bytes);
    let (Some(rmem_max), Some(wmem_max)) = (facts.rmem_max, facts.wmem_max) else {
        return warn(
            NAME,
            "cannot read net.core.rmem_max / net.core.wmem_max".to_owned(),
            "check that /proc/sys is mounted".to_owned(),
        );
    };
    let asked = format!(
        "quic.socket_receive_buffer_bytes = {} and quic.socket_send_buffer_bytes = {}; net.core.rmem_max = {rmem_max}, \
         net.core.wmem_max = {wmem_max}",
        bytes_text(receive_wanted),
        bytes_text(send_wanted)
    );
    let granted = match &facts.granted {
        Ok((receive, send)) => {
            format!("; a UDP socket asking for them got {} and {}", bytes_text(receive / 2), bytes_text(send / 2))
        }
        Err(error) => format!("; setting them on a UDP socket failed: {error}"),
    };
    let mut short = Vec::new();
    if rmem_max < receive_wanted {
        short.push(format!("net.core.rmem_max={receive_wanted}"));
    }
    if wmem_max < send_wanted {
        short.push(format!("net.core.wmem_max={send_wanted}"));
    }
    if short.is_empty() {
        ok(NAME, format!("{asked}{granted}"))
    } else {
        warn(
            NAME,
            format!(
                "{asked}{granted}: the kernel silently caps SO_RCVBUF/SO_SNDBUF below what the config asks for, \
                 and bursts of datagrams beyond the cap are dropped"
            ),
            format!(
                "sysctl -w {} and persist it in {SYSCTL_DROP_IN} (the package's drop-in sets 8 MiB, the default); or \
                 lower quic.socket_receive_buffer_bytes / quic.socket_send_buffer_bytes to the caps",
                short.join(" ")
            ),
        )
    }
}

/// quinn-udp's view of a loopback UDP socket: (GSO segments, GRO segments), 1 meaning
/// unsupported.
pub fn udp_offload(segments: &Result<(usize, usize), String>) -> Check {
    const NAME: &str = "udp.gso_gro";
    match segments {
        Ok((gso, gro)) if *gso > 1 && *gro > 1 => ok(
            NAME,
            format!("quinn-udp reports GSO (up to {gso} segments per send) and GRO ({gro} segments per receive)"),
        ),
        Ok((gso, gro)) => warn(
            NAME,
            format!(
                "quinn-udp reports GSO {} and GRO {}: each datagram costs one system call",
                if *gso > 1 { "available" } else { "unavailable" },
                if *gro > 1 { "available" } else { "unavailable" }
            ),
            "use a kernel of 5.0 or newer (UDP GSO 4.18, GRO 5.0) and a NIC driver with UDP segmentation offload"
                .to_owned(),
        ),
        Err(error) => {
            warn(NAME, format!("cannot make a UDP socket on loopback: {error}"), "check the network namespace".into())
        }
    }
}

/// What making a SO_REUSEPORT group with the steering program gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReuseportOutcome {
    pub group_size: usize,
    pub port: u16,
    /// Datagrams whose connection id named socket i that socket i received.
    pub steered_right: usize,
}

pub fn reuseport_cbpf(outcome: &Result<ReuseportOutcome, String>) -> Check {
    const NAME: &str = "udp.reuseport_cbpf";
    match outcome {
        Ok(outcome) if outcome.steered_right == outcome.group_size => ok(
            NAME,
            format!(
                "a SO_REUSEPORT group of {} sockets on 127.0.0.1:{} took serve's connection-id steering program \
                 (SO_ATTACH_REUSEPORT_CBPF), and each test datagram reached the socket its connection id named",
                outcome.group_size, outcome.port
            ),
        ),
        Ok(outcome) => fail(
            NAME,
            format!(
                "the cBPF steering program attached to a SO_REUSEPORT group on 127.0.0.1:{} but only {} of {} \
                 datagrams reached the socket they named",
                outcome.port, outcome.steered_right, outcome.group_size
            ),
            "use a kernel of 4.6 or newer (SO_ATTACH_REUSEPORT_CBPF) and allow setsockopt in the seccomp profile"
                .into(),
        ),
        Err(error) => fail(
            NAME,
            format!("cannot make a SO_REUSEPORT group with a cBPF steering program on loopback: {error}"),
            "use a kernel of 4.6 or newer (SO_ATTACH_REUSEPORT_CBPF) and allow setsockopt in the seccomp profile"
                .into(),
        ),
    }
}

// ---------------------------------------------------------------------------------------
// The disk ceiling (--measure)

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiskCeiling {
    pub write_bytes: u64,
    pub writes: u64,
    pub megabytes_per_s: f64,
    pub fsync_us_p50: u64,
    pub fsync_us_p99: u64,
    pub write_and_fsync_us_p50: u64,
}

/// The measured ceiling next to the flush window, with a suggestion when the window is
/// far from what one write and fdatasync cost.
pub fn disk_ceiling(path: &str, measured: &Result<DiskCeiling, String>, flush_delay_us_max: u64) -> Check {
    const NAME: &str = "measure.disk";
    let ceiling = match measured {
        Ok(ceiling) => ceiling,
        Err(error) => {
            return warn(
                NAME,
                format!("could not measure {path}: {error}"),
                "fix the failing checks above first".into(),
            )
        }
    };
    let saw = format!(
        "{} O_DIRECT writes of {} each followed by fdatasync in {path}: {:.0} MB/s; fdatasync p50 {} us, p99 {} us; \
         write+fdatasync p50 {} us; log.flush_delay_us_max is {flush_delay_us_max} us",
        ceiling.writes,
        bytes_text(ceiling.write_bytes),
        ceiling.megabytes_per_s,
        ceiling.fsync_us_p50,
        ceiling.fsync_us_p99,
        ceiling.write_and_fsync_us_p50
    );
    let p99 = ceiling.fsync_us_p99.max(1);
    if flush_delay_us_max > 4 * p99 && flush_delay_us_max > 100 {
        warn(
            NAME,
            format!(
                "{saw}: the window is {}x the fdatasync p99, so an idle partition's acks wait mostly for the window",
                flush_delay_us_max / p99
            ),
            format!("suggest log.flush_delay_us_max = {} (about the fdatasync p99 of this disk)", p99.max(50)),
        )
    } else if flush_delay_us_max * 4 < ceiling.fsync_us_p50 {
        ok(
            NAME,
            format!(
                "{saw}: the window is well under one fdatasync; appends that arrive during a flush are grouped anyway, \
                 so it adds little latency (raise it towards {} us only if small flushes limit throughput)",
                ceiling.fsync_us_p50
            ),
        )
    } else {
        ok(NAME, format!("{saw}: the window is in the range of this disk's fdatasync latency"))
    }
}

/// The nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[u64], percent: u64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() as u64 * percent).div_ceil(100).max(1) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_uring_facts(setup: Result<IoUringSetup, i32>) -> IoUringFacts {
        IoUringFacts {
            setup,
            io_uring_disabled: Some(0),
            io_uring_group: Some(-1),
            group_ids: [0].into_iter().collect(),
            cap_sys_admin: false,
            seccomp_mode: Some(0),
            kernel_release: "6.1.0".to_owned(),
        }
    }

    #[test]
    fn a_full_data_dir_warns_instead_of_keeping_weir_from_starting() {
        let full = data_dir_writable("/d", &Err("No space left on device (os error 28)".to_owned()), false);
        assert_eq!(full.status, Status::Warn);
        let denied = data_dir_writable("/d", &Err("Permission denied (os error 13)".to_owned()), false);
        assert_eq!(denied.status, Status::Fail);
        assert!(denied.fix.unwrap().starts_with("chown -R weir:weir /d"));
        let io = direct_io("/d", &DirectIoOutcome::IoFailed { operation: "write", errno: libc::ENOSPC });
        assert_eq!(io.status, Status::Warn);
        let io = direct_io("/d", &DirectIoOutcome::IoFailed { operation: "write", errno: libc::EIO });
        assert_eq!(io.status, Status::Fail);
    }

    #[test]
    fn a_read_only_mount_is_told_to_remount_never_to_chown() {
        let read_only = [
            // The mount flag alone (a write refused by permissions on a read-only mount).
            data_dir_writable("/d", &Err("Permission denied (os error 13)".to_owned()), true),
            // EROFS alone (statvfs not answering).
            data_dir_writable("/d", &Err("Read-only file system (os error 30)".to_owned()), false),
            data_dir_presence(
                "/d",
                &DirPresence::CannotCreate {
                    error: "Read-only file system (os error 30)".to_owned(),
                    read_only_mount: true,
                },
            ),
        ];
        for check in read_only {
            assert_eq!(check.status, Status::Fail);
            let fix = check.fix.unwrap();
            assert!(!fix.contains("chown weir"), "{fix}");
            assert!(fix.starts_with("/d is on a read-only mount"), "{fix}");
            assert!(fix.contains("mount -o remount,rw \"$(findmnt -no TARGET -T /d)\""), "{fix}");
            assert!(fix.contains("point data_dir at a writable filesystem"), "{fix}");
        }
        let elsewhere = data_dir_presence(
            "/d",
            &DirPresence::CannotCreate { error: "Permission denied (os error 13)".to_owned(), read_only_mount: false },
        );
        assert!(elsewhere.fix.unwrap().starts_with("mkdir -p /d && chown weir:weir /d"));
    }

    #[test]
    fn a_taken_port_names_its_holder_and_tells_this_weir_from_another() {
        let holder =
            |pid: u32, command: &str| PortHolder { pid, command: command.to_owned(), executable: command.to_owned() };
        let check = |facts: &PortFacts, data_dir_holder: Option<u32>| {
            listen_port("ports.quic", "quic.listen", PortProtocol::Udp, "0.0.0.0:4433", facts, data_dir_holder)
        };
        assert_eq!(check(&PortFacts::Free, None).status, Status::Ok);
        assert_eq!(check(&PortFacts::AnyPort, None).status, Status::Ok);
        // The weir serving this data directory: running already, a warning.
        let running = check(&PortFacts::InUse { holders: vec![holder(4711, "weir")] }, Some(4711));
        assert_eq!(running.status, Status::Warn);
        assert!(running.saw.starts_with("weir (PID 4711) already listens on UDP 0.0.0.0:4433"), "{}", running.saw);
        // Another weir on the same port: the devices would be split.
        let other = check(&PortFacts::InUse { holders: vec![holder(815, "weir")] }, Some(4711));
        assert_eq!(other.status, Status::Fail);
        assert!(other.saw.contains("another weir (PID 815"), "{}", other.saw);
        assert!(other.saw.contains("SO_REUSEPORT"), "{}", other.saw);
        assert_eq!(other.fix.unwrap(), "stop it (`kill 815`), or set quic.listen to a port of its own");
        let unlocked = check(&PortFacts::InUse { holders: vec![holder(815, "weir")] }, None);
        assert_eq!(unlocked.status, Status::Fail);
        // Something else.
        let foreign = check(&PortFacts::InUse { holders: vec![holder(99, "nginx")] }, Some(4711));
        assert_eq!(foreign.status, Status::Fail);
        assert_eq!(foreign.saw, "UDP 0.0.0.0:4433 is in use by nginx (PID 99)");
        let hidden = check(&PortFacts::InUse { holders: Vec::new() }, None);
        assert_eq!(hidden.status, Status::Fail);
        assert!(hidden.fix.unwrap().contains("ss -lnp 'sport = :4433'"));
        let admin = listen_port(
            "ports.admin",
            "admin.listen",
            PortProtocol::Tcp,
            "127.0.0.1:9464",
            &PortFacts::InUse { holders: vec![holder(815, "weir")] },
            None,
        );
        assert!(
            admin.saw.contains("already listens on TCP 127.0.0.1:9464: `weir serve` would exit 4"),
            "{}",
            admin.saw
        );
    }

    #[test]
    fn io_uring_denials_are_told_apart() {
        let mut facts = io_uring_facts(Err(libc::EPERM));
        facts.seccomp_mode = Some(2);
        let check = io_uring(&facts);
        assert_eq!(check.status, Status::Fail);
        assert!(check.saw.contains("seccomp filter"), "{}", check.saw);
        assert!(check.fix.unwrap().contains("--security-opt seccomp="));

        let mut facts = io_uring_facts(Err(libc::EPERM));
        facts.io_uring_disabled = Some(2);
        let check = io_uring(&facts);
        assert!(check.saw.contains("kernel.io_uring_disabled = 2"), "{}", check.saw);
        assert!(check.fix.unwrap().contains("sysctl -w kernel.io_uring_disabled=0"));

        let mut facts = io_uring_facts(Err(libc::EPERM));
        facts.io_uring_disabled = Some(1);
        facts.io_uring_group = Some(1234);
        let check = io_uring(&facts);
        assert!(check.saw.contains("not in kernel.io_uring_group = 1234"), "{}", check.saw);
        assert!(check.fix.unwrap().contains("SupplementaryGroups="));

        let mut facts = io_uring_facts(Err(libc::EPERM));
        facts.io_uring_disabled = Some(1);
        let check = io_uring(&facts);
        assert!(check.saw.contains("only CAP_SYS_ADMIN"), "{}", check.saw);

        let mut facts = io_uring_facts(Err(libc::ENOSYS));
        facts.kernel_release = "4.19.0".to_owned();
        let check = io_uring(&facts);
        assert!(check.saw.contains("no usable io_uring"), "{}", check.saw);

        let facts = io_uring_facts(Ok(IoUringSetup { missing_opcodes: vec!["STATX"], iopoll_errno: None }));
        let check = io_uring(&facts);
        assert!(check.saw.contains("lacks io_uring opcodes glommio needs: STATX"), "{}", check.saw);

        let facts = io_uring_facts(Ok(IoUringSetup { missing_opcodes: vec![], iopoll_errno: None }));
        assert_eq!(io_uring(&facts).status, Status::Ok);
    }

    #[test]
    fn tmpfs_fails_ext4_passes_overlay_warns() {
        assert_eq!(data_dir_filesystem("/d", Ok(0xEF53)).status, Status::Ok);
        let tmpfs = data_dir_filesystem("/d", Ok(0x0102_1994));
        assert_eq!(tmpfs.status, Status::Fail);
        assert!(tmpfs.saw.contains("tmpfs") && tmpfs.saw.contains("O_DIRECT"), "{}", tmpfs.saw);
        assert_eq!(data_dir_filesystem("/d", Ok(0x794C_7630)).status, Status::Warn);
    }

    #[test]
    fn memlock_below_glommio_minimum_fails_below_registration_warns() {
        let mut facts = MemlockFacts {
            soft_bytes: Some(64 << 10),
            hard_bytes: Some(64 << 10),
            cap_ipc_lock: false,
            cores: 2,
            io_memory_bytes: 16 << 20,
        };
        let check = memlock(&facts);
        assert_eq!(check.status, Status::Fail);
        assert!(check.saw.contains("glommio refuses to start an executor below 512 KiB"), "{}", check.saw);
        assert!(check.fix.unwrap().contains("LimitMEMLOCK=infinity"));
        facts.soft_bytes = Some(8 << 20);
        assert_eq!(memlock(&facts).status, Status::Warn);
        facts.cap_ipc_lock = true;
        assert_eq!(memlock(&facts).status, Status::Ok);
        facts.cap_ipc_lock = false;
        facts.soft_bytes = None;
        assert_eq!(memlock(&facts).status, Status::Ok);
        assert_eq!(memlock_needed_bytes(2, 16 << 20), 96 << 20);
        assert_eq!(memlock_needed_bytes(1, 1000), 192 << 10);
    }

    #[test]
    fn cores_say_which_reason() {
        let present: BTreeSet<usize> = [0, 1, 2, 3].into_iter().collect();
        let facts = CoreFacts {
            selection: CoreSelection::List(vec![1, 2, 3, 9]),
            present: present.clone(),
            online: [0, 1, 2].into_iter().collect(),
            affinity: [0, 1].into_iter().collect(),
        };
        let check = cores(&facts);
        assert_eq!(check.status, Status::Fail);
        assert!(check.saw.contains("CPU 9 does not exist"), "{}", check.saw);
        assert!(check.saw.contains("CPU 3 is offline"), "{}", check.saw);
        assert!(
            check.saw.contains("CPU 2 is online but this process's affinity mask (0, 1) excludes it"),
            "{}",
            check.saw
        );
        let check = cores(&CoreFacts { selection: CoreSelection::All, ..facts });
        assert_eq!(check.status, Status::Warn);
        assert!(check.saw.contains("excludes online CPUs 2"), "{}", check.saw);
    }

    #[test]
    fn free_space_budget_counts_used_bytes() {
        let facts = SpaceFacts {
            available_bytes: 10 << 30,
            used_bytes: 0,
            partitions: 4,
            partition_bytes_max: 8 << 30,
            preallocate_bytes: 32 << 20,
            segment_bytes_max: 256 << 20,
        };
        let check = free_space("/d", Ok(facts));
        assert_eq!(check.status, Status::Warn);
        let fix = check.fix.unwrap();
        assert!(fix.contains("log.partition_bytes_max to at most 2.5 GiB"), "{fix}");
        assert!(!fix.contains("segment_bytes_max"), "{fix}");
        let check = free_space("/d", Ok(SpaceFacts { available_bytes: 256 << 20, ..facts }));
        assert!(check.fix.unwrap().ends_with("and log.segment_bytes_max to at most half of that (16 MiB)"));
        let check = free_space("/d", Ok(SpaceFacts { used_bytes: 30 << 30, ..facts }));
        assert_eq!(check.status, Status::Ok);
    }

    #[test]
    fn flush_window_far_above_fdatasync_gets_a_suggestion() {
        let ceiling = DiskCeiling {
            write_bytes: 1 << 20,
            writes: 100,
            megabytes_per_s: 900.0,
            fsync_us_p50: 80,
            fsync_us_p99: 200,
            write_and_fsync_us_p50: 900,
        };
        let check = disk_ceiling("/d", &Ok(ceiling), 10_000);
        assert_eq!(check.status, Status::Warn);
        assert_eq!(
            check.fix.as_deref(),
            Some("suggest log.flush_delay_us_max = 200 (about the fdatasync p99 of this disk)")
        );
        assert_eq!(disk_ceiling("/d", &Ok(ceiling), 250).status, Status::Ok);
    }

    #[test]
    fn udp_buffers_above_the_kernel_caps_warn_with_the_sysctl() {
        let facts = UdpBufferFacts {
            receive_wanted_bytes: 16 << 20,
            send_wanted_bytes: 8 << 20,
            rmem_max: Some(212_992),
            wmem_max: Some(8 << 20),
            granted: Ok((2 * 212_992, 16 << 20)),
        };
        let check = udp_buffers(&facts);
        assert_eq!(check.status, Status::Warn);
        assert!(check.saw.contains("a UDP socket asking for them got 208 KiB and 8 MiB"), "{}", check.saw);
        assert!(check.fix.unwrap().starts_with("sysctl -w net.core.rmem_max=16777216 and persist"));
        let check = udp_buffers(&UdpBufferFacts { rmem_max: Some(16 << 20), ..facts });
        assert_eq!(check.status, Status::Ok, "{}", check.saw);
    }

    #[test]
    fn percentiles_and_sizes() {
        let samples: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&samples, 50), 50);
        assert_eq!(percentile(&samples, 99), 99);
        assert_eq!(percentile(&[7], 99), 7);
        assert_eq!(bytes_text(8 << 20), "8 MiB");
        assert_eq!(bytes_text(1536), "1.5 KiB");
        assert_eq!(kernel_version("6.18.44-fc-v669"), Some((6, 18)));
    }
}
