//! Kafka's classic consumer-group protocol, as the coordinator sees it: members join,
//! the coordinator waits until every known member has rejoined (or its rebalance
//! timeout passes), names a leader and a generation, the leader's assignment is handed
//! to every member at sync, heartbeats keep members in, a member that leaves or misses
//! its session timeout starts the next rebalance. Offset commits are checked against
//! the member and generation, so a member that lost its partitions in a rebalance
//! cannot overwrite the offsets of the member that took them over.
//!
//! Pure: requests and `now_ms` in, answers out. An answer that must wait (a join until
//! the rebalance completes, a sync until the leader's assignment arrives) is returned
//! as `Pending`; it is produced later by `poll_answer`, after a later request or a
//! `handle_tick`. Invariants (`check_invariants`): a Stable or CompletingRebalance group
//! has a leader that is a member; every pending join or sync belongs to a member; the
//! group and member counts stay within their limits.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::kafka_api::error_code;

/// Kafka's group error codes (beyond `kafka_api::error_code`).
pub mod group_error {
    pub const ILLEGAL_GENERATION: i16 = 22;
    pub const INCONSISTENT_GROUP_PROTOCOL: i16 = 23;
    pub const UNKNOWN_MEMBER_ID: i16 = 25;
    pub const INVALID_SESSION_TIMEOUT: i16 = 26;
    pub const REBALANCE_IN_PROGRESS: i16 = 27;
    pub const GROUP_MAX_SIZE_REACHED: i16 = 81;
    pub const INVALID_GROUP_ID: i16 = 24;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
}
use group_error::*;

/// Limits of the coordinator (config `[kafka_api]`).
#[derive(Debug, Clone, Copy)]
pub struct GroupLimits {
    pub groups_max: usize,
    pub members_per_group_max: usize,
    pub session_timeout_ms_min: i32,
    pub session_timeout_ms_max: i32,
}

/// A group's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl GroupState {
    pub fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
        }
    }
}

#[derive(Debug, Clone)]
struct Member {
    session_timeout_ms: i32,
    rebalance_timeout_ms: i32,
    /// (protocol name, metadata) in the member's order of preference.
    protocols: Vec<(String, Vec<u8>)>,
    last_seen_ms: u64,
    /// Joined in the rebalance under way.
    rejoined: bool,
    assignment: Vec<u8>,
}

#[derive(Debug, Clone)]
struct Group {
    state: GroupState,
    generation: i32,
    protocol_type: Option<String>,
    protocol: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// When the rebalance under way gives up on members that did not rejoin.
    rebalance_deadline_ms: u64,
    pending_joins: Vec<String>,
    pending_syncs: Vec<String>,
}

impl Group {
    fn new() -> Group {
        Group {
            state: GroupState::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            rebalance_deadline_ms: 0,
            pending_joins: Vec::new(),
            pending_syncs: Vec::new(),
        }
    }
}

/// A JoinGroup, decoded.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub member_id: String,
    pub client_id: String,
    pub protocol_type: String,
    pub protocols: Vec<(String, Vec<u8>)>,
    pub session_timeout_ms: i32,
    pub rebalance_timeout_ms: i32,
}

/// A JoinGroup answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinAnswer {
    pub error_code: i16,
    pub generation: i32,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub leader: String,
    pub member_id: String,
    /// (member id, metadata) for the leader; empty for the others.
    pub members: Vec<(String, Vec<u8>)>,
}

impl JoinAnswer {
    /// An answer carrying only `error_code` (no generation, no members).
    pub fn error(error_code: i16, member_id: &str) -> JoinAnswer {
        JoinAnswer {
            error_code,
            generation: -1,
            protocol_type: None,
            protocol: None,
            leader: String::new(),
            member_id: member_id.to_owned(),
            members: Vec::new(),
        }
    }
}

/// A SyncGroup answer: the member's assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncAnswer {
    pub error_code: i16,
    pub protocol_type: Option<String>,
    pub protocol: Option<String>,
    pub assignment: Vec<u8>,
}

impl SyncAnswer {
    /// An answer carrying only `error_code` (no assignment).
    pub fn error(error_code: i16) -> SyncAnswer {
        SyncAnswer { error_code, protocol_type: None, protocol: None, assignment: Vec::new() }
    }
}

/// An answer now, or later through `poll_answer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    Now(T),
    Pending { member_id: String },
}

/// A deferred answer, ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deferred {
    Join { group: String, member_id: String, answer: JoinAnswer },
    Sync { group: String, member_id: String, answer: SyncAnswer },
}

/// What a group looks like, for `weir status` and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupView {
    pub group: String,
    pub state: GroupState,
    pub generation: i32,
    pub members: usize,
}

/// The coordinator of every group on this appliance.
#[derive(Debug)]
pub struct Coordinator {
    limits: GroupLimits,
    groups: BTreeMap<String, Group>,
    ready: VecDeque<Deferred>,
    /// Member ids are `<client id>-<this counter>`, unique for the process's life.
    next_member: u64,
}

impl Coordinator {
    pub fn new(limits: GroupLimits) -> Coordinator {
        assert!(limits.groups_max > 0 && limits.members_per_group_max > 0);
        Coordinator { limits, groups: BTreeMap::new(), ready: VecDeque::new(), next_member: 0 }
    }

    pub fn handle_join(&mut self, now_ms: u64, group_id: &str, request: JoinRequest) -> Outcome<JoinAnswer> {
        let answer = |code| Outcome::Now(JoinAnswer::error(code, &request.member_id));
        if group_id.is_empty() {
            return answer(INVALID_GROUP_ID);
        }
        if request.session_timeout_ms < self.limits.session_timeout_ms_min
            || request.session_timeout_ms > self.limits.session_timeout_ms_max
        {
            return answer(INVALID_SESSION_TIMEOUT);
        }
        if !self.groups.contains_key(group_id) && self.groups.len() >= self.limits.groups_max {
            return answer(COORDINATOR_NOT_AVAILABLE);
        }
        if !request.member_id.is_empty()
            && self.groups.get(group_id).is_none_or(|group| !group.members.contains_key(&request.member_id))
        {
            return answer(UNKNOWN_MEMBER_ID);
        }
        let group = self.groups.entry(group_id.to_owned()).or_insert_with(Group::new);
        if group.protocol_type.as_ref().is_some_and(|kind| *kind != request.protocol_type) && !group.members.is_empty()
        {
            return answer(INCONSISTENT_GROUP_PROTOCOL);
        }
        if !group.members.is_empty()
            && !group.members.values().all(|member| shares_protocol(member, &request.protocols))
        {
            return answer(INCONSISTENT_GROUP_PROTOCOL);
        }
        let member_id = if request.member_id.is_empty() {
            if group.members.len() >= self.limits.members_per_group_max {
                return answer(GROUP_MAX_SIZE_REACHED);
            }
            self.next_member += 1;
            format!("{}-{}", if request.client_id.is_empty() { "member" } else { &request.client_id }, self.next_member)
        } else {
            request.member_id.clone()
        };
        let changed = match group.members.get(&member_id) {
            None => true,
            Some(member) => member.protocols != request.protocols,
        };
        let member = group.members.entry(member_id.clone()).or_insert_with(|| Member {
            session_timeout_ms: request.session_timeout_ms,
            rebalance_timeout_ms: request.rebalance_timeout_ms,
            protocols: Vec::new(),
            last_seen_ms: now_ms,
            rejoined: false,
            assignment: Vec::new(),
        });
        member.protocols = request.protocols.clone();
        member.session_timeout_ms = request.session_timeout_ms;
        member.rebalance_timeout_ms = request.rebalance_timeout_ms.max(request.session_timeout_ms);
        member.last_seen_ms = now_ms;
        member.rejoined = true;
        group.protocol_type = Some(request.protocol_type.clone());
        match group.state {
            GroupState::Stable if !changed && group.leader.as_deref() != Some(&member_id) => {
                // A follower rejoining with nothing changed: it gets the current
                // generation back at once (Kafka does the same).
                return Outcome::Now(join_answer(group, &member_id));
            }
            GroupState::PreparingRebalance => {}
            _ => start_rebalance(group_id, group, now_ms, &mut self.ready),
        }
        // After `start_rebalance`, which asks every member (this one too) to rejoin.
        group.members.get_mut(&member_id).expect("just joined").rejoined = true;
        if !group.pending_joins.contains(&member_id) {
            group.pending_joins.push(member_id.clone());
        }
        self.try_complete_join(group_id, now_ms);
        self.check_invariants();
        Outcome::Pending { member_id }
    }

    pub fn handle_sync(
        &mut self,
        now_ms: u64,
        group_id: &str,
        member_id: &str,
        generation: i32,
        assignments: Vec<(String, Vec<u8>)>,
    ) -> Outcome<SyncAnswer> {
        let Some(group) = self.groups.get_mut(group_id) else {
            return Outcome::Now(SyncAnswer::error(UNKNOWN_MEMBER_ID));
        };
        let Some(member) = group.members.get_mut(member_id) else {
            return Outcome::Now(SyncAnswer::error(UNKNOWN_MEMBER_ID));
        };
        member.last_seen_ms = now_ms;
        if generation != group.generation {
            return Outcome::Now(SyncAnswer::error(ILLEGAL_GENERATION));
        }
        match group.state {
            GroupState::Empty | GroupState::PreparingRebalance => {
                Outcome::Now(SyncAnswer::error(REBALANCE_IN_PROGRESS))
            }
            GroupState::Stable => Outcome::Now(sync_answer(group, member_id)),
            GroupState::CompletingRebalance => {
                if !group.pending_syncs.iter().any(|pending| pending == member_id) {
                    group.pending_syncs.push(member_id.to_owned());
                }
                if group.leader.as_deref() == Some(member_id) {
                    for (assigned, assignment) in assignments {
                        if let Some(member) = group.members.get_mut(&assigned) {
                            member.assignment = assignment;
                        }
                    }
                    group.state = GroupState::Stable;
                    for waiting in std::mem::take(&mut group.pending_syncs) {
                        let answer = sync_answer(group, &waiting);
                        self.ready.push_back(Deferred::Sync { group: group_id.to_owned(), member_id: waiting, answer });
                    }
                }
                self.check_invariants();
                Outcome::Pending { member_id: member_id.to_owned() }
            }
        }
    }

    pub fn handle_heartbeat(&mut self, now_ms: u64, group_id: &str, member_id: &str, generation: i32) -> i16 {
        let Some(group) = self.groups.get_mut(group_id) else { return UNKNOWN_MEMBER_ID };
        let Some(member) = group.members.get_mut(member_id) else { return UNKNOWN_MEMBER_ID };
        member.last_seen_ms = now_ms;
        match group.state {
            GroupState::PreparingRebalance => REBALANCE_IN_PROGRESS,
            _ if generation != group.generation => ILLEGAL_GENERATION,
            _ => error_code::NONE,
        }
    }

    /// Members leave; each gets its own code.
    pub fn handle_leave(&mut self, now_ms: u64, group_id: &str, member_ids: &[String]) -> Vec<i16> {
        let Some(group) = self.groups.get_mut(group_id) else { return vec![UNKNOWN_MEMBER_ID; member_ids.len()] };
        let mut codes = Vec::new();
        let mut left = false;
        for member_id in member_ids {
            if remove_member(group_id, group, member_id, &mut self.ready) {
                left = true;
                codes.push(error_code::NONE);
            } else {
                codes.push(UNKNOWN_MEMBER_ID);
            }
        }
        if left {
            self.after_departure(group_id, now_ms);
        }
        self.forget_empty();
        codes
    }

    /// Checks an offset commit: `Ok` when it may be stored. A commit with generation
    /// -1 and no member is a standalone consumer's (`assign()`), accepted while the
    /// group has no members.
    pub fn check_commit(&self, group_id: &str, member_id: &str, generation: i32) -> Result<(), i16> {
        let group = self.groups.get(group_id);
        let members = group.map_or(0, |group| group.members.len());
        if generation < 0 && member_id.is_empty() {
            return if members == 0 { Ok(()) } else { Err(UNKNOWN_MEMBER_ID) };
        }
        let Some(group) = group else { return Err(UNKNOWN_MEMBER_ID) };
        if !group.members.contains_key(member_id) {
            return Err(UNKNOWN_MEMBER_ID);
        }
        if generation != group.generation {
            return Err(ILLEGAL_GENERATION);
        }
        // While the group prepares a rebalance a member of the current generation
        // still owns its partitions and commits them before rejoining (Kafka allows it
        // too); between join and sync nobody owns anything yet.
        if group.state == GroupState::CompletingRebalance {
            return Err(REBALANCE_IN_PROGRESS);
        }
        Ok(())
    }

    /// Time passes: members silent past their session timeout are removed, and a
    /// rebalance past its deadline completes without the members that did not rejoin.
    pub fn handle_tick(&mut self, now_ms: u64) {
        let ids: Vec<String> = self.groups.keys().cloned().collect();
        for group_id in ids {
            let group = self.groups.get_mut(&group_id).expect("listed");
            let expired: Vec<String> = group
                .members
                .iter()
                .filter(|(id, member)| {
                    // A member waiting for its join or sync answer cannot heartbeat meanwhile.
                    !group.pending_joins.contains(id)
                        && !group.pending_syncs.contains(id)
                        && now_ms.saturating_sub(member.last_seen_ms) > member.session_timeout_ms as u64
                })
                .map(|(id, _)| id.clone())
                .collect();
            if !expired.is_empty() {
                self.handle_leave(now_ms, &group_id, &expired);
            }
            let Some(group) = self.groups.get_mut(&group_id) else { continue }; // forgotten: empty
            if group.state == GroupState::PreparingRebalance && now_ms >= group.rebalance_deadline_ms {
                let absent: Vec<String> =
                    group.members.iter().filter(|(_, member)| !member.rejoined).map(|(id, _)| id.clone()).collect();
                for member_id in &absent {
                    remove_member(&group_id, group, member_id, &mut self.ready);
                }
                if group.members.is_empty() {
                    to_empty(group);
                } else {
                    self.try_complete_join(&group_id, now_ms);
                }
            }
        }
        self.forget_empty();
        self.check_invariants();
    }

    /// Forgets groups without members (their committed offsets are kept by the
    /// caller), so `groups_max` counts live groups.
    fn forget_empty(&mut self) {
        self.groups.retain(|_, group| group.state != GroupState::Empty || !group.members.is_empty());
    }

    /// The next deferred answer that is ready.
    pub fn poll_answer(&mut self) -> Option<Deferred> {
        self.ready.pop_front()
    }

    /// Whether `group_id` may be used (joined, or its offsets committed): a group
    /// already live or holding stored offsets always may; a new one only while live
    /// and stored groups together are fewer than `groups_max`. This bounds the
    /// committed-offsets file and the per-group metric series, whose group names the
    /// clients choose.
    pub fn admits_group(&self, group_id: &str, stored: &BTreeSet<String>) -> bool {
        if self.groups.contains_key(group_id) || stored.contains(group_id) {
            return true;
        }
        let known = stored.len() + self.groups.keys().filter(|live| !stored.contains(*live)).count();
        known < self.limits.groups_max
    }

    pub fn groups(&self) -> Vec<GroupView> {
        self.groups
            .iter()
            .map(|(group, state)| GroupView {
                group: group.clone(),
                state: state.state,
                generation: state.generation,
                members: state.members.len(),
            })
            .collect()
    }

    fn after_departure(&mut self, group_id: &str, now_ms: u64) {
        let group = self.groups.get_mut(group_id).expect("the group exists");
        if group.members.is_empty() {
            to_empty(group);
        } else if group.state != GroupState::PreparingRebalance {
            start_rebalance(group_id, group, now_ms, &mut self.ready);
        } else {
            self.try_complete_join(group_id, now_ms);
        }
        self.check_invariants();
    }

    /// Completes the join phase once every member rejoined.
    fn try_complete_join(&mut self, group_id: &str, now_ms: u64) {
        let group = self.groups.get_mut(group_id).expect("the group exists");
        if group.state != GroupState::PreparingRebalance || group.members.values().any(|member| !member.rejoined) {
            return;
        }
        // Every member's session restarts with the new generation (Kafka does the
        // same): a member that waited long for its join is not expired for it.
        for member in group.members.values_mut() {
            member.last_seen_ms = now_ms;
        }
        group.generation += 1;
        group.state = GroupState::CompletingRebalance;
        group.protocol = choose_protocol(group);
        if group.leader.as_ref().is_none_or(|leader| !group.members.contains_key(leader)) {
            group.leader = group.pending_joins.first().cloned().or_else(|| group.members.keys().next().cloned());
        }
        for member in group.members.values_mut() {
            member.assignment.clear();
        }
        for member_id in std::mem::take(&mut group.pending_joins) {
            let answer = join_answer(group, &member_id);
            self.ready.push_back(Deferred::Join { group: group_id.to_owned(), member_id, answer });
        }
    }

    pub fn check_invariants(&self) {
        assert!(self.groups.len() <= self.limits.groups_max);
        for (id, group) in &self.groups {
            assert!(group.members.len() <= self.limits.members_per_group_max, "{id}: too many members");
            if matches!(group.state, GroupState::Stable | GroupState::CompletingRebalance) {
                let leader = group.leader.as_ref().expect("a leader once joined");
                assert!(group.members.contains_key(leader), "{id}: the leader is a member");
            }
            if group.state == GroupState::Empty {
                assert!(group.members.is_empty(), "{id}: an empty group has no members");
            }
            for pending in group.pending_joins.iter().chain(&group.pending_syncs) {
                assert!(group.members.contains_key(pending), "{id}: {pending} waits but is no member");
            }
        }
    }
}

fn shares_protocol(member: &Member, protocols: &[(String, Vec<u8>)]) -> bool {
    member.protocols.iter().any(|(name, _)| protocols.iter().any(|(other, _)| other == name))
}

/// Starts a rebalance: every member must rejoin. Syncs still waiting for the
/// previous generation's assignment are answered REBALANCE_IN_PROGRESS.
fn start_rebalance(group_id: &str, group: &mut Group, now_ms: u64, ready: &mut VecDeque<Deferred>) {
    group.state = GroupState::PreparingRebalance;
    let timeout = group.members.values().map(|member| member.rebalance_timeout_ms.max(0) as u64).max().unwrap_or(0);
    group.rebalance_deadline_ms = now_ms + timeout;
    for member in group.members.values_mut() {
        member.rejoined = false;
    }
    for member_id in std::mem::take(&mut group.pending_syncs) {
        let answer = SyncAnswer::error(REBALANCE_IN_PROGRESS);
        ready.push_back(Deferred::Sync { group: group_id.to_owned(), member_id, answer });
    }
}

/// Removes a member; its waiting join or sync is answered UNKNOWN_MEMBER_ID.
fn remove_member(group_id: &str, group: &mut Group, member_id: &str, ready: &mut VecDeque<Deferred>) -> bool {
    if group.members.remove(member_id).is_none() {
        return false;
    }
    if group.pending_joins.iter().any(|pending| pending == member_id) {
        group.pending_joins.retain(|pending| pending != member_id);
        let answer = JoinAnswer::error(UNKNOWN_MEMBER_ID, member_id);
        ready.push_back(Deferred::Join { group: group_id.to_owned(), member_id: member_id.to_owned(), answer });
    }
    if group.pending_syncs.iter().any(|pending| pending == member_id) {
        group.pending_syncs.retain(|pending| pending != member_id);
        let answer = SyncAnswer::error(UNKNOWN_MEMBER_ID);
        ready.push_back(Deferred::Sync { group: group_id.to_owned(), member_id: member_id.to_owned(), answer });
    }
    true
}

fn to_empty(group: &mut Group) {
    group.state = GroupState::Empty;
    group.leader = None;
    group.protocol = None;
    group.pending_joins.clear();
    group.pending_syncs.clear();
}

/// The first protocol of the leader-to-be (any member's order would do; Kafka votes)
/// that every member supports.
fn choose_protocol(group: &Group) -> Option<String> {
    let first = group.members.values().next()?;
    first
        .protocols
        .iter()
        .map(|(name, _)| name)
        .find(|name| group.members.values().all(|member| member.protocols.iter().any(|(other, _)| other == *name)))
        .cloned()
}

fn join_answer(group: &Group, member_id: &str) -> JoinAnswer {
    let leader = group.leader.clone().unwrap_or_default();
    let members = if leader == member_id {
        let protocol = group.protocol.clone().unwrap_or_default();
        group
            .members
            .iter()
            .map(|(id, member)| {
                let metadata = member
                    .protocols
                    .iter()
                    .find(|(name, _)| *name == protocol)
                    .map(|(_, metadata)| metadata.clone())
                    .unwrap_or_default();
                (id.clone(), metadata)
            })
            .collect()
    } else {
        Vec::new()
    };
    JoinAnswer {
        error_code: error_code::NONE,
        generation: group.generation,
        protocol_type: group.protocol_type.clone(),
        protocol: group.protocol.clone(),
        leader,
        member_id: member_id.to_owned(),
        members,
    }
}

fn sync_answer(group: &Group, member_id: &str) -> SyncAnswer {
    SyncAnswer {
        error_code: error_code::NONE,
        protocol_type: group.protocol_type.clone(),
        protocol: group.protocol.clone(),
        assignment: group.members.get(member_id).map(|member| member.assignment.clone()).unwrap_or_default(),
    }
}

/// A group's lag on one partition: the records still stored from its committed offset
/// to the durable end. A committed offset behind the log start (retention deleted
/// what it had not read) counts from the start, one past the end counts none: lag is
/// what the group can still read, never negative.
pub fn lag_records(committed_offset: i64, log_start_offset: i64, log_end_offset: i64) -> i64 {
    (log_end_offset - committed_offset.max(log_start_offset)).max(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> GroupLimits {
        GroupLimits {
            groups_max: 4,
            members_per_group_max: 4,
            session_timeout_ms_min: 1000,
            session_timeout_ms_max: 60_000,
        }
    }

    fn join(member_id: &str) -> JoinRequest {
        JoinRequest {
            member_id: member_id.to_owned(),
            client_id: "c".to_owned(),
            protocol_type: "consumer".to_owned(),
            protocols: vec![("range".to_owned(), vec![1])],
            session_timeout_ms: 10_000,
            rebalance_timeout_ms: 30_000,
        }
    }

    fn pending(outcome: Outcome<JoinAnswer>) -> String {
        match outcome {
            Outcome::Pending { member_id } => member_id,
            other => panic!("{other:?}"),
        }
    }

    fn joined(coordinator: &mut Coordinator) -> Vec<JoinAnswer> {
        let mut answers = Vec::new();
        while let Some(Deferred::Join { answer, .. }) = coordinator.poll_answer() {
            answers.push(answer);
        }
        answers
    }

    #[test]
    fn one_member_joins_leads_and_syncs_its_own_assignment() {
        let mut coordinator = Coordinator::new(limits());
        let member = pending(coordinator.handle_join(0, "g", join("")));
        let answers = joined(&mut coordinator);
        assert_eq!(answers.len(), 1);
        assert_eq!((answers[0].generation, answers[0].leader.as_str()), (1, member.as_str()));
        assert_eq!(answers[0].members, vec![(member.clone(), vec![1])]);
        let sync = coordinator.handle_sync(1, "g", &member, 1, vec![(member.clone(), vec![9])]);
        assert_eq!(sync, Outcome::Pending { member_id: member.clone() });
        match coordinator.poll_answer() {
            Some(Deferred::Sync { answer, .. }) => assert_eq!(answer.assignment, vec![9]),
            other => panic!("{other:?}"),
        }
        assert_eq!(coordinator.handle_heartbeat(2, "g", &member, 1), 0);
        assert_eq!(coordinator.check_commit("g", &member, 1), Ok(()));
    }

    #[test]
    fn a_second_member_rebalances_and_the_first_must_rejoin_before_either_is_answered() {
        let mut coordinator = Coordinator::new(limits());
        let first = pending(coordinator.handle_join(0, "g", join("")));
        joined(&mut coordinator);
        coordinator.handle_sync(1, "g", &first, 1, vec![(first.clone(), vec![])]);
        coordinator.poll_answer();
        let second = pending(coordinator.handle_join(2, "g", join("")));
        assert!(joined(&mut coordinator).is_empty(), "waits for the first member to rejoin");
        assert_eq!(coordinator.handle_heartbeat(3, "g", &first, 1), REBALANCE_IN_PROGRESS);
        assert_eq!(coordinator.check_commit("g", &first, 1), Ok(()), "it still owns its partitions");
        pending(coordinator.handle_join(4, "g", join(&first)));
        let answers = joined(&mut coordinator);
        assert_eq!(answers.len(), 2);
        assert!(answers.iter().all(|answer| answer.generation == 2 && answer.leader == first));
        assert_eq!(answers.iter().find(|answer| answer.member_id == second).unwrap().members.len(), 0);
        // The old generation's commit is refused once the new one exists, and nobody
        // commits before the new assignment is synced.
        assert_eq!(coordinator.check_commit("g", &first, 1), Err(ILLEGAL_GENERATION));
        assert_eq!(coordinator.check_commit("g", &first, 2), Err(REBALANCE_IN_PROGRESS));
    }

    #[test]
    fn a_leaving_member_rebalances_the_rest_and_a_silent_one_expires() {
        let mut coordinator = Coordinator::new(limits());
        let first = pending(coordinator.handle_join(0, "g", join("")));
        assert_eq!(joined(&mut coordinator)[0].generation, 1, "alone, the first member is answered at once");
        let second = pending(coordinator.handle_join(0, "g", join("")));
        pending(coordinator.handle_join(0, "g", join(&first)));
        let answers = joined(&mut coordinator);
        assert_eq!(answers.len(), 2, "{answers:?}");
        assert_eq!(coordinator.handle_leave(5, "g", std::slice::from_ref(&second)), vec![0]);
        assert_eq!(coordinator.handle_heartbeat(6, "g", &first, 2), REBALANCE_IN_PROGRESS);
        pending(coordinator.handle_join(7, "g", join(&first)));
        assert_eq!(joined(&mut coordinator)[0].generation, 3);
        // Silent past its session timeout: removed, the group is empty.
        coordinator.handle_tick(7 + 10_001);
        assert!(coordinator.groups().is_empty(), "an empty group is forgotten");
        assert_eq!(coordinator.check_commit("g", "", -1), Ok(()));
    }

    #[test]
    fn a_rebalance_past_its_deadline_drops_members_that_did_not_rejoin() {
        let mut coordinator = Coordinator::new(limits());
        let first = pending(coordinator.handle_join(0, "g", join("")));
        joined(&mut coordinator);
        let _ = coordinator.handle_sync(0, "g", &first, 1, vec![]);
        coordinator.poll_answer();
        let second = pending(coordinator.handle_join(1000, "g", join("")));
        coordinator.handle_tick(1000 + 30_000);
        let answers = joined(&mut coordinator);
        assert_eq!(answers.len(), 1);
        assert_eq!((answers[0].member_id.as_str(), answers[0].leader.as_str()), (second.as_str(), second.as_str()));
        assert_eq!(coordinator.handle_heartbeat(31_001, "g", &first, 1), UNKNOWN_MEMBER_ID);
    }

    #[test]
    fn bad_joins_are_refused() {
        let mut coordinator = Coordinator::new(limits());
        let mut request = join("");
        request.session_timeout_ms = 10;
        assert!(matches!(coordinator.handle_join(0, "g", request), Outcome::Now(JoinAnswer { error_code: 26, .. })));
        assert!(matches!(
            coordinator.handle_join(0, "g", join("ghost")),
            Outcome::Now(JoinAnswer { error_code: 25, .. })
        ));
        assert!(matches!(coordinator.handle_join(0, "", join("")), Outcome::Now(JoinAnswer { error_code: 24, .. })));
        for group in ["a", "b", "c", "d"] {
            pending(coordinator.handle_join(0, group, join("")));
        }
        assert!(matches!(coordinator.handle_join(0, "e", join("")), Outcome::Now(JoinAnswer { error_code: 15, .. })));
    }

    #[test]
    fn lag_counts_the_stored_records_from_the_committed_offset_to_the_end() {
        assert_eq!(lag_records(120, 0, 200), 80);
        assert_eq!(lag_records(200, 0, 200), 0);
        assert_eq!(lag_records(10, 50, 200), 150, "behind retention: from the log start");
        assert_eq!(lag_records(-1, 50, 200), 150);
        assert_eq!(lag_records(250, 0, 200), 0, "past the end: none");
    }

    #[test]
    fn stored_offsets_count_toward_groups_max() {
        let mut coordinator = Coordinator::new(limits());
        pending(coordinator.handle_join(0, "live", join("")));
        let stored: BTreeSet<String> = ["live", "old-1", "old-2"].map(str::to_owned).into();
        assert!(coordinator.admits_group("live", &stored) && coordinator.admits_group("old-1", &stored));
        assert!(coordinator.admits_group("new", &stored), "3 known of 4");
        let stored: BTreeSet<String> = ["old-1", "old-2", "old-3"].map(str::to_owned).into();
        assert!(!coordinator.admits_group("new", &stored), "live + 3 stored = groups_max");
        assert!(coordinator.admits_group("old-3", &stored));
    }
}
