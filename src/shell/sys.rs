//! The one module allowed `unsafe`: thin calls into libc that no safe crate wraps for
//! us. Every block carries a SAFETY paragraph.
#![allow(unsafe_code)]

use std::collections::BTreeSet;
use std::ffi::CString;
use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// CPU ids that are online and in this process's affinity mask: the cores an executor
/// can be pinned to.
pub fn usable_cpus() -> BTreeSet<usize> {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .ok()
        .map(|text| parse_cpu_list(text.trim()))
        .unwrap_or_default();
    // SAFETY: `cpu_set_t` is plain data for which all-zero is a valid (empty) set;
    // `sched_getaffinity` writes at most `size_of::<cpu_set_t>()` bytes into it, and
    // `CPU_ISSET` only reads it, for indices below `CPU_SETSIZE`.
    let allowed: BTreeSet<usize> = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return online;
        }
        (0..libc::CPU_SETSIZE as usize).filter(|cpu| libc::CPU_ISSET(*cpu, &set)).collect()
    };
    if online.is_empty() {
        return allowed;
    }
    online.intersection(&allowed).copied().collect()
}

/// Parses the kernel's CPU list format: `0-3,5,7-8`.
pub fn parse_cpu_list(text: &str) -> BTreeSet<usize> {
    let mut cpus = BTreeSet::new();
    for part in text.split(',').filter(|part| !part.is_empty()) {
        match part.split_once('-') {
            Some((first, last)) => {
                if let (Ok(first), Ok(last)) = (first.parse::<usize>(), last.parse::<usize>()) {
                    cpus.extend(first..=last.min(first + 65_536));
                }
            }
            None => {
                if let Ok(cpu) = part.parse() {
                    cpus.insert(cpu);
                }
            }
        }
    }
    cpus
}

/// Attaches the connection-id steering program to a SO_REUSEPORT group (through any
/// one of its sockets; it applies to the whole group).
///
/// The classic BPF program sees the UDP payload. A QUIC short-header packet (first bit
/// 0) carries weir's connection id right after its first byte, and the id's first 4
/// bytes are the owning core: the program returns that number, which the kernel uses as
/// the index of the socket in the group (bind order = core order). Long-header packets
/// (handshakes; the id was chosen by the client) and out-of-range values return a value
/// the kernel ignores, falling back to its usual 4-tuple hash.
pub fn attach_reuseport_steering(socket: &std::net::UdpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const BPF_LD: u16 = 0x00;
    const BPF_B: u16 = 0x10;
    const BPF_W: u16 = 0x00;
    const BPF_ABS: u16 = 0x20;
    const BPF_JMP: u16 = 0x05;
    const BPF_JSET: u16 = 0x40;
    const BPF_K: u16 = 0x00;
    const BPF_RET: u16 = 0x06;
    const BPF_A: u16 = 0x10;
    let program = [
        // A = first byte of the payload
        libc::sock_filter { code: BPF_LD | BPF_B | BPF_ABS, jt: 0, jf: 0, k: 0 },
        // long header (bit 0x80 set)? jump to "no opinion"
        libc::sock_filter { code: BPF_JMP | BPF_JSET | BPF_K, jt: 2, jf: 0, k: 0x80 },
        // A = 4 bytes at offset 1: the core in the connection id
        libc::sock_filter { code: BPF_LD | BPF_W | BPF_ABS, jt: 0, jf: 0, k: 1 },
        libc::sock_filter { code: BPF_RET | BPF_A, jt: 0, jf: 0, k: 0 },
        libc::sock_filter { code: BPF_RET | BPF_K, jt: 0, jf: 0, k: u32::MAX },
    ];
    let fprog = libc::sock_fprog { len: program.len() as u16, filter: program.as_ptr() as *mut libc::sock_filter };
    // SAFETY: `fprog` points at `program`, which outlives the call; the kernel copies the
    // program during setsockopt and keeps no pointer to our memory. The fd is a valid,
    // open UDP socket borrowed for the duration of the call.
    let result = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            &fprog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The last OS error, naming the call that failed.
fn last_error(operation: &str) -> io::Error {
    let error = io::Error::last_os_error();
    io::Error::new(error.kind(), format!("{operation}: {error}"))
}

// ----- the doctor's probes of the host (`doctor::sys` judges nothing itself) -----

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// The filesystem type (`f_type`) of the filesystem holding `path`.
pub fn filesystem_magic(path: &Path) -> io::Result<i64> {
    let path = c_path(path)?;
    // SAFETY: `statfs` is plain data for which all-zero is valid; the kernel writes at
    // most one `statfs` into it; `path` is a NUL-terminated string that outlives the
    // call.
    unsafe {
        let mut stats: libc::statfs = std::mem::zeroed();
        if libc::statfs(path.as_ptr(), &mut stats) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stats.f_type as i64)
    }
}

/// Whether the filesystem holding `path` is mounted read-only (`ST_RDONLY`); false
/// when `statvfs` does not answer (the write probe then tells).
pub fn mounted_read_only(path: &Path) -> bool {
    let Ok(path) = c_path(path) else { return false };
    // SAFETY: as for `statfs` above: zeroed plain data, written by the kernel only, and
    // a NUL-terminated path that outlives the call.
    unsafe {
        let mut stats: libc::statvfs = std::mem::zeroed();
        libc::statvfs(path.as_ptr(), &mut stats) == 0 && stats.f_flag & libc::ST_RDONLY != 0
    }
}

pub(crate) fn statx_dio_align(path: &Path) -> io::Result<Option<(u32, u32)>> {
    let path = c_path(path)?;
    // SAFETY: `statx` is plain data for which all-zero is valid; the kernel writes at
    // most one `statx` into it; `path` is a NUL-terminated string that outlives the call
    // and is absolute or relative to the working directory (AT_FDCWD).
    let stats = unsafe {
        let mut stats: libc::statx = std::mem::zeroed();
        if libc::statx(libc::AT_FDCWD, path.as_ptr(), 0, libc::STATX_DIOALIGN, &mut stats) != 0 {
            return Err(io::Error::last_os_error());
        }
        stats
    };
    if stats.stx_mask & libc::STATX_DIOALIGN == 0 {
        return Ok(None);
    }
    Ok(Some((stats.stx_dio_mem_align, stats.stx_dio_offset_align)))
}

/// The soft and hard RLIMIT_MEMLOCK in bytes; `None` is unlimited.
pub fn memlock_limits() -> io::Result<(Option<u64>, Option<u64>)> {
    // SAFETY: `rlimit` is plain data; `getrlimit` writes one into it and reads nothing.
    let limits = unsafe {
        let mut limits: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limits) != 0 {
            return Err(io::Error::last_os_error());
        }
        limits
    };
    let bytes = |value: libc::rlim_t| if value == libc::RLIM_INFINITY { None } else { Some(value) };
    Ok((bytes(limits.rlim_cur), bytes(limits.rlim_max)))
}

pub(crate) fn reuseport_socket(port: u16) -> io::Result<UdpSocket> {
    // SAFETY: `socket` takes no pointers; a non-negative result is a new descriptor that
    // nothing else owns, so `OwnedFd` may take it.
    let fd = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(last_error("socket"));
        }
        OwnedFd::from_raw_fd(fd)
    };
    let on: libc::c_int = 1;
    // SAFETY: `on` is a live c_int and the length passed is its size; the kernel only
    // reads it.
    let set = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(last_error("setsockopt(SO_REUSEPORT)"));
    }
    let address = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: `address` is a live, fully initialised sockaddr_in and the length passed
    // is its size; the kernel only reads it.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&address as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if bound != 0 {
        return Err(last_error("bind 127.0.0.1"));
    }
    Ok(UdpSocket::from(fd))
}

/// Bytes an unprivileged writer may still use on the filesystem holding `path`
/// (`statvfs`: `f_bavail` x `f_frsize`).
/// Hands a bound, listening std socket to the current glommio executor (glommio's own
/// `TcpListener::bind` sets SO_REUSEPORT, so a second weir could silently share the
/// port; weir binds without it, at start, where a taken port is a clear error).
/// Call on the executor thread that will accept.
pub fn glommio_tcp_listener(listener: std::net::TcpListener) -> glommio::net::TcpListener {
    use std::os::fd::{FromRawFd, IntoRawFd};
    let fd = listener.into_raw_fd();
    // SAFETY: `into_raw_fd` gave up ownership of `fd`, an open, bound and listening TCP
    // socket, and nothing else holds it; `from_raw_fd` takes that ownership (the
    // listener closes it when dropped). glommio requires the call on an executor
    // thread, which the caller is.
    unsafe { glommio::net::TcpListener::from_raw_fd(fd) }
}

pub fn available_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"))?;
    // SAFETY: `statvfs` is plain data for which all-zero is valid; the kernel writes at
    // most one `statvfs` into it; `path` is a NUL-terminated string that outlives the
    // call.
    unsafe {
        let mut stats: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(path.as_ptr(), &mut stats) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((stats.f_bavail as u64).saturating_mul(stats.f_frsize as u64))
    }
}

/// Allocations at least this large are only reserved, not committed (see
/// `ReserveLargeAllocator`). Nothing weir allocates on purpose comes near it: buffers
/// for I/O come from glommio's own memory, batches are at most 8 MiB.
pub const RESERVE_ONLY_BYTES_MIN: usize = 1 << 30;

/// The process's allocator: the system allocator, except that a request of at least
/// `RESERVE_ONLY_BYTES_MIN` bytes is an anonymous private mapping with `MAP_NORESERVE`,
/// so the kernel only reserves the address space and backs pages as they are touched.
///
/// Why: kafka-protocol 0.18.0 sizes a vector from an array length in a broker response
/// before it checks it against the bytes left, so a few bytes declaring hundreds of
/// millions of elements ask for tens of GiB at once. From the system allocator that
/// request fails and the process aborts (nothing can catch it): one misbehaving broker
/// would stop every device's ingestion. Reserved instead, the decoder fails at the
/// first element the response does not hold, with a decode error weir handles, and
/// the mapping is returned untouched. Inputs: `tests/fuzz/corpus/kafka_response/regression-*`.
/// Remove this once kafka-protocol checks array lengths (upstream pull requests 152,
/// 161, 200).
pub struct ReserveLargeAllocator;

impl ReserveLargeAllocator {
    fn reserves(layout: std::alloc::Layout) -> bool {
        layout.size() >= RESERVE_ONLY_BYTES_MIN && layout.align() <= 4096
    }
}

// SAFETY: every pointer handed out is either from `System` (and goes back to it, with
// the same layout, which decides the path the same way) or from `mmap` of exactly
// `layout.size()` bytes, page-aligned (so aligned for any `align <= 4096`), readable,
// writable and zero-filled, and goes back to `munmap` with that size. A failed `mmap`
// yields null, which `GlobalAlloc` callers treat as allocation failure.
unsafe impl std::alloc::GlobalAlloc for ReserveLargeAllocator {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        if !Self::reserves(layout) {
            // SAFETY: the caller's contract for `alloc` is passed on unchanged.
            return unsafe { std::alloc::System.alloc(layout) };
        }
        // SAFETY: an anonymous private mapping at an address the kernel chooses
        // touches no existing memory; the result is checked before use.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                layout.size(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if address == libc::MAP_FAILED {
            std::ptr::null_mut()
        } else {
            address.cast()
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        if !Self::reserves(layout) {
            // SAFETY: the caller's contract for `alloc_zeroed` is passed on unchanged.
            return unsafe { std::alloc::System.alloc_zeroed(layout) };
        }
        // SAFETY: as `alloc`; anonymous mappings are zero-filled.
        unsafe { self.alloc(layout) }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: std::alloc::Layout) {
        if !Self::reserves(layout) {
            // SAFETY: `pointer` came from `System` with this layout (see `alloc`).
            return unsafe { std::alloc::System.dealloc(pointer, layout) };
        }
        // SAFETY: `pointer` is a mapping of `layout.size()` bytes made by `alloc`, no
        // longer used by the caller.
        unsafe {
            libc::munmap(pointer.cast(), layout.size());
        }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size` with `layout.align()` is a valid layout.
        let new_layout = unsafe { std::alloc::Layout::from_size_align_unchecked(new_size, layout.align()) };
        if !Self::reserves(layout) && !Self::reserves(new_layout) {
            // SAFETY: both sizes stay with `System`; the caller's contract is passed on.
            return unsafe { std::alloc::System.realloc(pointer, layout, new_size) };
        }
        // Crossing the threshold (or staying above it): a new block, the bytes copied.
        // SAFETY: `new_layout` is valid (above); the old block is valid for
        // `layout.size()` bytes and the new one for `new_size`; they do not overlap.
        unsafe {
            let moved = self.alloc(new_layout);
            if !moved.is_null() {
                std::ptr::copy_nonoverlapping(pointer, moved, layout.size().min(new_size));
                self.dealloc(pointer, layout);
            }
            moved
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-3,5,7-8"), [0, 1, 2, 3, 5, 7, 8].into_iter().collect());
        assert_eq!(parse_cpu_list("0"), [0].into_iter().collect());
    }

    #[test]
    fn a_huge_allocation_is_reserved_and_a_small_one_is_the_system_s() {
        use std::alloc::{GlobalAlloc, Layout};
        let allocator = ReserveLargeAllocator;
        // 64 GiB: far beyond this machine's memory, as kafka-protocol asks for.
        let huge = Layout::from_size_align(64 << 30, 8).unwrap();
        // SAFETY: a valid non-zero layout; the block is written within its first page
        // and its last byte, then freed with the same layout.
        unsafe {
            let block = allocator.alloc(huge);
            assert!(!block.is_null(), "a reservation this large must not fail");
            assert_eq!(*block, 0);
            *block = 7;
            *block.add(huge.size() - 1) = 9;
            allocator.dealloc(block, huge);
            let small = Layout::from_size_align(64, 8).unwrap();
            let block = allocator.alloc(small);
            assert!(!block.is_null());
            let grown = allocator.realloc(block, small, 128);
            assert!(!grown.is_null());
            allocator.dealloc(grown, Layout::from_size_align(128, 8).unwrap());
        }
    }

    #[test]
    fn this_host_has_a_usable_cpu() {
        assert!(!usable_cpus().is_empty());
    }
}
