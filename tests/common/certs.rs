//! A throw-away PKI made with the openssl CLI: EC P-256 keys, X.509 v3 certificates that
//! rustls/webpki accepts (CA certs with `CA:TRUE`, end-entity certs with `CA:FALSE`, SANs).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::find_program;

/// Paths of the generated PEM files (keys are PKCS#8, unencrypted).
#[derive(Debug, Clone)]
pub struct TestCerts {
    pub dir: PathBuf,
    /// The CA that signs `server_*` and `client_*`.
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// Server certificate: CN 127.0.0.1, SAN IP:127.0.0.1 and DNS:localhost, serverAuth.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Client certificate signed by `ca_cert`: CN fieldbridge-test-client, clientAuth.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// An unrelated CA: trusting it instead of `ca_cert` must make the server be refused.
    pub other_ca_cert: PathBuf,
    pub other_ca_key: PathBuf,
    /// A client certificate signed by `other_ca_cert`: the broker must refuse it.
    pub other_client_cert: PathBuf,
    pub other_client_key: PathBuf,
}

impl TestCerts {
    /// Generates everything into `dir` (which must exist). Takes well under a second.
    pub fn generate(dir: &Path) -> TestCerts {
        let d = dir.to_path_buf();
        let p = |name: &str| d.join(name);
        let certs = TestCerts {
            dir: d.clone(),
            ca_cert: p("ca.crt"),
            ca_key: p("ca.key"),
            server_cert: p("server.crt"),
            server_key: p("server.key"),
            client_cert: p("client.crt"),
            client_key: p("client.key"),
            other_ca_cert: p("other-ca.crt"),
            other_ca_key: p("other-ca.key"),
            other_client_cert: p("other-client.crt"),
            other_client_key: p("other-client.key"),
        };
        std::fs::write(
            p("ca.cnf"),
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = fieldbridge test CA\n\
             [v3_ca]\nbasicConstraints = critical,CA:TRUE\n\
             keyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n",
        )
        .expect("write ca.cnf");
        std::fs::write(
            p("other-ca.cnf"),
            "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = unrelated test CA\n\
             [v3_ca]\nbasicConstraints = critical,CA:TRUE\n\
             keyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n",
        )
        .expect("write other-ca.cnf");
        std::fs::write(
            p("server.ext"),
            "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
             extendedKeyUsage = serverAuth\nsubjectAltName = IP:127.0.0.1,DNS:localhost\n\
             subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid,issuer\n",
        )
        .expect("write server.ext");
        std::fs::write(
            p("client.ext"),
            "basicConstraints = critical,CA:FALSE\nkeyUsage = critical,digitalSignature\n\
             extendedKeyUsage = clientAuth\n\
             subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid,issuer\n",
        )
        .expect("write client.ext");

        make_ca(&d, "ca.cnf", &certs.ca_key, &certs.ca_cert);
        make_ca(
            &d,
            "other-ca.cnf",
            &certs.other_ca_key,
            &certs.other_ca_cert,
        );
        make_leaf(
            &d,
            "/CN=127.0.0.1",
            "server.ext",
            (&certs.ca_cert, &certs.ca_key),
            (&certs.server_key, &certs.server_cert),
        );
        make_leaf(
            &d,
            "/CN=fieldbridge-test-client",
            "client.ext",
            (&certs.ca_cert, &certs.ca_key),
            (&certs.client_key, &certs.client_cert),
        );
        make_leaf(
            &d,
            "/CN=rogue-test-client",
            "client.ext",
            (&certs.other_ca_cert, &certs.other_ca_key),
            (&certs.other_client_key, &certs.other_client_cert),
        );
        certs
    }

    /// PEM bytes of a file, for rumqttc's `TlsConfiguration::Simple`.
    pub fn read(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let bin = find_program("openssl", &["/usr/bin/openssl"]);
    let out = Command::new(bin)
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

fn make_ca(dir: &Path, cnf: &str, key: &Path, cert: &Path) {
    let mut args = vec!["req", "-x509", "-new", "-nodes", "-sha256", "-days", "3650"];
    args.extend(EC);
    args.extend(["-config", cnf, "-extensions", "v3_ca"]);
    args.extend(["-keyout", s(key), "-out", s(cert)]);
    openssl(dir, &args);
}

fn make_leaf(dir: &Path, subject: &str, ext: &str, ca: (&Path, &Path), out: (&Path, &Path)) {
    let (key, cert) = out;
    let csr = cert.with_extension("csr");
    let mut args = vec!["req", "-new", "-nodes", "-subj", subject];
    args.extend(EC);
    args.extend(["-keyout", s(key), "-out", s(&csr)]);
    openssl(dir, &args);
    let serial = format!("0x{:x}", rand_serial());
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-sha256",
            "-days",
            "3650",
            "-in",
            s(&csr),
            "-CA",
            s(ca.0),
            "-CAkey",
            s(ca.1),
            "-set_serial",
            &serial,
            "-extfile",
            ext,
            "-out",
            s(cert),
        ],
    );
}

/// A serial number unique enough for a test PKI (time + counter), no RNG crate needed.
fn rand_serial() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    ((nanos << 8) ^ u128::from(N.fetch_add(1, Ordering::Relaxed))) | 1
}
