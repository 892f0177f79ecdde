//! The doctor's certificate checks: the `[quic]` PKI files (`ca.pem`, `server.pem`,
//! `server.key` in `quic.certs_dir`) are present and readable, the server certificate
//! chains to the CA, the key belongs to the certificate, how many days are left, no
//! private key in the directory is readable by group or others, and the server
//! certificate does not come from weir's development CA.
//!
//! Judging is pure: it takes the files' bytes (or why they could not be read) and the
//! time as a Unix timestamp, so tests make expired, mismatched and foreign PKIs with
//! rcgen and check the verdicts without waiting for a clock. Verification is rustls's
//! own (webpki path building with the ring provider, as the listener uses), so the
//! doctor accepts exactly what the listener and the devices will.
//!
//! The chain check is made at a time inside every certificate's validity when one
//! exists, so an expired certificate is reported once, by `certificates.expiry`, and
//! not again as a broken chain.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::sign::CertifiedKey;

use crate::doctor::{Check, Status};

/// The largest PKI file the doctor reads.
pub const PEM_FILE_BYTES_MAX: u64 = 1 << 20;
/// Below this many days left, the expiry check warns.
pub const EXPIRY_WARN_DAYS: i64 = 30;
const DAY_S: i64 = 86_400;

/// Why a file could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadFailure {
    Missing,
    Unreadable(String),
}

/// What reading one PKI file gave.
pub type FileRead = Result<Vec<u8>, ReadFailure>;

/// The facts the certificate checks judge.
#[derive(Debug, Clone)]
pub struct CertificateFacts {
    /// `quic.certs_dir` as written in the config.
    pub directory: String,
    pub generate_dev_certs: bool,
    pub ca: FileRead,
    pub certificate: FileRead,
    pub key: FileRead,
    /// Every private key (`*.key`) in the directory and its `devices/`, with its
    /// permission bits (or why they could not be read).
    pub key_modes: Vec<KeyMode>,
    pub now_unix_s: i64,
}

/// A private key file's permission bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMode {
    pub path: String,
    pub mode: u32,
}

/// The names of the checks, in report order.
pub const NAMES: [&str; 6] =
    ["certificates.files", "certificates.chain", "certificates.key", "certificates.expiry", KEY_MODE, DEVELOPMENT_CA];
/// The check that no private key is readable by group or others.
pub const KEY_MODE: &str = "certificates.key_mode";
/// The check that the server certificate is not from `weir certs`' development CA.
pub const DEVELOPMENT_CA: &str = "certificates.development_ca";
/// The organization every certificate of `weir certs` names (`crate::certs`).
pub const DEVELOPMENT_ORGANIZATION: &str = "weir development PKI";

/// The private keys (`*.key`) of `directory` and `directory/devices`, with their modes.
fn key_modes(directory: &Path) -> Vec<KeyMode> {
    use std::os::unix::fs::PermissionsExt;
    let mut found = Vec::new();
    for folder in [directory.to_owned(), directory.join("devices")] {
        let Ok(entries) = std::fs::read_dir(&folder) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|extension| extension != "key") {
                continue;
            }
            if let Ok(metadata) = std::fs::metadata(&path) {
                found.push(KeyMode { path: path.display().to_string(), mode: metadata.permissions().mode() & 0o7777 });
            }
        }
    }
    found.sort_by(|left, right| left.path.cmp(&right.path));
    found
}

/// Reads the three files of `directory`.
pub fn read_facts(directory: &Path, generate_dev_certs: bool, now_unix_s: i64) -> CertificateFacts {
    let read = |name: &str| -> FileRead {
        let path = directory.join(name);
        match std::fs::metadata(&path) {
            Ok(metadata) if metadata.len() > PEM_FILE_BYTES_MAX => {
                return Err(ReadFailure::Unreadable(format!(
                    "{} bytes, more than a PEM file of certificates holds ({PEM_FILE_BYTES_MAX})",
                    metadata.len()
                )))
            }
            _ => {}
        }
        match std::fs::read(&path) {
            Ok(bytes) => Ok(bytes),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Err(ReadFailure::Missing),
            Err(error) => Err(ReadFailure::Unreadable(error.to_string())),
        }
    };
    CertificateFacts {
        directory: directory.display().to_string(),
        generate_dev_certs,
        ca: read("ca.pem"),
        certificate: read("server.pem"),
        key: read("server.key"),
        key_modes: key_modes(directory),
        now_unix_s,
    }
}

fn check(name: &'static str, status: Status, saw: String, fix: Option<String>) -> Check {
    Check { name, status, saw, fix }
}

fn skipped(reason: &str) -> Vec<Check> {
    NAMES[1..4].iter().map(|name| check(name, Status::Skip, reason.to_owned(), None)).collect()
}

/// One certificate's validity window and subject, from x509-parser.
#[derive(Debug, Clone)]
struct Validity {
    subject: String,
    issuer: String,
    not_before_unix_s: i64,
    not_after_unix_s: i64,
    not_after_text: String,
}

fn validity(der: &CertificateDer<'_>) -> Result<Validity, String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).map_err(|error| error.to_string())?;
    let window = certificate.validity();
    Ok(Validity {
        subject: certificate.subject().to_string(),
        issuer: certificate.issuer().to_string(),
        not_before_unix_s: window.not_before.timestamp(),
        not_after_unix_s: window.not_after.timestamp(),
        not_after_text: window.not_after.to_string(),
    })
}

fn certificates(bytes: &[u8], path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates: Vec<_> = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<_, _>>()
        .map_err(|error| format!("{path} is not PEM: {error}"))?;
    if certificates.is_empty() {
        return Err(format!("{path} holds no PEM certificate"));
    }
    Ok(certificates)
}

/// Every certificate check, in `NAMES` order.
pub fn judge(facts: &CertificateFacts) -> Vec<Check> {
    let mut checks = judge_files(facts);
    checks.push(key_mode_check(&facts.key_modes));
    checks.push(development_ca_check(facts));
    checks
}

/// A key readable by anyone but its owner fails: the TLS identity (or, for `ca.key`, the
/// power to mint device identities) is only as private as the file.
fn key_mode_check(keys: &[KeyMode]) -> Check {
    if keys.is_empty() {
        return check(KEY_MODE, Status::Skip, "no private key (*.key) to check".into(), None);
    }
    let open: Vec<&KeyMode> = keys.iter().filter(|key| key.mode & 0o077 != 0).collect();
    if open.is_empty() {
        let listed = keys.iter().map(|key| format!("{} {:04o}", key.path, key.mode)).collect::<Vec<_>>().join(", ");
        return check(KEY_MODE, Status::Ok, format!("readable by their owner only: {listed}"), None);
    }
    let listed = open
        .iter()
        .map(|key| format!("{} is {:04o} ({})", key.path, key.mode, who_else_reads(key.mode)))
        .collect::<Vec<_>>()
        .join("; ");
    let paths = open.iter().map(|key| key.path.as_str()).collect::<Vec<_>>().join(" ");
    check(
        KEY_MODE,
        Status::Fail,
        format!("private keys readable by others than their owner: {listed}"),
        Some(format!(
            "chmod 0600 {paths} && chown weir: {paths} (serve runs as weir; `weir certs` writes keys 0600); a key \
             others could read is compromised: re-issue it if the host is shared"
        )),
    )
}

fn who_else_reads(mode: u32) -> &'static str {
    match (mode & 0o070 != 0, mode & 0o007 != 0) {
        (true, true) => "group and others have access",
        (true, false) => "its group has access",
        _ => "others have access",
    }
}

/// A server certificate issued by `weir certs`' CA: devices trust a CA whose key sits
/// beside it on the appliance, which any development box can also mint. Fine for a
/// trial, never for a site.
fn development_ca_check(facts: &CertificateFacts) -> Check {
    let Ok(bytes) = &facts.certificate else {
        return check(DEVELOPMENT_CA, Status::Skip, "no server certificate to check".into(), None);
    };
    let issuer = CertificateDer::pem_slice_iter(bytes)
        .next()
        .and_then(Result::ok)
        .and_then(|der| validity(&der).ok())
        .map(|window| window.issuer);
    let Some(issuer) = issuer else {
        return check(DEVELOPMENT_CA, Status::Skip, "the server certificate cannot be parsed".into(), None);
    };
    let directory = facts.directory.trim_end_matches('/');
    if issuer.contains(&format!("O={DEVELOPMENT_ORGANIZATION}")) {
        check(
            DEVELOPMENT_CA,
            Status::Warn,
            format!(
                "{directory}/server.pem is issued by the development CA of `weir certs` ({issuer}): fine for a \
                 trial, not for a site"
            ),
            Some(format!(
                "install the site's PKI in {directory} (ca.pem, server.pem, server.key 0600), set \
                 quic.generate_dev_certs = false, then `systemctl reload weir` (SIGHUP) or restart"
            )),
        )
    } else {
        check(DEVELOPMENT_CA, Status::Ok, format!("{directory}/server.pem is issued by {issuer}"), None)
    }
}

/// The first four checks: files, chain, key, expiry.
fn judge_files(facts: &CertificateFacts) -> Vec<Check> {
    let directory = &facts.directory;
    let path = |name: &str| format!("{}/{name}", directory.trim_end_matches('/'));
    let files = [("ca.pem", &facts.ca), ("server.pem", &facts.certificate), ("server.key", &facts.key)];
    let missing: Vec<String> = files
        .iter()
        .filter(|(_, read)| matches!(read, Err(ReadFailure::Missing)))
        .map(|(name, _)| path(name))
        .collect();
    let unreadable: Vec<String> = files
        .iter()
        .filter_map(|(name, read)| match read {
            Err(ReadFailure::Unreadable(error)) => Some(format!("{}: {error}", path(name))),
            _ => None,
        })
        .collect();
    let production_fix = format!(
        "install the site's PKI there: {} (the CA device certificates chain to), {} and {}, readable by the weir user, \
         and set quic.generate_dev_certs = false; `weir certs --dir {directory}` makes a development PKI",
        path("ca.pem"),
        path("server.pem"),
        path("server.key")
    );
    if !unreadable.is_empty() {
        let mut checks = vec![check(
            NAMES[0],
            Status::Fail,
            format!("cannot read {}", unreadable.join("; ")),
            Some(format!(
                "chown weir:weir {directory}/* && chmod 0600 {directory}/*.key && chmod 0644 {directory}/*.pem \
                 (serve runs as weir)"
            )),
        )];
        checks.extend(skipped("a PKI file cannot be read (see certificates.files)"));
        return checks;
    }
    if missing.len() == files.len() && facts.generate_dev_certs {
        let mut checks = vec![check(
            NAMES[0],
            Status::Warn,
            format!(
                "no certificates in {directory}: serve will create a development PKI there (quic.generate_dev_certs = \
                 true), and devices must then trust its ca.pem"
            ),
            Some(production_fix),
        )];
        checks.extend(skipped("no certificates yet (see certificates.files)"));
        return checks;
    }
    if !missing.is_empty() {
        let why = if facts.generate_dev_certs {
            "serve creates a development PKI only when all three are missing"
        } else {
            "quic.generate_dev_certs = false"
        };
        let mut checks = vec![check(
            NAMES[0],
            Status::Fail,
            format!("missing {} ({why}): serve cannot start the QUIC listener", missing.join(", ")),
            Some(production_fix),
        )];
        checks.extend(skipped("a PKI file is missing (see certificates.files)"));
        return checks;
    }
    let (Ok(ca_bytes), Ok(certificate_bytes), Ok(key_bytes)) = (&facts.ca, &facts.certificate, &facts.key) else {
        unreachable!("every file was read");
    };
    let mut checks = vec![check(
        NAMES[0],
        Status::Ok,
        format!("{}, {} and {} are present and readable", path("ca.pem"), path("server.pem"), path("server.key")),
        None,
    )];
    let parsed = certificates(ca_bytes, &path("ca.pem")).and_then(|roots| {
        let chain = certificates(certificate_bytes, &path("server.pem"))?;
        let mut windows = Vec::new();
        for (name, der) in roots.iter().map(|der| ("ca.pem", der)).chain(chain.iter().map(|der| ("server.pem", der))) {
            windows.push(validity(der).map_err(|error| format!("{}: {error}", path(name)))?);
        }
        Ok((roots, chain, windows))
    });
    let (roots, chain, windows) = match parsed {
        Ok(parsed) => parsed,
        Err(error) => {
            checks.push(check(
                NAMES[1],
                Status::Fail,
                error,
                Some("put PEM certificates in ca.pem and server.pem (-----BEGIN CERTIFICATE-----)".into()),
            ));
            checks.extend(skipped("the certificates cannot be parsed (see certificates.chain)").into_iter().skip(1));
            return checks;
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let root_windows = &windows[..roots.len()];
    let leaf_window = &windows[roots.len()];
    checks.push(chain_check(&provider, &roots, &chain, &windows, leaf_window, facts.now_unix_s, &path));
    checks.push(key_check(&provider, &chain, key_bytes, &path));
    checks.push(expiry_check(root_windows, leaf_window, facts.now_unix_s, &path));
    checks
}

fn chain_check(
    provider: &Arc<CryptoProvider>,
    roots: &[CertificateDer<'static>],
    chain: &[CertificateDer<'static>],
    windows: &[Validity],
    leaf: &Validity,
    now_unix_s: i64,
    path: &dyn Fn(&str) -> String,
) -> Check {
    const NAME: &str = "certificates.chain";
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        if let Err(error) = store.add(root.clone()) {
            return check(
                NAME,
                Status::Fail,
                format!("{} cannot be a trust anchor: {error}", path("ca.pem")),
                Some("put the CA certificate (not a leaf) in ca.pem".into()),
            );
        }
    }
    // A time inside the validity of the server's chain (webpki does not check a trust
    // anchor's), so expiry is judged once, by the expiry check.
    let chain_windows = &windows[roots.len()..];
    let latest_start = chain_windows.iter().map(|window| window.not_before_unix_s).max().unwrap_or(now_unix_s);
    let earliest_end = chain_windows.iter().map(|window| window.not_after_unix_s).min().unwrap_or(now_unix_s);
    let at = if (latest_start..=earliest_end).contains(&now_unix_s) { now_unix_s } else { latest_start };
    let at_note = if at == now_unix_s { String::new() } else { " (checked within the certificates' validity)".into() };
    let Ok(leaf_parsed) = ParsedCertificate::try_from(&chain[0]) else {
        return check(NAME, Status::Fail, format!("{} is not a valid X.509 certificate", path("server.pem")), None);
    };
    let verified = rustls::client::verify_server_cert_signed_by_trust_anchor(
        &leaf_parsed,
        &store,
        &chain[1..],
        UnixTime::since_unix_epoch(std::time::Duration::from_secs(at.max(0) as u64)),
        provider.signature_verification_algorithms.all,
    );
    let anchors: Vec<String> = windows[..roots.len()].iter().map(|window| window.subject.clone()).collect();
    match verified {
        Ok(()) => check(
            NAME,
            Status::Ok,
            format!(
                "{} ({}) chains to {} ({}){at_note}",
                path("server.pem"),
                leaf.subject,
                path("ca.pem"),
                anchors.join("; ")
            ),
            None,
        ),
        Err(error) => {
            let why = match &error {
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer) => format!(
                    "it is issued by {} and no CA in {} ({}) signed it",
                    leaf.issuer,
                    path("ca.pem"),
                    anchors.join("; ")
                ),
                rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature) => format!(
                    "{} holds a CA with its issuer's name ({}) but the signature does not verify with that CA's key: \
                     a different CA of the same name",
                    path("ca.pem"),
                    leaf.issuer
                ),
                rustls::Error::InvalidCertificate(rustls::CertificateError::InvalidPurpose)
                | rustls::Error::InvalidCertificate(rustls::CertificateError::InvalidPurposeContext { .. }) => {
                    "it is not valid for TLS server authentication (extended key usage)".to_owned()
                }
                other => other.to_string(),
            };
            check(
                NAME,
                Status::Fail,
                format!(
                    "{} ({}) does not chain to {}: {why}{at_note}; devices will refuse the handshake",
                    path("server.pem"),
                    leaf.subject,
                    path("ca.pem")
                ),
                Some(format!(
                    "put the CA that issued server.pem in {} (intermediates go after the leaf in server.pem), or \
                     re-issue server.pem from the site's CA",
                    path("ca.pem")
                )),
            )
        }
    }
}

fn key_check(
    provider: &Arc<CryptoProvider>,
    chain: &[CertificateDer<'static>],
    key_bytes: &[u8],
    path: &dyn Fn(&str) -> String,
) -> Check {
    const NAME: &str = "certificates.key";
    let key = match PrivateKeyDer::from_pem_slice(key_bytes) {
        Ok(key) => key,
        Err(error) => {
            return check(
                NAME,
                Status::Fail,
                format!("{} holds no usable PEM private key: {error}", path("server.key")),
                Some("put the server's private key (PKCS#8, PKCS#1 or SEC1 PEM) in server.key".into()),
            )
        }
    };
    let signing_key = match provider.key_provider.load_private_key(key) {
        Ok(signing_key) => signing_key,
        Err(error) => {
            return check(
                NAME,
                Status::Fail,
                format!("{}: the TLS stack cannot use this key: {error}", path("server.key")),
                Some("use an ECDSA P-256/P-384, Ed25519 or RSA (2048+) key".into()),
            )
        }
    };
    match CertifiedKey::new(chain.to_vec(), signing_key).keys_match() {
        Ok(()) => check(
            NAME,
            Status::Ok,
            format!("{} is the private key of {}'s certificate", path("server.key"), path("server.pem")),
            None,
        ),
        Err(error) => check(
            NAME,
            Status::Fail,
            format!(
                "{} does not belong to the certificate in {} ({error}): the TLS handshake would fail",
                path("server.key"),
                path("server.pem")
            ),
            Some(
                "install the key the certificate was issued for, or re-issue server.pem for this key (both files \
                 come from the same certificate request)"
                    .into(),
            ),
        ),
    }
}

fn days_left(window: &Validity, now_unix_s: i64) -> i64 {
    (window.not_after_unix_s - now_unix_s).div_euclid(DAY_S)
}

fn expiry_check(roots: &[Validity], leaf: &Validity, now_unix_s: i64, path: &dyn Fn(&str) -> String) -> Check {
    const NAME: &str = "certificates.expiry";
    let mut named: Vec<(String, &Validity)> = vec![(path("server.pem"), leaf)];
    named.extend(roots.iter().map(|window| (format!("{} ({})", path("ca.pem"), window.subject), window)));
    let reissue = |what: &str| {
        format!(
            "{what}, then restart weir (`weir certs --dir DIR --days N` for a development PKI); devices refuse an \
             expired or not yet valid certificate"
        )
    };
    for (name, window) in &named {
        if now_unix_s > window.not_after_unix_s {
            return check(
                NAME,
                Status::Fail,
                format!(
                    "{name} expired on {} ({} days ago)",
                    window.not_after_text,
                    (now_unix_s - window.not_after_unix_s).div_euclid(DAY_S)
                ),
                Some(reissue("issue a new certificate and install it")),
            );
        }
        if now_unix_s < window.not_before_unix_s {
            return check(
                NAME,
                Status::Fail,
                format!(
                    "{name} is not valid yet: it starts {} s from now by this host's clock",
                    window.not_before_unix_s - now_unix_s
                ),
                Some(reissue("check the host's clock (timedatectl; NTP), or issue a certificate valid from now")),
            );
        }
    }
    let (soonest_name, soonest) =
        named.iter().min_by_key(|(_, window)| window.not_after_unix_s).expect("the leaf is always there");
    let summary = named
        .iter()
        .map(|(name, window)| {
            format!("{name} until {} ({} days)", window.not_after_text, days_left(window, now_unix_s))
        })
        .collect::<Vec<_>>()
        .join("; ");
    let days = days_left(soonest, now_unix_s);
    if days < EXPIRY_WARN_DAYS {
        check(
            NAME,
            Status::Warn,
            format!("{soonest_name} expires in {days} days (under {EXPIRY_WARN_DAYS}): {summary}"),
            Some(reissue("renew it before it expires")),
        )
    } else {
        check(NAME, Status::Ok, format!("valid now: {summary}"), None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    use std::time::{Duration, SystemTime};

    const NOW: i64 = 1_800_000_000;

    fn at(unix_s: i64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix_s as u64)
    }

    struct Pki {
        ca: String,
        issuer: Issuer<'static, KeyPair>,
    }

    fn ca(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.not_before = at(NOW - 100 * DAY_S).into();
        params.not_after = at(NOW + 3650 * DAY_S).into();
        let key = KeyPair::generate().unwrap();
        let ca = params.self_signed(&key).unwrap().pem();
        Pki { ca, issuer: Issuer::new(params, key) }
    }

    fn server(pki: &Pki, not_before: i64, not_after: i64) -> (String, String) {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = at(not_before).into();
        params.not_after = at(not_after).into();
        let key = KeyPair::generate().unwrap();
        (params.signed_by(&key, &pki.issuer).unwrap().pem(), key.serialize_pem())
    }

    fn facts(ca: &str, certificate: &str, key: &str) -> CertificateFacts {
        CertificateFacts {
            directory: "/etc/weir/certs".into(),
            generate_dev_certs: false,
            ca: Ok(ca.as_bytes().to_vec()),
            certificate: Ok(certificate.as_bytes().to_vec()),
            key: Ok(key.as_bytes().to_vec()),
            key_modes: vec![KeyMode { path: "/etc/weir/certs/server.key".into(), mode: 0o600 }],
            now_unix_s: NOW,
        }
    }

    fn status(checks: &[Check]) -> Vec<(&'static str, Status)> {
        checks.iter().map(|check| (check.name, check.status)).collect()
    }

    #[test]
    fn a_good_pki_passes_and_a_short_one_warns() {
        let pki = ca("site CA");
        let (certificate, key) = server(&pki, NOW - DAY_S, NOW + 365 * DAY_S);
        let checks = judge(&facts(&pki.ca, &certificate, &key));
        assert!(checks.iter().all(|check| check.status == Status::Ok), "{checks:#?}");
        assert!(checks[3].saw.contains("(365 days)"), "{}", checks[3].saw);
        let (certificate, key) = server(&pki, NOW - DAY_S, NOW + 10 * DAY_S + 60);
        let checks = judge(&facts(&pki.ca, &certificate, &key));
        assert_eq!(checks[3].status, Status::Warn);
        assert!(checks[3].saw.starts_with("/etc/weir/certs/server.pem expires in 10 days"), "{}", checks[3].saw);
    }

    #[test]
    fn expired_foreign_and_mismatched_are_told_apart() {
        let pki = ca("site CA");
        let (expired, expired_key) = server(&pki, NOW - 400 * DAY_S, NOW - 2 * DAY_S);
        let checks = judge(&facts(&pki.ca, &expired, &expired_key));
        assert_eq!(
            status(&checks),
            [
                ("certificates.files", Status::Ok),
                ("certificates.chain", Status::Ok),
                ("certificates.key", Status::Ok),
                ("certificates.expiry", Status::Fail),
                (KEY_MODE, Status::Ok),
                (DEVELOPMENT_CA, Status::Ok)
            ]
        );
        assert!(checks[3].saw.contains("expired on") && checks[3].saw.contains("(2 days ago)"), "{}", checks[3].saw);
        let (future, future_key) = server(&pki, NOW + DAY_S, NOW + 9 * DAY_S);
        assert!(judge(&facts(&pki.ca, &future, &future_key))[3].saw.contains("is not valid yet"));

        let (certificate, key) = server(&pki, NOW - DAY_S, NOW + 365 * DAY_S);
        let other = ca("another CA");
        let checks = judge(&facts(&other.ca, &certificate, &key));
        assert_eq!(checks[1].status, Status::Fail);
        assert!(
            checks[1].saw.contains("no CA in /etc/weir/certs/ca.pem (CN=another CA) signed it"),
            "{}",
            checks[1].saw
        );
        let checks = judge(&facts(&pki.ca, &certificate, &expired_key));
        assert_eq!(checks[2].status, Status::Fail);
        assert!(checks[2].saw.contains("does not belong to the certificate"), "{}", checks[2].saw);
    }

    #[test]
    fn missing_files_fail_unless_serve_makes_a_development_pki() {
        let mut facts = facts("", "", "");
        facts.ca = Err(ReadFailure::Missing);
        facts.certificate = Err(ReadFailure::Missing);
        facts.key = Err(ReadFailure::Missing);
        let checks = judge(&facts);
        assert_eq!(checks[0].status, Status::Fail);
        assert!(checks[0].saw.contains("quic.generate_dev_certs = false"), "{}", checks[0].saw);
        // chain, key, expiry and development_ca need the files; the key modes do not.
        assert_eq!(status(&checks)[1..].iter().filter(|(_, status)| *status == Status::Skip).count(), 4);
        facts.generate_dev_certs = true;
        assert_eq!(judge(&facts)[0].status, Status::Warn);
        facts.key = Err(ReadFailure::Unreadable("Permission denied (os error 13)".into()));
        let checks = judge(&facts);
        assert_eq!(checks[0].status, Status::Fail);
        assert!(checks[0].saw.contains("server.key: Permission denied"), "{}", checks[0].saw);
    }

    #[test]
    fn a_key_readable_by_group_or_others_fails_with_the_chmod() {
        let pki = ca("site CA");
        let (certificate, key) = server(&pki, NOW - DAY_S, NOW + 365 * DAY_S);
        let mut facts = facts(&pki.ca, &certificate, &key);
        assert_eq!(judge(&facts)[4].status, Status::Ok, "{:#?}", judge(&facts));
        facts.key_modes = vec![
            KeyMode { path: "/etc/weir/certs/ca.key".into(), mode: 0o644 },
            KeyMode { path: "/etc/weir/certs/devices/d.key".into(), mode: 0o600 },
            KeyMode { path: "/etc/weir/certs/server.key".into(), mode: 0o640 },
        ];
        let checks = judge(&facts);
        let key_mode = &checks[4];
        assert_eq!((key_mode.name, key_mode.status), (KEY_MODE, Status::Fail));
        assert_eq!(
            key_mode.saw,
            "private keys readable by others than their owner: /etc/weir/certs/ca.key is 0644 (group and others \
             have access); /etc/weir/certs/server.key is 0640 (its group has access)"
        );
        assert!(
            key_mode.fix.as_deref().unwrap().starts_with(
                "chmod 0600 /etc/weir/certs/ca.key /etc/weir/certs/server.key && chown weir: /etc/weir/certs/ca.key"
            ),
            "{key_mode:?}"
        );
        // The other verdicts do not change.
        assert!(checks[..4].iter().all(|check| check.status == Status::Ok), "{checks:#?}");
        facts.key_modes.clear();
        assert_eq!(judge(&facts)[4].status, Status::Skip);
    }

    #[test]
    fn a_server_certificate_from_the_development_ca_warns() {
        let directory = tempfile::tempdir().unwrap();
        crate::certs::generate(directory.path(), &[], &[], 30).unwrap();
        let facts = read_facts(directory.path(), true, NOW);
        let checks = judge(&facts);
        assert_eq!(checks.len(), NAMES.len());
        let development = &checks[5];
        assert_eq!((development.name, development.status), (DEVELOPMENT_CA, Status::Warn), "{checks:#?}");
        assert!(development.saw.contains("issued by the development CA of `weir certs`"), "{development:?}");
        assert!(development.fix.as_deref().unwrap().contains("quic.generate_dev_certs = false"), "{development:?}");
        // weir certs wrote its keys 0600: the mode check passes on what it made.
        assert_eq!(checks[4].status, Status::Ok, "{checks:#?}");
        assert_eq!(facts.key_modes.len(), 2, "ca.key and server.key: {:?}", facts.key_modes);

        let pki = ca("site CA");
        let (certificate, key) = server(&pki, NOW - DAY_S, NOW + 365 * DAY_S);
        let site = judge(&self::facts(&pki.ca, &certificate, &key));
        assert_eq!(site[5].status, Status::Ok, "{site:#?}");
        assert_eq!(site[5].saw, "/etc/weir/certs/server.pem is issued by CN=site CA");
    }
}
