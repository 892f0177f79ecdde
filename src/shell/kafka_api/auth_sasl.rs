//! SASL on the Kafka listener: SaslHandshake (v1) and SaslAuthenticate (v0..v2)
//! answered by the connection itself, since they change what it may do next. The
//! conversation's decisions are `core::sasl_server`'s; this module looks credentials
//! up, makes the server nonce, builds the responses and counts the outcomes.
//!
//! A failed authentication is answered (SASL_AUTHENTICATION_FAILED with the reason,
//! which never says whether the user exists) and then the connection is closed, as
//! Kafka does; so is a second handshake, or more SaslAuthenticate requests than the
//! mechanism needs. A PLAIN check costs one PBKDF2 on the listener's core: one try
//! per connection, and `connections_max` bounds how many run at once.

use bytes::Bytes;
use kafka_protocol::messages::{
    RequestKind, ResponseKind, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
    SaslHandshakeResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::answer::{frame, DecodedRequest, RequestError};
use super::auth_credentials::Credentials;
use super::{Listener, Session};
use crate::config::{ConfigProblem, KafkaApiSaslConfig, KafkaApiSaslMechanism};
use crate::core::kafka_api::error_code;
use crate::core::sasl::{nonce_text, Mechanism, SCRAM_NONCE_BYTES};
use crate::core::sasl_server::{AuthStep, HandshakeRefusal, SaslConversation};
use crate::shell::metrics::AuthMechanism;

/// What the listener authenticates with: the offered mechanisms and the users.
pub struct SaslSettings {
    pub mechanisms: Vec<Mechanism>,
    pub credentials: Credentials,
}

impl SaslSettings {
    /// Loads `[kafka_api.sasl]`'s credentials file; the problem names the field.
    pub fn load(config: &KafkaApiSaslConfig) -> Result<SaslSettings, ConfigProblem> {
        let problem = |why: String| ConfigProblem { path: "kafka_api.sasl.credentials_file".into(), why };
        let path = config.credentials_file.as_ref().ok_or_else(|| problem("needed with mechanisms".into()))?;
        let credentials = Credentials::load(path).map_err(|error| problem(error.to_string()))?;
        if credentials.is_empty() {
            return Err(problem(format!("{}: holds no user (add one with `weir kafka-user add`)", path.display())));
        }
        let mechanisms = config
            .mechanisms
            .iter()
            .map(|mechanism| match mechanism {
                KafkaApiSaslMechanism::Plain => Mechanism::Plain,
                KafkaApiSaslMechanism::ScramSha256 => Mechanism::ScramSha256,
                KafkaApiSaslMechanism::ScramSha512 => Mechanism::ScramSha512,
            })
            .collect();
        Ok(SaslSettings { mechanisms, credentials })
    }
}

/// The answer to a SaslHandshake or SaslAuthenticate request, and whether the
/// connection goes on; `None` for any other request.
pub(super) fn respond(
    listener: &Listener,
    session: &Session,
    request: &DecodedRequest,
) -> Result<Option<(Bytes, After)>, RequestError> {
    let DecodedRequest::Decoded { api_key, version, header, body, .. } = request else { return Ok(None) };
    let (response, after) = match body.as_ref() {
        RequestKind::SaslHandshake(request) => {
            let (response, after) = handshake(listener, session, request);
            (ResponseKind::SaslHandshake(response), after)
        }
        RequestKind::SaslAuthenticate(request) => {
            let (response, after) = authenticate(listener, session, request);
            (ResponseKind::SaslAuthenticate(response), after)
        }
        _ => return Ok(None),
    };
    Ok(Some((frame(header.correlation_id, *api_key, *version, &response)?, after)))
}

fn metric_mechanism(mechanism: Mechanism) -> AuthMechanism {
    match mechanism {
        Mechanism::Plain => AuthMechanism::Plain,
        Mechanism::ScramSha256 => AuthMechanism::ScramSha256,
        Mechanism::ScramSha512 => AuthMechanism::ScramSha512,
    }
}

/// Whether the connection goes on after this answer.
pub enum After {
    GoOn,
    Close,
}

fn handshake(listener: &Listener, session: &Session, request: &SaslHandshakeRequest) -> (SaslHandshakeResponse, After) {
    let mut response = SaslHandshakeResponse::default();
    let Some(settings) = &listener.settings.sasl else {
        response.error_code = error_code::UNSUPPORTED_SASL_MECHANISM;
        return (response, After::Close);
    };
    response.mechanisms =
        settings.mechanisms.iter().map(|mechanism| StrBytes::from_static_str(mechanism.name())).collect();
    let mut conversation = session.sasl.borrow_mut();
    let conversation = conversation.get_or_insert_with(|| SaslConversation::new(settings.mechanisms.clone()));
    match conversation.handshake(request.mechanism.as_str()) {
        Ok(mechanism) => {
            session.mechanism.set(Some(mechanism));
            (response, After::GoOn)
        }
        Err(HandshakeRefusal::Unsupported) => {
            response.error_code = error_code::UNSUPPORTED_SASL_MECHANISM;
            (response, After::Close)
        }
        Err(HandshakeRefusal::OutOfOrder) => {
            response.error_code = error_code::ILLEGAL_SASL_STATE;
            (response, After::Close)
        }
    }
}

fn authenticate(
    listener: &Listener,
    session: &Session,
    request: &SaslAuthenticateRequest,
) -> (SaslAuthenticateResponse, After) {
    let mut response = SaslAuthenticateResponse::default();
    let failed = |response: &mut SaslAuthenticateResponse, why: String| {
        response.error_code = error_code::SASL_AUTHENTICATION_FAILED;
        response.error_message = Some(StrBytes::from_string(why));
    };
    let mut conversation = session.sasl.borrow_mut();
    let (Some(settings), Some(conversation)) = (&listener.settings.sasl, conversation.as_mut()) else {
        failed(&mut response, "SaslAuthenticate before SaslHandshake".into());
        return (response, After::Close);
    };
    // A fresh server nonce from the ring provider's system randomness.
    let mut bytes = [0u8; SCRAM_NONCE_BYTES];
    if rustls::crypto::ring::default_provider().secure_random.fill(&mut bytes).is_err() {
        failed(&mut response, "no system randomness for the SCRAM nonce".into());
        return (response, After::Close);
    }
    let nonce = nonce_text(&bytes);
    let step = conversation
        .authenticate(&request.auth_bytes, &nonce, |user, mechanism| settings.credentials.lookup(user, mechanism));
    match step {
        AuthStep::Continue(bytes) => {
            response.auth_bytes = Bytes::from(bytes);
            (response, After::GoOn)
        }
        AuthStep::Done { username, mechanism, response: bytes } => {
            listener.metrics.authenticated(metric_mechanism(mechanism));
            let principal = format!("User:{username}");
            tracing::info!(%principal, mechanism = mechanism.name(), "Kafka client authenticated");
            session.authenticate(listener, principal);
            response.auth_bytes = Bytes::from(bytes);
            (response, After::GoOn)
        }
        AuthStep::Failed { mechanism, why } => {
            if let Some(mechanism) = mechanism.or(session.mechanism.get()) {
                listener.metrics.authentication_failed(metric_mechanism(mechanism));
            }
            failed(&mut response, format!("Authentication failed: {why}"));
            (response, After::Close)
        }
    }
}
