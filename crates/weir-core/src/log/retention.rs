//! Retention planning: which whole segments the shipper's progress lets the log delete.
//!
//! Only sealed segments that lie wholly below the offset the caller names are deleted,
//! oldest first, and only while the partition is over its byte budget. The active
//! segment is never a candidate.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedSegment {
    pub base_offset: i64,
    /// One past the segment's last offset (the next segment's base).
    pub next_offset: i64,
    pub bytes: u64,
}

/// How many of the oldest `sealed` segments (ordered by base offset) to delete so the
/// partition (sealed plus `active_bytes`) gets within `budget_bytes`, deleting only
/// segments whose every offset is below `below_offset`.
pub fn plan_deletions(sealed: &[SealedSegment], active_bytes: u64, budget_bytes: u64, below_offset: i64) -> usize {
    let mut total: u64 = sealed.iter().map(|segment| segment.bytes).sum::<u64>() + active_bytes;
    let mut count = 0;
    for segment in sealed {
        if total <= budget_bytes || segment.next_offset > below_offset {
            break;
        }
        total -= segment.bytes;
        count += 1;
    }
    count
}

/// As `plan_deletions`, and also while less than `excess_bytes` were freed (what the
/// data directory as a whole is over its retention threshold).
pub fn plan_deletions_with_excess(
    sealed: &[SealedSegment],
    active_bytes: u64,
    budget_bytes: u64,
    below_offset: i64,
    excess_bytes: u64,
) -> usize {
    let mut total: u64 = sealed.iter().map(|segment| segment.bytes).sum::<u64>() + active_bytes;
    let mut freed = 0u64;
    let mut count = 0;
    for segment in sealed {
        if (total <= budget_bytes && freed >= excess_bytes) || segment.next_offset > below_offset {
            break;
        }
        total -= segment.bytes;
        freed += segment.bytes;
        count += 1;
    }
    count
}

/// The segment a full disk deletes to make room, and whether it was shipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomVictim {
    pub segment: SealedSegment,
    pub shipped: bool,
}

/// Which segment goes when the disk is full: the oldest sealed one (`None` when only
/// the active segment is left) if it is wholly below `shipped_below_offset`, or under
/// `drop-oldest` even if it is not (its records are lost upstream: the caller reports
/// them).
pub fn plan_room(
    oldest_sealed: Option<SealedSegment>,
    shipped_below_offset: i64,
    drop_oldest: bool,
) -> Option<RoomVictim> {
    let segment = oldest_sealed?;
    let shipped = segment.next_offset <= shipped_below_offset;
    (shipped || drop_oldest).then_some(RoomVictim { segment, shipped })
}

/// The room keeper's pick among a core's partitions when another partition asks for
/// room under `drop-oldest`: of the healthy partitions that have a sealed segment, the
/// one whose oldest sealed segment was written longest ago. `candidates` holds, per
/// partition, whether it is poisoned and its oldest sealed segment's modification time
/// (any ordered time); the index of the pick.
pub fn pick_room_keeper_victim<T: Ord + Copy>(candidates: &[(bool, Option<T>)]) -> Option<usize> {
    candidates
        .iter()
        .enumerate()
        .filter(|(_, (poisoned, _))| !poisoned)
        .filter_map(|(index, (_, modified))| modified.map(|modified| (modified, index)))
        .min()
        .map(|(_, index)| index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_room_keeper_takes_the_oldest_sealed_segment_of_a_healthy_partition() {
        assert_eq!(pick_room_keeper_victim::<u64>(&[]), None);
        assert_eq!(pick_room_keeper_victim(&[(false, None), (false, Some(5u64))]), Some(1));
        assert_eq!(pick_room_keeper_victim(&[(false, Some(7u64)), (false, Some(5)), (false, Some(9))]), Some(1));
        // A poisoned partition is left alone even when its segment is the oldest.
        assert_eq!(pick_room_keeper_victim(&[(true, Some(1u64)), (false, Some(5))]), Some(1));
        assert_eq!(pick_room_keeper_victim(&[(true, Some(1u64)), (false, None)]), None);
    }

    fn segments() -> Vec<SealedSegment> {
        vec![
            SealedSegment { base_offset: 0, next_offset: 100, bytes: 1000 },
            SealedSegment { base_offset: 100, next_offset: 200, bytes: 1000 },
            SealedSegment { base_offset: 200, next_offset: 300, bytes: 1000 },
        ]
    }

    #[test]
    fn deletes_only_while_over_budget_and_below_offset() {
        assert_eq!(plan_deletions(&segments(), 500, 10_000, 1000), 0, "under budget");
        assert_eq!(plan_deletions(&segments(), 500, 2000, 1000), 2);
        assert_eq!(plan_deletions(&segments(), 500, 0, 1000), 3);
        assert_eq!(plan_deletions(&segments(), 500, 0, 199), 1, "second segment holds offset 199");
        assert_eq!(plan_deletions(&segments(), 500, 0, 0), 0);
    }

    #[test]
    fn the_data_directory_excess_deletes_shipped_segments_under_the_partition_budget() {
        assert_eq!(plan_deletions_with_excess(&segments(), 500, 10_000, 1000, 0), 0);
        assert_eq!(plan_deletions_with_excess(&segments(), 500, 10_000, 1000, 1), 1);
        assert_eq!(plan_deletions_with_excess(&segments(), 500, 10_000, 1000, 1001), 2);
        assert_eq!(plan_deletions_with_excess(&segments(), 500, 10_000, 150, 5000), 1, "only shipped ones");
        assert_eq!(plan_deletions_with_excess(&segments(), 500, 2000, 1000, 0), 2, "partition budget still applies");
    }

    #[test]
    fn a_full_disk_deletes_the_oldest_segment_only_if_shipped_unless_drop_oldest() {
        let oldest = SealedSegment { base_offset: 0, next_offset: 100, bytes: 4096 };
        assert_eq!(plan_room(None, 1000, true), None, "the active segment never goes");
        assert_eq!(plan_room(Some(oldest), 100, false), Some(RoomVictim { segment: oldest, shipped: true }));
        assert_eq!(plan_room(Some(oldest), 99, false), None);
        assert_eq!(plan_room(Some(oldest), 99, true), Some(RoomVictim { segment: oldest, shipped: false }));
    }
}
