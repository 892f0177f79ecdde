//! Scenario tests of the group-commit state machine. A small driver plays the shell:
//! it carries out each action the way `shell::log` does, on a model disk with knobs
//! (budget left, free bytes, failures), and every `handle_*` checks the invariants.

use super::*;

const MS: Duration = Duration::from_millis(1);

fn config() -> PartitionConfig {
    PartitionConfig {
        segment_bytes_max: 10_000,
        segment_age_max: Duration::from_secs(60),
        index_interval_bytes: 1000,
        preallocate_bytes: 64 << 10,
        flush_delay_max: 2 * MS,
        flush_bytes_max: 1000,
        alignment_bytes: 4096,
        disk_reserve_bytes: 1 << 20,
    }
}

/// A stand-in shell: the answers the core got, the I/O it asked for, and what the
/// next I/O step returns.
struct Shell {
    core: PartitionCore,
    base: Instant,
    replies: Vec<Result<i64, Refusal>>,
    /// The exact batch bytes of each append (the test's records).
    queued: VecDeque<usize>,
    budget_left: u64,
    free_bytes: Option<u64>,
    /// Segments this partition may delete to make room.
    deletable: usize,
    fail_next_write: Option<Failure>,
    fail_next_sync: bool,
    log: Vec<String>,
    closed: Option<bool>,
}

impl Shell {
    fn new(config: PartitionConfig) -> Shell {
        let base = Instant::now();
        Shell {
            core: PartitionCore::new(config, ActiveState::empty(0, base)),
            base,
            replies: Vec::new(),
            queued: VecDeque::new(),
            budget_left: u64::MAX,
            free_bytes: None,
            deletable: 0,
            fail_next_write: None,
            fail_next_sync: false,
            log: Vec::new(),
            closed: None,
        }
    }

    fn at(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms)
    }

    /// An append of `bytes` batch bytes (its bound) arriving at `ms`.
    fn append(&mut self, bytes: usize, ms: u64) {
        self.queued.push_back(bytes);
        self.core.handle_append(bytes, 1, self.at(ms));
        self.run(ms);
    }

    /// Carries out every action at `ms` (completions arrive at once).
    fn run(&mut self, ms: u64) {
        let now = self.at(ms);
        while let Some(action) = self.core.poll_action() {
            match action {
                Action::Plan { appends } => {
                    let bytes: usize = self.queued.iter().take(appends).sum();
                    self.log.push(format!("plan {appends}"));
                    self.core.handle_batch_bytes(BATCH_HEADER_BYTES + bytes);
                }
                Action::Reserve { bytes } => {
                    let granted = bytes <= self.budget_left;
                    if granted {
                        self.budget_left -= bytes;
                    }
                    self.core.handle_reserved(granted, now);
                }
                Action::Unreserve { bytes } => self.budget_left += bytes,
                Action::Roll { base_offset } => {
                    self.log.push(format!("roll {base_offset}"));
                    self.core.handle_rolled(now);
                }
                Action::MeasureFree => self.core.handle_free_bytes(self.free_bytes, now),
                Action::Write(step) => {
                    self.log.push(format!(
                        "write {} at {} index {:?} {}",
                        step.base_offset,
                        step.plan.end_position - step.batch_bytes as u64,
                        step.index_entry,
                        step.write_index
                    ));
                    match self.fail_next_write.take() {
                        Some(failure) => self.core.handle_failed(failure, now),
                        None => {
                            let allocated = step.plan.preallocate_to.unwrap_or(self.core.active().allocated_bytes);
                            self.core.handle_written(allocated);
                        }
                    }
                }
                Action::Sync => {
                    if std::mem::take(&mut self.fail_next_sync) {
                        self.core.handle_failed(Failure::Other, now);
                    } else {
                        self.core.handle_synced(now);
                    }
                }
                Action::MakeRoom => {
                    let freed = self.deletable > 0;
                    if freed {
                        self.deletable -= 1;
                        self.log.push("delete".to_owned());
                        self.free_bytes = None;
                        self.budget_left = u64::MAX;
                    }
                    self.core.handle_room_made(freed, now);
                }
                Action::WaitForRoom { .. } => {
                    self.log.push("wait".to_owned());
                    self.core.handle_room_waited();
                }
                Action::DiskFull { appends, .. } => self.log.push(format!("full {appends}")),
                Action::Poisoned => self.log.push("poisoned".to_owned()),
                Action::Reply(result) => {
                    self.queued.pop_front().expect("a reply for a queued append");
                    self.replies.push(result);
                }
                Action::Close { seal } => self.closed = Some(seal),
                Action::Stop => self.closed = Some(false),
            }
        }
    }

    /// An append that finds the queue empty behind it.
    fn append_alone(&mut self, bytes: usize, ms: u64) {
        self.append(bytes, ms);
        self.queue_empty(ms);
    }

    fn queue_empty(&mut self, ms: u64) {
        self.core.handle_queue_empty(self.at(ms));
        self.run(ms);
    }

    fn writes(&self) -> usize {
        self.log.iter().filter(|line| line.starts_with("write")).count()
    }
}

#[test]
fn an_idle_append_waits_for_the_window() {
    let mut shell = Shell::new(config());
    shell.append(100, 0);
    assert_eq!(shell.core.wants_append(), Some(Some(shell.at(2))));
    shell.queue_empty(1);
    assert!(shell.replies.is_empty(), "the window is still open");
    shell.append(100, 1);
    shell.queue_empty(2);
    assert_eq!(shell.replies, vec![Ok(0), Ok(1)]);
    assert_eq!(shell.writes(), 1, "one group, one write");
    assert!(shell.core.is_idle());
}

#[test]
fn busy_appends_go_at_once() {
    let mut shell = Shell::new(config());
    shell.append(100, 0);
    shell.queue_empty(2);
    // Within the window after the last flush ended: the flush was the window.
    shell.append(100, 3);
    assert_eq!(shell.core.wants_append(), Some(Some(shell.at(3))));
    shell.queue_empty(3);
    assert_eq!(shell.replies, vec![Ok(0), Ok(1)]);
    // Long after: idle again, so it waits.
    shell.append(100, 50);
    shell.queue_empty(50);
    assert_eq!(shell.replies.len(), 2);
    shell.queue_empty(52);
    assert_eq!(shell.replies.len(), 3);
}

/// Two partitions of one core sharing a pacer of one flush per 10 ms.
fn paced_pair() -> (Shell, Shell) {
    let pacer = Rc::new(RefCell::new(FlushPacer::new(100)));
    let (mut first, mut second) = (Shell::new(config()), Shell::new(config()));
    second.base = first.base;
    first.core.set_pacer(pacer.clone());
    second.core.set_pacer(pacer);
    (first, second)
}

#[test]
fn paced_partitions_take_turns_and_gather_while_they_wait() {
    let (mut first, mut second) = paced_pair();
    first.append(100, 0);
    second.append(100, 0);
    // Both windows end at 2 ms: the first takes the slot at once, the second the next
    // one, 10 ms on, and keeps gathering until then.
    first.queue_empty(2);
    second.queue_empty(2);
    assert_eq!(first.replies, vec![Ok(0)]);
    assert!(second.replies.is_empty());
    assert_eq!(second.core.wants_append(), Some(Some(second.at(12))));
    second.append(100, 5);
    second.append(100, 11);
    second.queue_empty(11);
    assert!(second.replies.is_empty(), "its slot has not come");
    second.queue_empty(12);
    assert_eq!(second.replies, vec![Ok(0), Ok(1), Ok(2)]);
    assert_eq!(second.log, vec!["plan 3".to_owned(), "write 0 at 0 index None false".to_owned()]);
}

#[test]
fn paced_flushes_of_a_busy_core_stay_at_the_limit() {
    let (mut first, mut second) = paced_pair();
    // An append every millisecond on each partition for 200 ms.
    for ms in 0..200 {
        for shell in [&mut first, &mut second] {
            shell.append(10, ms);
            shell.queue_empty(ms);
        }
    }
    for shell in [&mut first, &mut second] {
        shell.queue_empty(240);
    }
    let writes = first.writes() + second.writes();
    assert!(writes <= 200 / 10 + 3, "{writes} flushes in 200 ms at 100 flushes/s");
    assert_eq!(first.replies.len() + second.replies.len(), 400, "every append acked");
    // Unpaced, every millisecond's append would be its own flush after the first.
    let mut unpaced = Shell::new(config());
    for ms in 0..200 {
        unpaced.append(10, ms);
        unpaced.queue_empty(ms);
    }
    assert!(unpaced.writes() >= 190, "{} unpaced flushes", unpaced.writes());
}

#[test]
fn a_full_group_goes_without_a_slot() {
    let (mut first, mut second) = paced_pair();
    first.append(100, 0);
    first.queue_empty(2); // takes the slot at 2 ms
    second.append(1000 - BATCH_HEADER_BYTES, 3);
    assert_eq!(second.replies, vec![Ok(0)], "a full group does not wait for the slot at 12 ms");
}

#[test]
fn a_group_at_flush_bytes_max_carries_the_next_append() {
    let mut shell = Shell::new(config());
    shell.append(400, 0);
    shell.append(400, 0);
    assert!(shell.log.is_empty(), "{} bytes fit", BATCH_HEADER_BYTES + 800);
    shell.append(400, 0); // would pass 1000: carried
    assert_eq!(shell.log[0], "plan 2");
    assert_eq!(shell.replies, vec![Ok(0), Ok(1)]);
    // The carried append starts the next group right after the flush: busy.
    assert_eq!(shell.core.wants_append(), Some(Some(shell.at(0))));
    shell.queue_empty(0);
    assert_eq!(shell.replies, vec![Ok(0), Ok(1), Ok(2)]);
    assert_eq!(shell.writes(), 2);
}

#[test]
fn a_group_that_reaches_flush_bytes_max_goes_without_waiting() {
    let mut shell = Shell::new(config());
    shell.append(1000 - BATCH_HEADER_BYTES, 0);
    assert_eq!(shell.replies, vec![Ok(0)]);
}

#[test]
fn the_segment_rolls_when_too_full_and_when_too_old() {
    let mut config = config();
    config.flush_delay_max = Duration::ZERO;
    let mut shell = Shell::new(config);
    for _ in 0..11 {
        shell.append_alone(900 - BATCH_HEADER_BYTES, 0);
    }
    // 11 batches of 900 bytes: the 12th would pass 10,000.
    assert!(!shell.log.iter().any(|line| line.starts_with("roll")));
    shell.append_alone(900 - BATCH_HEADER_BYTES, 0);
    assert!(shell.log.contains(&"roll 11".to_owned()), "{:?}", shell.log);
    assert_eq!(shell.core.active().base_offset, 11);
    assert_eq!(shell.core.active().end_position, 900);
    shell.append_alone(100, 59_999);
    assert_eq!(shell.core.active().base_offset, 11);
    shell.append_alone(100, 60_000);
    assert!(shell.log.contains(&"roll 13".to_owned()), "{:?}", shell.log);
    assert_eq!(shell.core.active().base_offset, 13, "aged out: rolled at its end");
    assert_eq!(shell.replies.len(), 14);
    assert!(shell.replies.iter().enumerate().all(|(offset, reply)| *reply == Ok(offset as i64)));
}

#[test]
fn an_index_entry_every_interval_and_entries_written_in_groups() {
    let mut config = config();
    config.flush_delay_max = Duration::ZERO;
    config.segment_bytes_max = 1 << 30;
    let mut shell = Shell::new(config);
    for _ in 0..40 {
        shell.append_alone(500 - BATCH_HEADER_BYTES, 0);
    }
    // 500-byte batches with a 1000-byte interval: an entry at every second batch.
    let entries: Vec<&String> = shell.log.iter().filter(|line| line.contains("Some(")).collect();
    assert_eq!(entries.len(), 19, "{:?}", shell.log);
    assert!(entries[0].starts_with("write 2 at 1000 index Some(IndexEntry { relative_offset: 2, position: 1000 })"));
    assert_eq!(shell.core.active().index_entries, 19);
    assert_eq!(shell.core.active().index_written, INDEX_ENTRIES_PER_WRITE);
    let written: Vec<&String> = shell.log.iter().filter(|line| line.ends_with("true")).collect();
    assert_eq!(written.len(), 1, "16 entries go in one index write");
}

#[test]
fn a_full_disk_deletes_a_shipped_segment_and_writes() {
    let mut shell = Shell::new(config());
    shell.budget_left = 100;
    shell.deletable = 1;
    shell.append(100, 0);
    shell.queue_empty(2);
    assert_eq!(shell.replies, vec![Ok(0)]);
    assert!(shell.log.contains(&"delete".to_owned()));
    assert_eq!(shell.core.reserved_bytes(), 0);
}

#[test]
fn the_reserve_floor_refuses_a_write_that_would_fill_the_filesystem() {
    let mut shell = Shell::new(config());
    shell.free_bytes = Some(1 << 20); // less than the floor plus one page
    shell.append(100, 0);
    shell.queue_empty(2);
    assert_eq!(shell.replies, vec![Err(Refusal::DiskFull)]);
    assert_eq!(shell.budget_left, u64::MAX, "the reservation was given back");
    assert!(!shell.core.is_poisoned());
    // Room enough for the page but not the step: only the page is preallocated.
    shell.free_bytes = Some((1 << 20) + 4096);
    shell.append(100, 10);
    shell.queue_empty(12);
    assert_eq!(shell.replies[1], Ok(0));
    assert_eq!(shell.core.active().allocated_bytes, 4096);
}

#[test]
fn drop_oldest_waits_for_room_then_refuses() {
    let mut shell = Shell::new(config());
    shell.core.set_drop_oldest(true);
    shell.budget_left = 0;
    shell.append(100, 0);
    shell.queue_empty(2);
    assert_eq!(shell.replies, vec![Err(Refusal::DiskFull)]);
    assert_eq!(shell.log.iter().filter(|line| *line == "wait").count(), ROOM_WAIT_STEPS);
    assert!(shell.log.contains(&"full 1".to_owned()));
    // Under block nothing waits.
    shell.core.set_drop_oldest(false);
    shell.log.clear();
    shell.append(100, 10);
    shell.queue_empty(12);
    assert_eq!(shell.replies[1], Err(Refusal::DiskFull));
    assert!(!shell.log.contains(&"wait".to_owned()));
}

#[test]
fn a_failed_write_poisons_and_later_appends_are_refused_poisoned() {
    let mut shell = Shell::new(config());
    shell.fail_next_write = Some(Failure::Other);
    shell.append(100, 0);
    shell.append(100, 0);
    shell.queue_empty(2);
    assert_eq!(shell.replies, vec![Err(Refusal::Failed), Err(Refusal::Poisoned)]);
    assert!(shell.core.is_poisoned());
    assert_eq!(shell.budget_left, u64::MAX);
    shell.append(100, 10);
    shell.queue_empty(20);
    assert_eq!(shell.replies[2], Err(Refusal::Poisoned));
    assert_eq!(shell.writes(), 1, "nothing is written after a failure");
    shell.core.handle_close(shell.at(30));
    shell.run(30);
    assert_eq!(shell.closed, Some(false), "a poisoned partition is not sealed");
}

#[test]
fn a_failed_sync_poisons_too() {
    let mut shell = Shell::new(config());
    shell.fail_next_sync = true;
    shell.append(100, 0);
    shell.queue_empty(2);
    assert_eq!(shell.replies, vec![Err(Refusal::Failed)]);
    assert!(shell.core.is_poisoned());
}

#[test]
fn a_full_filesystem_at_preallocation_is_not_a_poison() {
    let mut shell = Shell::new(config());
    shell.fail_next_write = Some(Failure::FullBeforeWrite);
    shell.append(100, 0);
    shell.queue_empty(2);
    assert_eq!(shell.replies, vec![Err(Refusal::DiskFull)]);
    assert!(!shell.core.is_poisoned());
    shell.append(100, 10);
    shell.queue_empty(12);
    assert_eq!(shell.replies[1], Ok(0));
}

#[test]
fn close_flushes_the_group_and_the_carried_append() {
    let mut shell = Shell::new(config());
    shell.append(400, 0);
    shell.append(400, 0);
    shell.queued.push_back(400);
    // The third does not fit: it is carried, and the first two are written.
    shell.core.handle_append(400, 1, shell.at(0));
    shell.run(0);
    assert_eq!(shell.replies.len(), 2);
    shell.core.handle_close(shell.at(0));
    shell.run(0);
    assert_eq!(shell.replies, vec![Ok(0), Ok(1), Ok(2)]);
    assert_eq!(shell.closed, Some(true));
    assert!(shell.core.is_done());
    assert_eq!(shell.core.wants_append(), None);
}

#[test]
fn close_while_gathering_writes_at_once() {
    let mut shell = Shell::new(config());
    shell.append(100, 0);
    shell.core.handle_close(shell.at(0));
    shell.run(0);
    assert_eq!(shell.replies, vec![Ok(0)]);
    assert_eq!(shell.closed, Some(true));
}

#[test]
fn appenders_gone_writes_what_is_gathered_then_stops() {
    let mut shell = Shell::new(config());
    shell.append(100, 0);
    shell.core.handle_input_closed(shell.at(0));
    shell.run(0);
    assert_eq!(shell.replies, vec![Ok(0)]);
    assert_eq!(shell.closed, Some(false));
    assert!(shell.core.is_done());
}
