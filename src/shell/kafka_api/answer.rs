//! Requests in, responses out: decodes a frame with `kafka-protocol`, asks
//! `core::kafka_api` what to do, reads through `CoreAppender::query` (the owning core),
//! and encodes the answer. Fetch returns the stored batches byte for byte.

use std::time::Instant;

use crate::core::consumer_group::JoinRequest;
use crate::shell::kafka_api::groups::Committed;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    api_versions_response::ApiVersion, create_partitions_response::CreatePartitionsTopicResult,
    create_topics_response::CreatableTopicResult, delete_records_response::DeleteRecordsPartitionResult,
    delete_records_response::DeleteRecordsTopicResult, delete_topics_response::DeletableTopicResult,
    fetch_response::FetchableTopicResponse, fetch_response::PartitionData,
    list_offsets_response::ListOffsetsPartitionResponse, list_offsets_response::ListOffsetsTopicResponse,
    metadata_response::MetadataResponseBroker, metadata_response::MetadataResponsePartition,
    metadata_response::MetadataResponseTopic, produce_response::PartitionProduceResponse,
    produce_response::TopicProduceResponse, ApiKey, ApiVersionsResponse, BrokerId, CreatePartitionsResponse,
    CreateTopicsResponse, DeleteRecordsResponse, DeleteTopicsResponse, FetchRequest, FetchResponse,
    InitProducerIdResponse, ListOffsetsRequest, ListOffsetsResponse, MetadataRequest, MetadataResponse,
    ProduceResponse, RequestHeader, RequestKind, ResponseHeader, ResponseKind, TopicName,
};
use kafka_protocol::messages::{
    join_group_response::JoinGroupResponseMember, leave_group_response::MemberResponse,
    offset_commit_response::OffsetCommitResponsePartition, offset_commit_response::OffsetCommitResponseTopic,
    offset_fetch_response::OffsetFetchResponsePartition, offset_fetch_response::OffsetFetchResponseTopic,
    FindCoordinatorRequest, FindCoordinatorResponse, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse,
    LeaveGroupRequest, LeaveGroupResponse, OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest,
    OffsetFetchResponse, SyncGroupRequest, SyncGroupResponse,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use super::Listener;
use crate::core::kafka_acl::Permissions;
use crate::core::kafka_api::{self as decide, error_code, Disposition, ListOffsetsPlan, APIS_ANSWERED};
use crate::shell::log_query::{LogAnswer, LogQuery, PartitionFailure, ReadOutcome};

/// Why a request closes its connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    #[error("a request of {bytes} bytes is too short for a request header")]
    Short { bytes: usize },
    #[error("api key {key} version {version} is not answered by weir (docs/KAFKA_API.md lists what is)")]
    Unanswered { key: i16, version: i16 },
    #[error("api key {key} version {version}: the request does not decode: {reason}")]
    Malformed { key: i16, version: i16, reason: String },
    #[error("api key {key} version {version}: the response does not encode: {reason}")]
    Encode { key: i16, version: i16, reason: String },
    #[error("a Produce with acks=0 expects no answer, so its refusal closes the connection: {reason}")]
    UnansweredProduce { reason: &'static str },
}

/// A request ready to answer.
#[derive(Debug)]
pub enum DecodedRequest {
    Decoded {
        api_key: ApiKey,
        version: i16,
        header: RequestHeader,
        body: Box<RequestKind>,
        disposition: Disposition,
    },
    /// ApiVersions newer than weir knows: answered in v0 with UNSUPPORTED_VERSION.
    NewerApiVersions {
        correlation_id: i32,
    },
}

impl DecodedRequest {
    /// The request's API key.
    pub fn key(&self) -> i16 {
        match self {
            DecodedRequest::Decoded { api_key, .. } => *api_key as i16,
            DecodedRequest::NewerApiVersions { .. } => decide::api_key::API_VERSIONS,
        }
    }
}

/// Decodes one request frame (the bytes after its size). Never panics on any input
/// (the fuzz target `kafka_request` holds it to that).
pub fn decode_request(frame: Bytes) -> Result<DecodedRequest, RequestError> {
    if frame.len() < 8 {
        return Err(RequestError::Short { bytes: frame.len() });
    }
    let key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let disposition = decide::disposition(key, version);
    match disposition {
        Disposition::Close => return Err(RequestError::Unanswered { key, version }),
        Disposition::UnsupportedApiVersions => {
            let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
            return Ok(DecodedRequest::NewerApiVersions { correlation_id });
        }
        Disposition::Serve | Disposition::Refuse { .. } => {}
    }
    let api_key = ApiKey::try_from(key).map_err(|_| RequestError::Unanswered { key, version })?;
    let malformed = |reason: String| RequestError::Malformed { key, version, reason };
    let mut body = frame;
    let header = RequestHeader::decode(&mut body, api_key.request_header_version(version))
        .map_err(|error| malformed(error.to_string()))?;
    let request = RequestKind::decode(api_key, &mut body, version).map_err(|error| malformed(error.to_string()))?;
    Ok(DecodedRequest::Decoded { api_key, version, header, body: Box::new(request), disposition })
}

/// The framed response to `request`.
pub(super) async fn answer(
    listener: &Listener,
    request: DecodedRequest,
    permissions: &Permissions,
) -> Result<Bytes, RequestError> {
    let (api_key, version, header, body, disposition) = match request {
        DecodedRequest::NewerApiVersions { correlation_id } => {
            let mut response = api_versions();
            response.error_code = error_code::UNSUPPORTED_VERSION;
            return frame(correlation_id, ApiKey::ApiVersions, 0, &ResponseKind::ApiVersions(response));
        }
        DecodedRequest::Decoded { api_key, version, header, body, disposition } => {
            (api_key, version, header, body, disposition)
        }
    };
    let response = match (*body, disposition) {
        (body, Disposition::Refuse { code, reason }) => {
            listener.metrics.requests_refused.inc();
            refuse(body, code, reason)?
        }
        (RequestKind::ApiVersions(_), _) => ResponseKind::ApiVersions(api_versions()),
        (RequestKind::Metadata(request), _) => ResponseKind::Metadata(metadata(listener, &request, permissions)),
        (RequestKind::ListOffsets(request), _) => {
            ResponseKind::ListOffsets(list_offsets(listener, request, permissions).await)
        }
        (RequestKind::Fetch(request), _) => {
            let response = fetch(listener, request, permissions).await;
            listener.metrics.fetches.inc();
            let bytes: usize = response
                .responses
                .iter()
                .flat_map(|topic| topic.partitions.iter())
                .map(|partition| partition.records.as_ref().map_or(0, Bytes::len))
                .sum();
            listener.metrics.fetched_bytes.inc_by(bytes as u64);
            ResponseKind::Fetch(response)
        }
        (RequestKind::FindCoordinator(request), _) => {
            ResponseKind::FindCoordinator(find_coordinator(listener, &request))
        }
        (RequestKind::JoinGroup(request), _) => ResponseKind::JoinGroup(join_group(listener, request).await),
        (RequestKind::SyncGroup(request), _) => ResponseKind::SyncGroup(sync_group(listener, request).await),
        (RequestKind::Heartbeat(request), _) => {
            let mut response = HeartbeatResponse::default();
            response.error_code =
                listener.groups.heartbeat(&request.group_id.0, &request.member_id, request.generation_id);
            ResponseKind::Heartbeat(response)
        }
        (RequestKind::LeaveGroup(request), _) => ResponseKind::LeaveGroup(leave_group(listener, request)),
        (RequestKind::OffsetCommit(request), _) => {
            ResponseKind::OffsetCommit(offset_commit(listener, request, permissions).await)
        }
        (RequestKind::OffsetFetch(request), _) => {
            ResponseKind::OffsetFetch(offset_fetch(listener, request, permissions))
        }
        (_, _) => return Err(RequestError::Unanswered { key: api_key as i16, version }),
    };
    frame(header.correlation_id, api_key, version, &response)
}

/// Size, response header, body.
pub(super) fn frame(
    correlation_id: i32,
    api_key: ApiKey,
    version: i16,
    response: &ResponseKind,
) -> Result<Bytes, RequestError> {
    let encode_error = |error: String| RequestError::Encode { key: api_key as i16, version, reason: error };
    let mut bytes = BytesMut::with_capacity(256);
    bytes.put_i32(0);
    let mut header = ResponseHeader::default();
    header.correlation_id = correlation_id;
    header
        .encode(&mut bytes, api_key.response_header_version(version))
        .map_err(|error| encode_error(error.to_string()))?;
    response.encode(&mut bytes, version).map_err(|error| encode_error(error.to_string()))?;
    let size = i32::try_from(bytes.len() - 4).map_err(|_| encode_error("larger than 2 GiB".to_owned()))?;
    bytes[..4].copy_from_slice(&size.to_be_bytes());
    Ok(bytes.freeze())
}

fn api_versions() -> ApiVersionsResponse {
    let mut response = ApiVersionsResponse::default();
    response.api_keys = APIS_ANSWERED
        .iter()
        .map(|api| {
            let mut version = ApiVersion::default();
            version.api_key = api.key;
            version.min_version = api.version_min;
            version.max_version = api.version_max;
            version
        })
        .collect();
    response
}

/// The one broker's id.
const BROKER_ID: i32 = 0;
/// weir keeps no leader epochs (batches carry -1): clients skip epoch validation.
const LEADER_EPOCH_NONE: i32 = -1;
/// "Not asked for" in the authorized-operations fields.
const OPERATIONS_NOT_ASKED: i32 = i32::MIN;

fn name(topic: &str) -> TopicName {
    TopicName(StrBytes::from_string(topic.to_owned()))
}

fn partitions_of(listener: &Listener, topic: &str) -> Option<u32> {
    listener.settings.topics.iter().find(|(name, _)| name == topic).map(|(_, partitions)| *partitions)
}

/// Whether the connection's principal may read `topic`; a refusal is counted.
fn authorized(listener: &Listener, permissions: &Permissions, topic: &str) -> bool {
    let permitted = permissions.may_read(topic);
    if !permitted {
        listener.metrics.authorization_refusals.inc();
    }
    permitted
}

fn known_partition(listener: &Listener, topic: &str, partition: i32) -> bool {
    partitions_of(listener, topic).is_some_and(|count| partition >= 0 && (partition as u32) < count)
}

fn metadata(listener: &Listener, request: &MetadataRequest, permissions: &Permissions) -> MetadataResponse {
    let mut response = MetadataResponse::default();
    let mut broker = MetadataResponseBroker::default();
    broker.node_id = BrokerId(BROKER_ID);
    broker.host = StrBytes::from_string(listener.settings.advertised_host.clone());
    broker.port = listener.settings.advertised_port;
    response.brokers = vec![broker];
    response.cluster_id = Some(StrBytes::from_static_str("weir"));
    response.controller_id = BrokerId(BROKER_ID);
    response.cluster_authorized_operations = OPERATIONS_NOT_ASKED;
    let wanted: Vec<String> = match &request.topics {
        // Every topic: only those the principal may read are listed.
        None => listener
            .settings
            .topics
            .iter()
            .filter(|(name, _)| permissions.may_read(name))
            .map(|(name, _)| name.clone())
            .collect(),
        Some(topics) => topics.iter().filter_map(|topic| topic.name.as_ref().map(|name| name.0.to_string())).collect(),
    };
    response.topics = wanted
        .into_iter()
        .map(|topic| {
            let mut entry = MetadataResponseTopic::default();
            entry.topic_authorized_operations = OPERATIONS_NOT_ASKED;
            match partitions_of(listener, &topic).filter(|_| authorized(listener, permissions, &topic)) {
                Some(count) => {
                    entry.partitions = (0..count as i32)
                        .map(|index| {
                            let mut partition = MetadataResponsePartition::default();
                            partition.partition_index = index;
                            partition.leader_id = BrokerId(BROKER_ID);
                            partition.leader_epoch = LEADER_EPOCH_NONE;
                            partition.replica_nodes = vec![BrokerId(BROKER_ID)];
                            partition.isr_nodes = vec![BrokerId(BROKER_ID)];
                            partition
                        })
                        .collect();
                }
                None if !permissions.may_read(&topic) => entry.error_code = error_code::TOPIC_AUTHORIZATION_FAILED,
                None => entry.error_code = error_code::UNKNOWN_TOPIC_OR_PARTITION,
            }
            entry.name = Some(name(&topic));
            entry
        })
        .collect();
    response
}

fn failure_code(failure: &PartitionFailure) -> i16 {
    match failure {
        PartitionFailure::Unknown => error_code::UNKNOWN_TOPIC_OR_PARTITION,
        PartitionFailure::OutOfRange { .. } => error_code::OFFSET_OUT_OF_RANGE,
        PartitionFailure::Storage(_) => error_code::KAFKA_STORAGE_ERROR,
    }
}

async fn range_of(listener: &Listener, topic: &str, partition: u32) -> Result<(i64, i64), PartitionFailure> {
    let owner = listener.reader.owner_of(partition);
    match listener.reader.query(owner, LogQuery::Range { topic: topic.to_owned(), partition }).await {
        LogAnswer::Range(range) => range,
        _ => Err(PartitionFailure::Storage("unexpected answer".to_owned())),
    }
}

async fn list_offsets(
    listener: &Listener,
    request: ListOffsetsRequest,
    permissions: &Permissions,
) -> ListOffsetsResponse {
    let mut response = ListOffsetsResponse::default();
    for topic in request.topics {
        let topic_name = topic.name.0.to_string();
        let permitted = authorized(listener, permissions, &topic_name);
        let mut answered = ListOffsetsTopicResponse::default();
        answered.name = topic.name.clone();
        for asked in topic.partitions {
            let mut partition = ListOffsetsPartitionResponse::default();
            partition.partition_index = asked.partition_index;
            partition.leader_epoch = LEADER_EPOCH_NONE;
            partition.timestamp = -1;
            partition.offset = -1;
            let found = match permitted {
                true => list_offset(listener, &topic_name, asked.partition_index, asked.timestamp).await,
                false => Err(error_code::TOPIC_AUTHORIZATION_FAILED),
            };
            match found {
                Ok(Some((offset, timestamp))) => {
                    partition.offset = offset;
                    partition.timestamp = timestamp;
                }
                Ok(None) => {}
                Err(code) => partition.error_code = code,
            }
            answered.partitions.push(partition);
        }
        response.topics.push(answered);
    }
    response
}

/// (offset, timestamp) for one ListOffsets partition, `None` when no record reaches the
/// timestamp, or the error code.
async fn list_offset(
    listener: &Listener,
    topic: &str,
    partition: i32,
    timestamp: i64,
) -> Result<Option<(i64, i64)>, i16> {
    if !known_partition(listener, topic, partition) {
        return Err(error_code::UNKNOWN_TOPIC_OR_PARTITION);
    }
    let partition = partition as u32;
    let (start, end) = range_of(listener, topic, partition).await.map_err(|failure| failure_code(&failure))?;
    match decide::list_offsets(timestamp, start, end) {
        ListOffsetsPlan::Offset(offset) => Ok(Some((offset, -1))),
        ListOffsetsPlan::Invalid => Err(error_code::INVALID_REQUEST),
        ListOffsetsPlan::ByTimestamp(timestamp_ms) => {
            let owner = listener.reader.owner_of(partition);
            let query = LogQuery::OffsetForTimestamp { topic: topic.to_owned(), partition, timestamp_ms };
            match listener.reader.query(owner, query).await {
                LogAnswer::Offset(found) => found.map_err(|failure| failure_code(&failure)),
                _ => Err(error_code::UNKNOWN_SERVER_ERROR),
            }
        }
    }
}

/// One partition of a fetch after a pass: what the response says about it.
struct FetchedPartition {
    error_code: i16,
    start: i64,
    end: i64,
    records: Vec<Bytes>,
}

async fn fetch(listener: &Listener, request: FetchRequest, permissions: &Permissions) -> FetchResponse {
    for topic in &request.topics {
        authorized(listener, permissions, &topic.topic.0);
    }
    let started = Instant::now();
    let wait =
        std::time::Duration::from_millis(request.max_wait_ms.max(0) as u64).min(listener.settings.fetch_wait_max);
    let deadline = started + wait;
    loop {
        let (fetched, bytes) = fetch_pass(listener, &request, permissions).await;
        let now_ms = started.elapsed().as_millis() as u64;
        if decide::fetch_done(bytes, request.min_bytes, now_ms, wait.as_millis() as u64) {
            return fetch_response(&request, fetched);
        }
        wait_for_appends(listener, &request, &fetched, deadline).await;
        if Instant::now() >= deadline {
            let (fetched, _) = fetch_pass(listener, &request, permissions).await;
            return fetch_response(&request, fetched);
        }
    }
}

/// Reads every asked partition once, within the response's byte budget.
async fn fetch_pass(
    listener: &Listener,
    request: &FetchRequest,
    permissions: &Permissions,
) -> (Vec<FetchedPartition>, usize) {
    let mut response_left = decide::response_budget(request.max_bytes, listener.settings.response_bytes_max);
    let mut response_bytes = 0usize;
    let mut fetched = Vec::new();
    for topic in &request.topics {
        let topic_name = topic.topic.0.to_string();
        for asked in &topic.partitions {
            let mut entry = FetchedPartition { error_code: 0, start: -1, end: -1, records: Vec::new() };
            if !permissions.may_read(&topic_name) {
                entry.error_code = error_code::TOPIC_AUTHORIZATION_FAILED;
                fetched.push(entry);
                continue;
            }
            if !known_partition(listener, &topic_name, asked.partition) {
                entry.error_code = error_code::UNKNOWN_TOPIC_OR_PARTITION;
                fetched.push(entry);
                continue;
            }
            let partition = asked.partition as u32;
            let budget = decide::partition_budget(asked.partition_max_bytes, response_left);
            if !decide::partition_reads(budget, response_bytes) {
                match range_of(listener, &topic_name, partition).await {
                    Ok((start, end)) => (entry.start, entry.end) = (start, end),
                    Err(failure) => entry.error_code = failure_code(&failure),
                }
                fetched.push(entry);
                continue;
            }
            let query = LogQuery::Read {
                topic: topic_name.clone(),
                partition,
                offset: asked.fetch_offset,
                bytes_max: budget.max(1),
            };
            match listener.reader.query(listener.reader.owner_of(partition), query).await {
                LogAnswer::Read(ReadOutcome::Batches { batches, start, end }) => {
                    (entry.start, entry.end) = (start, end);
                    for batch in batches {
                        let whole_first = response_bytes == 0 && entry.records.is_empty();
                        let taken: usize = entry.records.iter().map(Bytes::len).sum();
                        if !whole_first && taken + batch.len() > budget {
                            break;
                        }
                        response_bytes += batch.len();
                        response_left = response_left.saturating_sub(batch.len());
                        entry.records.push(batch);
                    }
                }
                LogAnswer::Read(ReadOutcome::Failed(failure)) => {
                    if let PartitionFailure::OutOfRange { start, end } = failure {
                        (entry.start, entry.end) = (start, end);
                    }
                    entry.error_code = failure_code(&failure);
                }
                _ => entry.error_code = error_code::UNKNOWN_SERVER_ERROR,
            }
            fetched.push(entry);
        }
    }
    (fetched, response_bytes)
}

/// Waits until a partition of the fetch has new durable data, or the deadline: each
/// owning core is asked to wait for its own partitions, and the first to answer ends
/// the wait.
async fn wait_for_appends(listener: &Listener, request: &FetchRequest, fetched: &[FetchedPartition], until: Instant) {
    let mut by_owner: std::collections::BTreeMap<usize, Vec<(String, u32, i64)>> = std::collections::BTreeMap::new();
    let asked =
        request.topics.iter().flat_map(|topic| topic.partitions.iter().map(move |partition| (topic, partition)));
    for ((topic, asked), entry) in asked.zip(fetched) {
        if entry.error_code != error_code::NONE {
            continue;
        }
        let partition = asked.partition as u32;
        let waiting_from = asked.fetch_offset.max(entry.end - 1);
        by_owner.entry(listener.reader.owner_of(partition)).or_default().push((
            topic.topic.0.to_string(),
            partition,
            waiting_from,
        ));
    }
    if by_owner.is_empty() {
        glommio::timer::sleep(until.saturating_duration_since(Instant::now())).await;
        return;
    }
    let mut waits: Vec<_> = by_owner
        .into_iter()
        .map(|(owner, partitions)| Box::pin(listener.reader.query(owner, LogQuery::Wait { partitions, until })))
        .collect();
    futures_lite::future::poll_fn(|context| {
        for waiting in waits.iter_mut() {
            if std::future::Future::poll(waiting.as_mut(), context).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await;
}

fn fetch_response(request: &FetchRequest, fetched: Vec<FetchedPartition>) -> FetchResponse {
    let mut response = FetchResponse::default();
    let mut fetched = fetched.into_iter();
    for topic in &request.topics {
        let mut answered = FetchableTopicResponse::default();
        answered.topic = topic.topic.clone();
        answered.topic_id = topic.topic_id;
        for asked in &topic.partitions {
            let entry = fetched.next().expect("one result per asked partition");
            let mut partition = PartitionData::default();
            partition.partition_index = asked.partition;
            partition.error_code = entry.error_code;
            partition.high_watermark = entry.end;
            partition.last_stable_offset = entry.end;
            partition.log_start_offset = entry.start;
            partition.preferred_read_replica = BrokerId(-1);
            let size: usize = entry.records.iter().map(Bytes::len).sum();
            let mut records = BytesMut::with_capacity(size);
            for batch in &entry.records {
                records.extend_from_slice(batch);
            }
            partition.records = Some(records.freeze());
            answered.partitions.push(partition);
        }
        response.responses.push(answered);
    }
    response
}

/// The answer to a write or admin request: every part refused with `code` and
/// `reason`.
fn refuse(body: RequestKind, code: i16, reason: &'static str) -> Result<ResponseKind, RequestError> {
    let message = || Some(StrBytes::from_static_str(reason));
    tracing::debug!(reason, "Kafka API: request refused");
    Ok(match body {
        RequestKind::Produce(request) => {
            if request.acks == 0 {
                return Err(RequestError::UnansweredProduce { reason });
            }
            let mut response = ProduceResponse::default();
            for topic in request.topic_data {
                let mut answered = TopicProduceResponse::default();
                answered.name = topic.name;
                for data in topic.partition_data {
                    let mut partition = PartitionProduceResponse::default();
                    partition.index = data.index;
                    partition.error_code = code;
                    partition.base_offset = -1;
                    partition.log_start_offset = -1;
                    partition.error_message = message();
                    answered.partition_responses.push(partition);
                }
                response.responses.push(answered);
            }
            ResponseKind::Produce(response)
        }
        RequestKind::InitProducerId(_) => {
            let mut response = InitProducerIdResponse::default();
            response.error_code = code;
            response.producer_id = (-1).into();
            response.producer_epoch = -1;
            ResponseKind::InitProducerId(response)
        }
        RequestKind::DeleteRecords(request) => {
            let mut response = DeleteRecordsResponse::default();
            for topic in request.topics {
                let mut answered = DeleteRecordsTopicResult::default();
                answered.name = topic.name;
                for asked in topic.partitions {
                    let mut partition = DeleteRecordsPartitionResult::default();
                    partition.partition_index = asked.partition_index;
                    partition.low_watermark = -1;
                    partition.error_code = code;
                    answered.partitions.push(partition);
                }
                response.topics.push(answered);
            }
            ResponseKind::DeleteRecords(response)
        }
        RequestKind::CreateTopics(request) => {
            let mut response = CreateTopicsResponse::default();
            for topic in request.topics {
                let mut answered = CreatableTopicResult::default();
                answered.name = topic.name;
                answered.error_code = code;
                answered.error_message = message();
                answered.num_partitions = -1;
                answered.replication_factor = -1;
                response.topics.push(answered);
            }
            ResponseKind::CreateTopics(response)
        }
        RequestKind::DeleteTopics(request) => {
            let mut response = DeleteTopicsResponse::default();
            let names =
                request.topic_names.into_iter().map(Some).chain(request.topics.into_iter().map(|topic| topic.name));
            for topic in names {
                let mut answered = DeletableTopicResult::default();
                answered.name = topic;
                answered.error_code = code;
                answered.error_message = message();
                response.responses.push(answered);
            }
            ResponseKind::DeleteTopics(response)
        }
        RequestKind::CreatePartitions(request) => {
            let mut response = CreatePartitionsResponse::default();
            for topic in request.topics {
                let mut answered = CreatePartitionsTopicResult::default();
                answered.name = topic.name;
                answered.error_code = code;
                answered.error_message = message();
                response.results.push(answered);
            }
            ResponseKind::CreatePartitions(response)
        }
        other => {
            return Err(RequestError::Malformed {
                key: -1,
                version: -1,
                reason: format!("no refusal for {:?}", std::mem::discriminant(&other)),
            })
        }
    })
}

fn find_coordinator(listener: &Listener, _request: &FindCoordinatorRequest) -> FindCoordinatorResponse {
    // weir is the one broker, so it coordinates every group (and every transaction id
    // a client might ask about is refused where it is used).
    let mut response = FindCoordinatorResponse::default();
    response.node_id = BrokerId(BROKER_ID);
    response.host = StrBytes::from_string(listener.settings.advertised_host.clone());
    response.port = listener.settings.advertised_port;
    response
}

fn text(bytes: &StrBytes) -> String {
    bytes.to_string()
}

async fn join_group(listener: &Listener, request: JoinGroupRequest) -> JoinGroupResponse {
    let join = JoinRequest {
        member_id: text(&request.member_id),
        client_id: String::new(),
        protocol_type: text(&request.protocol_type),
        protocols: request
            .protocols
            .iter()
            .map(|protocol| (text(&protocol.name), protocol.metadata.to_vec()))
            .collect(),
        session_timeout_ms: request.session_timeout_ms,
        rebalance_timeout_ms: request.rebalance_timeout_ms,
    };
    let answer = listener.groups.join(&request.group_id.0, join).await;
    let mut response = JoinGroupResponse::default();
    response.error_code = answer.error_code;
    response.generation_id = answer.generation;
    response.protocol_type = answer.protocol_type.map(StrBytes::from_string);
    response.protocol_name = answer.protocol.map(StrBytes::from_string);
    response.leader = StrBytes::from_string(answer.leader);
    response.member_id = StrBytes::from_string(answer.member_id);
    response.members = answer
        .members
        .into_iter()
        .map(|(member_id, metadata)| {
            let mut member = JoinGroupResponseMember::default();
            member.member_id = StrBytes::from_string(member_id);
            member.metadata = Bytes::from(metadata);
            member
        })
        .collect();
    response
}

async fn sync_group(listener: &Listener, request: SyncGroupRequest) -> SyncGroupResponse {
    let assignments = request
        .assignments
        .iter()
        .map(|assignment| (text(&assignment.member_id), assignment.assignment.to_vec()))
        .collect();
    let answer =
        listener.groups.sync(&request.group_id.0, &request.member_id, request.generation_id, assignments).await;
    let mut response = SyncGroupResponse::default();
    response.error_code = answer.error_code;
    response.protocol_type = answer.protocol_type.map(StrBytes::from_string);
    response.protocol_name = answer.protocol.map(StrBytes::from_string);
    response.assignment = Bytes::from(answer.assignment);
    response
}

fn leave_group(listener: &Listener, request: LeaveGroupRequest) -> LeaveGroupResponse {
    // v0-2 name one member, v3+ a list.
    let member_ids: Vec<String> = if request.members.is_empty() {
        vec![text(&request.member_id)]
    } else {
        request.members.iter().map(|member| text(&member.member_id)).collect()
    };
    let codes = listener.groups.leave(&request.group_id.0, &member_ids);
    let mut response = LeaveGroupResponse::default();
    if request.members.is_empty() {
        response.error_code = codes[0];
    }
    response.members = request
        .members
        .into_iter()
        .zip(codes)
        .map(|(member, code)| {
            let mut answered = MemberResponse::default();
            answered.member_id = member.member_id;
            answered.group_instance_id = member.group_instance_id;
            answered.error_code = code;
            answered
        })
        .collect();
    response
}

async fn offset_commit(
    listener: &Listener,
    request: OffsetCommitRequest,
    permissions: &Permissions,
) -> OffsetCommitResponse {
    let group = request.group_id.0.to_string();
    let checked = listener.groups.check_commit(&group, &request.member_id, request.generation_id_or_member_epoch);
    let mut entries = Vec::new();
    let mut response = OffsetCommitResponse::default();
    for topic in &request.topics {
        let topic_name = topic.name.0.to_string();
        let permitted = authorized(listener, permissions, &topic_name);
        let mut answered = OffsetCommitResponseTopic::default();
        answered.name = topic.name.clone();
        for asked in &topic.partitions {
            let mut partition = OffsetCommitResponsePartition::default();
            partition.partition_index = asked.partition_index;
            partition.error_code = match checked {
                _ if !permitted => error_code::TOPIC_AUTHORIZATION_FAILED,
                Err(code) => code,
                Ok(()) if !known_partition(listener, &topic_name, asked.partition_index) => {
                    error_code::UNKNOWN_TOPIC_OR_PARTITION
                }
                Ok(()) => {
                    entries.push((
                        topic_name.clone(),
                        asked.partition_index,
                        Committed {
                            offset: asked.committed_offset,
                            metadata: asked.committed_metadata.as_ref().map(text),
                        },
                    ));
                    error_code::NONE
                }
            };
            answered.partitions.push(partition);
        }
        response.topics.push(answered);
    }
    if !entries.is_empty() {
        listener.metrics.offset_commits.inc();
        if let Err(error) = listener.groups.commit(&group, entries).await {
            tracing::error!(%error, group, "Kafka API: committed offsets not stored");
            for partition in response.topics.iter_mut().flat_map(|topic| topic.partitions.iter_mut()) {
                if partition.error_code == error_code::NONE {
                    partition.error_code = error_code::KAFKA_STORAGE_ERROR;
                }
            }
        }
    }
    response
}

fn offset_fetch(listener: &Listener, request: OffsetFetchRequest, permissions: &Permissions) -> OffsetFetchResponse {
    let group = request.group_id.0.to_string();
    let committed = listener.groups.committed(&group);
    let asked: Vec<(TopicName, Vec<i32>)> = match request.topics {
        Some(topics) => topics.into_iter().map(|topic| (topic.name, topic.partition_indexes)).collect(),
        None => {
            let mut by_topic: std::collections::BTreeMap<String, Vec<i32>> = std::collections::BTreeMap::new();
            // The whole group: only the topics the principal may read.
            for (topic, partition) in committed.keys().filter(|(topic, _)| permissions.may_read(topic)) {
                by_topic.entry(topic.clone()).or_default().push(*partition);
            }
            by_topic.into_iter().map(|(topic, partitions)| (name(&topic), partitions)).collect()
        }
    };
    let mut response = OffsetFetchResponse::default();
    for (topic, partitions) in asked {
        let topic_name = topic.0.to_string();
        let permitted = authorized(listener, permissions, &topic_name);
        let mut answered = OffsetFetchResponseTopic::default();
        answered.name = topic;
        for partition_index in partitions {
            let mut partition = OffsetFetchResponsePartition::default();
            partition.partition_index = partition_index;
            partition.committed_leader_epoch = LEADER_EPOCH_NONE;
            if !permitted {
                partition.committed_offset = -1;
                partition.error_code = error_code::TOPIC_AUTHORIZATION_FAILED;
                answered.partitions.push(partition);
                continue;
            }
            match committed.get(&(topic_name.clone(), partition_index)) {
                Some(found) => {
                    partition.committed_offset = found.offset;
                    partition.metadata = found.metadata.clone().map(StrBytes::from_string);
                }
                None => {
                    partition.committed_offset = -1;
                    partition.metadata = Some(StrBytes::from_static_str(""));
                }
            }
            answered.partitions.push(partition);
        }
        response.topics.push(answered);
    }
    response
}
