//! `portcullis ca init`: the organisation's interception CA (ECDSA P-256), key file mode 0600.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// A CA certificate's fields: may sign leaves only (path length 0), valid for five years.
pub fn params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "portcullis");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = std::time::SystemTime::now();
    params.not_before = (now - std::time::Duration::from_secs(3600)).into();
    params.not_after = (now + std::time::Duration::from_secs(5 * 365 * 24 * 3600)).into();
    params
}

/// Writes `ca.pem` and `ca.key` into `dir`; refuses to overwrite an existing key.
pub fn init(dir: &Path, common_name: &str) -> Result<(), CaError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| CaError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = params(common_name);
    let cert = params.self_signed(&key)?;

    let key_path = dir.join("ca.key");
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(io(&key_path))?;
    f.write_all(key.serialize_pem().as_bytes())
        .map_err(io(&key_path))?;
    let cert_path = dir.join("ca.pem");
    std::fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
    Ok(())
}
