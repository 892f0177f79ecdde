//! The data directory's disk budget, shared by every partition on every core: one
//! atomic count of the segment bytes all partitions hold, against
//! `log.data_dir_bytes_max`. A partition adds what it writes and subtracts what it
//! deletes; an append that would go over the budget is treated as a full disk
//! (`log.disk_full_policy`). An atomic add per flush is the only cross-core touch.
//!
//! The room for a batch is *reserved* before it is written (one compare-and-swap), so
//! two cores can never both take the last room under the budget: a check followed by a
//! separate add let every core pass the check at once and go over by a batch each.
//! `tests/loom.rs` model-checks this file's every interleaving of two cores (it
//! includes this file with loom's atomics in place of std's, through `crate::sync`).

use crate::sync::atomic::{AtomicU64, Ordering};

use crate::config::DiskFullPolicy;

#[derive(Debug)]
pub struct DataDirBudget {
    /// 0: no limit but the filesystem's.
    bytes_max: u64,
    /// Below this much room under `bytes_max`, retention deletes shipped segments.
    retention_room_bytes: u64,
    policy: DiskFullPolicy,
    used_bytes: AtomicU64,
    /// Bytes a partition that could not make room among its own segments wants other
    /// partitions, on any core, to free under `drop-oldest`; 0 when none is wanted.
    room_wanted: AtomicU64,
}

impl DataDirBudget {
    pub fn new(bytes_max: u64, retention_room_bytes: u64, policy: DiskFullPolicy) -> DataDirBudget {
        DataDirBudget {
            bytes_max,
            retention_room_bytes,
            policy,
            used_bytes: AtomicU64::new(0),
            room_wanted: AtomicU64::new(0),
        }
    }

    /// No byte limit, `block` on a full filesystem: the default.
    pub fn unlimited() -> DataDirBudget {
        DataDirBudget::new(0, 0, DiskFullPolicy::Block)
    }

    pub fn policy(&self) -> DiskFullPolicy {
        self.policy
    }

    pub fn bytes_max(&self) -> u64 {
        self.bytes_max
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_bytes.load(Ordering::Relaxed)
    }

    /// A partition's segment bytes went from `before` to `after`.
    pub fn account(&self, before: u64, after: u64) {
        if after >= before {
            self.used_bytes.fetch_add(after - before, Ordering::Relaxed);
        } else {
            self.used_bytes.fetch_sub(before - after, Ordering::Relaxed);
        }
    }

    /// Counts `extra_bytes` in if they fit under the budget, atomically with the check;
    /// whether they were. The caller gives them back with `account(reserved, 0)` or
    /// turns them into written bytes (`account` of its own totals, reservation included).
    pub fn try_reserve(&self, extra_bytes: u64) -> bool {
        if self.bytes_max == 0 {
            self.used_bytes.fetch_add(extra_bytes, Ordering::Relaxed);
            return true;
        }
        let mut used = self.used_bytes.load(Ordering::Relaxed);
        loop {
            if used + extra_bytes > self.bytes_max {
                return false;
            }
            match self.used_bytes.compare_exchange_weak(used, used + extra_bytes, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(now) => used = now,
            }
        }
    }

    /// A partition needs `bytes` of room and has no sealed segment of its own to drop:
    /// asks every core's room keeper (`log::keep_room`) for them.
    pub fn want_room(&self, bytes: u64) {
        self.room_wanted.fetch_max(bytes.max(1), Ordering::AcqRel);
    }

    /// Bytes of room still wanted by some partition (0: none).
    pub fn room_wanted(&self) -> u64 {
        self.room_wanted.load(Ordering::Acquire)
    }

    /// A room keeper freed `bytes` for the partitions that wanted room.
    pub fn room_given(&self, bytes: u64) {
        let mut wanted = self.room_wanted.load(Ordering::Acquire);
        loop {
            let left = wanted.saturating_sub(bytes);
            match self.room_wanted.compare_exchange_weak(wanted, left, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(now) => wanted = now,
            }
        }
    }

    /// Bytes retention should free (from shipped segments) for the data directory:
    /// what is missing to have `retention_room_bytes` of room left.
    pub fn excess_bytes(&self) -> u64 {
        if self.bytes_max == 0 {
            return 0;
        }
        (self.used_bytes() + self.retention_room_bytes).saturating_sub(self.bytes_max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_and_judges_against_the_limit() {
        crate::sync::model(accounts_and_judges);
    }

    fn accounts_and_judges() {
        let budget = DataDirBudget::new(1000, 100, DiskFullPolicy::Block);
        budget.account(0, 850);
        assert!(!budget.try_reserve(151));
        assert!(budget.try_reserve(150));
        assert_eq!(budget.used_bytes(), 1000);
        budget.account(150, 0);
        assert_eq!(budget.excess_bytes(), 0);
        budget.account(850, 950);
        assert_eq!(budget.excess_bytes(), 50);
        budget.account(950, 100);
        assert_eq!(budget.used_bytes(), 100);
        assert!(DataDirBudget::unlimited().try_reserve(u64::MAX / 2));
    }

    #[test]
    fn room_wanted_is_the_largest_ask_until_that_much_is_given() {
        crate::sync::model(room_wanted_until_given);
    }

    fn room_wanted_until_given() {
        let budget = DataDirBudget::new(1000, 100, DiskFullPolicy::DropOldest);
        assert_eq!(budget.room_wanted(), 0);
        budget.want_room(300);
        budget.want_room(200);
        assert_eq!(budget.room_wanted(), 300);
        budget.room_given(250);
        assert_eq!(budget.room_wanted(), 50);
        budget.room_given(250);
        assert_eq!(budget.room_wanted(), 0);
        budget.want_room(0);
        assert_eq!(budget.room_wanted(), 1, "any ask wants at least a byte");
    }
}
