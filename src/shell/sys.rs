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
