//! Who may read which topic through the Kafka API: the one decision, asked by the
//! shell for each connection's principal.
//!
//! Without authentication (plain loopback, the default) every client reads every
//! topic, as before security existed. Once the listener authenticates its clients
//! (mTLS or SASL), the default is deny: a principal reads a topic only if a rule names
//! it (`User:NAME`, or `User:*` for every authenticated client) with that topic (or
//! `*`: every topic). Metadata lists only the permitted topics; a topic asked for by name, or
//! fetched, listed, committed or fetched offsets for, that the principal may not read
//! is TOPIC_AUTHORIZATION_FAILED, as Kafka answers.

use std::collections::BTreeSet;

/// Names every principal in a rule.
pub const ANY_PRINCIPAL: &str = "User:*";
/// Names every topic in a rule.
pub const ANY_TOPIC: &str = "*";
/// The prefix of every principal weir makes.
pub const PRINCIPAL_PREFIX: &str = "User:";

/// The principal of an authenticated user name (SASL) or certificate CN (mTLS).
pub fn principal(name: &str) -> String {
    format!("{PRINCIPAL_PREFIX}{name}")
}

/// One rule: `principal` may read `topics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub principal: String,
    pub topics: Vec<String>,
}

/// The listener's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    /// False without authentication: everything is readable.
    enforced: bool,
    rules: Vec<Rule>,
}

/// What one connection may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permissions {
    Everything,
    Topics(BTreeSet<String>),
}

impl Permissions {
    pub fn may_read(&self, topic: &str) -> bool {
        match self {
            Permissions::Everything => true,
            Permissions::Topics(topics) => topics.contains(topic),
        }
    }
}

impl Acl {
    /// No authentication: every client reads every topic.
    pub fn open() -> Acl {
        Acl { enforced: false, rules: Vec::new() }
    }

    /// Authentication is on: only what `rules` permit.
    pub fn enforced(rules: Vec<Rule>) -> Acl {
        Acl { enforced: true, rules }
    }

    pub fn is_enforced(&self) -> bool {
        self.enforced
    }

    /// What `principal` (None: the client did not authenticate) may read of
    /// `topics` (every edge topic).
    pub fn permissions<'topic>(
        &self,
        principal: Option<&str>,
        topics: impl IntoIterator<Item = &'topic str>,
    ) -> Permissions {
        if !self.enforced {
            return Permissions::Everything;
        }
        let Some(principal) = principal else { return Permissions::Topics(BTreeSet::new()) };
        let applying: Vec<&Rule> =
            self.rules.iter().filter(|rule| rule.principal == principal || rule.principal == ANY_PRINCIPAL).collect();
        if applying.iter().any(|rule| rule.topics.iter().any(|named| named == ANY_TOPIC)) {
            return Permissions::Everything;
        }
        let permitted = topics
            .into_iter()
            .filter(|topic| applying.iter().any(|rule| rule.topics.iter().any(|named| named == topic)))
            .map(str::to_owned)
            .collect();
        Permissions::Topics(permitted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOPICS: [&str; 3] = ["telemetry", "alarms", "secret"];

    fn acl() -> Acl {
        Acl::enforced(vec![
            Rule { principal: "User:dashboard".into(), topics: vec!["telemetry".into(), "alarms".into()] },
            Rule { principal: "User:ops".into(), topics: vec![ANY_TOPIC.into()] },
            Rule { principal: ANY_PRINCIPAL.into(), topics: vec!["alarms".into()] },
        ])
    }

    #[test]
    fn without_authentication_everything_is_readable() {
        assert_eq!(Acl::open().permissions(None, TOPICS), Permissions::Everything);
        assert!(Acl::open().permissions(Some("User:anyone"), TOPICS).may_read("secret"));
    }

    #[test]
    fn with_authentication_a_principal_reads_only_what_a_rule_names() {
        let acl = acl();
        let dashboard = acl.permissions(Some("User:dashboard"), TOPICS);
        assert!(dashboard.may_read("telemetry") && dashboard.may_read("alarms") && !dashboard.may_read("secret"));
        let ops = acl.permissions(Some("User:ops"), TOPICS);
        assert!(TOPICS.iter().all(|topic| ops.may_read(topic)));
        // Every authenticated client reads alarms; nothing else by default.
        let stranger = acl.permissions(Some("User:stranger"), TOPICS);
        assert!(stranger.may_read("alarms") && !stranger.may_read("telemetry"));
        // A connection without a principal reads nothing.
        assert_eq!(acl.permissions(None, TOPICS), Permissions::Topics(BTreeSet::new()));
        // A "*" rule reads every topic (an unknown one is then UNKNOWN_TOPIC_OR_PARTITION,
        // not an authorization failure); a named rule covers only its topics.
        assert_eq!(ops, Permissions::Everything);
        assert!(!dashboard.may_read("not-an-edge-topic"));
        // Names are exact: no prefix or case folding.
        assert!(!acl.permissions(Some("User:Dashboard"), TOPICS).may_read("telemetry"));
        assert!(!acl.permissions(Some("dashboard"), TOPICS).may_read("telemetry"));
    }
}
