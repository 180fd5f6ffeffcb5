//! Development TLS material (rcgen): a CA, a server certificate and per-client certificates for mutual TLS,
//! for the `fedsb-server certs` subcommand and tests. Not for production PKI.
//!
//! A client's identity is its certificate's subject Common Name ([`identity_from_der`]); the coordinator reads
//! it from the verified peer certificate, so the name is as trustworthy as the CA key.
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};

/// Errors making, writing or reading development certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen could not build or sign a certificate (e.g. an invalid DNS name).
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// Writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A client or server name that is not allowed.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The offending name.
        name: String,
        /// Why it is refused.
        reason: String,
    },
    /// A validity period of zero days or one too long to represent.
    #[error("invalid validity period: {0} days")]
    InvalidDays(u32),
    /// A DER certificate that cannot be parsed.
    #[error("cannot parse certificate: {0}")]
    Parse(String),
    /// A certificate whose subject has no usable Common Name.
    #[error("certificate has no usable subject Common Name: {0}")]
    NoIdentity(String),
}

/// PEM-encoded certificate and private key.
#[derive(Clone, Debug)]
pub struct PemPair {
    /// The certificate, PEM (`-----BEGIN CERTIFICATE-----`).
    pub cert_pem: String,
    /// The private key, PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub key_pem: String,
}

/// A development CA, a server certificate for `server_names` (DNS names and/or IP addresses, e.g. "localhost",
/// "127.0.0.1"), and one client certificate per name in `client_names` (the name is the certificate's Common
/// Name and the client's identity). All signed by the CA; ECDSA P-256; valid for `days` days.
#[derive(Clone, Debug)]
pub struct DevCerts {
    /// The CA certificate and key.
    pub ca: PemPair,
    /// The server certificate and key.
    pub server: PemPair,
    /// One certificate and key per client, with the client's name, in the order given.
    pub clients: Vec<(String, PemPair)>,
}

/// Checks a client name: `[A-Za-z0-9._-]+`, not `.` or `..` (it names files and is the client's identity).
fn check_client_name(name: &str) -> Result<(), CertError> {
    let invalid = |reason: &str| CertError::InvalidName { name: name.to_string(), reason: reason.to_string() };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(invalid("client names may only contain A-Z, a-z, 0-9, '.', '_' and '-'"));
    }
    if name == "." || name == ".." {
        return Err(invalid("not a usable file name"));
    }
    if name.len() > 64 {
        return Err(invalid("longer than 64 characters (the X.509 Common Name limit)"));
    }
    Ok(())
}

fn check_client_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<(), CertError> {
    let mut seen = std::collections::HashSet::new();
    for name in names {
        check_client_name(name)?;
        if !seen.insert(name) {
            return Err(CertError::InvalidName { name: name.to_string(), reason: "listed twice".into() });
        }
    }
    Ok(())
}

/// A server name as a SAN: an IP address, or a DNS name (dot-separated labels of `[A-Za-z0-9_-]`, 1 to 63
/// characters each, not starting or ending with '-'; at most 253 characters).
fn server_san(name: &str) -> Result<SanType, CertError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let invalid = |reason: &str| CertError::InvalidName { name: name.to_string(), reason: reason.to_string() };
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(invalid("not an IP address or a DNS name"));
    }
    let dns = name.to_string().try_into().map_err(|e| invalid(&format!("not a DNS name: {e}")))?;
    Ok(SanType::DnsName(dns))
}

/// Parameters shared by all three kinds of certificate: subject CN, validity from an hour ago (clock skew) to
/// `days` days from now.
fn base_params(common_name: &str, days: u32) -> Result<CertificateParams, CertError> {
    if days == 0 {
        return Err(CertError::InvalidDays(days));
    }
    let since_epoch = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    let lifetime = Duration::from_secs(u64::from(days) * 86_400);
    // X.509 GeneralizedTime stops at year 9999.
    if since_epoch + lifetime > Duration::from_secs(253_402_300_799) {
        return Err(CertError::InvalidDays(days));
    }
    let mut params = CertificateParams::default();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + lifetime;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    Ok(params)
}

fn pem_pair(cert: &rcgen::Certificate, key: &KeyPair) -> PemPair {
    PemPair { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
}

/// A development CA, a server certificate for `server_names` (DNS names and/or IP addresses, e.g.
/// "localhost", "127.0.0.1"), and one client certificate per name in `client_names` (the name is the
/// certificate's Common Name and the client's identity). All signed by the CA; ECDSA P-256; valid for `days`
/// days.
pub fn make_dev_certs(server_names: &[String], client_names: &[String], days: u32) -> Result<DevCerts, CertError> {
    check_client_names(client_names.iter().map(String::as_str))?;
    if server_names.is_empty() {
        return Err(CertError::InvalidName { name: String::new(), reason: "no server names given".into() });
    }
    // Checked before any key is generated.
    for name in server_names {
        server_san(name)?;
    }

    // CA: may sign end-entity certificates only.
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca_params = base_params("fedsb development CA", days)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = pem_pair(&ca_cert, &ca_key);
    let issuer = Issuer::new(ca_params, ca_key);

    // Server: serverAuth, SANs for every name (IP or DNS).
    let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut server_params = base_params(&server_names[0], days)?;
    server_params.subject_alt_names = server_names.iter().map(|n| server_san(n)).collect::<Result<_, _>>()?;
    server_params.is_ca = IsCa::ExplicitNoCa;
    server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.use_authority_key_identifier_extension = true;
    let server_cert = server_params.signed_by(&server_key, &issuer)?;
    let server = pem_pair(&server_cert, &server_key);

    // Clients: clientAuth, identity in the CN.
    let clients = client_names
        .iter()
        .map(|name| {
            let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
            let mut params = base_params(name, days)?;
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            params.use_authority_key_identifier_extension = true;
            let cert = params.signed_by(&key, &issuer)?;
            Ok((name.clone(), pem_pair(&cert, &key)))
        })
        .collect::<Result<_, CertError>>()?;

    Ok(DevCerts { ca, server, clients })
}

/// Writes a file; `private` files get mode 0600 (on Unix), also when they already existed.
fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let io_err = |source| CertError::Io { path: path.to_path_buf(), source };
    let mut options = OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = options.open(path).map_err(io_err)?;
    // `mode` applies only when the file is created: tighten an existing key file before writing the key.
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    }
    f.write_all(contents.as_bytes()).map_err(io_err)?;
    f.sync_all().map_err(io_err)
}

/// Writes ca.pem, ca.key, server.pem, server.key, clients/<name>.pem, clients/<name>.key into `dir` (keys with
/// mode 0600). Client names must be [A-Za-z0-9._-]+ (no path separators).
pub fn write_dev_certs(c: &DevCerts, dir: &Path) -> Result<(), CertError> {
    check_client_names(c.clients.iter().map(|(name, _)| name.as_str()))?;
    let clients_dir = dir.join("clients");
    fs::create_dir_all(&clients_dir).map_err(|source| CertError::Io { path: clients_dir.clone(), source })?;
    write_file(&dir.join("ca.pem"), &c.ca.cert_pem, false)?;
    write_file(&dir.join("ca.key"), &c.ca.key_pem, true)?;
    write_file(&dir.join("server.pem"), &c.server.cert_pem, false)?;
    write_file(&dir.join("server.key"), &c.server.key_pem, true)?;
    for (name, pair) in &c.clients {
        write_file(&clients_dir.join(format!("{name}.pem")), &pair.cert_pem, false)?;
        write_file(&clients_dir.join(format!("{name}.key")), &pair.key_pem, true)?;
    }
    Ok(())
}

/// The client identity in a DER certificate: its subject Common Name (x509-parser). Errors when there is none
/// (also when there are several, or it is empty or not a string).
pub fn identity_from_der(der: &[u8]) -> Result<String, CertError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| CertError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CertError::Parse(format!("{} trailing bytes after the certificate", rest.len())));
    }
    let mut cns = cert.subject().iter_common_name();
    let cn = cns.next().ok_or_else(|| CertError::NoIdentity("no Common Name".into()))?;
    if cns.next().is_some() {
        return Err(CertError::NoIdentity("several Common Names".into()));
    }
    let name = cn.as_str().map_err(|e| CertError::NoIdentity(format!("Common Name is not a string: {e}")))?;
    if name.is_empty() {
        return Err(CertError::NoIdentity("empty Common Name".into()));
    }
    Ok(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;
    use x509_parser::pem::parse_x509_pem;

    fn der_of(pem: &str) -> Vec<u8> {
        let (rest, pem) = parse_x509_pem(pem.as_bytes()).expect("PEM");
        assert!(rest.is_empty());
        assert_eq!(pem.label, "CERTIFICATE");
        pem.contents
    }

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn generated_certs_parse_and_carry_identities() {
        let certs =
            make_dev_certs(&names(&["localhost", "127.0.0.1", "::1"]), &names(&["alice", "client-2.b_x"]), 7).unwrap();

        let ca_der = der_of(&certs.ca.cert_pem);
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert!(ca.is_ca());
        assert_eq!(ca.subject(), ca.issuer());
        // Self-signed: verifies with its own key.
        ca.verify_signature(None).unwrap();
        let days = ca.validity().not_after.timestamp() - ca.validity().not_before.timestamp();
        assert_eq!(days, 7 * 86_400 + 3600);
        assert!(ca.validity().is_valid());

        let server_der = der_of(&certs.server.cert_pem);
        let (_, server) = x509_parser::parse_x509_certificate(&server_der).unwrap();
        assert!(!server.is_ca());
        assert_eq!(server.issuer(), ca.subject());
        server.verify_signature(Some(ca.public_key())).unwrap();
        let eku = server.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        let sans = &server.subject_alternative_name().unwrap().unwrap().value.general_names;
        assert!(sans.contains(&GeneralName::DNSName("localhost")));
        assert!(sans.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
        assert!(sans.iter().any(|n| matches!(n, GeneralName::IPAddress(b) if b.len() == 16)));
        assert!(certs.server.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        KeyPair::from_pem(&certs.server.key_pem).unwrap();

        assert_eq!(certs.clients.len(), 2);
        for ((name, pair), expected) in certs.clients.iter().zip(["alice", "client-2.b_x"]) {
            assert_eq!(name, expected);
            let der = der_of(&pair.cert_pem);
            assert_eq!(identity_from_der(&der).unwrap(), expected);
            let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
            assert!(!cert.is_ca());
            cert.verify_signature(Some(ca.public_key())).unwrap();
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.client_auth && !eku.server_auth);
            // The client's key matches its certificate.
            let key = KeyPair::from_pem(&pair.key_pem).unwrap();
            assert_eq!(key.public_key_raw(), cert.public_key().subject_public_key.data.as_ref());
        }
        assert_eq!(identity_from_der(&server_der).unwrap(), "localhost");
    }

    #[test]
    fn identity_errors() {
        assert!(matches!(identity_from_der(b"not a certificate"), Err(CertError::Parse(_))));
        // A certificate without a Common Name.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, "no cn");
        let cert = params.self_signed(&key).unwrap();
        assert!(matches!(identity_from_der(cert.der()), Err(CertError::NoIdentity(_))));
        // Trailing garbage.
        let certs = make_dev_certs(&names(&["localhost"]), &names(&["c"]), 1).unwrap();
        let mut der = der_of(&certs.clients[0].1.cert_pem);
        der.push(0);
        assert!(matches!(identity_from_der(&der), Err(CertError::Parse(_))));
    }

    #[test]
    fn invalid_names_and_days_are_refused() {
        let server = names(&["localhost"]);
        for bad in ["", "a/b", "../x", "a\\b", "a b", "é", ".", "..", "x\0", "a".repeat(65).as_str()] {
            let err = make_dev_certs(&server, &names(&["ok", bad]), 1).unwrap_err();
            assert!(matches!(err, CertError::InvalidName { .. }), "{bad:?}: {err}");
        }
        assert!(matches!(make_dev_certs(&server, &names(&["a", "a"]), 1), Err(CertError::InvalidName { .. })));
        assert!(matches!(make_dev_certs(&[], &names(&["a"]), 1), Err(CertError::InvalidName { .. })));
        for bad in ["bad name!", "", "a..b", "-a.b", "a/b", "x".repeat(64).as_str()] {
            let err = make_dev_certs(&names(&["localhost", bad]), &names(&["a"]), 1).unwrap_err();
            assert!(matches!(err, CertError::InvalidName { .. }), "{bad:?}: {err}");
        }
        assert!(make_dev_certs(&names(&["fedsb-server.internal", "10.0.0.2", "fe80::1"]), &[], 1).is_ok());
        assert!(matches!(make_dev_certs(&server, &names(&["a"]), 0), Err(CertError::InvalidDays(0))));
        assert!(matches!(make_dev_certs(&server, &names(&["a"]), u32::MAX), Err(CertError::InvalidDays(_))));
        // No clients is fine (CA and server only).
        assert!(make_dev_certs(&server, &[], 1).unwrap().clients.is_empty());

        // write_dev_certs re-checks names (the struct's fields are public) and writes nothing for a bad one.
        let mut certs = make_dev_certs(&server, &names(&["a"]), 1).unwrap();
        certs.clients[0].0 = "../evil".into();
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(write_dev_certs(&certs, dir.path()), Err(CertError::InvalidName { .. })));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn files_are_written() {
        let certs = make_dev_certs(&names(&["localhost", "127.0.0.1"]), &names(&["alice", "bob"]), 30).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        write_dev_certs(&certs, &out).unwrap();
        // Writing again (overwrite) works too.
        write_dev_certs(&certs, &out).unwrap();
        let read = |p: &str| fs::read_to_string(out.join(p)).unwrap();
        assert_eq!(read("ca.pem"), certs.ca.cert_pem);
        assert_eq!(read("ca.key"), certs.ca.key_pem);
        assert_eq!(read("server.pem"), certs.server.cert_pem);
        assert_eq!(read("server.key"), certs.server.key_pem);
        for (name, pair) in &certs.clients {
            assert_eq!(read(&format!("clients/{name}.pem")), pair.cert_pem);
            assert_eq!(read(&format!("clients/{name}.key")), pair.key_pem);
            assert_eq!(identity_from_der(&der_of(&read(&format!("clients/{name}.pem")))).unwrap(), *name);
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &str| fs::metadata(out.join(p)).unwrap().permissions().mode() & 0o777;
            for key in ["ca.key", "server.key", "clients/alice.key", "clients/bob.key"] {
                assert_eq!(mode(key), 0o600, "{key}");
            }
            // A pre-existing key file with loose permissions is tightened.
            fs::set_permissions(out.join("ca.key"), fs::Permissions::from_mode(0o644)).unwrap();
            write_dev_certs(&certs, &out).unwrap();
            assert_eq!(mode("ca.key"), 0o600);
        }
    }
}
