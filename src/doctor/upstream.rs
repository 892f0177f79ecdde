//! The doctor's upstream checks (with `[upstream] enabled = true`): each bootstrap
//! server accepts a TCP connection within `upstream.connect_timeout_ms`, answers
//! ApiVersions with versions weir speaks, and the mapped topics exist with at least as
//! many partitions as their edge topics (partition p ships to upstream partition p).
//!
//! The probe talks through weir's own thin Kafka client (`shell::kafka`), the same code
//! the shippers use, on one short-lived glommio executor: what the doctor reaches, the
//! shippers reach. The judging below is pure and takes the probe's facts.
//!
//! None of these is a `weir serve` preflight check: a cluster out of reach is what weir
//! is built to ride out (it keeps every record and ships later).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kafka_protocol::messages::{
    ApiVersionsRequest, FetchRequest, InitProducerIdRequest, ListOffsetsRequest, MetadataRequest, ProduceRequest,
};

use crate::config::ValidConfig;
use crate::doctor::{verdict, Check, Status};
use crate::shell::kafka::{self, ClientOptions, Connection, KafkaError, TopicMetadata};

/// The names of the checks, in report order.
pub const NAMES: [&str; 3] = ["upstream.reachable", "upstream.api_versions", "upstream.topics"];
/// The longest the doctor waits for one connection or one answer, whatever the config
/// says, so a run stays bounded.
pub const PROBE_TIMEOUT_MAX: Duration = Duration::from_secs(10);
/// Kafka's UNKNOWN_TOPIC_OR_PARTITION.
const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;

/// What one bootstrap server did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerOutcome {
    /// No TCP connection within the connect timeout.
    Unreachable { error: String, waited_ms: u64 },
    /// Connected, but ApiVersions was not answered usefully.
    NoApiVersions { error: String },
    /// ApiVersions answered: per API weir uses, the version it will speak or why none.
    Answered { connect_ms: u64, versions: Vec<(&'static str, Result<i16, String>)> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFacts {
    pub address: String,
    pub outcome: ServerOutcome,
}

/// An upstream topic and the edge topics that ship to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicExpectation {
    pub upstream: String,
    /// (edge topic, its partition count).
    pub edge_topics: Vec<(String, u32)>,
    /// Some edge topic ships to it `by-key`: the upstream topic needs exactly as many
    /// partitions (more would put keys where Kafka's partitioner does not).
    pub by_key: bool,
}

impl TopicExpectation {
    /// Upstream partitions needed: edge partition p ships to upstream partition p.
    pub fn partitions_needed(&self) -> u32 {
        self.edge_topics.iter().map(|(_, partitions)| *partitions).max().unwrap_or(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamFacts {
    pub servers: Vec<ServerFacts>,
    pub topics: Vec<TopicExpectation>,
    /// The Metadata answer of the first server that answered ApiVersions, and its address.
    pub metadata: Option<(String, Result<Vec<TopicMetadata>, String>)>,
}

/// The mapped upstream topics, from the config.
pub fn expectations(valid: &ValidConfig) -> Vec<TopicExpectation> {
    let mut by_upstream: BTreeMap<String, (Vec<(String, u32)>, bool)> = BTreeMap::new();
    for topic in &valid.config.topics {
        if let Some((upstream, _)) = valid.config.upstream.destination(&topic.name, 0) {
            let entry = by_upstream.entry(upstream).or_default();
            entry.0.push((topic.name.clone(), topic.partitions));
            entry.1 |= valid.config.upstream.partitions_exact(&topic.name, &valid.config.topics).is_some();
        }
    }
    by_upstream
        .into_iter()
        .map(|(upstream, (edge_topics, by_key))| TopicExpectation { upstream, edge_topics, by_key })
        .collect()
}

/// The three upstream checks: skipped when shipping is off or a glommio executor
/// cannot start (weir's Kafka client runs on one): io_uring or memlock failed.
pub fn checks(valid: &ValidConfig, executor_ok: bool) -> Vec<Check> {
    let upstream = &valid.config.upstream;
    if !upstream.enabled {
        return NAMES.iter().map(|name| verdict::skip(name, "upstream.enabled = false: nothing is shipped")).collect();
    }
    if !executor_ok {
        return NAMES
            .iter()
            .map(|name| {
                verdict::skip(
                    name,
                    "weir's Kafka client runs on a glommio executor, which cannot start here (see io_uring, memlock)",
                )
            })
            .collect();
    }
    let options = ClientOptions {
        client_id: upstream.client_id.clone(),
        connect_timeout: Duration::from_millis(upstream.connect_timeout_ms.0).min(PROBE_TIMEOUT_MAX),
        request_timeout: Duration::from_millis(upstream.request_timeout_ms.0).min(PROBE_TIMEOUT_MAX),
        // The probes connect as the shipper does: TLS and SASL as configured.
        security: crate::shell::kafka_secure::Security::load_or_refuse(upstream),
    };
    let topics = expectations(valid);
    match probe(upstream.bootstrap_servers.clone(), topics.clone(), options) {
        Ok(facts) => judge(&facts),
        Err(error) => NAMES
            .iter()
            .map(|name| Check {
                name,
                status: Status::Warn,
                saw: format!("cannot run the probe: {error}"),
                fix: Some("fix the failing checks above (io_uring, memlock) first".into()),
            })
            .collect(),
    }
}

/// Talks to every bootstrap server on a short-lived glommio executor.
pub fn probe(
    servers: Vec<String>,
    topics: Vec<TopicExpectation>,
    options: ClientOptions,
) -> Result<UpstreamFacts, String> {
    let spawned = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .name("weir-doctor-upstream")
        .io_memory(crate::doctor::verdict::GLOMMIO_IO_MEMORY_BYTES_MIN as usize)
        .spawn(move || async move {
            let mut facts = UpstreamFacts { servers: Vec::new(), topics, metadata: None };
            let names: Vec<String> = facts.topics.iter().map(|topic| topic.upstream.clone()).collect();
            for address in servers {
                let started = Instant::now();
                let outcome = match Connection::connect(&address, &options).await {
                    Ok(mut connection) => {
                        let versions = api_versions(&connection);
                        if facts.metadata.is_none() {
                            let metadata = kafka::topics_metadata(&mut connection, &names).await;
                            facts.metadata = Some((address.clone(), metadata.map_err(|error| error.to_string())));
                        }
                        ServerOutcome::Answered { connect_ms: started.elapsed().as_millis() as u64, versions }
                    }
                    Err(KafkaError::Connect { source, .. }) => ServerOutcome::Unreachable {
                        error: source.to_string(),
                        waited_ms: started.elapsed().as_millis() as u64,
                    },
                    Err(error) => ServerOutcome::NoApiVersions { error: error.to_string() },
                };
                facts.servers.push(ServerFacts { address, outcome });
            }
            facts
        });
    match spawned {
        Ok(handle) => handle.join().map_err(|error| format!("the probing executor failed: {error}")),
        Err(error) => Err(format!("cannot start a glommio executor: {error}")),
    }
}

/// The version weir will speak for each API the shippers use.
fn api_versions(connection: &Connection) -> Vec<(&'static str, Result<i16, String>)> {
    let name = |result: Result<i16, KafkaError>| result.map_err(|error| error.to_string());
    vec![
        ("ApiVersions", name(connection.version::<ApiVersionsRequest>(kafka::API_VERSIONS_VERSIONS))),
        ("Metadata", name(connection.version::<MetadataRequest>(kafka::METADATA_VERSIONS))),
        ("InitProducerId", name(connection.version::<InitProducerIdRequest>(kafka::INIT_PRODUCER_ID_VERSIONS))),
        ("Produce", name(connection.version::<ProduceRequest>(kafka::PRODUCE_VERSIONS))),
        ("Fetch", name(connection.version::<FetchRequest>(kafka::FETCH_VERSIONS))),
        ("ListOffsets", name(connection.version::<ListOffsetsRequest>(kafka::LIST_OFFSETS_VERSIONS))),
    ]
}

fn check(name: &'static str, status: Status, saw: String, fix: Option<String>) -> Check {
    Check { name, status, saw, fix }
}

/// Judges the probe's facts: reachable, api_versions, topics.
pub fn judge(facts: &UpstreamFacts) -> Vec<Check> {
    vec![reachable(facts), api_versions_check(facts), topics_check(facts)]
}

fn reachable(facts: &UpstreamFacts) -> Check {
    const NAME: &str = NAMES[0];
    if facts.servers.is_empty() {
        return check(
            NAME,
            Status::Fail,
            "upstream.bootstrap_servers is empty".into(),
            Some("list the cluster's brokers in upstream.bootstrap_servers".into()),
        );
    }
    let mut seen = Vec::new();
    let mut unreachable = Vec::new();
    for server in &facts.servers {
        match &server.outcome {
            ServerOutcome::Unreachable { error, waited_ms } => {
                unreachable.push(server.address.clone());
                seen.push(format!("{}: no TCP connection ({error}, after {waited_ms} ms)", server.address));
            }
            ServerOutcome::NoApiVersions { .. } | ServerOutcome::Answered { .. } => {
                seen.push(format!("{}: connected", server.address));
            }
        }
    }
    let saw = seen.join("; ");
    let fix = format!(
        "check that a broker listens at {} and that this box can reach it (routing, firewall, VPN); meanwhile weir \
         keeps every record and ships once the link is up",
        unreachable.join(", ")
    );
    if unreachable.is_empty() {
        check(NAME, Status::Ok, saw, None)
    } else if unreachable.len() < facts.servers.len() {
        check(NAME, Status::Warn, format!("{saw}: shipping works through the others"), Some(fix))
    } else {
        check(NAME, Status::Fail, format!("{saw}: no bootstrap server is reachable, nothing can ship"), Some(fix))
    }
}

fn api_versions_check(facts: &UpstreamFacts) -> Check {
    const NAME: &str = NAMES[1];
    let mut seen = Vec::new();
    let mut failed = false;
    let mut answered = false;
    for server in &facts.servers {
        match &server.outcome {
            ServerOutcome::Unreachable { .. } => {}
            ServerOutcome::NoApiVersions { error } => {
                failed = true;
                seen.push(format!("{}: ApiVersions not answered: {error}", server.address));
            }
            ServerOutcome::Answered { connect_ms, versions } => {
                answered = true;
                let unsupported: Vec<&String> =
                    versions.iter().filter_map(|(_, result)| result.as_ref().err()).collect();
                if unsupported.is_empty() {
                    let spoken: Vec<String> = versions
                        .iter()
                        .filter_map(|(api, result)| result.as_ref().ok().map(|version| format!("{api} v{version}")))
                        .collect();
                    seen.push(format!(
                        "{}: connected and answered ApiVersions in {connect_ms} ms; weir will speak {}",
                        server.address,
                        spoken.join(", ")
                    ));
                } else {
                    failed = true;
                    seen.push(unsupported.iter().map(|error| error.as_str()).collect::<Vec<_>>().join("; "));
                }
            }
        }
    }
    if !answered && !failed {
        return verdict::skip(NAME, "no bootstrap server is reachable (see upstream.reachable)");
    }
    let saw = seen.join("; ");
    if failed {
        check(
            NAME,
            Status::Fail,
            saw,
            Some(
                "point upstream.bootstrap_servers at Kafka brokers (plain-text listener: TLS and SASL are not \
                 supported yet); weir needs Kafka 0.11+ (Produce v3+, InitProducerId v3+ means Kafka 2.4+)"
                    .into(),
            ),
        )
    } else {
        check(NAME, Status::Ok, saw, None)
    }
}

fn topics_check(facts: &UpstreamFacts) -> Check {
    const NAME: &str = NAMES[2];
    let Some((address, metadata)) = &facts.metadata else {
        return verdict::skip(NAME, "no bootstrap server answered (see upstream.reachable, upstream.api_versions)");
    };
    let metadata = match metadata {
        Ok(metadata) => metadata,
        Err(error) => {
            return check(
                NAME,
                Status::Fail,
                format!("{address}: Metadata failed: {error}"),
                Some("check the broker's logs and that the client id may describe topics (ACLs)".into()),
            )
        }
    };
    let mut good = Vec::new();
    let mut failures = Vec::new();
    let mut warnings = Vec::new();
    let mut fixes = Vec::new();
    let bootstrap = address.as_str();
    for (expectation, found) in facts.topics.iter().zip(metadata) {
        let topic = &expectation.upstream;
        let needed = expectation.partitions_needed();
        let edges = expectation
            .edge_topics
            .iter()
            .map(|(edge, partitions)| format!("edge {edge} has {partitions}"))
            .collect::<Vec<_>>()
            .join(", ");
        match found.error_code {
            None | Some(UNKNOWN_TOPIC_OR_PARTITION) => {
                failures.push(format!("topic {topic} does not exist ({edges} partitions)"));
                fixes.push(format!(
                    "kafka-topics.sh --bootstrap-server {bootstrap} --create --topic {topic} --partitions {needed}"
                ));
            }
            Some(0) if found.partitions < needed as usize => {
                failures.push(format!(
                    "topic {topic} has {} partitions, fewer than the {needed} it needs ({edges}; edge partition p \
                     ships to upstream partition p)",
                    found.partitions
                ));
                fixes.push(format!(
                    "kafka-topics.sh --bootstrap-server {bootstrap} --alter --topic {topic} --partitions {needed}"
                ));
            }
            Some(0) if found.partitions > needed as usize && expectation.by_key => {
                failures.push(format!(
                    "topic {topic} has {} partitions; partitioning = \"by-key\" needs exactly {needed} ({edges}): \
                     weir would not ship it",
                    found.partitions
                ));
                fixes.push(format!(
                    "give the edge topic as many partitions as {topic} ({} in [[topics]]; this moves keys to new \
                     edge partitions), or ship to a topic with {needed} partitions",
                    found.partitions
                ));
            }
            Some(0) if found.partitions > needed as usize => {
                warnings.push(format!(
                    "topic {topic} has {} partitions, more than the {needed} shipped to it ({edges}): upstream \
                     partitions {needed}..{} get nothing from this box",
                    found.partitions,
                    found.partitions - 1
                ));
                fixes.push(format!(
                    "give the edge topic as many partitions as {topic} ({} in [[topics]]), or accept the idle \
                     upstream partitions",
                    found.partitions
                ));
            }
            Some(0) => good.push(format!("{topic}: {} partitions ({edges})", found.partitions)),
            Some(code) => {
                failures.push(format!(
                    "topic {topic}: Metadata answered {} ({code})",
                    crate::core::ship::errors::error_name(code)
                ));
                fixes.push(format!("check topic {topic} on the cluster (ACLs for the client id, its leaders)"));
            }
        }
    }
    let mut saw = format!("{address}: ");
    let parts: Vec<String> = failures.iter().chain(&warnings).chain(&good).cloned().collect();
    saw.push_str(&parts.join("; "));
    if facts.topics.is_empty() {
        return check(
            NAME,
            Status::Warn,
            "no edge topic maps to an upstream topic: nothing is shipped".into(),
            Some("map edge topics in [[upstream.topics]] (or leave it empty to ship every topic by name)".into()),
        );
    }
    if !failures.is_empty() {
        check(NAME, Status::Fail, saw, Some(fixes.join("; ")))
    } else if !warnings.is_empty() {
        check(NAME, Status::Warn, saw, Some(fixes.join("; ")))
    } else {
        check(NAME, Status::Ok, saw, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(servers: Vec<ServerOutcome>, found: Vec<(Option<i16>, usize)>) -> UpstreamFacts {
        let topics = vec![
            TopicExpectation { upstream: "central".into(), edge_topics: vec![("telemetry".into(), 4)], by_key: false },
            TopicExpectation { upstream: "audit".into(), edge_topics: vec![("audit".into(), 1)], by_key: false },
        ];
        let metadata = found
            .into_iter()
            .zip(&topics)
            .map(|((error_code, partitions), topic)| TopicMetadata {
                topic: topic.upstream.clone(),
                error_code,
                partitions,
            })
            .collect();
        UpstreamFacts {
            servers: servers
                .into_iter()
                .enumerate()
                .map(|(index, outcome)| ServerFacts { address: format!("10.0.0.{index}:9092"), outcome })
                .collect(),
            topics,
            metadata: Some(("10.0.0.0:9092".into(), Ok(metadata))),
        }
    }

    fn answered() -> ServerOutcome {
        ServerOutcome::Answered { connect_ms: 3, versions: vec![("Produce", Ok(9))] }
    }

    #[test]
    fn one_unreachable_server_of_two_warns_and_all_unreachable_fails() {
        let down = ServerOutcome::Unreachable { error: "Connection refused".into(), waited_ms: 0 };
        let checks = judge(&facts(vec![answered(), down.clone()], vec![(Some(0), 4), (Some(0), 1)]));
        assert_eq!(checks[0].status, Status::Warn, "{}", checks[0].saw);
        assert_eq!(checks[2].status, Status::Ok, "{}", checks[2].saw);
        let mut all_down = facts(vec![down], vec![]);
        all_down.metadata = None;
        let checks = judge(&all_down);
        assert_eq!(checks[0].status, Status::Fail);
        assert_eq!(checks[1].status, Status::Skip);
        assert_eq!(checks[2].status, Status::Skip);
    }

    #[test]
    fn missing_and_short_topics_fail_with_the_command_and_wide_ones_warn() {
        let checks = judge(&facts(vec![answered()], vec![(Some(3), 0), (Some(0), 1)]));
        assert_eq!(checks[2].status, Status::Fail);
        assert!(checks[2].fix.as_ref().unwrap().contains("--create --topic central --partitions 4"));
        let checks = judge(&facts(vec![answered()], vec![(Some(0), 2), (Some(0), 1)]));
        assert!(checks[2].saw.contains("topic central has 2 partitions, fewer than the 4"), "{}", checks[2].saw);
        assert!(checks[2].fix.as_ref().unwrap().contains("--alter --topic central --partitions 4"));
        let checks = judge(&facts(vec![answered()], vec![(Some(0), 6), (Some(0), 1)]));
        assert_eq!(checks[2].status, Status::Warn);
        assert!(checks[2].saw.contains("upstream partitions 4..5 get nothing"), "{}", checks[2].saw);
        // Shipped by key, a wider upstream topic fails: weir would not ship to it.
        let mut wide_by_key = facts(vec![answered()], vec![(Some(0), 6), (Some(0), 1)]);
        wide_by_key.topics[0].by_key = true;
        let checks = judge(&wide_by_key);
        assert_eq!(checks[2].status, Status::Fail);
        assert!(checks[2].saw.contains("\"by-key\" needs exactly 4"), "{}", checks[2].saw);
    }
}
