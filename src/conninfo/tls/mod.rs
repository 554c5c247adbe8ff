//! TLS with libpq's meaning of `sslmode`, on rustls: which certificates to trust, whether to
//! check the host name, the client certificate, and errors an operator can act on.
//!
//! rustls (with the `ring` provider) keeps heimdall one self-contained binary with no OpenSSL
//! at run time. Nothing is loaded unless a mode needs it: `prefer` without a root certificate,
//! the default, builds a config that verifies nothing and reads no file, and the OS trust store
//! is read only for `sslrootcert=system`. The settings come from the connection string and
//! `~/.postgresql` ([`settings`]); the certificate checks libpq has and rustls lacks are in
//! `verify.rs`.

use std::fmt;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, bail};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio_postgres_rustls::MakeRustlsConnect;

mod verify;
use verify::{AcceptAny, ChainOnly};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// Where trusted roots come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    /// The OS trust store (`sslrootcert=system`, as libpq 16 defines it).
    System,
}

impl fmt::Display for RootCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RootCert::File(path) => write!(f, "{}", path.display()),
            RootCert::System => f.write_str("the system trust store"),
        }
    }
}

/// The TLS part of the connection settings, resolved by [`settings`].
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// The roots to verify against, if any: given, or libpq's default file when it exists.
    pub root_cert: Option<RootCert>,
    /// The client certificate and its key, if the certificate file exists (libpq skips a
    /// missing certificate silently).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    pub direct: bool,
}

/// libpq's TLS settings and defaults. `~/.postgresql/root.crt` is used when it exists (and then
/// verified against in every mode, as libpq does); `~/.postgresql/postgresql.crt` and `.key` are
/// the default client certificate. TLS is never used over Unix sockets, as in libpq.
pub fn settings(
    mode: Option<&str>,
    root_cert: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    negotiation: Option<&str>,
    hosts: &[String],
    home: Option<&Path>,
) -> Result<TlsSettings> {
    let dot_postgresql = home.map(|h| h.join(".postgresql"));
    let root_cert = match root_cert.as_deref() {
        Some("system") => Some(RootCert::System),
        Some(path) => Some(RootCert::File(PathBuf::from(path))),
        None => dot_postgresql
            .as_ref()
            .map(|d| d.join("root.crt"))
            .filter(|p| p.exists())
            .map(RootCert::File),
    };
    let mode = match mode {
        None if root_cert == Some(RootCert::System) => SslMode::VerifyFull,
        None => SslMode::Prefer,
        Some(m) => SslMode::parse(m).ok_or_else(|| {
            anyhow::anyhow!(
                "invalid sslmode '{m}': expected disable, allow, prefer, require, verify-ca or verify-full"
            )
        })?,
    };
    if root_cert == Some(RootCert::System) && mode != SslMode::VerifyFull {
        bail!(
            "sslrootcert=system needs sslmode=verify-full (weak sslmode={} may not be used with the system trust store, as in libpq)",
            mode.name()
        );
    }
    let cert = cert
        .map(PathBuf::from)
        .or_else(|| dot_postgresql.as_ref().map(|d| d.join("postgresql.crt")));
    let key = key
        .map(PathBuf::from)
        .or_else(|| dot_postgresql.as_ref().map(|d| d.join("postgresql.key")));
    // libpq goes on without a client certificate when the file is not there.
    let client_cert = match (cert, key) {
        (Some(cert), Some(key)) if cert.exists() => Some((cert, key)),
        (Some(cert), None) if cert.exists() => {
            bail!("sslcert {} is given but no sslkey", cert.display())
        }
        _ => None,
    };
    let direct = match negotiation {
        None | Some("postgres") => false,
        Some("direct") if mode >= SslMode::Require => true,
        Some("direct") => bail!("sslnegotiation=direct needs sslmode=require or stronger"),
        Some(other) => bail!("invalid sslnegotiation '{other}': expected postgres or direct"),
    };
    let all_sockets = !hosts.is_empty() && hosts.iter().all(|h| h.starts_with('/'));
    Ok(TlsSettings {
        mode: if all_sockets { SslMode::Disable } else { mode },
        root_cert,
        client_cert,
        direct,
    })
}

/// What to hand the `postgres` crate: nothing, when TLS cannot be used at all.
pub fn connector(settings: &TlsSettings) -> Result<Option<MakeRustlsConnect>> {
    if settings.mode == SslMode::Disable {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;

    let verify_name = settings.mode == SslMode::VerifyFull;
    let builder = match (&settings.root_cert, settings.mode) {
        (None, SslMode::VerifyCa | SslMode::VerifyFull) => bail!(
            "sslmode={} needs a root certificate, and ~/.postgresql/root.crt does not exist: set sslrootcert=FILE, or sslrootcert=system for the OS trust store",
            settings.mode.name()
        ),
        // libpq verifies nothing in these modes without a root certificate.
        (None, _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(
                provider.signature_verification_algorithms,
            ))),
        // With roots, libpq verifies the chain in every mode, and the name only in verify-full.
        (Some(root), _) => {
            let roots = Arc::new(load_roots(root)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
                .build()?;
            if verify_name {
                builder.with_webpki_verifier(webpki)
            } else {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(ChainOnly(webpki)))
            }
        }
    };
    let config = match &settings.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key_path)) => {
            let certs = read_certs(cert, "client certificate")?;
            let key = read_key(key_path)?;
            // rustls parses the key only here; name both files, since either may be at fault.
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                anyhow::anyhow!(
                    "cannot use the client key {} with the certificate {}: {e}",
                    key_path.display(),
                    cert.display()
                )
            })?
        }
    };
    Ok(Some(MakeRustlsConnect::new(config)))
}

fn load_roots(root: &RootCert) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    match root {
        RootCert::File(path) => {
            let certs = read_certs(path, "root certificate")?;
            let (added, _ignored) = store.add_parsable_certificates(certs);
            if added == 0 {
                bail!(
                    "the root certificate file {} holds no usable certificate",
                    path.display()
                );
            }
        }
        RootCert::System => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                bail!(
                    "sslrootcert=system: no certificates found in the system trust store (install ca-certificates, or set SSL_CERT_FILE)"
                );
            }
        }
    }
    Ok(store)
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<_, _>>())
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot read the {what} file {}: {}",
                path.display(),
                pem_error(&e)
            )
        })?;
    if certs.is_empty() {
        bail!(
            "the {what} file {} holds no PEM certificate",
            path.display()
        );
    }
    Ok(certs)
}

/// Reads the client key, refusing one that is not a regular file or that others could read or
/// replace.
///
/// libpq (fe-secure-openssl.c) refuses a key that is not a regular file, and one with group or
/// world access: at most 0600, or 0640 when root owns it (so a group can share a system key).
/// It does not check the owner, reasoning that a process able to read such a file must own it.
/// That does not hold for root, which reads every file: heimdall, often root, also requires the
/// key to belong to the user it runs as or to root, so that no other account can swap the key
/// heimdall presents.
///
/// The checks use the metadata of the file as opened (`fstat`), so the file checked is the file
/// read; `O_NONBLOCK` keeps a FIFO planted at the path from blocking the open.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    let cannot_read = |e: std::io::Error| {
        anyhow::anyhow!("cannot read the client key file {}: {e}", path.display())
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(cannot_read)?;
    let meta = file.metadata().map_err(cannot_read)?;
    if !meta.file_type().is_file() {
        bail!(
            "the client key file {} is not a regular file",
            path.display()
        );
    }
    let euid = rustix::process::geteuid().as_raw();
    let mode = meta.mode() & 0o777;
    if meta.uid() != euid && meta.uid() != 0 {
        bail!(
            "the client key file {} is owned by uid {}, neither by the user heimdall runs as (uid {euid}) nor by root; chown it to one of them",
            path.display(),
            meta.uid()
        );
    }
    let root_owned = meta.uid() == 0;
    if (!root_owned && mode & 0o077 != 0) || (root_owned && mode & 0o037 != 0) {
        bail!(
            "the client key file {} has group or world access; permissions should be u=rw (0600) or less, or u=rw,g=r (0640) if owned by root",
            path.display()
        );
    }
    let mut pem = Vec::new();
    file.read_to_end(&mut pem).map_err(cannot_read)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the client key file {}: {}",
            path.display(),
            pem_error(&e)
        )
    })
}

/// PEM errors, without ever quoting the file's content.
fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::Io(io) => io.to_string(),
        Error::NoItemsFound => "no PEM item of the expected kind in it".to_owned(),
        _ => "not valid PEM".to_owned(),
    }
}

/// Turns a TLS failure into a sentence: the crate reports rustls errors wrapped in I/O errors.
pub fn explain(e: &postgres::Error, settings: &TlsSettings, host: &str) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(rustls_error) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(explain_rustls(rustls_error, settings, host));
        }
        if err.to_string().contains("server does not support TLS") {
            return Some(format!(
                "the server does not support TLS, and sslmode={} needs it",
                settings.mode.name()
            ));
        }
        source = err.source();
    }
    None
}

fn explain_rustls(e: &rustls::Error, settings: &TlsSettings, host: &str) -> String {
    let roots = settings
        .root_cert
        .as_ref()
        .map_or_else(|| "no root certificate".to_owned(), |r| r.to_string());
    match e {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => format!(
            "the server's certificate is not valid for host '{host}' (sslmode=verify-full checks the host name)"
        ),
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => format!("the server's certificate is not trusted (checked against {roots})"),
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "the server's certificate has expired".to_owned(),
        rustls::Error::InvalidCertificate(other) => {
            format!("the server's certificate was rejected ({other:?}; checked against {roots})")
        }
        other => format!("TLS failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmodes_parse_and_order_by_strength() {
        for name in [
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ] {
            assert_eq!(SslMode::parse(name).map(SslMode::name), Some(name));
        }
        assert_eq!(SslMode::parse("on"), None);
        assert!(SslMode::Require < SslMode::VerifyFull);
    }

    #[test]
    fn verify_modes_without_roots_are_refused_before_connecting() {
        let settings = TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: None,
            client_cert: None,
            direct: false,
        };
        let err = format!("{:#}", connector(&settings).err().unwrap());
        assert!(err.contains("root.crt"), "{err}");
    }

    #[test]
    fn a_key_that_others_can_read_is_refused_with_its_path() {
        let dir = std::env::temp_dir().join(format!("heimdall-key-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("client.key");
        std::fs::write(
            &key,
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let err = format!("{:#}", read_key(&key).err().unwrap());
        assert!(
            err.contains(&key.display().to_string()) && err.contains("group or world"),
            "{err}"
        );
        assert!(!err.contains("c2VjcmV0"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
