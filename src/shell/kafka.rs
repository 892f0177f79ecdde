//! weir's thin Kafka client: just what the shipper needs, over glommio TCP on the
//! partition's own core. Message codecs come from the `kafka-protocol` crate; framing,
//! version negotiation, metadata, leader lookup and the few calls below are here.
//!
//! One `Connection` per shipper, to its partition's leader. Requests may be pipelined
//! (`send` then `read_frame`); Kafka answers in request order on a connection, and the
//! correlation id of every answer is checked against what was sent. `read_frame` is
//! cancel-safe (bytes are kept in the connection's buffer between calls), so the
//! shipper can wait for an answer or a timer, whichever comes first. A write that fails
//! or times out leaves a half-written frame: the caller drops the connection.
//!
//! Versions: ApiVersions is asked first and every call uses the highest version both
//! sides support within weir's own range (below the versions that address topics by
//! id only). InitProducerId is v3+ with `transactional_id: None` (the crate's default
//! is `Some("")`, which Kafka refuses).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures_lite::future;
use glommio::net::TcpStream;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, BrokerId, FetchRequest, InitProducerIdRequest, ListOffsetsRequest,
    MetadataRequest, ProduceRequest, ProduceResponse, RequestHeader, ResponseHeader, SaslAuthenticateRequest,
    SaslHandshakeRequest, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes, VersionRange};

use crate::core::sasl::{self, Mechanism, ScramClient, SCRAM_NONCE_BYTES};
use crate::core::ship::errors::{error_name, NONE};
use crate::core::ship::{ProduceAnswer, ProducerIdentity};
pub use crate::shell::kafka_error::KafkaError;
use crate::shell::kafka_error::Refusal;
use crate::shell::kafka_secure::{self, SaslCredentials, Security, Transport};

/// The largest response frame accepted (a Fetch answer is bounded by the request's
/// `max_bytes`, far below this).
pub const RESPONSE_BYTES_MAX: usize = 64 << 20;
/// Bytes read from the socket at once.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Requests outstanding on one connection (Produce pipeline, plus slack).
pub const PIPELINE_MAX: usize = 8;

/// The versions weir speaks, per API (before topic-id-only versions).
pub const API_VERSIONS_VERSIONS: VersionRange = VersionRange { min: 0, max: 3 };
pub const METADATA_VERSIONS: VersionRange = VersionRange { min: 1, max: 12 };
pub const INIT_PRODUCER_ID_VERSIONS: VersionRange = VersionRange { min: 3, max: 4 };
pub const PRODUCE_VERSIONS: VersionRange = VersionRange { min: 3, max: 12 };
/// Fetch stops at v11 (the last non-flexible version): tansu 0.6.0's SQLite engine
/// answers v12 with a tagged field (tag 0) that v12 does not define, which a strict
/// decoder refuses. weir needs nothing from v12 (high watermark and records only).
pub const FETCH_VERSIONS: VersionRange = VersionRange { min: 4, max: 11 };
pub const LIST_OFFSETS_VERSIONS: VersionRange = VersionRange { min: 1, max: 7 };
pub const SASL_HANDSHAKE_VERSIONS: VersionRange = VersionRange { min: 1, max: 1 };
pub const SASL_AUTHENTICATE_VERSIONS: VersionRange = VersionRange { min: 0, max: 2 };
/// Kafka's error codes for the SASL exchange.
const UNSUPPORTED_SASL_MECHANISM: i16 = 33;

/// How to reach and talk to the brokers.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub client_id: String,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    /// TLS and SASL (`Security::none()`: plain TCP, no authentication).
    pub security: Security,
}

/// One TCP connection to one broker.
pub struct Connection {
    address: String,
    stream: Transport,
    client_id: StrBytes,
    request_timeout: Duration,
    next_correlation: i32,
    /// Broker's version range per API key.
    versions: HashMap<i16, (i16, i16)>,
    read_buffer: BytesMut,
    read_chunk: Box<[u8]>,
    /// Correlation ids sent and not yet answered, in order.
    outstanding: VecDeque<i32>,
}

fn api_name(key: i16) -> &'static str {
    match ApiKey::try_from(key) {
        Ok(ApiKey::Produce) => "Produce",
        Ok(ApiKey::Fetch) => "Fetch",
        Ok(ApiKey::ListOffsets) => "ListOffsets",
        Ok(ApiKey::Metadata) => "Metadata",
        Ok(ApiKey::ApiVersions) => "ApiVersions",
        Ok(ApiKey::InitProducerId) => "InitProducerId",
        Ok(ApiKey::SaslHandshake) => "SaslHandshake",
        Ok(ApiKey::SaslAuthenticate) => "SaslAuthenticate",
        _ => "(other API)",
    }
}

impl Connection {
    /// Connects, runs the TLS handshake (if configured), negotiates API versions and
    /// authenticates (if configured). A TLS or SASL refusal is `KafkaError::Refused`.
    pub async fn connect(address: &str, options: &ClientOptions) -> Result<Connection, KafkaError> {
        Connection::open(address, options)
            .await
            .map_err(|error| kafka_secure::refine_opening(address, &options.security, error))
    }

    async fn open(address: &str, options: &ClientOptions) -> Result<Connection, KafkaError> {
        let connect = TcpStream::connect_timeout(address, options.connect_timeout);
        let stream = connect.await.map_err(|error| KafkaError::Connect {
            address: address.to_owned(),
            source: std::io::Error::other(error.to_string()),
        })?;
        stream.set_nodelay(true).map_err(|error| KafkaError::Io {
            address: address.to_owned(),
            operation: "set TCP_NODELAY",
            source: error.into(),
        })?;
        let timeout = options.connect_timeout;
        let opened = future::or(async { Some(Transport::open(stream, address, &options.security).await) }, async {
            glommio::timer::sleep(timeout).await;
            None
        })
        .await;
        let stream = match opened {
            Some(stream) => stream?,
            None => {
                return Err(KafkaError::Timeout { address: address.to_owned(), operation: "TLS handshake", timeout })
            }
        };
        let mut connection = Connection {
            address: address.to_owned(),
            stream,
            client_id: StrBytes::from_string(options.client_id.clone()),
            request_timeout: options.request_timeout,
            next_correlation: 1,
            versions: HashMap::new(),
            read_buffer: BytesMut::with_capacity(READ_CHUNK_BYTES),
            read_chunk: vec![0u8; READ_CHUNK_BYTES].into_boxed_slice(),
            outstanding: VecDeque::new(),
        };
        let request = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("weir"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        // A broker that does not speak our ApiVersions version answers UNSUPPORTED_VERSION
        // in a v0 answer (listing what it speaks); ask again in v0 then.
        let frame = connection.call_frame(&request, API_VERSIONS_VERSIONS.max).await?;
        let response = match connection.decode::<ApiVersionsRequest>(frame.clone(), API_VERSIONS_VERSIONS.max) {
            Ok(response) if response.error_code != 35 => response,
            _ => {
                let v0: ApiVersionsResponse = connection.decode::<ApiVersionsRequest>(frame, 0)?;
                if v0.error_code != 35 {
                    return Err(connection.broker_error("ApiVersions", v0.error_code));
                }
                connection.call(&ApiVersionsRequest::default(), 0).await?
            }
        };
        if response.error_code != NONE {
            return Err(connection.broker_error("ApiVersions", response.error_code));
        }
        for api in response.api_keys {
            connection.versions.insert(api.api_key, (api.min_version, api.max_version));
        }
        if let Some(credentials) = &options.security.sasl {
            authenticate(&mut connection, credentials).await?;
        }
        Ok(connection)
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    /// Requests sent and not yet answered.
    pub fn outstanding(&self) -> usize {
        self.outstanding.len()
    }

    fn broker_error(&self, api: &'static str, code: i16) -> KafkaError {
        KafkaError::Broker { address: self.address.clone(), api, code, name: error_name(code) }
    }

    /// The highest version of `R` within `ours` that the broker speaks too.
    pub fn version<R: Request>(&self, ours: VersionRange) -> Result<i16, KafkaError> {
        let ours_min = ours.min.max(R::VERSIONS.min);
        let ours_max = ours.max.min(R::VERSIONS.max);
        let (broker_min, broker_max) = self.versions.get(&R::KEY).copied().unwrap_or((-1, -1));
        let version = ours_max.min(broker_max);
        if broker_max < 0 || version < ours_min.max(broker_min) {
            return Err(KafkaError::Unsupported {
                address: self.address.clone(),
                api: api_name(R::KEY),
                broker_min,
                broker_max,
                ours_min,
                ours_max,
            });
        }
        Ok(version)
    }

    fn codec_error(&self, key: i16, version: i16, reason: impl std::fmt::Display) -> KafkaError {
        KafkaError::Codec { address: self.address.clone(), api: api_name(key), version, reason: reason.to_string() }
    }

    /// Writes one request frame; returns its correlation id.
    pub async fn send<R: Request>(&mut self, request: &R, version: i16) -> Result<i32, KafkaError> {
        assert!(self.outstanding.len() < PIPELINE_MAX, "pipeline bound");
        let correlation = self.next_correlation;
        self.next_correlation = self.next_correlation.wrapping_add(1).max(1);
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(correlation)
            .with_client_id(Some(self.client_id.clone()));
        let header_version = R::header_version(version);
        let mut frame = BytesMut::new();
        frame.put_i32(0); // the size, filled in below
        header.encode(&mut frame, header_version).map_err(|error| self.codec_error(R::KEY, version, error))?;
        request.encode(&mut frame, version).map_err(|error| self.codec_error(R::KEY, version, error))?;
        let size = i32::try_from(frame.len() - 4).expect("a request is far below 2 GiB");
        frame[0..4].copy_from_slice(&size.to_be_bytes());
        let timeout = self.request_timeout;
        let address = self.address.clone();
        let write = async {
            self.stream.write_all(&frame).await?;
            self.stream.flush().await
        };
        let outcome = future::or(async { Some(write.await) }, async {
            glommio::timer::sleep(timeout).await;
            None
        })
        .await;
        match outcome {
            Some(Ok(())) => {}
            Some(Err(source)) => return Err(KafkaError::Io { address, operation: "write request", source }),
            None => return Err(KafkaError::Timeout { address, operation: "write request", timeout }),
        }
        self.outstanding.push_back(correlation);
        Ok(correlation)
    }

    /// Reads the next response frame: its correlation id and the whole frame after
    /// the size (header included). Cancel-safe.
    pub async fn read_frame(&mut self) -> Result<(i32, Bytes), KafkaError> {
        loop {
            if self.read_buffer.len() >= 4 {
                let size = i64::from(i32::from_be_bytes(self.read_buffer[0..4].try_into().expect("4 bytes")));
                if size < 4 || size as usize > RESPONSE_BYTES_MAX {
                    return Err(KafkaError::FrameSize { address: self.address.clone(), bytes: size });
                }
                let size = size as usize;
                if self.read_buffer.len() >= 4 + size {
                    self.read_buffer.advance(4);
                    let frame = self.read_buffer.split_to(size).freeze();
                    let correlation = i32::from_be_bytes(frame[0..4].try_into().expect("4 bytes"));
                    let expected = self.outstanding.pop_front();
                    if expected != Some(correlation) {
                        return Err(KafkaError::Correlation {
                            address: self.address.clone(),
                            got: correlation,
                            expected: expected.unwrap_or(-1),
                        });
                    }
                    return Ok((correlation, frame));
                }
                self.read_buffer.reserve(4 + size - self.read_buffer.len());
            }
            let read = self.stream.read(&mut self.read_chunk).await;
            match read {
                Ok(0) => return Err(KafkaError::Closed { address: self.address.clone() }),
                Ok(bytes) => self.read_buffer.extend_from_slice(&self.read_chunk[..bytes]),
                Err(source) => {
                    return Err(KafkaError::Io { address: self.address.clone(), operation: "read response", source })
                }
            }
        }
    }

    /// Decodes a frame from `read_frame` as the answer to an `R` of `version`.
    pub fn decode<R: Request>(&self, mut frame: Bytes, version: i16) -> Result<R::Response, KafkaError> {
        let header_version = <R::Response as HeaderVersion>::header_version(version);
        ResponseHeader::decode(&mut frame, header_version).map_err(|error| self.codec_error(R::KEY, version, error))?;
        <R::Response as Decodable>::decode(&mut frame, version)
            .map_err(|error| self.codec_error(R::KEY, version, error))
    }

    /// One request, one answer, within the request timeout. Only when nothing else is
    /// outstanding on this connection.
    pub async fn call<R: Request>(&mut self, request: &R, version: i16) -> Result<R::Response, KafkaError> {
        let frame = self.call_frame(request, version).await?;
        self.decode::<R>(frame, version)
    }

    /// `call` without decoding: the answer's whole frame.
    async fn call_frame<R: Request>(&mut self, request: &R, version: i16) -> Result<Bytes, KafkaError> {
        assert!(self.outstanding.is_empty(), "call() on a connection with pipelined requests");
        self.send(request, version).await?;
        let timeout = self.request_timeout;
        let answer = future::or(async { Some(self.read_frame().await) }, async {
            glommio::timer::sleep(timeout).await;
            None
        })
        .await;
        match answer {
            Some(Ok((_, frame))) => Ok(frame),
            Some(Err(error)) => Err(error),
            None => Err(KafkaError::Timeout { address: self.address.clone(), operation: api_name(R::KEY), timeout }),
        }
    }
}

fn topic_name(topic: &str) -> TopicName {
    TopicName(StrBytes::from_string(topic.to_owned()))
}

/// Connects to the leader of `topic`/`partition`: tries the bootstrap servers in turn
/// for metadata, then connects to the leader (reusing the bootstrap connection when it
/// is the leader).
pub async fn connect_to_leader(
    bootstrap_servers: &[String],
    topic: &str,
    partition: i32,
    options: &ClientOptions,
) -> Result<Connection, KafkaError> {
    connect_to_leader_checked(bootstrap_servers, topic, partition, None, options).await
}

/// `connect_to_leader`, also refusing a topic whose partition count is not
/// `partitions_exact` (a `by-key` mapping) with `KafkaError::PartitionCount`.
pub async fn connect_to_leader_checked(
    bootstrap_servers: &[String],
    topic: &str,
    partition: i32,
    partitions_exact: Option<u32>,
    options: &ClientOptions,
) -> Result<Connection, KafkaError> {
    let mut last = None;
    for server in bootstrap_servers {
        match leader_via(server, topic, partition, partitions_exact, options).await {
            Ok(connection) => return Ok(connection),
            Err(error) => last = Some(error),
        }
    }
    Err(KafkaError::NoBootstrap {
        last: Box::new(last.unwrap_or(KafkaError::Closed { address: "(no bootstrap servers)".to_owned() })),
    })
}

async fn leader_via(
    server: &str,
    topic: &str,
    partition: i32,
    partitions_exact: Option<u32>,
    options: &ClientOptions,
) -> Result<Connection, KafkaError> {
    let mut connection = Connection::connect(server, options).await?;
    let version = connection.version::<MetadataRequest>(METADATA_VERSIONS)?;
    let request = MetadataRequest::default()
        .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(topic_name(topic)))]))
        .with_allow_auto_topic_creation(false);
    let metadata = connection.call(&request, version).await?;
    let missing = |why| KafkaError::Metadata { address: server.to_owned(), topic: topic.to_owned(), partition, why };
    let topic_metadata = metadata
        .topics
        .iter()
        .find(|entry| entry.name.as_ref().is_some_and(|name| name.0.as_str() == topic))
        .ok_or_else(|| missing("the topic is not in the answer"))?;
    if topic_metadata.error_code != NONE {
        return Err(connection.broker_error("Metadata", topic_metadata.error_code));
    }
    if let Some(expected) = partitions_exact {
        if topic_metadata.partitions.len() != expected as usize {
            return Err(KafkaError::PartitionCount {
                address: server.to_owned(),
                topic: topic.to_owned(),
                expected,
                found: topic_metadata.partitions.len(),
            });
        }
    }
    let partition_metadata = topic_metadata
        .partitions
        .iter()
        .find(|entry| entry.partition_index == partition)
        .ok_or_else(|| missing("the topic has no such partition (the upstream topic needs at least as many partitions as the edge topic)"))?;
    if partition_metadata.error_code != NONE && partition_metadata.leader_id.0 < 0 {
        return Err(connection.broker_error("Metadata", partition_metadata.error_code));
    }
    let leader: BrokerId = partition_metadata.leader_id;
    let broker = metadata
        .brokers
        .iter()
        .find(|broker| broker.node_id == leader)
        .ok_or_else(|| missing("the partition has no leader among the listed brokers"))?;
    let leader_address = format!("{}:{}", broker.host.as_str(), broker.port);
    if leader_address == server {
        return Ok(connection);
    }
    Connection::connect(&leader_address, options).await
}

/// What a Metadata answer says about one topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicMetadata {
    pub topic: String,
    /// `None` when the answer does not list the topic at all.
    pub error_code: Option<i16>,
    pub partitions: usize,
}

/// Metadata for `topics` (never creating them): one entry per topic asked, in order.
pub async fn topics_metadata(connection: &mut Connection, topics: &[String]) -> Result<Vec<TopicMetadata>, KafkaError> {
    let version = connection.version::<MetadataRequest>(METADATA_VERSIONS)?;
    let request = MetadataRequest::default()
        .with_topics(Some(
            topics.iter().map(|topic| MetadataRequestTopic::default().with_name(Some(topic_name(topic)))).collect(),
        ))
        .with_allow_auto_topic_creation(false);
    let metadata = connection.call(&request, version).await?;
    Ok(topics
        .iter()
        .map(|topic| {
            let found =
                metadata.topics.iter().find(|entry| entry.name.as_ref().is_some_and(|name| name.0.as_str() == topic));
            TopicMetadata {
                topic: topic.clone(),
                error_code: found.map(|entry| entry.error_code),
                partitions: found.map_or(0, |entry| entry.partitions.len()),
            }
        })
        .collect())
}

/// InitProducerId with no transactional id: a fresh idempotent producer.
pub async fn init_producer(
    connection: &mut Connection,
    transaction_timeout_ms: i32,
) -> Result<ProducerIdentity, KafkaError> {
    let version = connection.version::<InitProducerIdRequest>(INIT_PRODUCER_ID_VERSIONS)?;
    let request = InitProducerIdRequest::default()
        .with_transactional_id(None)
        .with_transaction_timeout_ms(transaction_timeout_ms)
        .with_producer_id((-1).into())
        .with_producer_epoch(-1);
    let response = connection.call(&request, version).await?;
    if response.error_code != NONE {
        return Err(connection.broker_error("InitProducerId", response.error_code));
    }
    let producer = ProducerIdentity { id: response.producer_id.0, epoch: response.producer_epoch };
    if producer.id < 0 || producer.epoch < 0 {
        return Err(KafkaError::Codec {
            address: connection.address().to_owned(),
            api: "InitProducerId",
            version,
            reason: format!("granted no producer: id {} epoch {}", producer.id, producer.epoch),
        });
    }
    Ok(producer)
}

/// One partition's part of a Fetch answer.
#[derive(Debug, Clone)]
pub struct FetchAnswer {
    pub error_code: i16,
    pub high_watermark: i64,
    pub log_start_offset: i64,
    pub records: Bytes,
}

/// How long a Fetch may wait for data (milliseconds): an empty partition answers
/// after this.
pub const FETCH_WAIT_MS: i32 = 10;

/// Fetches `topic`/`partition` from `offset`, up to `bytes_max`, waiting at most
/// `FETCH_WAIT_MS` for data.
pub async fn fetch(
    connection: &mut Connection,
    topic: &str,
    partition: i32,
    offset: i64,
    bytes_max: i32,
) -> Result<FetchAnswer, KafkaError> {
    let version = connection.version::<FetchRequest>(FETCH_VERSIONS)?;
    let request = FetchRequest::default()
        // Kafka answers at once when data is there; tansu answers nothing at all
        // unless it may wait a little for at least one byte.
        .with_max_wait_ms(FETCH_WAIT_MS)
        .with_min_bytes(1)
        .with_max_bytes(bytes_max)
        .with_isolation_level(0)
        .with_topics(vec![FetchTopic::default().with_topic(topic_name(topic)).with_partitions(vec![
            FetchPartition::default()
                .with_partition(partition)
                .with_current_leader_epoch(-1)
                .with_fetch_offset(offset)
                .with_log_start_offset(-1)
                .with_partition_max_bytes(bytes_max),
        ])]);
    let response = connection.call(&request, version).await?;
    if response.error_code != NONE {
        return Err(connection.broker_error("Fetch", response.error_code));
    }
    let data = response
        .responses
        .iter()
        .filter(|entry| entry.topic.0.as_str() == topic)
        .flat_map(|entry| entry.partitions.iter())
        .find(|entry| entry.partition_index == partition)
        .ok_or_else(|| KafkaError::MissingPartition {
            address: connection.address().to_owned(),
            topic: topic.to_owned(),
            partition,
        })?;
    Ok(FetchAnswer {
        error_code: data.error_code,
        high_watermark: data.high_watermark,
        log_start_offset: data.log_start_offset,
        records: data.records.clone().unwrap_or_default(),
    })
}

/// The earliest offset of `topic`/`partition` (ListOffsets with timestamp -2).
pub async fn earliest_offset(connection: &mut Connection, topic: &str, partition: i32) -> Result<i64, KafkaError> {
    let version = connection.version::<ListOffsetsRequest>(LIST_OFFSETS_VERSIONS)?;
    let request = ListOffsetsRequest::default().with_replica_id((-1).into()).with_isolation_level(0).with_topics(vec![
        ListOffsetsTopic::default().with_name(topic_name(topic)).with_partitions(vec![ListOffsetsPartition::default()
            .with_partition_index(partition)
            .with_current_leader_epoch(-1)
            .with_timestamp(-2)]),
    ]);
    let response = connection.call(&request, version).await?;
    let answer = response
        .topics
        .iter()
        .filter(|entry| entry.name.0.as_str() == topic)
        .flat_map(|entry| entry.partitions.iter())
        .find(|entry| entry.partition_index == partition)
        .ok_or_else(|| KafkaError::MissingPartition {
            address: connection.address().to_owned(),
            topic: topic.to_owned(),
            partition,
        })?;
    if answer.error_code != NONE {
        return Err(connection.broker_error("ListOffsets", answer.error_code));
    }
    Ok(answer.offset.max(0))
}

/// The high watermark of `topic`/`partition`, from a Fetch answer (tansu's memory
/// engine answers ListOffsets(latest) wrongly; every broker fills the Fetch one).
pub async fn high_watermark(connection: &mut Connection, topic: &str, partition: i32) -> Result<i64, KafkaError> {
    let earliest = earliest_offset(connection, topic, partition).await.unwrap_or(0);
    let answer = fetch(connection, topic, partition, earliest, 1 << 16).await?;
    if answer.error_code != NONE || answer.high_watermark < 0 {
        return Err(connection.broker_error("Fetch", answer.error_code));
    }
    Ok(answer.high_watermark)
}

/// A Produce request carrying exactly one batch for one partition, acks=all.
pub fn produce_request(topic: &str, partition: i32, batch: Bytes, timeout_ms: i32) -> ProduceRequest {
    ProduceRequest::default().with_transactional_id(None).with_acks(-1).with_timeout_ms(timeout_ms).with_topic_data(
        vec![TopicProduceData::default().with_name(topic_name(topic)).with_partition_data(vec![
            PartitionProduceData::default().with_index(partition).with_records(Some(batch)),
        ])],
    )
}

/// The broker's answer for our partition in a Produce response, if present.
pub fn produce_answer(response: &ProduceResponse, topic: &str, partition: i32) -> Option<ProduceAnswer> {
    let data = response
        .responses
        .iter()
        .filter(|entry| entry.name.0.as_str() == topic)
        .flat_map(|entry| entry.partition_responses.iter())
        .find(|entry| entry.index == partition)?;
    Some(if data.error_code == NONE {
        ProduceAnswer::Appended { upstream_offset: (data.base_offset >= 0).then_some(data.base_offset) }
    } else {
        ProduceAnswer::Error { code: data.error_code }
    })
}

// ----- SASL (the credentials and the TLS transport are `kafka_secure`'s) -----

/// A fresh SCRAM client nonce from the ring provider's system randomness.
fn client_nonce() -> Result<String, Refusal> {
    let mut bytes = [0u8; SCRAM_NONCE_BYTES];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| Refusal::Setup { reason: "no system randomness for the SCRAM nonce".into() })?;
    Ok(sasl::nonce_text(&bytes))
}

/// Authenticates `connection` as `credentials`: SaslHandshake v1, then one (PLAIN) or
/// two (SCRAM) SaslAuthenticate round trips. Must run before any other request but
/// ApiVersions.
pub async fn authenticate(connection: &mut Connection, credentials: &SaslCredentials) -> Result<(), KafkaError> {
    let address = connection.address().to_owned();
    let mechanism = credentials.mechanism;
    let refused = |reason: String| {
        KafkaError::Refused(Refusal::Sasl {
            address: address.clone(),
            mechanism: mechanism.name(),
            username: credentials.username.clone(),
            reason,
        })
    };
    let handshake_version = connection.version::<SaslHandshakeRequest>(SASL_HANDSHAKE_VERSIONS).map_err(|error| {
        refused(format!("the broker offers no SASL handshake weir speaks (is this a SASL listener?): {error}"))
    })?;
    let handshake = SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(mechanism.name()));
    let answer = connection.call(&handshake, handshake_version).await?;
    if answer.error_code != NONE {
        let offered: Vec<&str> = answer.mechanisms.iter().map(|name| name.as_str()).collect();
        return Err(refused(if answer.error_code == UNSUPPORTED_SASL_MECHANISM {
            format!("the broker does not offer this mechanism; it offers {offered:?}")
        } else {
            format!("SaslHandshake answered {} ({})", error_name(answer.error_code), answer.error_code)
        }));
    }
    let version = connection.version::<SaslAuthenticateRequest>(SASL_AUTHENTICATE_VERSIONS)?;
    match mechanism {
        Mechanism::Plain => {
            let message = sasl::plain_message(&credentials.username, credentials.password());
            round_trip(connection, version, message, &refused).await?;
        }
        Mechanism::ScramSha256 | Mechanism::ScramSha512 => {
            let nonce = client_nonce().map_err(KafkaError::Refused)?;
            let mut scram = ScramClient::new(mechanism, &credentials.username, credentials.password(), nonce);
            let server_first = round_trip(connection, version, scram.client_first(), &refused).await?;
            let client_final = scram.handle_server_first(&server_first).map_err(|error| refused(error.to_string()))?;
            let server_final = round_trip(connection, version, client_final, &refused).await?;
            scram.handle_server_final(&server_final).map_err(|error| refused(error.to_string()))?;
        }
    }
    Ok(())
}

/// One SaslAuthenticate request and its answer's bytes; a broker error is a refusal.
async fn round_trip(
    connection: &mut Connection,
    version: i16,
    message: Vec<u8>,
    refused: &impl Fn(String) -> KafkaError,
) -> Result<Vec<u8>, KafkaError> {
    let request = SaslAuthenticateRequest::default().with_auth_bytes(message.into());
    let answer = connection.call(&request, version).await?;
    if answer.error_code != NONE {
        let detail = answer.error_message.as_ref().map_or("", |message| message.as_str());
        return Err(refused(format!(
            "the broker answered {} ({}){}{detail}",
            error_name(answer.error_code),
            answer.error_code,
            if detail.is_empty() { "" } else { ": " },
        )));
    }
    Ok(answer.auth_bytes.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_produce_request_carries_one_batch_with_acks_all_and_no_transaction() {
        let request = produce_request("up", 3, Bytes::from_static(b"batch"), 1000);
        assert_eq!(request.acks, -1);
        assert_eq!(request.transactional_id, None);
        assert_eq!(request.topic_data.len(), 1);
        assert_eq!(request.topic_data[0].partition_data.len(), 1);
        assert_eq!(request.topic_data[0].partition_data[0].index, 3);
        for version in PRODUCE_VERSIONS.min..=PRODUCE_VERSIONS.max {
            let mut buffer = BytesMut::new();
            request.encode(&mut buffer, version).unwrap();
            let decoded = ProduceRequest::decode(&mut buffer.freeze(), version).unwrap();
            assert_eq!(decoded, request, "v{version}");
        }
    }

    #[test]
    fn init_producer_id_asks_for_no_transactional_id() {
        let request = InitProducerIdRequest::default().with_transactional_id(None);
        let mut buffer = BytesMut::new();
        request.encode(&mut buffer, 3).unwrap();
        // v3 is flexible: a compact nullable string, 0 for null.
        assert_eq!(buffer[0], 0);
    }
}
