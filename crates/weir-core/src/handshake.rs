//! Handshake admission: what one core does with a client's first packet, and when a
//! handshake that has not finished is given up. Pure: the listener passes its load and
//! the time (`shell::quic`).
//!
//! A handshake costs a core its TLS work (a signature, a key exchange, the client's
//! chain checked). A core works on the handshakes it admitted all at once, so the
//! more it holds the longer each takes; past the device's connect timeout every one of
//! them is abandoned and the work is lost (issue 18: with 4,096 per core admitted after
//! a restart, 8,339 of 24,455 handshakes of a 10,000-device fleet failed that way). So
//! the rule bounds the handshakes in progress, not the clients waiting:
//!
//! 1. Refused, answered at once with CONNECTION_REFUSED (one small packet under the
//!    initial keys; no TLS work): while the listener shuts down, at `connections_max`,
//!    or with `handshakes_max` handshakes in progress on the core. The device backs off
//!    (capped exponential, full jitter) and comes back.
//! 2. Asked to prove its address (Retry) when it has not yet and `handshakes_before_retry`
//!    handshakes are in progress: a flood from forged addresses then holds at most that
//!    many places, and devices that answer the Retry get the rest.
//! 3. Otherwise accepted.
//!
//! A handshake still in progress `handshake_timeout` after it was accepted is closed
//! (the device gave up on it, or cannot finish it), so its place goes to the next.

use std::time::{Duration, Instant};

/// The limits of one core (from `[quic]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeLimits {
    pub connections_max: usize,
    pub handshakes_before_retry: usize,
    pub handshakes_max: usize,
    pub handshake_timeout: Duration,
}

/// What the core holds when a client's first packet arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoreLoad {
    pub shutting_down: bool,
    pub connections: usize,
    pub handshaking: usize,
}

/// What the client that sent it learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Accept,
    /// Prove your address: a Retry packet with a token.
    Retry,
    /// CONNECTION_REFUSED, for the reason named (`weir_quic_refusals_total{reason}`).
    Refuse(Refusal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    ShuttingDown,
    ConnectionsMax,
    HandshakesMax,
}

impl Refusal {
    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::ShuttingDown => "shutting_down",
            Refusal::ConnectionsMax => "connections_max",
            Refusal::HandshakesMax => "handshakes_max",
        }
    }
}

/// The decision for a new client. `address_validated`: it answered a Retry (or
/// presented a token); `may_retry`: a Retry is still possible (one per connection).
pub fn admit(limits: &HandshakeLimits, load: CoreLoad, address_validated: bool, may_retry: bool) -> Admission {
    if load.shutting_down {
        Admission::Refuse(Refusal::ShuttingDown)
    } else if load.connections >= limits.connections_max {
        Admission::Refuse(Refusal::ConnectionsMax)
    } else if load.handshaking >= limits.handshakes_max {
        Admission::Refuse(Refusal::HandshakesMax)
    } else if !address_validated && may_retry && load.handshaking >= limits.handshakes_before_retry {
        Admission::Retry
    } else {
        Admission::Accept
    }
}

/// When a handshake accepted at `accepted` is given up.
pub fn handshake_deadline(limits: &HandshakeLimits, accepted: Instant) -> Instant {
    accepted + limits.handshake_timeout
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> HandshakeLimits {
        HandshakeLimits {
            connections_max: 100,
            handshakes_before_retry: 4,
            handshakes_max: 8,
            handshake_timeout: Duration::from_secs(10),
        }
    }

    fn load(connections: usize, handshaking: usize) -> CoreLoad {
        CoreLoad { shutting_down: false, connections, handshaking }
    }

    #[test]
    fn below_the_retry_threshold_every_client_is_accepted() {
        for handshaking in 0..4 {
            assert_eq!(admit(&limits(), load(50, handshaking), false, true), Admission::Accept);
        }
    }

    #[test]
    fn between_the_thresholds_unproven_clients_get_a_retry_and_proven_ones_are_accepted() {
        for handshaking in 4..8 {
            assert_eq!(admit(&limits(), load(50, handshaking), false, true), Admission::Retry);
            assert_eq!(admit(&limits(), load(50, handshaking), true, false), Admission::Accept);
            // A client that already had its one Retry (and somehow is not validated) is
            // not asked again.
            assert_eq!(admit(&limits(), load(50, handshaking), false, false), Admission::Accept);
        }
    }

    #[test]
    fn at_handshakes_max_every_client_is_refused_proven_or_not() {
        for validated in [false, true] {
            assert_eq!(admit(&limits(), load(50, 8), validated, !validated), Admission::Refuse(Refusal::HandshakesMax));
            assert_eq!(admit(&limits(), load(50, 9), validated, !validated), Admission::Refuse(Refusal::HandshakesMax));
        }
    }

    #[test]
    fn connections_max_and_shutdown_refuse_before_anything_else() {
        assert_eq!(admit(&limits(), load(100, 0), true, false), Admission::Refuse(Refusal::ConnectionsMax));
        let closing = CoreLoad { shutting_down: true, ..load(0, 0) };
        assert_eq!(admit(&limits(), closing, true, false), Admission::Refuse(Refusal::ShuttingDown));
        assert_eq!(Refusal::HandshakesMax.name(), "handshakes_max");
    }

    #[test]
    fn a_retry_threshold_at_or_above_the_maximum_means_no_retry() {
        let limits = HandshakeLimits { handshakes_before_retry: 8, ..limits() };
        for handshaking in 0..8 {
            assert_eq!(admit(&limits, load(0, handshaking), false, true), Admission::Accept);
        }
        assert_eq!(admit(&limits, load(0, 8), false, true), Admission::Refuse(Refusal::HandshakesMax));
    }

    #[test]
    fn a_handshake_is_given_up_its_timeout_after_it_was_accepted() {
        let at = Instant::now();
        assert_eq!(handshake_deadline(&limits(), at), at + Duration::from_secs(10));
    }
}
