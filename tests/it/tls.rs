//! TLS on both listeners, with the real binary and the official clients:
//! certificates made here with `rcgen` (a CA, the server's, an admin
//! client's, and a client of another CA), `llmops serve --tls-cert
//! --tls-key --admin-client-ca`, then a rustls client from Rust and the
//! `openai` and `grpcio` Python clients (`tests/python_tls`) over TLS; and
//! certificates replaced while it serves (SIGHUP, changed files, bad files).

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
pub struct Pem {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The test PKI: files under `dir`.
pub struct Pki {
    pub ca: PathBuf,
    pub server: Pem,
    pub client: Pem,
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

pub fn make_pki(dir: &Path) -> Pki {
    make_pki_and_ca(dir).0
}

/// [`make_pki`], and its CA to sign more certificates with.
fn make_pki_and_ca(dir: &Path) -> (Pki, CertifiedIssuer<'static, KeyPair>) {
    let root = ca("llmops test CA");
    let other = ca("another CA");
    let ca_path = dir.join("ca.crt");
    std::fs::write(&ca_path, root.pem()).unwrap();
    let pki = Pki {
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
    };
    (pki, root)
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

fn start_tls_server(dir: &Path, model: &Path, pki: &Pki, extra: &[String]) -> Server {
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
        .args(extra)
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
    let server = start_tls_server(tmp.path(), &model, &pki, &[]);
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

/// The leaf certificate (DER) a new TLS connection to `addr` is shown.
fn presented(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    conn.peer_certificates().unwrap()[0].to_vec()
}

fn der(pem: &Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_file(pem)
        .unwrap()
        .to_vec()
}

/// `llmops_tls_reloads_total{result="…"}` from `/metrics` over TLS.
fn reloads(addr: SocketAddr, config: Arc<rustls::ClientConfig>, result: &str) -> f64 {
    let (status, text) = https_get(addr, "/metrics", None, config).unwrap();
    assert_eq!(status, 200, "{text}");
    let series = format!("llmops_tls_reloads_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str())?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Polls `f` every 50 ms until it is true; panics after `within`.
fn eventually(within: Duration, what: &str, log: &Path, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < within,
            "{what} not within {within:?}; server log:\n{}",
            tail(log, 30)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `GET /health` on an open HTTP/1.1 connection, kept alive: the status.
fn keep_alive_get(s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>) -> String {
    write!(s, "GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    // The head, then exactly content-length bytes of body.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
        .unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    head.split(' ').nth(1).unwrap().to_string()
}

/// Replaces the served files with `new`'s, as a renewal would.
fn install(pem: &Pem, at: &Pem) {
    std::fs::copy(&pem.key, &at.key).unwrap();
    std::fs::copy(&pem.cert, &at.cert).unwrap();
}

#[test]
fn replaced_certificates_are_served_after_sighup_or_a_file_change_and_bad_files_keep_the_old_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut pki, root) = make_pki_and_ca(tmp.path());
    let server_cert = |name: &str| {
        leaf(
            tmp.path(),
            name,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &root,
        )
    };
    let (b, c) = (server_cert("server-b"), server_cert("server-c"));
    // The server reads `served.*`; A (make_pki's) is there first.
    let served = Pem {
        cert: tmp.path().join("served.crt"),
        key: tmp.path().join("served.key"),
    };
    install(&pki.server, &served);
    let a = std::mem::replace(&mut pki.server, served);
    let model = tmp.path().join("model");
    SynthSpec::tiny_llama().write(&model, None).unwrap();
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // Polling every 0.2 s, for the last step; SIGHUP for the others.
    let extra = [
        "--metrics-addr".to_string(),
        metrics.to_string(),
        "--tls-reload-secs".into(),
        "0.2".into(),
    ];
    let server = start_tls_server(tmp.path(), &model, &pki, &extra);
    let pid = server.child.id() as libc::pid_t;
    let client = client_config(&pki, None);
    let (cert_a, cert_b, cert_c) = (der(&a.cert), der(&b.cert), der(&c.cert));
    assert_eq!(presented(server.http, client.clone()), cert_a);
    assert_eq!(presented(server.grpc, client.clone()), cert_a);
    // The metrics listener speaks TLS with the same certificate.
    assert_eq!(presented(metrics, client.clone()), cert_a);
    let (status, body) = http_get(metrics, "/metrics").unwrap();
    assert_eq!(status, 400, "plain HTTP on the metrics port: {body}");
    let ok_before = reloads(metrics, client.clone(), "ok");

    // A connection opened under A, kept alive across the reload.
    let tcp = TcpStream::connect_timeout(&server.http, Duration::from_secs(2)).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn =
        rustls::ClientConnection::new(client.clone(), "localhost".try_into().unwrap()).unwrap();
    let mut open = rustls::StreamOwned::new(conn, tcp);
    assert_eq!(keep_alive_get(&mut open), "200");

    // B replaces A on disk; SIGHUP; new connections get B.
    install(&b, &pki.server);
    // SAFETY: kill sends a signal to our own child; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    eventually(
        Duration::from_secs(10),
        "B served after SIGHUP",
        &server.log,
        || presented(server.http, client.clone()) == cert_b,
    );
    assert_eq!(presented(server.grpc, client.clone()), cert_b);
    assert_eq!(presented(metrics, client.clone()), cert_b);
    assert!(reloads(metrics, client.clone(), "ok") > ok_before);
    // The connection opened under A is untouched and still served.
    assert_eq!(
        open.conn.peer_certificates().unwrap()[0].to_vec(),
        cert_a,
        "an open connection keeps its certificate"
    );
    assert_eq!(keep_alive_get(&mut open), "200");
    let (status, body) = https_get(
        server.http,
        "/v1/models",
        Some(INFERENCE_KEY),
        client.clone(),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");

    // Garbage in the certificate file: the reload fails, is counted, and B
    // stays; the process lives on.
    let errors_before = reloads(metrics, client.clone(), "error");
    std::fs::write(&pki.server.cert, "this is not a certificate\n").unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    eventually(
        Duration::from_secs(10),
        "the failed reload counted",
        &server.log,
        || reloads(metrics, client.clone(), "error") > errors_before,
    );
    assert_eq!(presented(server.http, client.clone()), cert_b);
    assert!(
        std::fs::read_to_string(&server.log)
            .unwrap()
            .contains("TLS reload failed"),
        "{}",
        tail(&server.log, 20)
    );
    // A key that is not the certificate's: refused the same way.
    std::fs::copy(&b.cert, &pki.server.cert).unwrap();
    std::fs::copy(&c.key, &pki.server.key).unwrap();
    let errors_before = reloads(metrics, client.clone(), "error");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    eventually(
        Duration::from_secs(10),
        "the mismatched pair refused",
        &server.log,
        || reloads(metrics, client.clone(), "error") > errors_before,
    );
    assert_eq!(presented(server.http, client.clone()), cert_b);

    // C written in place, no signal: the modification-time check picks
    // it up.
    install(&c, &pki.server);
    eventually(
        Duration::from_secs(10),
        "C served after the files changed",
        &server.log,
        || presented(server.http, client.clone()) == cert_c,
    );
    let (status, body) = https_get(server.http, "/health", None, client).unwrap();
    assert_eq!(status, 200, "{body}");
}

/// Reads from `s` until the server closes it; when that was (`None`: still
/// open after `within`).
fn closed_within(s: &mut impl Read, within: Duration) -> Option<Instant> {
    let t0 = Instant::now();
    let mut buf = [0u8; 1024];
    while t0.elapsed() < within {
        match s.read(&mut buf) {
            Ok(0) => return Some(Instant::now()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            // Reset, or a TLS close without close_notify: closed.
            Err(_) => return Some(Instant::now()),
        }
    }
    None
}

#[test]
fn over_tls_a_stalled_handshake_a_slow_head_and_an_idle_connection_are_closed_in_time() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = make_pki(tmp.path());
    let model = tmp.path().join("model");
    SynthSpec::tiny_llama().write(&model, None).unwrap();
    let (header, idle) = (Duration::from_secs(1), Duration::from_secs(3));
    let margin = Duration::from_secs(6);
    let server = start_tls_server(
        tmp.path(),
        &model,
        &pki,
        &[
            "--header-read-timeout-secs".into(),
            "1".into(),
            "--idle-timeout-secs".into(),
            "3".into(),
        ],
    );
    let config = client_config(&pki, None);
    let open_tls = || {
        let tcp = TcpStream::connect_timeout(&server.http, Duration::from_secs(2)).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let conn =
            rustls::ClientConnection::new(config.clone(), "localhost".try_into().unwrap()).unwrap();
        rustls::StreamOwned::new(conn, tcp)
    };

    // A TLS record header's first byte, then nothing: the handshake limit.
    let mut stalled = TcpStream::connect_timeout(&server.http, Duration::from_secs(2)).unwrap();
    stalled
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    stalled.write_all(&[0x16]).unwrap();
    let t0 = Instant::now();
    let closed = closed_within(&mut stalled, header + margin).expect("handshake still open");
    assert!(closed - t0 >= header - Duration::from_millis(100));

    // A finished handshake and half a request head, dripping.
    let mut slow = open_tls();
    slow.write_all(b"GET /health HTTP/1.1\r\n").unwrap();
    let t0 = Instant::now();
    let mut closed = None;
    while closed.is_none() && t0.elapsed() < header + margin {
        let _ = slow.write_all(b"x");
        closed = closed_within(&mut slow, Duration::from_millis(500));
    }
    let closed = closed.expect("a slow head over TLS is still open");
    assert!(closed - t0 >= header - Duration::from_millis(100));

    // One request answered, then idle.
    let mut kept = open_tls();
    assert_eq!(keep_alive_get(&mut kept), "200");
    let t0 = Instant::now();
    let closed = closed_within(&mut kept, idle + margin).expect("idle TLS connection still open");
    assert!(
        closed - t0 >= idle - Duration::from_millis(100),
        "{:?}",
        closed - t0
    );

    // The server still serves.
    let (status, body) = https_get(server.http, "/health", None, config).unwrap();
    assert_eq!(status, 200, "{body}");
}
