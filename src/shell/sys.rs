//! The one module allowed `unsafe`: thin calls into libc that no safe crate wraps for
//! us. Every block carries a SAFETY paragraph.
#![allow(unsafe_code)]

use std::collections::BTreeSet;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-3,5,7-8"), [0, 1, 2, 3, 5, 7, 8].into_iter().collect());
        assert_eq!(parse_cpu_list("0"), [0].into_iter().collect());
    }

    #[test]
    fn this_host_has_a_usable_cpu() {
        assert!(!usable_cpus().is_empty());
    }
}
