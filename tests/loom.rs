//! loom models of what weir shares between cores: every interleaving of two cores'
//! operations is run, not a lucky few.
//!
//! - The data directory's disk budget (`src/shell/budget.rs`, included here with loom's
//!   atomics through a `sync` module of this crate): two cores reserving the last room
//!   never both get it; reservations given back and bytes deleted on another core
//!   leave the count exact.
//! - The check-then-add it replaced is modelled too, to show the model catches the
//!   overshoot it had (that test expects loom to find the bad interleaving).

/// What `src/shell/budget.rs` takes from `crate::sync` and `crate::config`.
mod sync {
    pub use loom::model;
    pub use loom::sync::atomic;
}
mod config {
    pub use weir::config::DiskFullPolicy;
}

// Only some of its methods are modelled.
#[allow(dead_code)]
#[path = "../src/shell/budget.rs"]
mod budget;

use budget::DataDirBudget;
use config::DiskFullPolicy;
use loom::sync::Arc;

#[test]
fn two_cores_never_both_take_the_last_room_under_the_budget() {
    loom::model(|| {
        let budget = Arc::new(DataDirBudget::new(1000, 0, DiskFullPolicy::Block));
        budget.account(0, 900);
        let other = budget.clone();
        let core_1 = loom::thread::spawn(move || other.try_reserve(100));
        let mine = budget.try_reserve(100);
        let theirs = core_1.join().unwrap();
        assert!(mine ^ theirs, "exactly one core gets the last 100 bytes (mine {mine}, theirs {theirs})");
        assert_eq!(budget.used_bytes(), 1000);
    });
}

#[test]
fn a_reservation_given_back_while_another_core_deletes_leaves_the_count_exact() {
    loom::model(|| {
        let budget = Arc::new(DataDirBudget::new(1000, 0, DiskFullPolicy::Block));
        budget.account(0, 600); // core 0's partition
        budget.account(0, 300); // core 1's partition
        let other = budget.clone();
        let core_1 = loom::thread::spawn(move || {
            other.account(300, 100); // retention deleted a segment
        });
        let reserved = budget.try_reserve(100);
        budget.account(100, 0); // the write failed: the reservation goes back
        core_1.join().unwrap();
        assert!(reserved, "900 + 100 fits whatever core 1 did");
        assert_eq!(budget.used_bytes(), 700);
    });
}

#[test]
#[should_panic(expected = "went over the budget")]
fn the_old_check_then_add_lets_two_cores_overshoot() {
    use loom::sync::atomic::{AtomicU64, Ordering};
    loom::model(|| {
        let used = Arc::new(AtomicU64::new(900));
        let check_then_add = |used: &AtomicU64| {
            if used.load(Ordering::Relaxed) + 100 <= 1000 {
                used.fetch_add(100, Ordering::Relaxed);
            }
        };
        let other = used.clone();
        let core_1 = loom::thread::spawn(move || check_then_add(&other));
        check_then_add(&used);
        core_1.join().unwrap();
        assert!(used.load(Ordering::Relaxed) <= 1000, "went over the budget");
    });
}
