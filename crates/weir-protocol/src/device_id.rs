//! Device ids: what a device is called in its certificate, in its records'
//! `weir.device` header, in the allow and deny lists and in metrics.

/// Longest device id; ids are 1..=64 of `a-z A-Z 0-9 . _ -`.
pub const DEVICE_ID_BYTES_MAX: usize = 64;

/// Whether `id` is a device id: 1..=64 bytes of `a-z A-Z 0-9 . _ -`.
pub fn is_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= DEVICE_ID_BYTES_MAX
        && id.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"._-".contains(&byte))
}

/// The device id a client certificate (DER) names: its subject common name, if that is
/// a device id.
pub fn device_id_of(certificate_der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(certificate_der).ok()?;
    let common_name = certificate.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    is_device_id(&common_name).then_some(common_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_and_of_a_small_alphabet() {
        assert!(is_device_id("press-7.line_2"));
        assert!(is_device_id(&"a".repeat(DEVICE_ID_BYTES_MAX)));
        assert!(!is_device_id(""));
        assert!(!is_device_id(&"a".repeat(DEVICE_ID_BYTES_MAX + 1)));
        assert!(!is_device_id("dev 1"));
        assert!(!is_device_id("dév"));
        assert!(device_id_of(b"not a certificate").is_none());
    }
}
