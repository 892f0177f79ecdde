//! Entry points for the fuzz targets (`tests/fuzz`, run with `tools/fuzz`) and for the
//! test suite, which replays every input kept in `tests/fuzz/corpus` through them
//! (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes, as an attacker or a damaged
//! disk would hand them to weir, and must return without panicking, without
//! allocating more than its limits allow, and with its own invariants intact (checked
//! with `assert!`: a broken invariant is a crash the fuzzer reports).

use std::collections::BTreeSet;

use bytes::Bytes;
use kafka_protocol::messages::{
    ApiVersionsResponse, FetchResponse, InitProducerIdResponse, ListOffsetsResponse, MetadataResponse, ProduceResponse,
    ResponseHeader,
};
use kafka_protocol::protocol::{Decodable, HeaderVersion};

use crate::config::{Config, Host};
use crate::core::log::recovery::{self, ScanCursor, ScanStop};
use crate::core::log::{batch, index};
use crate::core::protocol::{self, FRAME_LIMITS_V1};
use crate::core::session::FrameAssembler;
use crate::core::ship::reconcile;

/// Device stream bytes: length-prefixed frames reassembled as the QUIC session does,
/// each checked as a produce frame and as an answer frame (what a device library
/// reads). A frame that passes is within every limit.
pub fn device_stream(bytes: &[u8]) {
    let mut assembler = FrameAssembler::new(FRAME_LIMITS_V1.frame_bytes_max);
    // Fed in two pieces, as a stream arrives: the split point is part of the input.
    let split = bytes.first().map_or(0, |first| usize::from(*first).min(bytes.len()));
    for piece in [&bytes[..split], &bytes[split..]] {
        assembler.push(piece);
        loop {
            match assembler.next_frame() {
                Ok(Some(frame)) => {
                    assert!(frame.len() <= FRAME_LIMITS_V1.frame_bytes_max);
                    if let Ok(produce) = protocol::check_produce(&frame, &FRAME_LIMITS_V1) {
                        assert!(produce.records.len() <= FRAME_LIMITS_V1.records_per_frame_max);
                        assert!(produce.topic.len() <= FRAME_LIMITS_V1.topic_bytes_max);
                    }
                    let _ = protocol::check_answer(&frame, &FRAME_LIMITS_V1);
                }
                // What waits is one partial frame within the limit (prefix included).
                Ok(None) => {
                    assert!(assembler.buffered_bytes() < FRAME_LIMITS_V1.frame_bytes_max + 4);
                    break;
                }
                Err(_) => return, // the session closes the stream
            }
        }
    }
}

/// One record batch as read from a segment or a fetch: a batch that checks out decodes
/// into exactly its record count, and re-encoding those records gives a batch that
/// checks out and decodes to the same records. The CRC turns away almost every mutated
/// input at the door, so the same bytes are tried again with their CRC made right: that
/// is what reaches the record decoder (a damaged batch whose CRC still matches, or one
/// a broker sent).
pub fn record_batch(bytes: &[u8]) {
    record_batch_as_given(bytes);
    if let Ok(total) = batch::peek_total_bytes(bytes) {
        if bytes.len() >= total {
            let mut fixed = bytes.to_vec();
            let crc = crc32c::crc32c(&fixed[batch::CRC_START..total]);
            fixed[batch::CRC_START - 4..batch::CRC_START].copy_from_slice(&crc.to_be_bytes());
            record_batch_as_given(&fixed);
        }
    }
}

fn record_batch_as_given(bytes: &[u8]) {
    let _ = batch::peek_total_bytes(bytes);
    let _ = batch::parse_header(bytes);
    let Ok(header) = batch::check_batch(bytes) else { return };
    let shared = Bytes::copy_from_slice(&bytes[..header.total_bytes()]);
    let Ok(records) = batch::records(&shared) else { return };
    let mut decoded = Vec::new();
    for record in records {
        match record {
            Ok(view) => decoded.push(view.to_record(&shared)),
            Err(_) => return,
        }
    }
    if decoded.len() != header.record_count as usize || decoded.is_empty() {
        return; // a batch whose count disagrees with its records is refused elsewhere
    }
    let encoded = batch::encode_to_vec(header.base_offset, &decoded);
    let again = batch::check_batch(&encoded).expect("weir's own encoding checks out");
    assert_eq!(again.record_count, header.record_count);
    let encoded = Bytes::from(encoded);
    let round_trip: Vec<_> =
        batch::records(&encoded).expect("decodes").map(|record| record.expect("decodes").to_record(&encoded)).collect();
    assert_eq!(round_trip.len(), decoded.len());
    for (before, after) in decoded.iter().zip(&round_trip) {
        assert_eq!((&before.key, &before.value, &before.headers), (&after.key, &after.value, &after.headers));
    }
}

/// A segment's bytes as recovery sees them after a crash: the scan never moves
/// backwards or past the window, and the torn-tail search only reports positions
/// after the start of the bad bytes.
pub fn recovery_scan(bytes: &[u8]) {
    for at_end in [false, true] {
        let mut cursor = ScanCursor { position: 0, next_offset: 0, batches: 0, records: 0 };
        let mut last_position = None;
        let stop = recovery::scan_window(bytes, 0, at_end, &mut cursor, |position, _header| {
            assert!(last_position.is_none_or(|last| position > last));
            last_position = Some(position);
        });
        assert!(cursor.position <= bytes.len() as u64);
        if let ScanStop::Invalid(_) = stop {
            let rest = &bytes[cursor.position as usize..];
            if let Some(found) = recovery::find_later_batch(rest, cursor.position, cursor.next_offset) {
                assert!(found > cursor.position && found < bytes.len() as u64);
            }
        }
    }
}

/// An index file's bytes: parsed entries grow strictly, and a lookup returns an entry
/// at or before the offset asked for.
pub fn index_file(bytes: &[u8]) {
    let (entries, _garbage) = index::parse_entries(bytes);
    for pair in entries.windows(2) {
        assert!(pair[0].relative_offset < pair[1].relative_offset && pair[0].position < pair[1].position);
    }
    for probe in [0u32, 1, 7, 1 << 10, 1 << 20, u32::MAX] {
        let found = index::lookup(&entries, probe);
        assert!(found.relative_offset <= probe || (found.relative_offset == 0 && found.position == 0));
    }
}

/// A broker's answer: the first byte picks the API weir calls and its version, the
/// rest is the response frame (header and body) that kafka-protocol decodes; a Fetch
/// answer's records then go through weir's own upstream scan parser.
pub fn kafka_response(bytes: &[u8]) {
    let Some((selector, frame)) = bytes.split_first() else { return };
    let mut frame = Bytes::copy_from_slice(frame);
    let version = i16::from(selector >> 4);
    macro_rules! decode {
        ($response:ty) => {{
            let header_version = <$response as HeaderVersion>::header_version(version);
            if ResponseHeader::decode(&mut frame, header_version).is_err() {
                return;
            }
            <$response as Decodable>::decode(&mut frame, version).ok()
        }};
    }
    match selector & 0x0f {
        0 => {
            decode!(ApiVersionsResponse);
        }
        1 => {
            decode!(MetadataResponse);
        }
        2 => {
            decode!(InitProducerIdResponse);
        }
        3 => {
            decode!(ProduceResponse);
        }
        4 => {
            decode!(ListOffsetsResponse);
        }
        5 => {
            let Some(response) = decode!(FetchResponse) else { return };
            for topic in &response.responses {
                for partition in &topic.partitions {
                    if let Some(records) = &partition.records {
                        let _ = reconcile::parse_records(records);
                    }
                }
            }
        }
        _ => {
            // The records bytes alone, as a Fetch carries them.
            if let Ok((found, next)) = reconcile::parse_records(&frame) {
                if let (Some(last), Some(next)) = (found.last(), next) {
                    assert!(next >= last.next_upstream_offset);
                }
            }
        }
    }
}

/// A config file's text: parsing and validation end in a config or an error, and a
/// config that validates names only the cores the host has.
pub fn config_file(bytes: &[u8]) {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    let Ok(config) = Config::parse(text, "fuzz.toml") else { return };
    let host = Host::with_cpus(BTreeSet::from([0, 1, 2, 3]));
    if let Ok(valid) = config.validate(&host, "fuzz.toml") {
        assert!(valid.cores.iter().all(|cpu| host.usable_cpus.contains(cpu)));
    }
}

/// A Kafka client's request frame (the bytes after its size), as the Kafka API's
/// listener decodes it: it either closes the connection with a reason, or yields a
/// request whose key and version weir answers, with a header that decoded whole.
pub fn kafka_request(bytes: &[u8]) {
    use crate::core::kafka_api::{self, Disposition};
    use crate::shell::kafka_api::{decode_request, DecodedRequest};
    match decode_request(Bytes::copy_from_slice(bytes)) {
        Err(_) => {}
        Ok(DecodedRequest::NewerApiVersions { .. }) => {
            let version = i16::from_be_bytes([bytes[2], bytes[3]]);
            assert_eq!(
                kafka_api::disposition(kafka_api::api_key::API_VERSIONS, version),
                Disposition::UnsupportedApiVersions
            );
        }
        Ok(DecodedRequest::Decoded { api_key, version, header, disposition, .. }) => {
            assert_ne!(disposition, Disposition::Close);
            assert_eq!(kafka_api::disposition(api_key as i16, version), disposition);
            assert_eq!((header.request_api_key, header.request_api_version), (api_key as i16, version));
            let answered = kafka_api::APIS_ANSWERED.iter().find(|api| api.key == api_key as i16).expect("answered");
            assert!(answered.version_min <= version && version <= answered.version_max);
        }
    }
}

/// A Kafka client's SCRAM or PLAIN messages, as the listener's SASL server reads them
/// (`core::sasl_server`): the first part of the input (its first byte says how long)
/// is a client-first message, the rest a client-final one; the whole input is also a
/// PLAIN message. Nothing panics, and a forged client-final never authenticates.
pub fn scram_server(bytes: &[u8]) {
    use crate::core::sasl::Mechanism;
    use crate::core::sasl_server::{parse_client_first, parse_plain, AuthStep, SaslConversation, ScramCredential};
    static CREDENTIAL: std::sync::OnceLock<ScramCredential> = std::sync::OnceLock::new();
    let credential = CREDENTIAL
        .get_or_init(|| ScramCredential::derive(Mechanism::ScramSha256, b"pencil", b"fuzzing salt", 4096))
        .clone();
    let split = bytes.first().map_or(0, |first| usize::from(*first).min(bytes.len()));
    let (first, last) = bytes.split_at(split);
    if let Ok(parsed) = parse_client_first(first) {
        assert!(!parsed.username.is_empty() && !parsed.client_nonce.contains(','));
    }
    let _ = parse_plain(bytes);
    let mut conversation = SaslConversation::new(vec![Mechanism::ScramSha256]);
    conversation.handshake("SCRAM-SHA-256").expect("offered");
    let lookup = |_: &str, _: Mechanism| Some(credential.clone());
    match conversation.authenticate(first, "fuzzNonce", lookup) {
        AuthStep::Continue(server_first) => {
            assert!(server_first.starts_with(b"r="));
            // The proof needs the password: random bytes never carry it.
            assert!(!matches!(conversation.authenticate(last, "fuzzNonce", lookup), AuthStep::Done { .. }));
        }
        AuthStep::Done { .. } => panic!("a client-first message alone authenticated"),
        AuthStep::Failed { .. } => {}
    }
}
