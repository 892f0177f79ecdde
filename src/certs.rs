//! `weir certs`: a development PKI so that `weir serve` and `weir-sim` work on a fresh
//! machine without hand-made certificates. Production sites bring their own CA and
//! point the `[quic]` config at it.
//!
//! Layout under the output directory: `ca.pem` + `ca.key` (a self-signed CA, reused
//! when present so devices can be added later), `server.pem` + `server.key` (for
//! `localhost`, 127.0.0.1, ::1 and any `--server-name`), `devices/<id>.pem` +
//! `devices/<id>.key` (the device id is the certificate's subject common name).
//! Existing files are never overwritten.
//!
//! Private keys (`*.key`) are created 0600 and the directories weir creates for them
//! 0700 (the process umask can only narrow these), so a key is never readable by
//! another user, not even for the moment between creating and chmod-ing it.
//! Certificates (`*.pem`) are public and keep the umask's mode. `weir doctor` fails on
//! a key readable by group or others (`doctor::certs`).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// Device-id rules live in the protocol crate (device-side code shares them).
pub use crate::core::protocol::device_id::{device_id_of, is_device_id, DEVICE_ID_BYTES_MAX};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertsError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{0:?} is not a device id (1..=64 of a-z A-Z 0-9 . _ -)")]
    BadDeviceId(String),
    #[error("{path} exists; remove it first or choose another directory")]
    Exists { path: PathBuf },
}

/// What `generate` wrote.
#[derive(Debug, Default)]
pub struct Written {
    pub files: Vec<PathBuf>,
    pub reused_ca: bool,
}

/// The mode of a private key file weir writes.
pub const KEY_FILE_MODE: u32 = 0o600;
/// The mode of a directory weir creates for a PKI.
pub const KEY_DIRECTORY_MODE: u32 = 0o700;

/// Whether `path` names a private key (by weir's layout: `*.key`).
fn is_key_file(path: &Path) -> bool {
    path.extension().is_some_and(|extension| extension == "key")
}

fn write_new(path: &Path, contents: &str, written: &mut Written) -> Result<(), CertsError> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if path.exists() {
        return Err(CertsError::Exists { path: path.to_owned() });
    }
    if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(KEY_DIRECTORY_MODE)
            .create(parent)
            .map_err(|source| CertsError::Io { path: parent.to_owned(), source })?;
    }
    let mode = if is_key_file(path) { KEY_FILE_MODE } else { 0o644 };
    let io_error = |source| CertsError::Io { path: path.to_owned(), source };
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(
        |source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => CertsError::Exists { path: path.to_owned() },
            _ => io_error(source),
        },
    )?;
    file.write_all(contents.as_bytes()).map_err(io_error)?;
    written.files.push(path.to_owned());
    Ok(())
}

fn read(path: &Path) -> Result<String, CertsError> {
    std::fs::read_to_string(path).map_err(|source| CertsError::Io { path: path.to_owned(), source })
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name.push(DnType::OrganizationName, "weir development PKI");
    name
}

/// Creates (or reuses) the CA, then the server certificate if missing, then a
/// certificate for every device id in `devices`.
pub fn generate(
    directory: &Path,
    server_names: &[String],
    devices: &[String],
    days: u32,
) -> Result<Written, CertsError> {
    for id in devices {
        if !is_device_id(id) {
            return Err(CertsError::BadDeviceId(id.clone()));
        }
    }
    let mut written = Written::default();
    let now = time_now();
    let until = now + std::time::Duration::from_secs(u64::from(days) * 86_400);
    let ca_cert_path = directory.join("ca.pem");
    let ca_key_path = directory.join("ca.key");
    let issuer = if ca_cert_path.exists() && ca_key_path.exists() {
        written.reused_ca = true;
        let key = KeyPair::from_pem(&read(&ca_key_path)?)?;
        Issuer::from_ca_cert_pem(&read(&ca_cert_path)?, key)?
    } else {
        let mut params = CertificateParams::default();
        params.distinguished_name = name("weir development CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = now.into();
        params.not_after = (now + std::time::Duration::from_secs(10 * 365 * 86_400)).into();
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        write_new(&ca_cert_path, &cert.pem(), &mut written)?;
        write_new(&ca_key_path, &key.serialize_pem(), &mut written)?;
        Issuer::new(params, key)
    };
    let server_cert_path = directory.join("server.pem");
    if !server_cert_path.exists() {
        let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
        names.extend(server_names.iter().cloned());
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(name.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.distinguished_name = name("weir server");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now.into();
        params.not_after = until.into();
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write_new(&server_cert_path, &cert.pem(), &mut written)?;
        write_new(&directory.join("server.key"), &key.serialize_pem(), &mut written)?;
    }
    for id in devices {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = now.into();
        params.not_after = until.into();
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        write_new(&directory.join("devices").join(format!("{id}.pem")), &cert.pem(), &mut written)?;
        write_new(&directory.join("devices").join(format!("{id}.key")), &key.serialize_pem(), &mut written)?;
    }
    Ok(written)
}

fn time_now() -> std::time::SystemTime {
    // A minute in the past, so a device whose clock is slightly behind accepts it.
    std::time::SystemTime::now() - std::time::Duration::from_secs(60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;

    #[test]
    fn generates_a_ca_server_and_devices_and_never_overwrites() {
        let directory = tempfile::tempdir().unwrap();
        let written =
            generate(directory.path(), &["weir.local".into()], &["dev-1".into(), "dev-2".into()], 30).unwrap();
        assert!(!written.reused_ca);
        assert_eq!(written.files.len(), 8);
        let der = rustls_pki_types::CertificateDer::from_pem_file(directory.path().join("devices/dev-1.pem")).unwrap();
        assert_eq!(device_id_of(&der).as_deref(), Some("dev-1"));
        // Adding a device reuses the CA; an existing device is refused.
        let again = generate(directory.path(), &[], &["dev-3".into()], 30).unwrap();
        assert!(again.reused_ca);
        assert!(matches!(generate(directory.path(), &[], &["dev-3".into()], 30), Err(CertsError::Exists { .. })));
        assert!(matches!(generate(directory.path(), &[], &["bad id".into()], 30), Err(CertsError::BadDeviceId(_))));
    }

    #[test]
    fn keys_are_written_0600_and_their_directories_0700() {
        use std::os::unix::fs::PermissionsExt;
        let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        let root = tempfile::tempdir().unwrap();
        let directory = root.path().join("pki");
        let written = generate(&directory, &[], &["dev-1".into()], 30).unwrap();
        assert_eq!(mode(&directory), KEY_DIRECTORY_MODE);
        assert_eq!(mode(&directory.join("devices")), KEY_DIRECTORY_MODE);
        let keys: Vec<_> = written.files.iter().filter(|path| is_key_file(path)).collect();
        assert_eq!(keys.len(), 3, "ca.key, server.key, devices/dev-1.key: {written:?}");
        for path in &written.files {
            let expected = if is_key_file(path) { KEY_FILE_MODE } else { 0o644 & !umask() };
            assert_eq!(mode(path), expected, "{}", path.display());
        }
    }

    /// The process umask (read without changing it, from /proc).
    fn umask() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|line| line.starts_with("Umask:")).unwrap();
        u32::from_str_radix(line.split_whitespace().nth(1).unwrap(), 8).unwrap()
    }
}
