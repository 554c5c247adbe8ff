//! TLS for the integration tests: a throwaway certificate authority made at test time (rcgen),
//! the certificates it signs, and a [`TestPostgres`] that accepts TCP connections only over TLS
//! ([`TlsPostgres`], shared by a test binary through [`shared_tls`]).
//!
//! Nothing is checked in: every key is generated when the test binary first needs it, so no
//! private key ever lands in the repository and no certificate ever expires under the tests.
//! Not responsible for any heimdall behaviour: tests state that themselves.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, date_time_ymd,
};
use tempfile::TempDir;

use super::{ClusterConfig, DataFile, TestPostgres, panic_message};

/// A role that must log in with a client certificate (`cert` auth): its certificate's CN is
/// this name, signed by the cluster's CA ([`Certs::client_cert`]).
pub const CERT_USER: &str = "heimdall_cert";
/// A role the TLS cluster also lets in without TLS (`hostnossl`), for tests that need a plain
/// TCP path to the same server. Every other TCP login must use TLS.
pub const PLAIN_USER: &str = "heimdall_plain";
/// The CN of [`Certs::other_client_cert`]: a valid certificate, but for no role we log in as.
pub const OTHER_CERT_NAME: &str = "heimdall_other";

/// Only the socket (for the fixture itself) is trusted without TLS; on TCP, [`CERT_USER`] needs
/// a client certificate, everyone else needs TLS, and only [`PLAIN_USER`] may go without.
const TLS_HBA: &str = "\
# Written by tests/support/tls.rs: TCP logins must use TLS.
local       all          all                           trust
local       replication  all                           trust
hostssl     all          heimdall_cert  127.0.0.1/32   cert
hostssl     all          all            127.0.0.1/32   trust
hostnossl   all          heimdall_plain 127.0.0.1/32   trust
";

/// A CA and everything it signed, plus an unrelated CA, as PEM files in a temp dir of their
/// own. Key files are 0600 (libpq refuses a key others can read); the dir goes with the value.
pub struct Certs {
    dir: TempDir,
    ca_pem: String,
    server_cert_pem: String,
    server_key_pem: String,
    client_key_pem: String,
}

impl Certs {
    /// Makes a fresh CA ("heimdall test CA"), a server certificate for `localhost` and
    /// `127.0.0.1`, a client certificate for [`CERT_USER`] and one for [`OTHER_CERT_NAME`]
    /// (both signed by the CA), and an unrelated CA that signed nothing we use.
    pub fn generate() -> Certs {
        let (ca_cert, ca) = new_ca("heimdall test CA");
        let (other_ca_cert, _) = new_ca("heimdall unrelated CA");
        let (server_cert, server_key) = new_leaf(
            &ca,
            "localhost",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) =
            new_leaf(&ca, CERT_USER, &[], ExtendedKeyUsagePurpose::ClientAuth);
        let (other_client_cert, other_client_key) = new_leaf(
            &ca,
            OTHER_CERT_NAME,
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
        );

        let dir = tempfile::Builder::new()
            .prefix("heimdall-tls-")
            .tempdir()
            .unwrap_or_else(|e| panic!("Certs: cannot create a temp dir: {e}"));
        let certs = Certs {
            dir,
            ca_pem: ca_cert.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            client_key_pem: client_key.serialize_pem(),
        };
        certs.write("root.crt", &certs.ca_pem, 0o644);
        certs.write("other-root.crt", &other_ca_cert.pem(), 0o644);
        certs.write("server.crt", &certs.server_cert_pem, 0o644);
        certs.write("server.key", &certs.server_key_pem, 0o600);
        certs.write("client.crt", &client_cert.pem(), 0o644);
        certs.write("client.key", &certs.client_key_pem, 0o600);
        certs.write("other-client.crt", &other_client_cert.pem(), 0o644);
        certs.write("other-client.key", &other_client_key.serialize_pem(), 0o600);
        certs
    }

    fn write(&self, name: &str, contents: &str, mode: u32) {
        let path = self.dir.path().join(name);
        fs::write(&path, contents)
            .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(mode)))
            .unwrap_or_else(|e| panic!("Certs: cannot write {}: {e}", path.display()));
    }

    /// The temp dir holding every file below.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA that signed the server's and the clients' certificates (`sslrootcert=`).
    pub fn root_cert(&self) -> PathBuf {
        self.dir.path().join("root.crt")
    }

    /// A CA that signed nothing the server uses: trusting only it must fail.
    pub fn other_root_cert(&self) -> PathBuf {
        self.dir.path().join("other-root.crt")
    }

    /// The client certificate for [`CERT_USER`] (`sslcert=`).
    pub fn client_cert(&self) -> PathBuf {
        self.dir.path().join("client.crt")
    }

    /// The key of [`Certs::client_cert`] (`sslkey=`), mode 0600.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client.key")
    }

    /// A client certificate signed by the right CA, for [`OTHER_CERT_NAME`].
    pub fn other_client_cert(&self) -> PathBuf {
        self.dir.path().join("other-client.crt")
    }

    /// The key of [`Certs::other_client_cert`], mode 0600.
    pub fn other_client_key(&self) -> PathBuf {
        self.dir.path().join("other-client.key")
    }

    /// The base64 lines of the client key's PEM text (no BEGIN/END lines): any one of them in
    /// heimdall's output is a leak of key material.
    pub fn client_key_lines(&self) -> Vec<&str> {
        self.client_key_pem
            .lines()
            .filter(|l| !l.starts_with("-----") && !l.trim().is_empty())
            .collect()
    }
}

/// The server's files, copied into its data dir: the server wants its key owned by the cluster
/// owner, with no group or world access.
fn server_files(certs: &Certs) -> Vec<DataFile> {
    let file = |name: &str, pem: &str, mode| DataFile {
        name: name.to_owned(),
        contents: pem.as_bytes().to_vec(),
        mode,
    };
    vec![
        file("server.crt", &certs.server_cert_pem, 0o644),
        file("server.key", &certs.server_key_pem, 0o600),
        file("root.crt", &certs.ca_pem, 0o644),
    ]
}

fn new_ca(name: &str) -> (Certificate, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params);
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("Certs: cannot make a key: {e}"));
    let cert = params
        .self_signed(&key)
        .unwrap_or_else(|e| panic!("Certs: cannot sign CA {name}: {e}"));
    (cert, Issuer::new(params, key))
}

/// An end-entity certificate with CN `name` and the given subject alternative names (DNS
/// names or IP addresses), signed by `issuer`.
fn new_leaf(
    issuer: &Issuer<'static, KeyPair>,
    name: &str,
    alt_names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (Certificate, KeyPair) {
    let alt_names: Vec<String> = alt_names.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(alt_names)
        .unwrap_or_else(|e| panic!("Certs: bad names for {name}: {e}"));
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    set_validity(&mut params);
    let key = KeyPair::generate().unwrap_or_else(|e| panic!("Certs: cannot make a key: {e}"));
    let cert = params
        .signed_by(&key, issuer)
        .unwrap_or_else(|e| panic!("Certs: cannot sign {name}: {e}"));
    (cert, key)
}

/// Valid from well before any test machine's clock to well after: a test never fails because
/// a certificate is not yet, or no longer, valid.
fn set_validity(params: &mut CertificateParams) {
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(2099, 12, 31);
}

/// A [`TestPostgres`] with `ssl = on`, the certificates of its own [`Certs`], and a
/// `pg_hba.conf` that lets TCP logins in only over TLS ([`CERT_USER`] only with its client
/// certificate). The superuser is trusted once TLS is up. Roles [`CERT_USER`] and
/// [`PLAIN_USER`] exist.
pub struct TlsPostgres {
    pg: TestPostgres,
    certs: Certs,
}

impl TlsPostgres {
    /// Generates fresh certificates and starts a cluster owned by the caller.
    pub fn start() -> TlsPostgres {
        let certs = Certs::generate();
        let pg = TestPostgres::start_with(ClusterConfig {
            conf: vec![
                "ssl = on".into(),
                "ssl_cert_file = 'server.crt'".into(),
                "ssl_key_file = 'server.key'".into(),
                "ssl_ca_file = 'root.crt'".into(),
            ],
            hba: Some(TLS_HBA.into()),
            files: server_files(&certs),
            ..ClusterConfig::default()
        });
        pg.client()
            .batch_execute(&format!(
                "CREATE ROLE {CERT_USER} LOGIN; CREATE ROLE {PLAIN_USER} LOGIN;"
            ))
            .unwrap_or_else(|e| panic!("TlsPostgres: cannot create the test roles: {e}"));
        TlsPostgres { pg, certs }
    }

    pub fn certs(&self) -> &Certs {
        &self.certs
    }

    pub fn port(&self) -> u16 {
        self.pg.port()
    }

    /// The superuser, trusted over TLS.
    pub fn superuser(&self) -> &str {
        self.pg.superuser()
    }

    /// `host=HOST port=PORT user=SUPERUSER dbname=postgres EXTRA`: the caller adds the TLS
    /// settings.
    pub fn conninfo(&self, host: &str, extra: &str) -> String {
        self.conninfo_as(self.pg.superuser(), host, extra)
    }

    /// [`TlsPostgres::conninfo`] for another role, e.g. [`CERT_USER`].
    pub fn conninfo_as(&self, user: &str, host: &str, extra: &str) -> String {
        format!(
            "host={host} port={} user={user} dbname=postgres {extra}",
            self.pg.port()
        )
    }

    /// `postgresql://SUPERUSER@HOST:PORT/postgres?QUERY` (no `?` when `query` is empty).
    pub fn url(&self, host: &str, query: &str) -> String {
        let url = format!(
            "postgresql://{}@{host}:{}/postgres",
            self.pg.superuser(),
            self.pg.port()
        );
        if query.is_empty() {
            url
        } else {
            format!("{url}?{query}")
        }
    }
}

/// The TLS cluster shared by all tests of this test binary, started on first use and stopped
/// (with its certificates removed) at process exit, like [`super::shared`].
pub fn shared_tls() -> &'static TlsPostgres {
    static SHARED: OnceLock<Result<TlsPostgres, String>> = OnceLock::new();
    extern "C" fn stop_shared_tls_at_exit() {
        if let Some(Ok(tls)) = SHARED.get() {
            for problem in tls.pg.shutdown() {
                eprintln!("TlsPostgres (shared, port {}): {problem}", tls.pg.port);
            }
            if let Err(e) = fs::remove_dir_all(tls.certs.dir()) {
                eprintln!(
                    "TlsPostgres: cannot remove {}: {e}",
                    tls.certs.dir().display()
                );
            }
        }
    }
    let started = SHARED.get_or_init(|| {
        panic::catch_unwind(AssertUnwindSafe(TlsPostgres::start))
            .map(|mut tls| {
                tls.pg.shared = true;
                // SAFETY: registers a plain function with no captured state; atexit has no
                // other preconditions.
                if unsafe { libc::atexit(stop_shared_tls_at_exit) } != 0 {
                    eprintln!(
                        "TlsPostgres: atexit failed; the shared server stops on exit by PDEATHSIG only"
                    );
                }
                tls
            })
            .map_err(|payload| panic_message(&*payload))
    });
    match started {
        Ok(tls) => tls,
        Err(message) => panic!("the shared TlsPostgres failed to start: {message}"),
    }
}
