//! Every example device profile in firmware-config/ (files named device*.toml) loads and
//! validates, so the documented examples cannot drift from the parser.

use std::path::Path;

use weir_device::DeviceProfile;

#[test]
fn every_example_device_profile_in_firmware_config_loads() {
    let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../firmware-config");
    let mut loaded = Vec::new();
    for entry in std::fs::read_dir(&directory).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("device") && name.ends_with(".toml") {
            let profile = DeviceProfile::load(&path).unwrap_or_else(|error| panic!("{error}"));
            assert_eq!(profile.server.alpn, "weir/1");
            assert!(
                profile.tls.ca.is_absolute() || profile.tls.ca.starts_with(&directory),
                "paths resolve next to the file"
            );
            loaded.push(name);
        }
    }
    assert!(loaded.contains(&"device.toml".to_owned()), "{loaded:?}");
}

#[test]
fn the_documented_example_states_every_default() {
    // device.toml shows each optional field at its default value.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../firmware-config/device.toml");
    let profile = DeviceProfile::load(&path).unwrap();
    let defaults = DeviceProfile::new(
        profile.server_addresses(),
        &profile.server.name,
        profile.tls.ca.clone(),
        profile.tls.certificate.clone(),
        profile.tls.key.clone(),
    );
    assert_eq!(profile, defaults);
}
