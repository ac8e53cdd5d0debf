//! TLS on both listeners, with the real binary and the official clients:
//! certificates made here with `rcgen` (a CA, the server's, an admin
//! client's, and a client of another CA), `llmops serve --tls-cert
//! --tls-key --admin-client-ca`, then a rustls client from Rust and the
//! `openai` and `grpcio` Python clients (`tests/python_tls`) over TLS.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llmops::config::hash_secret;
use llmops::engine::synth::SynthSpec;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use tokio_rustls::rustls;

const ADMIN_KEY: &str = "sk-tls-admin";
const INFERENCE_KEY: &str = "sk-tls-inference";
const PYTEST_TIMEOUT: Duration = Duration::from_secs(240);

fn python() -> String {
    std::env::var("LLMOPS_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A certificate and its key, as PEM files.
struct Pem {
    cert: PathBuf,
    key: PathBuf,
}

/// The test PKI: files under `dir`.
struct Pki {
    ca: PathBuf,
    server: Pem,
    client: Pem,
    /// A client certificate from a CA the server does not trust.
    rogue_client: Pem,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

fn leaf(
    dir: &Path,
    name: &str,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
    issuer: &CertifiedIssuer<'static, KeyPair>,
) -> Pem {
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, issuer).unwrap();
    let pem = Pem {
        cert: dir.join(format!("{name}.crt")),
        key: dir.join(format!("{name}.key")),
    };
    std::fs::write(&pem.cert, cert.pem()).unwrap();
    std::fs::write(&pem.key, key.serialize_pem()).unwrap();
    pem
}

fn make_pki(dir: &Path) -> Pki {
    let root = ca("llmops test CA");
    let other = ca("another CA");
    let ca_path = dir.join("ca.crt");
    std::fs::write(&ca_path, root.pem()).unwrap();
    Pki {
        ca: ca_path,
        server: leaf(
            dir,
            "server",
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &root,
        ),
        client: leaf(
            dir,
            "admin-client",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            &root,
        ),
        rogue_client: leaf(
            dir,
            "rogue-client",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            &other,
        ),
    }
}

/// A rustls client that trusts the test CA, with an optional client cert.
fn client_config(pki: &Pki, cert: Option<&Pem>) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(&pki.ca).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    Arc::new(match cert {
        None => builder.with_no_client_auth(),
        Some(p) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_file(&p.cert).unwrap()],
                PrivateKeyDer::from_pem_file(&p.key).unwrap(),
            )
            .unwrap(),
    })
}

/// A blocking HTTPS GET over HTTP/1.1: (status, body).
fn https_get(
    addr: SocketAddr,
    path: &str,
    key: Option<&str>,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<(u16, String)> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap())
        .map_err(std::io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let auth = key
        .map(|k| format!("authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => {}
        // A peer that closes without close_notify after the whole response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(e),
    }
    parse_response(&String::from_utf8_lossy(&raw))
}

/// A blocking plain-HTTP GET: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    parse_response(&raw)
}

fn parse_response(raw: &str) -> std::io::Result<(u16, String)> {
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {raw:?}")))?;
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A `llmops serve` child, killed when dropped (also on panic).
struct Server {
    child: Child,
    http: SocketAddr,
    grpc: SocketAddr,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_tls_server(dir: &Path, model: &Path, pki: &Pki) -> Server {
    let config = dir.join("llmops.toml");
    let key = |id: &str, role: &str, secret: &str| {
        format!(
            "[[auth.keys]]\nid = \"{id}\"\nrole = \"{role}\"\nsha256 = \"{}\"\n\n",
            hash_secret(secret)
        )
    };
    // The certificate and key from the file, the client CA from a flag:
    // both sources are read.
    let toml = format!(
        "[server]\ntls_cert = {:?}\ntls_key = {:?}\n\n{}{}",
        pki.server.cert.display().to_string(),
        pki.server.key.display().to_string(),
        key("tls-admin", "admin", ADMIN_KEY),
        key("tls-inference", "inference", INFERENCE_KEY),
    );
    std::fs::write(&config, toml).unwrap();
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let grpc = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let log = dir.join("server.log");
    let log_file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmops"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("LLMOPS_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .stdin(Stdio::null())
        .env("NO_COLOR", "1")
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--model")
        .arg(model)
        .args(["--model-name", "tiny"])
        .args(["--http-addr", &http.to_string()])
        .args(["--grpc-addr", &grpc.to_string()])
        .arg("--admin-client-ca")
        .arg(&pki.ca)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .spawn()
        .expect("start llmops serve");
    let mut server = Server {
        child,
        http,
        grpc,
        log,
    };
    let started = Instant::now();
    let trusting = client_config(pki, None);
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            panic!(
                "llmops serve exited with {status} before it was ready; its log:\n{}",
                tail(&server.log, 50)
            );
        }
        if let Ok((200, _)) = https_get(server.http, "/ready", None, trusting.clone()) {
            return server;
        }
        if started.elapsed() > Duration::from_secs(120) {
            panic!(
                "llmops serve was not ready over TLS after 120 s; its log:\n{}",
                tail(&server.log, 50)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn tls_serves_the_official_clients_and_admin_needs_a_client_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(tmp.path());
    let model = tmp.path().join("model");
    SynthSpec::tiny_llama().write(&model, None).unwrap();
    let server = start_tls_server(tmp.path(), &model, &pki);
    let plain_tls = client_config(&pki, None);
    let with_cert = client_config(&pki, Some(&pki.client));

    // Plain HTTP to the TLS port: a 400 that says why, and the server goes on.
    let (status, body) = http_get(server.http, "/health").unwrap();
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("TLS"), "{body}");

    // Inference routes need no client certificate.
    let (status, body) = https_get(
        server.http,
        "/v1/models",
        Some(INFERENCE_KEY),
        plain_tls.clone(),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");

    // The admin API: refused without a client certificate, even with the
    // admin key; served with one.
    let (status, body) = https_get(
        server.http,
        "/admin/v1/models",
        Some(ADMIN_KEY),
        plain_tls.clone(),
    )
    .unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("client certificate"), "{body}");
    let (status, body) = https_get(
        server.http,
        "/admin/v1/models",
        Some(ADMIN_KEY),
        with_cert.clone(),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("tiny"), "{body}");

    // A certificate from another CA fails the handshake.
    let rogue = https_get(
        server.http,
        "/admin/v1/models",
        Some(ADMIN_KEY),
        client_config(&pki, Some(&pki.rogue_client)),
    );
    assert!(
        rogue.is_err(),
        "a foreign client certificate was accepted: {rogue:?}"
    );

    // The official clients over TLS.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out_path = tmp.path().join("pytest.log");
    let out_file = std::fs::File::create(&out_path).unwrap();
    let mut pytest = Command::new(python())
        .args([
            "-m",
            "pytest",
            "-q",
            "--tb=short",
            "-p",
            "no:cacheprovider",
            "tests/python_tls",
        ])
        .current_dir(root)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env(
            "LLMOPS_TLS_HTTP",
            format!("https://localhost:{}", server.http.port()),
        )
        .env(
            "LLMOPS_TLS_GRPC",
            format!("localhost:{}", server.grpc.port()),
        )
        .env("LLMOPS_TLS_CA", &pki.ca)
        .env("LLMOPS_TLS_CLIENT_CERT", &pki.client.cert)
        .env("LLMOPS_TLS_CLIENT_KEY", &pki.client.key)
        .env("LLMOPS_TLS_MODEL", "tiny")
        .env("LLMOPS_TLS_ADMIN_KEY", ADMIN_KEY)
        .env("LLMOPS_TLS_INFERENCE_KEY", INFERENCE_KEY)
        // Neither a real account, a proxy, nor a CA bundle from outside.
        .env_remove("OPENAI_API_KEY")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("SSL_CERT_FILE")
        .env_remove("SSL_CERT_DIR")
        .env_remove("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("no_proxy", "127.0.0.1,localhost")
        .stdin(Stdio::null())
        .stdout(out_file.try_clone().unwrap())
        .stderr(out_file)
        .spawn()
        .expect("start pytest (needs Python 3 with the clients: see tests/it/clients.rs)");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = pytest.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > PYTEST_TIMEOUT {
            let _ = pytest.kill();
            let _ = pytest.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let output = std::fs::read_to_string(&out_path).unwrap_or_default();
    match status {
        Some(s) if s.success() => println!("{output}"),
        _ => panic!(
            "pytest tests/python_tls failed or timed out ({status:?}):\n{output}\n--- server log ---\n{}",
            tail(&server.log, 40)
        ),
    }
    // `llmops models` (the admin gRPC client) over TLS: with the client
    // certificate it works, without one the server refuses it.
    let url = format!("https://localhost:{}", server.grpc.port());
    let cli = |with_cert: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_llmops"));
        cmd.args(["models", "--url", &url, "--api-key", ADMIN_KEY])
            .arg("--ca-cert")
            .arg(&pki.ca)
            .env_remove("LLMOPS_API_KEY")
            .env_remove("LLMOPS_ADMIN_URL")
            .stdin(Stdio::null());
        if with_cert {
            cmd.arg("--client-cert")
                .arg(&pki.client.cert)
                .arg("--client-key")
                .arg(&pki.client.key);
        }
        cmd.arg("serving").output().expect("run llmops models")
    };
    let ok = cli(true);
    assert!(
        ok.status.success() && String::from_utf8_lossy(&ok.stdout).contains("tiny"),
        "{ok:?}"
    );
    let refused = cli(false);
    assert!(!refused.status.success(), "{refused:?}");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("client certificate"), "{err}");

    // Still serving after every refusal above.
    let (status, body) = https_get(server.http, "/health", None, plain_tls).unwrap();
    assert_eq!(status, 200, "{body}");
}
