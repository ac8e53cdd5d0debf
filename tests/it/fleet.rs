//! A fleet on one shared registry: three real `llmops serve` processes on
//! loopback and a real etcd (Debian's `etcd-server`, which `scripts/test`
//! installs). A change sent to one replica is served by all three; the
//! leader's rollout moves every replica's weights and survives the
//! leader's death; a restarted replica restores from etcd; with etcd down
//! the replicas serve on and refuse changes with a clear error; the audit
//! log is the same, whole, on every replica.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use llmops::engine::synth::SynthSpec;
use reqwest::Method;
use serde_json::{Value, json};

use crate::process::{Served, call, free_port, tiny};

/// A single-member etcd on loopback, in its own data folder; killed on drop.
struct Etcd {
    child: Child,
    port: u16,
    peer: u16,
    dir: PathBuf,
    log: PathBuf,
}

impl Etcd {
    fn start(dir: &Path) -> Self {
        Self::start_on(dir, free_port(), free_port(), None)
    }

    /// With `tls`, clients must come over TLS with a certificate from the
    /// test CA.
    fn start_on(dir: &Path, port: u16, peer: u16, tls: Option<&crate::tls::Pki>) -> Self {
        let log = dir.with_extension("log");
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{port}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new("etcd");
        if let Some(pki) = tls {
            cmd.arg("--cert-file")
                .arg(&pki.server.cert)
                .arg("--key-file")
                .arg(&pki.server.key)
                .arg("--trusted-ca-file")
                .arg(&pki.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", "t", "--data-dir"])
            .arg(dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &format!("t={peer_url}"),
                "--log-level",
                "warn",
            ])
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("etcd is not installed: scripts/test installs Debian's etcd-server");
        Self {
            child,
            port,
            peer,
            dir: dir.to_path_buf(),
            log,
        }
    }

    async fn healthy(&self) {
        let c = reqwest::Client::new();
        let t0 = Instant::now();
        loop {
            if let Ok(r) = c
                .get(format!("http://127.0.0.1:{}/health", self.port))
                .send()
                .await
                && r.text().await.unwrap_or_default().contains("true")
            {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "etcd not healthy: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn url(&self, prefix: &str) -> String {
        format!("etcd://127.0.0.1:{}/{prefix}", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Kills it and starts it again on the same data and ports (plain
    /// HTTP), healthy.
    async fn restart(self) -> Self {
        let (port, peer, dir) = (self.port, self.peer, self.dir.clone());
        drop(self);
        let etcd = Self::start_on(&dir, port, peer, None);
        etcd.healthy().await;
        etcd
    }
}

/// Switches `tiny`'s stable alias to `v1` through `r` with `reason`,
/// retrying until the shared registry takes it (a replica reconnecting, or
/// logging in again, after etcd came back).
async fn switch_once_taken(c: &reqwest::Client, r: &Served, reason: &str) {
    let t0 = Instant::now();
    loop {
        let (st, v) = call(
            c,
            Method::PUT,
            r.url("/admin/v1/models/tiny/aliases/stable"),
            Some(json!({"version": "v1", "reason": reason})),
        )
        .await;
        if st == 200 {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no change taken after etcd came back: {st} {v}\n{}",
            r.tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A replica of the fleet at `registry`, serving `model` as `tiny`.
fn replica(tmp: &Path, name: &str, model: &Path, registry: &str) -> Served {
    let data = tmp.join(format!("data-{name}"));
    let log = tmp.join(format!("{name}.log"));
    let registry = registry.to_string();
    let name = name.to_string();
    Served::spawn(model, &data, &log, move |cmd| {
        cmd.args(["--registry", &registry, "--replica-id", &name])
            .args(["--leader-ttl-secs", "2"])
            .env("RUST_LOG", "info");
    })
}

/// Replicas `a`, `b` and `c` of the fleet at `registry`, started together
/// and ready.
async fn three_replicas(tmp: &Path, model: &Path, registry: &str) -> Vec<Served> {
    let mut rs: Vec<Served> = ["a", "b", "c"]
        .iter()
        .map(|n| replica(tmp, n, model, registry))
        .collect();
    for r in rs.iter_mut() {
        r.ready().await;
    }
    rs
}

async fn serving(c: &reqwest::Client, r: &Served) -> Value {
    let (st, v) = call(c, Method::GET, r.url("/admin/v1/serving"), None).await;
    assert_eq!(st, 200, "{v}");
    v["models"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["model"] == "tiny"))
        .cloned()
        .unwrap_or(Value::Null)
}

async fn fleet(c: &reqwest::Client, r: &Served) -> Value {
    let v: Value = c
        .get(r.url("/ready"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["fleet"].clone()
}

/// Waits until `check` holds on every replica; returns how long it took.
async fn on_all<F>(
    c: &reqwest::Client,
    rs: &[&Served],
    within: Duration,
    what: &str,
    check: F,
) -> Duration
where
    F: Fn(&Value) -> bool,
{
    let t0 = Instant::now();
    loop {
        let mut all = true;
        let mut seen = vec![];
        for r in rs {
            let s = serving(c, r).await;
            all &= check(&s);
            seen.push(s);
        }
        if all {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < within,
            "{what}: not on every replica within {within:?}: {seen:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The replica that leads, by `/ready`'s fleet details.
async fn leader(c: &reqwest::Client, rs: &[&Served], within: Duration) -> usize {
    let t0 = Instant::now();
    loop {
        let mut leaders = vec![];
        for (i, r) in rs.iter().enumerate() {
            if fleet(c, r).await["leader"] == true {
                leaders.push(i);
            }
        }
        if leaders.len() == 1 {
            return leaders[0];
        }
        assert!(leaders.len() < 2, "two replicas lead at once: {leaders:?}");
        assert!(t0.elapsed() < within, "no replica leads after {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Closed-loop completions spread over `urls` until `stop`; (sent, failed).
fn traffic(
    urls: Vec<String>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    tokio::spawn(async move {
        let sent = Arc::new(AtomicU64::new(0));
        let mut tasks = vec![];
        for w in 0..6 {
            let (urls, stop, sent) = (urls.clone(), stop.clone(), sent.clone());
            tasks.push(tokio::spawn(async move {
                let c = reqwest::Client::new();
                let mut failed = vec![];
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let url = &urls[i % urls.len()];
                    sent.fetch_add(1, Ordering::Relaxed);
                    let r = c
                        .post(format!("{url}/v1/completions"))
                        .bearer_auth(crate::process::ADMIN)
                        .header("x-llmops-route-key", format!("k{i}"))
                        .json(&json!({"model": "tiny", "prompt": "hello fleet", "max_tokens": 4, "stream": i % 2 == 0}))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 200 => {
                            let _ = r.bytes().await;
                        }
                        Ok(r) => failed.push(format!("{}: {}", r.status(), r.text().await.unwrap_or_default())),
                        Err(e) => failed.push(format!("{url}: {e:?}")),
                    }
                }
                failed
            }));
        }
        let mut failed = vec![];
        for t in tasks {
            failed.extend(t.await.unwrap());
        }
        (sent.load(Ordering::Relaxed), failed)
    })
}

async fn audit(c: &reqwest::Client, r: &Served) -> Vec<Value> {
    let (st, v) = call(c, Method::GET, r.url("/admin/v1/audit?limit=10000"), None).await;
    assert_eq!(st, 200, "{v}");
    v["entries"].as_array().cloned().unwrap_or_default()
}

/// Waits until capture is `enabled` (or not) on every replica.
async fn capture_on_all(c: &reqwest::Client, rs: &[&Served], enabled: bool) {
    let t0 = Instant::now();
    loop {
        let mut seen = vec![];
        for r in rs {
            let (st, v) = call(c, Method::GET, r.url("/admin/v1/models/tiny/capture"), None).await;
            assert_eq!(st, 200, "{v}");
            seen.push(v["enabled"] == true);
        }
        if seen.iter().all(|&e| e == enabled) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "capture {enabled} not on every replica: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until every replica mirrors to `version` (or has no shadow).
async fn shadow_on_all(c: &reqwest::Client, rs: &[&Served], version: Option<&str>) {
    let t0 = Instant::now();
    loop {
        let mut seen = vec![];
        for r in rs {
            let (st, v) = call(c, Method::GET, r.url("/admin/v1/models/tiny/shadow"), None).await;
            seen.push(match st {
                200 => v["spec"]["version"].as_str().map(str::to_string),
                404 => None,
                _ => panic!("{st}: {v}"),
            });
        }
        if seen.iter().all(|s| s.as_deref() == version) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "shadow {version:?} not on every replica: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_registry_in_etcd_through_swaps_rollouts_failover_and_outages() {
    let tmp = tempfile::tempdir().unwrap();
    let mut etcd = Etcd::start(&tmp.path().join("etcd"));
    etcd.healthy().await;
    let url = etcd.url("fleet-test");
    let (v1, v2, v3) = (
        tiny(tmp.path(), "v1", 1),
        tiny(tmp.path(), "v2", 2),
        tiny(tmp.path(), "v3", 3),
    );

    // Three replicas start together on an empty registry: one registers
    // the configured model, the others find it; all serve the same version.
    let mut rs = three_replicas(tmp.path(), &v1, &url).await;
    let c = reqwest::Client::new();
    let all: Vec<&Served> = rs.iter().collect();
    on_all(&c, &all, Duration::from_secs(5), "v1 stable", |s| {
        s["serving"]["version"] == "v1"
    })
    .await;
    leader(&c, &all, Duration::from_secs(10)).await;

    // A register and an alias switch sent to replica a, under load spread
    // over the three: every replica serves v2, and no request fails.
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(all.iter().map(|r| r.url("")).collect(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (st, v) = call(
        &c,
        Method::POST,
        rs[0].url("/admin/v1/models/tiny/versions"),
        Some(json!({"path": v2, "version": "v2"})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let t0 = Instant::now();
    let (st, v) = call(
        &c,
        Method::PUT,
        rs[0].url("/admin/v1/models/tiny/aliases/stable"),
        Some(json!({"version": "v2", "reason": "fleet swap"})),
    )
    .await;
    let answered = t0.elapsed();
    assert_eq!(st, 200, "{v}");
    let reach = on_all(&c, &all, Duration::from_secs(5), "v2 stable", |s| {
        s["serving"]["version"] == "v2"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (sent, failed) = load.await.unwrap();
    println!(
        "fleet: alias switch answered by replica a in {answered:?} (v2 loaded there first), on all 3 replicas {reach:?} later; {sent} requests during the swap, {} failed",
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "requests failed across the swap: {failed:?}"
    );
    assert!(sent > 10, "too little traffic to judge the swap: {sent}");

    // A shadow set on replica c mirrors on every replica; cleared on
    // replica a, it is gone from every replica.
    let (st, v) = call(
        &c,
        Method::PUT,
        rs[2].url("/admin/v1/models/tiny/shadow"),
        Some(json!({"version": "v1", "rate": 0.5, "reason": "fleet shadow"})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    shadow_on_all(&c, &all, Some("v1")).await;
    let (st, v) = call(
        &c,
        Method::DELETE,
        rs[0].url("/admin/v1/models/tiny/shadow?reason=fleet%20shadow%20done"),
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    shadow_on_all(&c, &all, None).await;

    // Capture likewise: on through replica b, off through replica c.
    let capture = "/admin/v1/models/tiny/capture";
    let (st, v) = call(
        &c,
        Method::PUT,
        rs[1].url(capture),
        Some(json!({"reason": "fleet capture"})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    capture_on_all(&c, &all, true).await;
    let (st, v) = call(
        &c,
        Method::DELETE,
        rs[2].url(&format!("{capture}?reason=enough")),
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    capture_on_all(&c, &all, false).await;

    // A retrain would write where only the replica that trains can read:
    // without --trained-dir a fleet refuses it, saying what to set.
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, "the fleet retrains from this text. ".repeat(40)).unwrap();
    let (st, v) = call(
        &c,
        Method::POST,
        rs[1].url("/admin/v1/models/tiny/retrain"),
        Some(json!({"data": [corpus], "steps": 1})),
    )
    .await;
    assert_eq!(st, 409, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("--trained-dir")),
        "{v}"
    );

    // A rollout started on a replica that may not lead: the leader drives
    // it, and every replica's table follows its weights.
    let (st, v) = call(
        &c,
        Method::POST,
        rs[1].url("/admin/v1/models/tiny/versions"),
        Some(json!({"path": v3, "version": "v3"})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(all.iter().map(|r| r.url("")).collect(), stop.clone());
    let (st, ro) = call(
        &c,
        Method::POST,
        rs[1].url("/admin/v1/rollouts"),
        Some(json!({
            "model": "tiny", "candidate": "v3", "steps": [20, 40, 60, 80, 100], "interval_secs": 1.0,
            "analysis": {"gates": ["error_rate <= 0.01"], "min_samples": 3, "mann_whitney_alpha": null}
        })),
    )
    .await;
    assert_eq!(st, 200, "{ro}");
    let id = ro["id"].as_str().unwrap().to_string();
    on_all(&c, &all, Duration::from_secs(5), "canary at 20%", |s| {
        s["serving"]["canary"]["version"] == "v3"
    })
    .await;
    on_all(&c, &all, Duration::from_secs(20), "canary at 40%", |s| {
        s["serving"]["canary"]["weight"].as_u64().unwrap_or(0) >= 40
    })
    .await;

    // The leader dies mid-rollout: another replica takes the lease and the
    // rollout goes on to promotion there.
    let dead = leader(&c, &all, Duration::from_secs(5)).await;
    let killed_at = Instant::now();
    let gone = rs.remove(dead);
    let _ = Command::new("kill")
        .args(["-9", &gone.pid().to_string()])
        .status();
    let survivors: Vec<&Served> = rs.iter().collect();
    let next = leader(&c, &survivors, Duration::from_secs(10)).await;
    let failover = killed_at.elapsed();
    println!(
        "fleet: leader {dead} killed; replica {next} of the survivors leads after {failover:?}"
    );
    let t0 = Instant::now();
    let done = loop {
        let (_, v) = call(
            &c,
            Method::GET,
            rs[0].url(&format!("/admin/v1/rollouts/{id}")),
            None,
        )
        .await;
        if v["phase"] != "progressing" && v["phase"] != "paused" {
            break v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "the rollout stalled after failover: {v:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.store(true, Ordering::Relaxed);
    let (_, failed) = load.await.unwrap();
    assert_eq!(done["phase"], "promoted", "{done:#}");
    let survivors: Vec<&Served> = rs.iter().collect();
    on_all(
        &c,
        &survivors,
        Duration::from_secs(5),
        "v3 stable, no canary",
        |s| s["serving"]["version"] == "v3" && s["serving"]["canary"].is_null(),
    )
    .await;
    // Requests to the killed replica fail; the others must not.
    let gone_url = gone.url("");
    let failed: Vec<&String> = failed
        .iter()
        .filter(|f| !f.starts_with(&gone_url))
        .collect();
    assert!(
        failed.is_empty(),
        "requests to live replicas failed: {failed:?}\n{}",
        rs.iter()
            .map(|r| format!("== {}\n{}", r.url(""), r.tail(400)))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // The dead replica restarts and restores the fleet's state from etcd.
    drop(gone);
    let mut back = replica(tmp.path(), "d", &v1, &url);
    back.ready().await;
    rs.push(back);
    let all: Vec<&Served> = rs.iter().collect();
    on_all(&c, &all, Duration::from_secs(5), "v3 after restart", |s| {
        s["serving"]["version"] == "v3"
    })
    .await;

    // etcd goes down: replicas serve on, refuse changes with a clear error,
    // and say so in /ready; none crashes.
    etcd.stop();
    let t0 = Instant::now();
    for r in &rs {
        loop {
            if fleet(&c, r).await["connected"] == false {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "a replica still reports etcd connected"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for r in &rs {
        let resp = c
            .post(r.url("/v1/completions"))
            .bearer_auth(crate::process::ADMIN)
            .json(&json!({"model": "tiny", "prompt": "still here", "max_tokens": 3}))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            200,
            "a replica stopped serving with etcd down"
        );
        let (st, v) = call(
            &c,
            Method::PUT,
            r.url("/admin/v1/models/tiny/aliases/stable"),
            Some(json!({"version": "v1"})),
        )
        .await;
        assert_eq!(st, 503, "{v}");
        let msg = v["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains("shared registry"), "{msg}");
        let f = fleet(&c, r).await;
        assert!(
            f["last_error"].as_str().is_some_and(|e| !e.is_empty()),
            "{f}"
        );
    }
    assert_eq!(serving(&c, &rs[0]).await["serving"]["version"], "v3");

    // etcd comes back: changes are taken again, and reach everyone.
    let _etcd = etcd.restart().await; // up until the test ends
    switch_once_taken(&c, &rs[0], "etcd is back").await;
    on_all(
        &c,
        &all,
        Duration::from_secs(5),
        "v1 after the outage",
        |s| s["serving"]["version"] == "v1",
    )
    .await;

    // The audit log is whole and the same on every replica: one sequence
    // without gaps, every action taken above in it.
    let logs = [
        audit(&c, &rs[0]).await,
        audit(&c, &rs[1]).await,
        audit(&c, &rs[2]).await,
    ];
    let seqs: Vec<u64> = logs[0].iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    for l in &logs[1..] {
        let other: Vec<u64> = l.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert!(
            other.len() + 2 >= seqs.len()
                && seqs.starts_with(&other[..other.len().min(seqs.len())]),
            "replicas disagree on the log"
        );
    }
    let has = |action: &str, pred: &dyn Fn(&Value) -> bool| {
        logs[0]
            .iter()
            .any(|e| e["action"] == action && e["result"] == "ok" && pred(e))
    };
    assert!(has("register_version", &|e| e["record"]["version"] == "v2"));
    assert!(has("set_alias", &|e| e["version"] == "v2"));
    assert!(has("rollout", &|e| e["event"] == "started"));
    assert!(has("rollout", &|e| e["event"] == "promoted"));
    assert!(has("set_alias", &|e| e["version"] == "v1"
        && e["reason"] == "etcd is back"));
    for r in &rs {
        assert!(
            !r.tail(2000).contains("panicked"),
            "a replica panicked:\n{}",
            r.tail(60)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_reaches_etcd_over_tls_with_a_client_certificate() {
    let tmp = tempfile::tempdir().unwrap();
    let pki = crate::tls::make_pki(tmp.path());
    let etcd = Etcd::start_on(
        &tmp.path().join("etcd"),
        free_port(),
        free_port(),
        Some(&pki),
    );
    let model = tmp.path().join("m");
    SynthSpec::tiny_llama().write(&model, None).unwrap();
    let url = format!(
        "{}?ca={}&cert={}&key={}",
        etcd.url("tls-test"),
        pki.ca.display(),
        pki.client.cert.display(),
        pki.client.key.display()
    );
    let mut r = Served::spawn(
        &model,
        &tmp.path().join("data"),
        &tmp.path().join("r.log"),
        move |cmd| {
            cmd.args(["--registry", &url, "--leader-ttl-secs", "2"]);
        },
    );
    r.ready().await;
    let c = reqwest::Client::new();
    let t0 = Instant::now();
    loop {
        let f = fleet(&c, &r).await;
        if f["connected"] == true && f["leader"] == true {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{f}\n{}",
            r.tail(30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (st, v) = call(&c, Method::GET, r.url("/admin/v1/audit"), None).await;
    assert_eq!(st, 200, "{v}");
    assert!(
        v["entries"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["action"] == "register_version")),
        "{v}"
    );
}

/// `scripts/check-deploy`: the Kubernetes manifests, the gateway example and
/// the Containerfile agree with each other and with this binary's flags.
#[test]
fn the_deploy_manifests_and_containerfile_agree_with_the_server() {
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check-deploy"))
        .arg(env!("CARGO_BIN_EXE_llmops"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `etcdctl` (Debian's `etcd-client`) against `etcd`, as `user` when given.
fn etcdctl(etcd: &Etcd, user: Option<&str>, args: &[&str]) {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=http://127.0.0.1:{}", etcd.port));
    if let Some(u) = user {
        cmd.arg(format!("--user={u}"));
    }
    let out = cmd
        .args(args)
        .output()
        .expect("etcdctl is not installed: scripts/test installs Debian's etcd-client");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// etcd with role-based auth: a replica logs in as a user whose role may
/// read and write its prefix only; a wrong password stops it at start with a
/// message that says so; after etcd restarts (forgetting every token) the
/// replica logs in again and takes changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_logs_in_to_etcd_as_a_user_and_again_after_etcd_restarts() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    etcd.healthy().await;
    for args in [
        &[
            "user",
            "add",
            "root",
            "--new-user-password=r00t",
            "--interactive=false",
        ][..],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "llmops"],
        &[
            "role",
            "grant-permission",
            "llmops",
            "--prefix=true",
            "readwrite",
            "/auth-test",
        ],
        &[
            "user",
            "add",
            "llmops",
            "--new-user-password=s3cret",
            "--interactive=false",
        ],
        &["user", "grant-role", "llmops", "llmops"],
        &["auth", "enable"],
    ] {
        etcdctl(&etcd, None, args);
    }
    let model = tmp.path().join("m");
    SynthSpec::tiny_llama().write(&model, None).unwrap();
    let url = format!("etcd://llmops@127.0.0.1:{}/auth-test", etcd.port);
    let start = |name: &str, password: &str| {
        let (url, password) = (url.clone(), password.to_string());
        Served::spawn(
            &model,
            &tmp.path().join(format!("data-{name}")),
            &tmp.path().join(format!("{name}.log")),
            move |cmd| {
                cmd.args(["--registry", &url, "--leader-ttl-secs", "2"])
                    .env("LLMOPS_ETCD_PASSWORD", password);
            },
        )
    };

    let mut bad = start("bad", "wrong");
    let status = bad.exited(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| !s.success()),
        "a wrong password must stop the replica: {status:?}"
    );
    let log = std::fs::read_to_string(&bad.log).unwrap();
    assert!(
        log.contains("logging in to etcd as `llmops`") && log.contains("authentication failed"),
        "{log}"
    );

    let mut r = start("good", "s3cret");
    r.ready().await;
    let c = reqwest::Client::new();
    let connected_and_leading = |f: &Value| f["connected"] == true && f["leader"] == true;
    let t0 = Instant::now();
    while !connected_and_leading(&fleet(&c, &r).await) {
        assert!(t0.elapsed() < Duration::from_secs(10), "{}", r.tail(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Its writes went in as that user (the root user could also read them,
    // but nobody else wrote here).
    assert!(
        audit(&c, &r)
            .await
            .iter()
            .any(|e| e["action"] == "register_version"),
        "{}",
        r.tail(30)
    );

    // etcd restarts: the replica's token is gone with it.
    let etcd = etcd.restart().await;
    switch_once_taken(&c, &r, "after the etcd restart").await;
    assert!(
        audit(&c, &r)
            .await
            .iter()
            .any(|e| e["reason"] == "after the etcd restart")
    );
    drop(etcd);
}

/// `scripts/check-image`: the Containerfile's runtime stage builds with
/// podman around this binary, and the image serves the embedded model as a
/// non-root user and stops cleanly on SIGTERM. (Its `build` stage, on
/// docker.io's rust image, cannot be pulled here: the script says how it
/// stands in for it.)
#[test]
fn the_image_builds_from_the_containerfile_and_serves() {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check-image"))
        .arg(env!("CARGO_BIN_EXE_llmops"))
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Short prompts in English, like the reference traffic.
const USUAL: [&str; 6] = [
    "the harbour was quiet",
    "a ship came in at dawn",
    "the keeper lit the lamp",
    "gulls over the pier",
    "nets dried in the sun",
    "the tide went out",
];

/// Long prompts in other scripts: a shift every gating signal sees.
const SHIFTED: [&str; 2] = [
    "Старый моряк пел о долгом путешествии, пока ветер гнал волны к берегу и чайки кричали над мачтой.",
    "灯塔在海湾上守望，渔夫在岸边修补渔网，潮水把小船带过礁石，雨整夜落在港口。",
];

async fn send(c: &reqwest::Client, r: &Served, prompts: &[&str], n: usize) {
    for i in 0..n {
        let (st, v) = call(
            c,
            Method::POST,
            r.url("/v1/completions"),
            Some(json!({"model": "tiny", "prompt": prompts[i % prompts.len()], "max_tokens": 2})),
        )
        .await;
        assert_eq!(st, 200, "{v}");
    }
}

/// `(state, windows judged)` of the stable version's drift on `r`.
async fn drift_of(c: &reqwest::Client, r: &Served) -> (String, u64) {
    let (st, v) = call(c, Method::GET, r.url("/admin/v1/models/tiny/drift"), None).await;
    assert_eq!(st, 200, "{v}");
    let stable = v["versions"]
        .as_array()
        .and_then(|vs| vs.iter().find(|s| s["stable"] == true))
        .cloned()
        .unwrap_or(Value::Null);
    (
        stable["state"].as_str().unwrap_or("").to_string(),
        stable["windows"].as_u64().unwrap_or(0),
    )
}

/// Waits until `r`'s stable version reads `state` after `windows` judged
/// windows (the engine records a request as it finishes it).
async fn until_drift(c: &reqwest::Client, r: &Served, state: &str, windows: u64) {
    let t0 = Instant::now();
    loop {
        let seen = drift_of(c, r).await;
        if seen == (state.to_string(), windows) {
            return;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "drift {seen:?}, expected {state} after {windows} windows"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn autopilot_steps(c: &reqwest::Client, r: &Served) -> Vec<Value> {
    audit(c, r)
        .await
        .into_iter()
        .filter(|e| e["action"] == "autopilot")
        .collect()
}

/// Drift in a fleet: each replica judges its own traffic; the leader starts
/// the loop (here the `notify` policy's one audited step) once, when a
/// majority of the replicas are in drift, and not for one replica alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_starts_the_drift_loop_once_when_most_replicas_drift() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    etcd.healthy().await;
    let url = etcd.url("drift-test");
    let model = tmp.path().join("m");
    SynthSpec {
        seed: 9,
        ..SynthSpec::tiny_llama()
    }
    .write(&model, None)
    .unwrap();
    let cfg = tmp.path().join("llmops.toml");
    std::fs::write(
        &cfg,
        r#"
[drift]
reference_requests = 24
window_requests = 12
min_window_requests = 6
window_secs = 600
consecutive = 1
prompt_logprob_rate = 0.0
signals = ["prompt_length", "prompt_script", "prompt_tokens"]

[autopilot]
policy = "notify"
"#,
    )
    .unwrap();
    let mut rs: Vec<Served> = ["a", "b", "c"]
        .iter()
        .map(|name| {
            let (url, cfg) = (url.clone(), cfg.clone());
            let name = name.to_string();
            Served::spawn(
                &model,
                &tmp.path().join(format!("data-{name}")),
                &tmp.path().join(format!("{name}.log")),
                move |cmd| {
                    cmd.args(["--registry", &url, "--replica-id", &name])
                        .args(["--leader-ttl-secs", "2"])
                        .arg("--config")
                        .arg(&cfg);
                },
            )
        })
        .collect();
    for r in rs.iter_mut() {
        r.ready().await;
    }
    let c = reqwest::Client::new();
    let all: Vec<&Served> = rs.iter().collect();
    leader(&c, &all, Duration::from_secs(10)).await;

    // Each replica freezes its reference and judges one usual window.
    for r in &all {
        send(&c, r, &USUAL, 24 + 12).await;
        until_drift(&c, r, "ok", 1).await;
    }
    // Every replica publishes its state each second: let them reach etcd.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Replica a alone sees shifted traffic: 1 of 3 is no fleet drift.
    send(&c, all[0], &SHIFTED, 12).await;
    until_drift(&c, all[0], "drift", 2).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let steps = autopilot_steps(&c, all[1]).await;
    assert!(
        steps.is_empty(),
        "one replica's drift started the loop: {steps:#?}\n{}",
        all.iter()
            .map(|r| r.tail(15))
            .collect::<Vec<_>>()
            .join("\n--\n")
    );
    // Replica b too: 2 of 3, the loop starts once.
    send(&c, all[1], &SHIFTED, 12).await;
    until_drift(&c, all[1], "drift", 2).await;
    let t0 = Instant::now();
    let steps = loop {
        let steps = autopilot_steps(&c, all[2]).await;
        if !steps.is_empty() {
            break steps;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no loop after 2 of 3 replicas drifted:\n{}",
            all.iter()
                .map(|r| r.tail(10))
                .collect::<Vec<_>>()
                .join("\n--\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(steps.len(), 1, "{steps:?}");
    assert_eq!(steps[0]["step"], "notified", "{steps:?}");
    assert!(
        steps[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("2 of 3 replicas in drift")),
        "{steps:?}"
    );
    // Replica c joins: still the same episode, no second loop.
    send(&c, all[2], &SHIFTED, 12).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(autopilot_steps(&c, all[0]).await.len(), 1);
}

/// What a verifying receiver saw: one entry per delivery, whether its
/// signature checked out under the secret, and the replica the event
/// names.
type Verified = Arc<std::sync::Mutex<Vec<(bool, String)>>>;

/// A webhook receiver on loopback that recomputes each delivery's HMAC
/// under `secret`, as `README.md` tells a receiver to.
async fn verifying_receiver(secret: &'static str) -> (String, Verified) {
    use hmac::{Hmac, Mac};
    let seen: Verified = Arc::default();
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let s = s.clone();
                async move {
                    let sig = headers
                        .get("x-llmops-signature")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    let t = sig.split(',').find_map(|p| p.strip_prefix("t="));
                    let v1 = sig.split(',').find_map(|p| p.strip_prefix("v1="));
                    let ok = match (t, v1) {
                        (Some(t), Some(v1)) => {
                            let mut mac =
                                Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
                            mac.update(format!("{t}.").as_bytes());
                            mac.update(&body);
                            hex::decode(v1).is_ok_and(|v| mac.verify_slice(&v).is_ok())
                        }
                        _ => false,
                    };
                    let ev: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let version = ev["version"].as_str().unwrap_or("").to_string();
                    s.lock().unwrap().push((ok, version));
                    if ok {
                        axum::http::StatusCode::OK
                    } else {
                        axum::http::StatusCode::UNAUTHORIZED
                    }
                }
            },
        ),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_secret_set_on_one_replica_signs_every_replicas_deliveries() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    etcd.healthy().await;
    let url = etcd.url("secrets-test");
    let model = tmp.path().join("m");
    SynthSpec::tiny_llama().write(&model, None).unwrap();
    // The fleet's secrets key, as a mounted Kubernetes Secret would be.
    let key = tmp.path().join("secrets.key");
    std::fs::write(&key, "a fleet key of more than sixteen bytes\n").unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // a, b and c share the key; d lacks it.
    let mut rs: Vec<Served> = ["a", "b", "c", "d"]
        .iter()
        .map(|name| {
            let (url, key) = (url.clone(), key.clone());
            let name = name.to_string();
            Served::spawn(
                &model,
                &tmp.path().join(format!("data-{name}")),
                &tmp.path().join(format!("{name}.log")),
                move |cmd| {
                    cmd.args(["--registry", &url, "--replica-id", &name])
                        .args(["--leader-ttl-secs", "2"]);
                    if name != "d" {
                        cmd.arg("--secrets-key-file").arg(&key);
                    }
                },
            )
        })
        .collect();
    for r in rs.iter_mut() {
        r.ready().await;
    }
    let c = reqwest::Client::new();
    let (hook_url, seen) = verifying_receiver("fleet-hook-secret").await;
    let (st, v) = call(
        &c,
        Method::PUT,
        rs[0].url("/admin/v1/hooks/ci"),
        Some(json!({"url": hook_url, "secret": "fleet-hook-secret",
                    "events": ["version_registered"], "retries": 0})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["signed"], true, "{v}");
    assert!(!v.to_string().contains("fleet-hook-secret"), "{v}");

    // Every replica has the hook: running where the key opens its
    // secret, failed (and saying why) on d.
    let t0 = Instant::now();
    loop {
        let mut states = vec![];
        for r in &rs {
            let (_, v) = call(&c, Method::GET, r.url("/admin/v1/hooks"), None).await;
            let h = v["hooks"]
                .as_array()
                .and_then(|a| a.iter().find(|h| h["name"] == "ci"))
                .cloned()
                .unwrap_or(Value::Null);
            states.push(h);
        }
        let state = |i: usize| states[i]["state"].as_str().unwrap_or("").to_string();
        if (0..3).all(|i| state(i) == "ok") && state(3) == "failed" {
            let why = states[3]["error"].as_str().unwrap();
            assert!(why.contains("--secrets-key-file"), "{why}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{states:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Each replica that takes a registration delivers its event, signed.
    for (i, version) in [(1, "from-b"), (2, "from-c"), (3, "from-d")] {
        let p = tmp.path().join(version);
        SynthSpec {
            seed: 40 + i as u64,
            ..SynthSpec::tiny_llama()
        }
        .write(&p, None)
        .unwrap();
        let (st, v) = call(
            &c,
            Method::POST,
            rs[i].url("/admin/v1/models/tiny/versions"),
            Some(json!({"path": p, "version": version})),
        )
        .await;
        assert_eq!(st, 201, "{v}");
    }
    let t0 = Instant::now();
    loop {
        let got = seen.lock().unwrap().clone();
        let versions: Vec<&str> = got.iter().map(|(_, v)| v.as_str()).collect();
        if versions.contains(&"from-b") && versions.contains(&"from-c") {
            assert!(got.iter().all(|(ok, _)| *ok), "unsigned or forged: {got:?}");
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{got:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // d sent nothing unsigned: it recorded the event as not delivered.
    let t0 = Instant::now();
    loop {
        let entries = audit(&c, &rs[3]).await;
        let failed = entries.iter().any(|e| {
            e["action"] == "hook_delivery"
                && e["hook"] == "ci"
                && e["outcome"] == "failed"
                && e["result"]
                    .as_str()
                    .is_some_and(|r| r.contains("not delivered"))
        });
        if failed {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{entries:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !seen.lock().unwrap().iter().any(|(_, v)| v == "from-d"),
        "d delivered without the secret"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_sent_to_non_leaders_hold_end_and_promote_a_rollout_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    etcd.healthy().await;
    let url = etcd.url("fleet-commands");
    let (v1, v2) = (tiny(tmp.path(), "v1", 1), tiny(tmp.path(), "v2", 2));
    let rs = three_replicas(tmp.path(), &v1, &url).await;
    let c = reqwest::Client::new();
    let all: Vec<&Served> = rs.iter().collect();
    let lead = leader(&c, &all, Duration::from_secs(10)).await;
    let (st, v) = call(
        &c,
        Method::POST,
        rs[0].url("/admin/v1/models/tiny/versions"),
        Some(json!({"path": v2, "version": "v2"})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(all.iter().map(|r| r.url("")).collect(), stop.clone());
    // Lenient checks and 1-s windows: left alone, it steps every second
    // (19 steps: still running when a loaded machine has shown its canary
    // on every replica).
    let id = lenient_rollout(
        &c,
        &rs[lead],
        &all,
        &[
            5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60, 65, 70, 75, 80, 85, 90, 95,
        ],
        1.0,
    )
    .await;
    let rollout_on = |r: &Served| r.url(&format!("/admin/v1/rollouts/{id}"));

    // Paused on a replica that does not lead: it holds on every replica
    // for three intervals (the leader's analysis does not undo it).
    let (a, b) = ((lead + 1) % 3, (lead + 2) % 3);
    command(&c, &rs[a], &id, "pause", "hold on").await;
    let t0 = Instant::now();
    let mut weight = None;
    while t0.elapsed() < Duration::from_secs(4) {
        for r in &rs {
            let (_, v) = call(&c, Method::GET, rollout_on(r), None).await;
            if v["phase"] == "progressing" && t0.elapsed() < Duration::from_secs(1) {
                continue; // not yet seen by this replica
            }
            assert_eq!(v["phase"], "paused", "{v:#}");
            let w = v["weight"].as_u64().unwrap();
            assert_eq!(
                *weight.get_or_insert(w),
                w,
                "the weight moved while paused: {v:#}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Aborted on the other non-leader: ended once, as an abort, everywhere.
    command(&c, &rs[b], &id, "abort", "enough").await;
    on_all(&c, &all, Duration::from_secs(5), "no canary", |s| {
        s["serving"]["canary"].is_null() && s["serving"]["version"] == "v1"
    })
    .await;
    // Two more intervals for a stale write to show up, if one were made.
    tokio::time::sleep(Duration::from_secs(2)).await;
    ended_once_everywhere(&c, &rs, &id, "aborted").await;

    // Promoted on a non-leader: ended once, as a promotion, everywhere
    // (the rollout's one window is longer than the test).
    let id = lenient_rollout(&c, &rs[lead], &all, &[10, 100], 120.0).await;
    command(&c, &rs[a], &id, "promote", "ship it").await;
    // Every replica then holds the new stable version alone (v1 unloaded).
    on_all(
        &c,
        &all,
        Duration::from_secs(10),
        "v2 stable, v2 alone loaded",
        |s| {
            s["serving"]["canary"].is_null()
                && s["serving"]["version"] == "v2"
                && s["loaded"] == json!(["v2"])
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = load.await.unwrap();
    ended_once_everywhere(&c, &rs, &id, "promoted").await;
}

/// Rollout `id`'s terminal entries (promoted, rolled back, aborted) in
/// `entries`.
fn terminal_entries<'a>(entries: &'a [Value], id: &str) -> Vec<&'a Value> {
    entries
        .iter()
        .filter(|e| e["action"] == "rollout" && e["id"] == id)
        .filter(|e| {
            matches!(
                e["new"]["phase"].as_str(),
                Some("aborted" | "rolled_back" | "promoted")
            )
        })
        .collect()
}

/// Rollout `id` ended as `phase` on every replica, by an operator's command
/// (the reason says "`phase` by …"), with one terminal entry in the log.
async fn ended_once_everywhere(c: &reqwest::Client, rs: &[Served], id: &str, phase: &str) {
    for r in rs {
        let u = r.url(&format!("/admin/v1/rollouts/{id}"));
        let (_, v) = call(c, Method::GET, u, None).await;
        assert_eq!(v["phase"], phase, "{v:#}");
        let reason = v["reason"].as_str().unwrap_or_default();
        assert!(reason.starts_with(&format!("{phase} by")), "{v:#}");
    }
    let entries = audit(c, &rs[0]).await;
    let ends = terminal_entries(&entries, id);
    assert_eq!(ends.len(), 1, "{ends:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_leader_stopped_past_its_lease_is_fenced_and_its_late_writes_never_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    etcd.healthy().await;
    let url = etcd.url("fleet-fenced");
    let (v1, v2) = (tiny(tmp.path(), "v1", 1), tiny(tmp.path(), "v2", 2));
    let rs = three_replicas(tmp.path(), &v1, &url).await;
    let names = ["a", "b", "c"];
    let c = reqwest::Client::new();
    let all: Vec<&Served> = rs.iter().collect();
    let old = leader(&c, &all, Duration::from_secs(10)).await;
    let others: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let (st, v) = call(
        &c,
        Method::POST,
        rs[old].url("/admin/v1/models/tiny/versions"),
        Some(json!({"path": v2, "version": "v2"})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    // Traffic on the replicas that stay up (the stopped one would hold
    // its requests).
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(
        others.iter().map(|&i| rs[i].url("")).collect(),
        stop.clone(),
    );
    // Many 1-s steps with lenient checks: it is still running after the
    // pause.
    let steps: Vec<u32> = (1..=19).map(|i| i * 5).collect();
    let id = lenient_rollout(&c, &rs[old], &all, &steps, 1.0).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // The leader stops for longer than its 2-s lease; another takes over
    // and drives the rollout meanwhile.
    let pid = rs[old].pid() as libc::pid_t;
    // SAFETY: kill(2) on the pid of a child this test owns and waits for.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let up: Vec<&Served> = others.iter().map(|&i| &rs[i]).collect();
    let new = others[leader(&c, &up, Duration::from_secs(15)).await];
    // Once the new leader has written to the rollout, its copy of the log
    // holds every entry the old one made before it stopped (an append
    // first reads the log to its end).
    let t0 = Instant::now();
    let last = loop {
        let entries = audit(&c, &rs[new]).await;
        let by = |i: usize| entries.iter().filter(move |e| e["replica"] == names[i]);
        if by(new).any(|e| e["action"] == "rollout") {
            break by(old).filter_map(|e| e["seq"].as_u64()).max().unwrap_or(0);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the new leader never drove the rollout"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    // It wakes with its windows long over and its lease gone: whatever it
    // tries to write then is refused.
    let t0 = Instant::now();
    while fleet(&c, &rs[old]).await["leader"] == true {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the old leader still claims to lead"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    command(&c, &rs[new], &id, "abort", "done").await;
    on_all(&c, &all, Duration::from_secs(10), "no canary", |s| {
        s["serving"]["canary"].is_null()
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let _ = load.await.unwrap();

    let entries = audit(&c, &rs[new]).await;
    // Nothing the old leader wrote after it stopped is in the log (before
    // it stopped, it wrote up to entry `last`).
    let late: Vec<&Value> = entries
        .iter()
        .filter(|e| e["seq"].as_u64() > Some(last) && e["replica"] == names[old])
        .collect();
    assert!(late.is_empty(), "the fenced leader wrote: {late:#?}");
    // Each revision of the rollout was written once, by one leader at a
    // time, and it ended once.
    let ours: Vec<&Value> = entries
        .iter()
        .filter(|e| e["action"] == "rollout" && e["id"] == id.as_str() && e["result"] == "ok")
        .collect();
    let mut revisions: Vec<u64> = ours
        .iter()
        .filter_map(|e| e["status"]["revision"].as_u64())
        .collect();
    let n = revisions.len();
    revisions.dedup();
    assert_eq!(revisions.len(), n, "a revision written twice: {ours:#?}");
    assert!(ours.iter().any(|e| e["replica"] == names[new]), "{ours:#?}");
    let ends = terminal_entries(&entries, &id);
    assert_eq!(ends.len(), 1, "{ends:#?}");
    // The old leader's driver let go of the rollout.
    let log = std::fs::read_to_string(&rs[old].log).unwrap();
    assert!(
        log.contains("no longer the leader")
            || log.contains("another replica changed the rollout first"),
        "{}",
        rs[old].tail(40)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaders_append_needs_its_lease_on_the_leader_key_in_the_same_transaction() {
    use llmops::registry::etcd::{Etcd as Store, EtcdOptions, Fenced};
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    etcd.healthy().await;
    let opts = EtcdOptions {
        url: etcd.url("fence"),
        password: None,
        replica_id: "solo".into(),
        leader_ttl: Duration::from_secs(5),
        timeout: Duration::from_secs(5),
    };
    let store = tokio::task::spawn_blocking(move || Store::connect(&opts).unwrap())
        .await
        .unwrap();
    let t0 = Instant::now();
    while !store.health().is_leader() {
        assert!(t0.elapsed() < Duration::from_secs(10), "it never leads");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let create = |seq: u64, fenced: bool| {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.create(seq, b"{}".to_vec(), fenced))
    };
    assert!(
        create(1, true).await.unwrap().unwrap(),
        "the leader appends"
    );
    // Entry 1 exists: a lost race, not a fence.
    assert!(!create(1, true).await.unwrap().unwrap());
    // The leader key goes while this replica's lease is still alive (its
    // keep-alive sees nothing wrong): its next leader write is refused by
    // etcd in the same transaction, and nothing is written.
    etcdctl(&etcd, None, &["del", "/fence/leader"]);
    let err = create(2, true).await.unwrap().unwrap_err();
    assert!(err.downcast_ref::<Fenced>().is_some(), "{err:#}");
    assert!(!store.health().is_leader(), "it still says it leads");
    assert!(
        store.read_from(2).unwrap().is_empty(),
        "the fenced write was applied"
    );
    // A write that is not the leader's needs no lease.
    assert!(create(2, false).await.unwrap().unwrap());
}

/// A rollout window that lacks a replica's samples (its publication is
/// unreadable, or late) is inconclusive, never judged on the others alone;
/// once the replica's data is readable again (here: gone), it goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_missing_a_replicas_samples_is_inconclusive_not_judged_without_them() {
    let tmp = tempfile::tempdir().unwrap();
    let etcd = Etcd::start(&tmp.path().join("etcd"));
    etcd.healthy().await;
    let url = etcd.url("fleet-missing");
    let (v1, v2) = (tiny(tmp.path(), "v1", 1), tiny(tmp.path(), "v2", 2));
    let mut solo = replica(tmp.path(), "a", &v1, &url);
    solo.ready().await;
    let c = reqwest::Client::new();
    leader(&c, &[&solo], Duration::from_secs(10)).await;
    let (st, v) = call(
        &c,
        Method::POST,
        solo.url("/admin/v1/models/tiny/versions"),
        Some(json!({"path": v2, "version": "v2"})),
    )
    .await;
    assert_eq!(st, 201, "{v}");
    // Another replica's publication that cannot be read.
    etcdctl(
        &etcd,
        None,
        &["put", "/fleet-missing/samples/ghost", "{\"at_ms\": "],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let load = traffic(vec![solo.url("")], stop.clone());
    let id = lenient_rollout(&c, &solo, &[&solo], &[10, 50], 1.0).await;
    let status = |c: reqwest::Client| {
        let u = solo.url(&format!("/admin/v1/rollouts/{id}"));
        async move { call(&c, Method::GET, u, None).await.1 }
    };
    // Three windows: each inconclusive, naming the replica; no step.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let v = status(c.clone()).await;
    assert_eq!(v["phase"], "progressing", "{v:#}");
    assert_eq!(v["weight"], 10, "{v:#}");
    let history = v["history"].as_array().unwrap();
    assert!(history.len() >= 2, "{v:#}");
    for h in history {
        assert_eq!(h["report"]["verdict"], "inconclusive", "{v:#}");
        let reason = h["report"]["reason"].as_str().unwrap();
        assert!(
            reason.contains("lacks samples from ghost (unreadable"),
            "{reason}"
        );
    }
    // The ghost goes; the next windows are judged and the rollout steps.
    etcdctl(&etcd, None, &["del", "/fleet-missing/samples/ghost"]);
    let t0 = Instant::now();
    loop {
        let v = status(c.clone()).await;
        if v["weight"] == 50 || v["phase"] == "promoted" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "{v:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (_, failed) = load.await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
}

/// Starts a rollout of `v2` on `r` with lenient checks (an error rate up
/// to 50%, one sample and one key enough, no rank test), no warm-up and
/// `interval` s windows; waits until every replica of `all` serves its
/// canary. Returns its id.
async fn lenient_rollout(
    c: &reqwest::Client,
    r: &Served,
    all: &[&Served],
    steps: &[u32],
    interval: f64,
) -> String {
    let (st, ro) = call(
        c,
        Method::POST,
        r.url("/admin/v1/rollouts"),
        Some(json!({
            "model": "tiny", "candidate": "v2", "steps": steps,
            "interval_secs": interval, "warmup_secs": 0.0,
            "analysis": {"gates": ["error_rate <= 0.5"], "min_samples": 1, "min_keys": 1,
                         "mann_whitney_alpha": false}
        })),
    )
    .await;
    assert_eq!(st, 200, "{ro}");
    on_all(c, all, Duration::from_secs(15), "canary on", |s| {
        s["serving"]["canary"]["version"] == "v2"
    })
    .await;
    ro["id"].as_str().unwrap().to_string()
}

/// Sends `action` (pause, resume, abort, promote) for rollout `id` to `r`,
/// with `reason`; it must be taken.
async fn command(c: &reqwest::Client, r: &Served, id: &str, action: &str, reason: &str) {
    let u = r.url(&format!("/admin/v1/rollouts/{id}/{action}"));
    let (st, v) = call(c, Method::POST, u, Some(json!({"reason": reason}))).await;
    assert_eq!(st, 200, "{v}");
}
