//! The organisation's interception CA and the leaf certificates it signs for intercepted names.
//!
//! Every leaf shares one ECDSA P-256 key generated at start: issuing a leaf then costs one
//! signature, not a key generation, and the key never leaves memory. Leaves are short-lived,
//! carry a random serial, and are cached per name in a bounded map so a busy name is signed
//! once per half-validity rather than once per tunnel.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::{CertifiedKey, SigningKey};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{path}: not a CA certificate: {source}")]
    NotCa { path: PathBuf, source: rcgen::Error },
    #[error("{path}: CA key does not load: {source}")]
    Key { path: PathBuf, source: rcgen::Error },
    #[error("issuing a certificate for {name:?}: {message}")]
    Issue { name: String, message: String },
    /// The key file's permissions: the message names the file.
    #[error("{0}")]
    Exposed(String),
}

/// Where the CA lives and how its leaves are kept.
#[derive(Debug, Clone, PartialEq)]
pub struct AuthoritySettings {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// Names whose leaves are kept; beyond this the oldest is dropped.
    pub leaf_cache: usize,
    pub leaf_validity: Duration,
}

struct Cached {
    key: Arc<CertifiedKey>,
    /// Reissued after this: half the validity, so a leaf in use never expires mid-session.
    renew_at: Instant,
}

pub struct Authority {
    ca_der: CertificateDer<'static>,
    /// The CA as rcgen needs it to sign (same name and key as the file; its own signature is
    /// never used).
    issuer: rcgen::Certificate,
    ca_key: KeyPair,
    leaf_key: KeyPair,
    leaf_signer: Arc<dyn SigningKey>,
    cache: DashMap<Box<str>, Cached>,
    /// Names in the order they were first cached: a new name at a full cache drops the
    /// first. Touched only when a leaf is issued for a name not cached, which signs anyway;
    /// a scan of the cache for its oldest entry instead cost more than the signature.
    order: Mutex<VecDeque<Box<str>>>,
    settings: AuthoritySettings,
}

impl std::fmt::Debug for Authority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("Authority")
            .field("ca_cert", &self.settings.ca_cert)
            .field("cached", &self.cache.len())
            .finish()
    }
}

impl Authority {
    /// Loads the CA; the key file must not be readable by other users.
    pub fn load(settings: &AuthoritySettings) -> Result<Authority, CaError> {
        let file_err = |path: &Path, message: String| CaError::File {
            path: path.to_path_buf(),
            message,
        };
        crate::secrets::refuse_world_readable(&settings.ca_key).map_err(CaError::Exposed)?;
        let cert_pem = std::fs::read_to_string(&settings.ca_cert)
            .map_err(|e| file_err(&settings.ca_cert, e.to_string()))?;
        let key_pem = std::fs::read_to_string(&settings.ca_key)
            .map_err(|e| file_err(&settings.ca_key, e.to_string()))?;
        let ca_key = KeyPair::from_pem(&key_pem).map_err(|source| CaError::Key {
            path: settings.ca_key.clone(),
            source,
        })?;
        let params =
            CertificateParams::from_ca_cert_pem(&cert_pem).map_err(|source| CaError::NotCa {
                path: settings.ca_cert.clone(),
                source,
            })?;
        // A leaf certificate passed off as the CA would sign leaves no client chains.
        if !matches!(params.is_ca, rcgen::IsCa::Ca(_)) {
            return Err(file_err(
                &settings.ca_cert,
                "not a CA certificate (its basicConstraints do not say CA:TRUE)".into(),
            ));
        }
        let issuer = params.self_signed(&ca_key).map_err(|source| CaError::Key {
            path: settings.ca_key.clone(),
            source,
        })?;
        let ca_der = first_certificate(&cert_pem)
            .ok_or_else(|| file_err(&settings.ca_cert, "no CERTIFICATE block".into()))?;
        let authority = Authority::new(ca_der, issuer, ca_key, settings.clone())?;
        authority.signs_for_its_certificate().map_err(|message| {
            file_err(
                &settings.ca_key,
                format!(
                    "the key does not match {}: {message}",
                    settings.ca_cert.display()
                ),
            )
        })?;
        Ok(authority)
    }

    /// Issues a leaf and checks it chains to the CA certificate as clients will check it: the
    /// key is the certificate's, or every intercepted handshake would fail.
    fn signs_for_its_certificate(&self) -> Result<(), String> {
        const NAME: &str = "portcullis-self-check.invalid";
        let leaf = self.issue(NAME).map_err(|e| e.to_string())?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).map_err(|e| e.to_string())?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::try_from(NAME).map_err(|e| e.to_string())?;
        rustls::client::danger::ServerCertVerifier::verify_server_cert(
            &*verifier,
            &leaf.cert[0],
            &leaf.cert[1..],
            &name,
            &[],
            rustls::pki_types::UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    pub fn settings(&self) -> &AuthoritySettings {
        &self.settings
    }

    /// Whether `other` signs with the same CA under the same settings: a reload that read
    /// the same files keeps the running authority, its leaf cache and TLS sessions.
    pub fn same_as(&self, other: &Authority) -> bool {
        self.ca_der == other.ca_der
            && self.settings == other.settings
            && self.ca_key.public_key_der() == other.ca_key.public_key_der()
    }

    /// A CA made in memory (tests, benchmarks).
    pub fn generate(settings: AuthoritySettings) -> Result<Authority, CaError> {
        let err = |e: rcgen::Error| CaError::Issue {
            name: "CA".into(),
            message: e.to_string(),
        };
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(err)?;
        let issuer = crate::ca::params("portcullis test CA")
            .self_signed(&ca_key)
            .map_err(err)?;
        Authority::new(issuer.der().clone(), issuer, ca_key, settings)
    }

    fn new(
        ca_der: CertificateDer<'static>,
        issuer: rcgen::Certificate,
        ca_key: KeyPair,
        settings: AuthoritySettings,
    ) -> Result<Authority, CaError> {
        let err = |message: String| CaError::Issue {
            name: "leaf key".into(),
            message,
        };
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| err(e.to_string()))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let leaf_signer =
            rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| err(e.to_string()))?;
        Ok(Authority {
            ca_der,
            issuer,
            ca_key,
            leaf_key,
            leaf_signer,
            cache: DashMap::new(),
            order: Mutex::new(VecDeque::new()),
            settings,
        })
    }

    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    pub fn cached(&self) -> usize {
        self.cache.len()
    }

    /// The leaf for `name` (a DNS name or an address literal), from the cache when fresh.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, CaError> {
        let now = Instant::now();
        if let Some(c) = self.cache.get(name) {
            if now < c.renew_at {
                return Ok(c.key.clone());
            }
        }
        let key = Arc::new(self.issue(name)?);
        if !self.cache.contains_key(name) {
            self.make_room(name);
        }
        self.cache.insert(
            name.into(),
            Cached {
                key: key.clone(),
                renew_at: now + self.settings.leaf_validity / 2,
            },
        );
        Ok(key)
    }

    /// Drops the names cached first until `name` fits, and queues it.
    fn make_room(&self, name: &str) {
        let cap = self.settings.leaf_cache.max(1);
        let mut order = self.order.lock().unwrap_or_else(|e| e.into_inner());
        while self.cache.len() >= cap {
            // A name queued twice (two tunnels issued its first leaf at once) is dropped at
            // its first turn; its second finds nothing and the loop goes on.
            let Some(first) = order.pop_front() else {
                break;
            };
            self.cache.remove(&first);
        }
        order.push_back(name.into());
    }

    /// A fresh leaf, not cached: SAN and CN = `name`, random serial, short validity.
    pub fn issue(&self, name: &str) -> Result<CertifiedKey, CaError> {
        let err = |message: String| CaError::Issue {
            name: name.to_string(),
            message,
        };
        let mut params = CertificateParams::default();
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(
                name.try_into()
                    .map_err(|e: rcgen::Error| err(e.to_string()))?,
            ),
        };
        params.subject_alt_names = vec![san];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        let mut serial = [0u8; 16];
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut serial)
            .map_err(|_| err("no randomness for a serial".into()))?;
        serial[0] &= 0x7f; // a positive INTEGER, as RFC 5280 asks
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        // Clocks of clients drift; an hour of slack on the start avoids "not yet valid".
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(3600)).into();
        params.not_after = (now + self.settings.leaf_validity).into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&self.leaf_key, &self.issuer, &self.ca_key)
            .map_err(|e| err(e.to_string()))?;
        Ok(CertifiedKey::new(
            vec![cert.der().clone(), self.ca_der.clone()],
            self.leaf_signer.clone(),
        ))
    }

    /// A server config presenting leaves by SNI, ALPN h2 and http/1.1; or always `fixed`, for
    /// clients that send no SNI (an address literal), whose leaf names the CONNECT target.
    pub fn server_config(
        self: &Arc<Self>,
        fixed: Option<Arc<CertifiedKey>>,
    ) -> rustls::ServerConfig {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(LeafResolver {
                authority: self.clone(),
                fixed,
            }));
        // `http/1.0` too: a client that offers only it (`curl --http1.0`) works through an
        // opaque tunnel, and would otherwise get a `no_application_protocol` alert here.
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
        cfg
    }
}

/// The CA certificate of a PEM file, as DER.
fn first_certificate(pem: &str) -> Option<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut pem.as_bytes()).flatten().next()
}

#[derive(Debug)]
struct LeafResolver {
    authority: Arc<Authority>,
    fixed: Option<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(fixed) = &self.fixed {
            return Some(fixed.clone());
        }
        match self.authority.leaf(hello.server_name()?) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(error = %e, "cannot issue an interception leaf");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authority(cache: usize) -> Arc<Authority> {
        Arc::new(
            Authority::generate(AuthoritySettings {
                ca_cert: "mem".into(),
                ca_key: "mem".into(),
                leaf_cache: cache,
                leaf_validity: Duration::from_secs(3600),
            })
            .unwrap(),
        )
    }

    /// Files as `portcullis ca init` writes them, then one of them swapped: a leaf certificate
    /// passed off as the CA, or another CA's key. Both are refused when loaded: every leaf
    /// signed with them would fail every client's check (found by the red team).
    #[test]
    fn a_ca_file_that_is_no_ca_or_not_the_keys_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        crate::ca::init(dir.path(), "test CA").unwrap();
        let settings = AuthoritySettings {
            ca_cert: dir.path().join("ca.pem"),
            ca_key: dir.path().join("ca.key"),
            leaf_cache: 8,
            leaf_validity: Duration::from_secs(3600),
        };
        assert!(Authority::load(&settings).is_ok());

        let other = tempfile::tempdir().unwrap();
        crate::ca::init(other.path(), "another CA").unwrap();
        let mismatched = AuthoritySettings {
            ca_key: other.path().join("ca.key"),
            ..settings.clone()
        };
        let e = Authority::load(&mismatched).err().unwrap().to_string();
        assert!(e.contains("does not match"), "{e}");

        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let leaf = CertificateParams::new(vec!["api.openai.com".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let leaf_pem = dir.path().join("leaf.pem");
        let leaf_key = dir.path().join("leaf.key");
        std::fs::write(&leaf_pem, leaf.pem()).unwrap();
        std::fs::write(&leaf_key, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&leaf_key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let not_ca = AuthoritySettings {
            ca_cert: leaf_pem,
            ca_key: leaf_key,
            ..settings.clone()
        };
        let e = Authority::load(&not_ca).err().unwrap().to_string();
        assert!(e.contains("not a CA certificate"), "{e}");

        // The permission check names the file once.
        std::fs::set_permissions(&settings.ca_key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Authority::load(&settings).err().unwrap().to_string();
        assert_eq!(e.matches("ca.key").count(), 1, "{e}");
    }

    #[test]
    fn leaves_are_cached_and_bounded() {
        let a = authority(2);
        let first = a.leaf("api.openai.com").unwrap();
        let again = a.leaf("api.openai.com").unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(first.cert.len(), 2, "leaf then CA");
        a.leaf("b.example").unwrap();
        a.leaf("c.example").unwrap();
        assert_eq!(a.cached(), 2);
        a.leaf("127.0.0.1").unwrap();
    }

    /// A new name at a full cache drops the name cached first, not a name cached since.
    #[test]
    fn the_first_name_cached_is_dropped_first() {
        let a = authority(3);
        let leaves: Vec<_> = ["a.example", "b.example", "c.example"]
            .iter()
            .map(|n| a.leaf(n).unwrap())
            .collect();
        a.leaf("d.example").unwrap();
        assert_eq!(a.cached(), 3);
        assert!(!Arc::ptr_eq(&a.leaf("a.example").unwrap(), &leaves[0]));
        // `a` came back in place of `b`; `c` stayed.
        assert!(Arc::ptr_eq(&a.leaf("c.example").unwrap(), &leaves[2]));
        assert!(!Arc::ptr_eq(&a.leaf("b.example").unwrap(), &leaves[1]));
        assert_eq!(a.cached(), 3);
    }

    #[test]
    fn serials_differ() {
        let a = authority(8);
        let x = a.issue("x.example").unwrap();
        let y = a.issue("x.example").unwrap();
        assert_ne!(x.cert[0], y.cert[0]);
    }

    #[test]
    fn rejects_unrepresentable_names() {
        let a = authority(8);
        assert!(a.issue("bücher.example").is_err(), "IA5 names only");
    }
}
