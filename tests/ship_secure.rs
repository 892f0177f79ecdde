//! Upstream shipping over TLS and SASL, against real peers on loopback:
//! - TLS: tansu behind Debian's stunnel4 (OpenSSL), which requires a client certificate
//!   and verifies it against the test's CA (made with rcgen by `weir certs` code);
//!   tansu advertises the stunnel port, so every connection (weir's and the reader's)
//!   is TLS.
//! - SASL: tansu behind tests/python/sasl_proxy.py, whose SCRAM server is the
//!   independent `scramp` package (PLAIN is checked by the proxy itself).
//!
//! The shipper's security settings are written as `[upstream]` TOML, validated and
//! loaded as `weir serve` does. Records appended through `PartitionLog` must reach the
//! upstream partition exactly once, in order, every field compared by confluent-kafka
//! (check.crcs=true, itself connecting over TLS / SASL); a wrong CA, a missing client
//! certificate, a wrong password and a broker that cannot prove the SCRAM credential
//! must stop shipping with a clear error, once, without retrying.
//!
//! Needs `tools/install-broker` (tansu, confluent-kafka, stunnel4) and
//! tests/python/requirements.txt (scramp) in ./.venv.

#[path = "common/broker.rs"]
mod broker;
mod common;
#[path = "common/secure.rs"]
mod secure;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker::{assert_exactly_once, free_port, read_upstream_with, Tansu};
use bytes::Bytes;
use common::{read_all, run, small_options};
use secure::{unrelated_ca, Pki, SaslProxy, Stunnel, BROKER_NAME};
use weir::config::{Config, Host};
use weir::core::log::batch::{Header, Record};
use weir::core::ship::{ShipConfig, UpstreamPartition};
use weir::shell::kafka::ClientOptions;
use weir::shell::kafka_secure::Security;
use weir::shell::log::PartitionLog;
use weir::shell::metrics::{Metrics, ShipMetrics};
use weir::shell::ship::{self, ShipError, ShipperSetup};

/// Shipper logs on stderr (shown for failing tests), filtered by WEIR_LOG.
fn logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
}

/// The security an `[upstream]` section asks for, validated and loaded as at start.
fn security_from(bootstrap: &str, sections: &str) -> Security {
    let text = format!("[upstream]\nenabled = true\nbootstrap_servers = [{bootstrap:?}]\n{sections}");
    let config = Config::parse(&text, "test config").expect("the config parses");
    let valid = config.validate(&Host::probe(), "test config").unwrap_or_else(|error| panic!("{error}"));
    Security::load(&valid.config.upstream).expect("the security settings load")
}

fn setup(directory: &Path, bootstrap: &str, topic: &str, security: Security) -> ShipperSetup {
    ShipperSetup {
        name: "edge-0".into(),
        edge_topic: "edge".into(),
        edge_partition: 0,
        directory: directory.to_owned(),
        bootstrap_servers: vec![bootstrap.to_owned()],
        client: ClientOptions {
            client_id: "weir-secure-test".into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            security,
        },
        upstream: UpstreamPartition { topic: topic.to_owned(), partition: 0, partitions_exact: None },
        config: ShipConfig {
            batch_bytes_max: 64 << 10,
            in_flight_max: 5,
            read_ahead_bytes: 128 << 10,
            request_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(400),
            persist_interval: Duration::from_millis(100),
            bandwidth_bytes_per_s_max: 0,
            reconcile_scan_bytes_max: 1 << 30,
        },
        seed: 11,
    }
}

fn record(seed: u64) -> Record {
    Record {
        timestamp_ms: 1_700_000_000_000 + seed as i64,
        key: (!seed.is_multiple_of(5)).then(|| Bytes::from(format!("sensor-{}", seed % 13))),
        value: Some(Bytes::from(
            (0..(seed % 2000) as usize).map(|index| (seed as usize ^ index) as u8).collect::<Vec<_>>(),
        )),
        headers: (0..seed % 3)
            .map(|index| Header { key: format!("h{index}").into(), value: Some(Bytes::from(seed.to_string())) })
            .collect(),
    }
}

/// Ships `appends` groups of records (half before the shipper starts, half while it
/// runs) and returns what the log holds once the shipper has drained it.
fn ship_records(directory: &Path, setup: ShipperSetup, appends: u64) -> Vec<(i64, Record)> {
    let path = directory.join("edge-0");
    let setup = ShipperSetup { directory: path.clone(), ..setup };
    run(move || async move {
        let options = weir::shell::log::LogOptions { partition_bytes_max: 1 << 30, ..small_options() };
        let log = PartitionLog::open(&path, "edge-0", options, Metrics::new().partition("edge", 0)).await.unwrap();
        let append = |first: u64, count: u64| {
            let log = log.clone();
            async move {
                for index in first..first + count {
                    let records = (index * 10..index * 10 + 1 + index % 3).map(record).collect();
                    log.append(records).await.expect("append");
                }
            }
        };
        append(0, appends / 2).await;
        let metrics = Metrics::new().ship("edge", 0);
        let shutdown = Arc::new(AtomicBool::new(false));
        let shipper = glommio::spawn_local(ship::run(log.clone(), setup, metrics.clone(), shutdown.clone()));
        append(appends / 2, appends - appends / 2).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while metrics.cursor_offset.get() < log.next_offset() {
            assert!(
                Instant::now() < deadline,
                "not drained: cursor {} of {}",
                metrics.cursor_offset.get(),
                log.next_offset()
            );
            assert_eq!(metrics.stopped.get(), 0, "the shipper stopped");
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
        shutdown.store(true, Ordering::Release);
        shipper.await.expect("the shipper ends cleanly on shutdown");
        let local = read_all(&log).await;
        log.close().await.unwrap();
        local
    })
}

/// Runs a shipper that must stop by itself (bounded): its error and metrics.
fn ship_until_refused(directory: &Path, setup: ShipperSetup) -> (ShipError, ShipMetrics) {
    let path = directory.join("edge-0");
    let setup = ShipperSetup { directory: path.clone(), ..setup };
    run(move || async move {
        let log =
            PartitionLog::open(&path, "edge-0", small_options(), Metrics::new().partition("edge", 0)).await.unwrap();
        log.append((0..20).map(record).collect()).await.expect("append");
        let metrics = Metrics::new().ship("edge", 0);
        let shutdown = Arc::new(AtomicBool::new(false));
        let shipper = glommio::spawn_local(ship::run(log.clone(), setup, metrics.clone(), shutdown.clone()));
        // A stopped shipper marks itself stopped and then keeps the partition's lag
        // current until shutdown; it returns its error when shut down.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while metrics.stopped.get() == 0 {
            assert!(std::time::Instant::now() < deadline, "the shipper kept retrying for 30 s instead of stopping");
            glommio::timer::sleep(Duration::from_millis(10)).await;
        }
        shutdown.store(true, std::sync::atomic::Ordering::Release);
        let outcome = shipper.await;
        log.close().await.unwrap();
        let error = match outcome {
            Err(error) => error,
            Ok(()) => panic!("the shipper ended without an error"),
        };
        (error, metrics)
    })
}

/// tansu behind stunnel (client certificates required), advertising the stunnel port.
struct TlsBroker {
    tansu: Tansu,
    stunnel: Stunnel,
}

impl TlsBroker {
    fn start(pki: &Pki, directory: &Path) -> TlsBroker {
        let tansu_port = free_port();
        let tls_port = free_port();
        let tansu = Tansu::start_on(tansu_port, tls_port);
        tansu.create_topic("central", 1);
        let stunnel = Stunnel::start(pki, tls_port, tansu_port, directory);
        TlsBroker { tansu, stunnel }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.stunnel.port)
    }
}

fn tls_reader_settings(pki: &Pki) -> Vec<(&'static str, String)> {
    vec![
        ("security.protocol", "SSL".into()),
        ("ssl.ca.location", pki.ca().display().to_string()),
        ("ssl.certificate.location", pki.client_certificate().display().to_string()),
        ("ssl.key.location", pki.client_key().display().to_string()),
        ("ssl.endpoint.identification.algorithm", "none".into()),
    ]
}

#[test]
fn records_shipped_over_mutual_tls_reach_the_broker_exactly_once() {
    logs();
    let directory = tempfile::tempdir().unwrap();
    let pki = Pki::new(&directory.path().join("pki"));
    let broker = TlsBroker::start(&pki, directory.path());
    // Connecting to 127.0.0.1 but checking the name the broker's certificate carries.
    let security = security_from(
        &broker.address(),
        &format!(
            "[upstream.tls]\nenabled = true\nca_file = {:?}\ncertificate_file = {:?}\nkey_file = {:?}\nserver_name = {BROKER_NAME:?}\n",
            pki.ca(),
            pki.client_certificate(),
            pki.client_key()
        ),
    );
    // 1 MiB upstream batches: a Produce request spans many TLS records (rustls takes
    // at most 64 KiB of plaintext at a time).
    let mut setup = setup(directory.path(), &broker.address(), "central", security);
    setup.config.batch_bytes_max = 1 << 20;
    setup.config.read_ahead_bytes = 2 << 20;
    let local = ship_records(directory.path(), setup, 1500);
    let upstream = read_upstream_with(
        &broker.address(),
        "central",
        0,
        local.len(),
        Duration::from_secs(60),
        &tls_reader_settings(&pki),
    );
    assert_exactly_once("secure shipping", &upstream, &local);
    let log = broker.stunnel.log_text();
    assert!(log.contains("CN=weir-shipper"), "stunnel verified weir's client certificate: {log}");
    let bytes: usize = local.iter().map(|(_, record)| record.value.as_ref().map_or(0, Bytes::len)).sum();
    assert!(bytes > 2 << 20, "enough data for 1 MiB requests: {bytes} bytes of values");
    eprintln!("{} records ({bytes} bytes of values) shipped over mTLS through stunnel", local.len());
    drop(broker.tansu);
}

#[test]
fn the_broker_certificate_is_also_checked_against_its_ip_address_without_a_name_override() {
    logs();
    let directory = tempfile::tempdir().unwrap();
    let pki = Pki::new(&directory.path().join("pki"));
    let broker = TlsBroker::start(&pki, directory.path());
    // No server_name: the certificate must name 127.0.0.1 (it does: `weir certs`).
    let security = security_from(
        &broker.address(),
        &format!(
            "[upstream.tls]\nenabled = true\nca_file = {:?}\ncertificate_file = {:?}\nkey_file = {:?}\n",
            pki.ca(),
            pki.client_certificate(),
            pki.client_key()
        ),
    );
    let local = ship_records(directory.path(), setup(directory.path(), &broker.address(), "central", security), 40);
    let upstream = read_upstream_with(
        &broker.address(),
        "central",
        0,
        local.len(),
        Duration::from_secs(60),
        &tls_reader_settings(&pki),
    );
    assert_exactly_once("secure shipping", &upstream, &local);
}

#[test]
fn a_broker_certificate_from_another_ca_stops_shipping_with_a_clear_error() {
    logs();
    let directory = tempfile::tempdir().unwrap();
    let pki = Pki::new(&directory.path().join("pki"));
    let broker = TlsBroker::start(&pki, directory.path());
    // A CA of another name (nothing chains to it), and an impostor: a CA with the
    // test CA's very name but another key.
    let unrelated = unrelated_ca(&directory.path().join("unrelated-ca"));
    let impostor = Pki::new(&directory.path().join("impostor-pki")).ca();
    for (ca, why) in [(unrelated, "UnknownIssuer"), (impostor, "BadSignature")] {
        let security = security_from(
            &broker.address(),
            &format!(
                "[upstream.tls]\nenabled = true\nca_file = {ca:?}\ncertificate_file = {:?}\nkey_file = {:?}\nserver_name = {BROKER_NAME:?}\n",
                pki.client_certificate(),
                pki.client_key()
            ),
        );
        let run_directory = directory.path().join(why);
        let (error, metrics) =
            ship_until_refused(&run_directory, setup(&run_directory, &broker.address(), "central", security));
        let text = error.to_string();
        eprintln!("{text}");
        assert!(matches!(error, ShipError::Refused { .. }), "{text}");
        assert!(text.contains(&format!("the broker's certificate is refused ({why})")), "{text}");
        assert!(text.contains(&ca.display().to_string()), "the error names the CA file: {text}");
        assert_eq!((metrics.stopped.get(), metrics.refused.get()), (1, 1));
        assert_eq!(metrics.shipped_records.get(), 0);
    }
}

#[test]
fn a_shipper_without_a_client_certificate_is_refused_by_the_broker() {
    logs();
    let directory = tempfile::tempdir().unwrap();
    let pki = Pki::new(&directory.path().join("pki"));
    let broker = TlsBroker::start(&pki, directory.path());
    let security = security_from(
        &broker.address(),
        &format!("[upstream.tls]\nenabled = true\nca_file = {:?}\nserver_name = {BROKER_NAME:?}\n", pki.ca()),
    );
    let (error, metrics) =
        ship_until_refused(directory.path(), setup(directory.path(), &broker.address(), "central", security));
    let text = error.to_string();
    eprintln!("{text}");
    assert!(matches!(error, ShipError::Refused { .. }), "{text}");
    assert!(text.contains("client certificate"), "{text}");
    assert_eq!((metrics.stopped.get(), metrics.refused.get()), (1, 1));
}

/// tansu behind the SASL proxy, advertising the proxy's port.
struct SaslBroker {
    tansu: Tansu,
    proxy: SaslProxy,
}

const SHIPPER_USER: (&str, &str) = ("weir-site-17", "correct horse battery staple");
const READER_USER: (&str, &str) = ("reader", "reader-password");

impl SaslBroker {
    fn start(topics: &[&str], forge: bool) -> SaslBroker {
        let tansu_port = free_port();
        let proxy = SaslProxy::start(tansu_port, &[SHIPPER_USER, READER_USER], forge);
        let tansu = Tansu::start_on(tansu_port, proxy.port);
        for topic in topics {
            tansu.create_topic(topic, 1);
        }
        SaslBroker { tansu, proxy }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.proxy.port)
    }
}

fn sasl_reader_settings() -> Vec<(&'static str, String)> {
    vec![
        ("security.protocol", "SASL_PLAINTEXT".into()),
        ("sasl.mechanism", "SCRAM-SHA-512".into()),
        ("sasl.username", READER_USER.0.into()),
        ("sasl.password", READER_USER.1.into()),
    ]
}

#[test]
fn each_sasl_mechanism_authenticates_and_ships_exactly_once() {
    logs();
    let broker = SaslBroker::start(&["plain", "scram-256", "scram-512"], false);
    let directory = tempfile::tempdir().unwrap();
    let password_file = directory.path().join("upstream-password");
    std::fs::write(&password_file, format!("{}\n", SHIPPER_USER.1)).unwrap();
    // The password from a file for two mechanisms, from the environment for one.
    let variable = format!("WEIR_TEST_UPSTREAM_PASSWORD_{}", std::process::id());
    std::env::set_var(&variable, SHIPPER_USER.1);
    for (mechanism, topic, source) in [
        ("PLAIN", "plain", format!("password_file = {password_file:?}")),
        ("SCRAM-SHA-256", "scram-256", format!("password_env = {variable:?}")),
        ("SCRAM-SHA-512", "scram-512", format!("password_file = {password_file:?}")),
    ] {
        let security = security_from(
            &broker.address(),
            &format!("[upstream.sasl]\nmechanism = {mechanism:?}\nusername = {:?}\n{source}\n", SHIPPER_USER.0),
        );
        let run_directory = directory.path().join(topic);
        let local = ship_records(&run_directory, setup(&run_directory, &broker.address(), topic, security), 200);
        let upstream = read_upstream_with(
            &broker.address(),
            topic,
            0,
            local.len(),
            Duration::from_secs(60),
            &sasl_reader_settings(),
        );
        assert_exactly_once("secure shipping", &upstream, &local);
        let authenticated = format!("authenticated {mechanism} {}", SHIPPER_USER.0);
        assert!(broker.proxy.events().contains(&authenticated), "{mechanism}: {:?}", broker.proxy.events());
        eprintln!("{mechanism}: {} records shipped", local.len());
    }
    assert!(!broker.proxy.events().iter().any(|event| event.starts_with("refused")), "{:?}", broker.proxy.events());
    drop(broker.tansu);
}

#[test]
fn connections_closed_when_their_sasl_session_expires_are_reopened_and_ship_exactly_once() {
    logs();
    // The proxy ends the shipper's connections 40 ms after authentication, as a
    // Kafka broker with connections.max.reauth.ms does when a client does not
    // re-authenticate (weir does not: it reconnects, authenticates again and re-sends
    // what was in flight, which the broker de-duplicates).
    let tansu_port = free_port();
    let arguments = ["--session-lifetime-ms", "40", "--expire-user", SHIPPER_USER.0].map(str::to_owned);
    let proxy = SaslProxy::start_with(tansu_port, &[SHIPPER_USER, READER_USER], &arguments);
    let tansu = Tansu::start_on(tansu_port, proxy.port);
    tansu.create_topic("central", 1);
    let address = format!("127.0.0.1:{}", proxy.port);
    let directory = tempfile::tempdir().unwrap();
    let password_file = directory.path().join("upstream-password");
    std::fs::write(&password_file, SHIPPER_USER.1).unwrap();
    let security = security_from(
        &address,
        &format!(
            "[upstream.sasl]\nmechanism = \"SCRAM-SHA-512\"\nusername = {:?}\npassword_file = {password_file:?}\n",
            SHIPPER_USER.0
        ),
    );
    let local = ship_records(directory.path(), setup(directory.path(), &address, "central", security), 3000);
    let expired = proxy.events().iter().filter(|event| *event == "session expired").count();
    let shipper_logins = proxy
        .events()
        .iter()
        .filter(|event| **event == format!("authenticated SCRAM-SHA-512 {}", SHIPPER_USER.0))
        .count();
    // The reader's sessions do not expire.
    let upstream =
        read_upstream_with(&address, "central", 0, local.len(), Duration::from_secs(60), &sasl_reader_settings());
    assert_exactly_once("secure shipping", &upstream, &local);
    eprintln!("{} records; {shipper_logins} logins of the shipper, {expired} sessions expired", local.len());
    assert!(shipper_logins >= 3 && expired >= 2, "sessions expired while shipping: {:?}", proxy.events());
}

#[test]
fn a_wrong_password_stops_shipping_with_a_clear_error_and_is_not_retried() {
    logs();
    for mechanism in ["SCRAM-SHA-256", "PLAIN"] {
        let broker = SaslBroker::start(&["central"], false);
        let directory = tempfile::tempdir().unwrap();
        let password_file = directory.path().join("upstream-password");
        std::fs::write(&password_file, "not the password\n").unwrap();
        let security = security_from(
            &broker.address(),
            &format!(
                "[upstream.sasl]\nmechanism = {mechanism:?}\nusername = {:?}\npassword_file = {password_file:?}\n",
                SHIPPER_USER.0
            ),
        );
        let (error, metrics) =
            ship_until_refused(directory.path(), setup(directory.path(), &broker.address(), "central", security));
        let text = error.to_string();
        eprintln!("{text}");
        assert!(matches!(error, ShipError::Refused { .. }), "{text}");
        assert!(text.contains(&format!("SASL {mechanism} as user \"{}\"", SHIPPER_USER.0)), "{text}");
        assert!(text.contains("SASL_AUTHENTICATION_FAILED"), "{text}");
        assert!(!text.contains("not the password"), "the password is never printed: {text}");
        assert_eq!((metrics.stopped.get(), metrics.refused.get()), (1, 1));
        // One attempt, not a retry loop.
        std::thread::sleep(Duration::from_millis(300));
        let refusals: Vec<_> = broker.proxy.events().into_iter().filter(|event| event.starts_with("refused")).collect();
        assert_eq!(refusals.len(), 1, "{mechanism}: {refusals:?}");
    }
}

#[test]
fn a_mechanism_the_broker_does_not_offer_is_refused_with_what_it_offers() {
    logs();
    let tansu_port = free_port();
    let proxy = SaslProxy::start_offering(tansu_port, &[SHIPPER_USER], false, "SCRAM-SHA-512");
    let tansu = Tansu::start_on(tansu_port, proxy.port);
    tansu.create_topic("central", 1);
    let address = format!("127.0.0.1:{}", proxy.port);
    let directory = tempfile::tempdir().unwrap();
    let password_file = directory.path().join("upstream-password");
    std::fs::write(&password_file, SHIPPER_USER.1).unwrap();
    let security = security_from(
        &address,
        &format!(
            "[upstream.sasl]\nmechanism = \"SCRAM-SHA-256\"\nusername = {:?}\npassword_file = {password_file:?}\n",
            SHIPPER_USER.0
        ),
    );
    let (error, metrics) = ship_until_refused(directory.path(), setup(directory.path(), &address, "central", security));
    let text = error.to_string();
    eprintln!("{text}");
    assert!(text.contains("does not offer this mechanism; it offers [\"SCRAM-SHA-512\"]"), "{text}");
    assert_eq!(metrics.refused.get(), 1);
}

#[test]
fn a_broker_that_cannot_prove_the_scram_credential_is_refused() {
    logs();
    let broker = SaslBroker::start(&["central"], true);
    let directory = tempfile::tempdir().unwrap();
    let password_file = directory.path().join("upstream-password");
    std::fs::write(&password_file, SHIPPER_USER.1).unwrap();
    let security = security_from(
        &broker.address(),
        &format!(
            "[upstream.sasl]\nmechanism = \"SCRAM-SHA-512\"\nusername = {:?}\npassword_file = {password_file:?}\n",
            SHIPPER_USER.0
        ),
    );
    let (error, metrics) =
        ship_until_refused(directory.path(), setup(directory.path(), &broker.address(), "central", security));
    let text = error.to_string();
    eprintln!("{text}");
    assert!(matches!(error, ShipError::Refused { .. }), "{text}");
    assert!(text.contains("SCRAM signature is wrong"), "{text}");
    assert_eq!(metrics.shipped_records.get(), 0, "nothing is sent to a broker that did not prove itself");
}

#[test]
fn scram_over_mutual_tls_ships_exactly_once() {
    logs();
    let directory = tempfile::tempdir().unwrap();
    let pki = Pki::new(&directory.path().join("pki"));
    // weir -> stunnel (mTLS) -> SASL proxy -> tansu, tansu advertising stunnel's port.
    let tansu_port = free_port();
    let tls_port = free_port();
    let proxy = SaslProxy::start(tansu_port, &[SHIPPER_USER, READER_USER], false);
    let tansu = Tansu::start_on(tansu_port, tls_port);
    tansu.create_topic("central", 1);
    let stunnel = Stunnel::start(&pki, tls_port, proxy.port, directory.path());
    let address = format!("127.0.0.1:{}", stunnel.port);
    let variable = format!("WEIR_TEST_UPSTREAM_PASSWORD_TLS_{}", std::process::id());
    std::env::set_var(&variable, SHIPPER_USER.1);
    let security = security_from(
        &address,
        &format!(
            "[upstream.tls]\nenabled = true\nca_file = {:?}\ncertificate_file = {:?}\nkey_file = {:?}\nserver_name = {BROKER_NAME:?}\n[upstream.sasl]\nmechanism = \"SCRAM-SHA-512\"\nusername = {:?}\npassword_env = {variable:?}\n",
            pki.ca(),
            pki.client_certificate(),
            pki.client_key(),
            SHIPPER_USER.0
        ),
    );
    let local = ship_records(directory.path(), setup(directory.path(), &address, "central", security), 200);
    let mut settings = tls_reader_settings(&pki);
    settings[0].1 = "SASL_SSL".into();
    settings.extend(sasl_reader_settings().into_iter().skip(1));
    let upstream = read_upstream_with(&address, "central", 0, local.len(), Duration::from_secs(60), &settings);
    assert_exactly_once("secure shipping", &upstream, &local);
    assert!(
        proxy.events().contains(&format!("authenticated SCRAM-SHA-512 {}", SHIPPER_USER.0)),
        "{:?}",
        proxy.events()
    );
}

/// The same log settings as the `[log]` section `serve_config` writes.
fn serve_log_options() -> weir::shell::log::LogOptions {
    weir::shell::log::LogOptions {
        segment_bytes_max: 256 << 10,
        segment_age_max: Duration::from_secs(3600),
        index_interval_bytes: 16 << 10,
        preallocate_bytes: 1 << 20,
        flush_delay_max: Duration::from_micros(200),
        flush_bytes_max: 64 << 10,
        core_flushes_per_s_max: 1000,
        appends_pending_max: 256,
        partition_bytes_max: 1 << 30,
    }
}

/// A `weir serve` config shipping edge topic "telemetry" (1 partition) to "central"
/// with the given `[upstream.tls]` / `[upstream.sasl]` sections; QUIC off.
fn serve_config(directory: &Path, bootstrap: &str, admin: &str, security: &str) -> std::path::PathBuf {
    let path = directory.join("weir.toml");
    let text = format!(
        r#"data_dir = "{data_dir}"
[engine]
io_memory_bytes = "8 MiB"
[log]
segment_bytes_max = "256 KiB"
index_interval_bytes = "16 KiB"
preallocate_bytes = "1 MiB"
flush_delay_us_max = 200
flush_bytes_max = "64 KiB"
appends_pending_max = 256
partition_bytes_max = "1 GiB"
[admin]
listen = "{admin}"
[kafka_api]
listen = "127.0.0.1:0"
[quic]
enabled = false
[upstream]
enabled = true
bootstrap_servers = ["{bootstrap}"]
connect_timeout_ms = 2000
request_timeout_ms = 5000
retry_backoff_ms_min = 20
retry_backoff_ms_max = 300
[[upstream.topics]]
edge = "telemetry"
upstream = "central"
{security}
[[topics]]
name = "telemetry"
partitions = 1
"#,
        data_dir = directory.join("data").display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Appends `count` records to the edge partition "telemetry-0" under `directory/data`.
fn append_edge(directory: &Path, count: u64) -> Vec<(i64, Record)> {
    let partition = directory.join("data/telemetry-0");
    run(move || async move {
        let log = PartitionLog::open(
            &partition,
            "telemetry-0",
            serve_log_options(),
            Metrics::new().partition("telemetry", 0),
        )
        .await
        .unwrap();
        for first in (0..count).step_by(4) {
            log.append((first..(first + 4).min(count)).map(record).collect()).await.expect("append");
        }
        let local = read_all(&log).await;
        log.close().await.unwrap();
        local
    })
}

fn http_get(address: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// SIGTERM, through the `kill` command (no unsafe code in tests).
fn sigterm(child: &std::process::Child) {
    let status = std::process::Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    assert!(status.success());
}

/// `weir serve` with the config, the password in `WEIR_UPSTREAM_PASSWORD`.
fn weir_serve(config: &Path, password: &str, output: &Path) -> std::process::Child {
    let log = std::fs::File::create(output).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["serve", "--cores", "1", "--config"])
        .arg(config)
        .env("WEIR_LOG", "info")
        .env("WEIR_UPSTREAM_PASSWORD", password)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("weir starts")
}

#[test]
fn weir_serve_ships_over_mutual_tls_and_scram_and_reports_a_wrong_password_in_its_metrics() {
    logs();
    let directory = tempfile::tempdir().unwrap();
    let pki = Pki::new(&directory.path().join("pki"));
    let tansu_port = free_port();
    let tls_port = free_port();
    let proxy = SaslProxy::start(tansu_port, &[SHIPPER_USER, READER_USER], false);
    let tansu = Tansu::start_on(tansu_port, tls_port);
    tansu.create_topic("central", 1);
    let stunnel = Stunnel::start(&pki, tls_port, proxy.port, directory.path());
    let address = format!("127.0.0.1:{}", stunnel.port);
    let security = format!(
        "[upstream.tls]\nenabled = true\nca_file = {:?}\ncertificate_file = {:?}\nkey_file = {:?}\nserver_name = {BROKER_NAME:?}\n[upstream.sasl]\nmechanism = \"SCRAM-SHA-256\"\nusername = {:?}\npassword_env = \"WEIR_UPSTREAM_PASSWORD\"\n",
        pki.ca(),
        pki.client_certificate(),
        pki.client_key(),
        SHIPPER_USER.0
    );
    let mut settings = tls_reader_settings(&pki);
    settings[0].1 = "SASL_SSL".into();
    settings.extend(sasl_reader_settings().into_iter().skip(1));

    // The right password: everything reaches the broker, then a clean stop.
    let run_directory = directory.path().join("right");
    let local = append_edge(&run_directory, 600);
    let admin = format!("127.0.0.1:{}", free_port());
    let config = serve_config(&run_directory, &address, &admin, &security);
    let output = run_directory.join("weir.log");
    let child = weir_serve(&config, SHIPPER_USER.1, &output);
    let upstream = read_upstream_with(&address, "central", 0, local.len(), Duration::from_secs(60), &settings);
    sigterm(&child);
    let status = { child }.wait_with_output().unwrap().status;
    let weir_output = std::fs::read_to_string(&output).unwrap_or_default();
    assert!(status.success(), "weir stops cleanly: {status}\n{weir_output}");
    assert_exactly_once("secure shipping", &upstream, &local);
    assert!(!weir_output.contains("shipping stopped"), "{weir_output}");

    // A wrong password: weir keeps running (the partition keeps its data), the shipper
    // stops once with the reason in the log and weir_ship_refused = 1 in /metrics.
    let run_directory = directory.path().join("wrong");
    append_edge(&run_directory, 40);
    let admin = format!("127.0.0.1:{}", free_port());
    let config = serve_config(&run_directory, &address, &admin, &security);
    let output = run_directory.join("weir.log");
    let child = weir_serve(&config, "not the password", &output);
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let metrics = std::net::TcpStream::connect(&admin).ok().map(|_| http_get(&admin, "/metrics"));
        if let Some(metrics) = metrics.filter(|text| {
            text.contains("weir_ship_refused{")
                && !text.contains("weir_ship_refused{topic=\"telemetry\",partition=\"0\"} 0")
        }) {
            break metrics;
        }
        assert!(Instant::now() < deadline, "no refusal in /metrics after 30 s");
        std::thread::sleep(Duration::from_millis(100));
    };
    sigterm(&child);
    let status = { child }.wait_with_output().unwrap().status;
    let weir_output = std::fs::read_to_string(&output).unwrap_or_default();
    assert!(status.success(), "weir keeps serving and stops cleanly: {status}\n{weir_output}");
    assert!(metrics.contains("weir_ship_refused{topic=\"telemetry\",partition=\"0\"} 1"), "{metrics}");
    assert!(metrics.contains("weir_ship_stopped{topic=\"telemetry\",partition=\"0\"} 1"), "{metrics}");
    assert!(
        weir_output.contains("SASL_AUTHENTICATION_FAILED") && weir_output.contains("upstream shipping stopped"),
        "{weir_output}"
    );
    assert!(!weir_output.contains("not the password"), "the password is never logged");
    let refusals = proxy.events().into_iter().filter(|event| event.starts_with("refused")).count();
    assert_eq!(refusals, 1, "one attempt, no retry loop: {:?}", proxy.events());
    drop(stunnel);
}
