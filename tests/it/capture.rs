//! Capture end to end: the real binary, logging at debug, captures
//! requests with planted personal data, and nothing of it reaches the
//! capture files, the export or the logs; the export is what `llmops
//! train` reads; rotation and the size cap hold; every change is audited.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::process::{ADMIN, Served, call};
use crate::server::TestServer;

/// Waits until `n` records were written (or dropped) by the capture.
async fn until_written(c: &reqwest::Client, base: &str, n: u64) -> Value {
    let t0 = Instant::now();
    loop {
        let (st, v) = call(
            c,
            reqwest::Method::GET,
            format!("{base}/admin/v1/models/tiny/capture"),
            None,
        )
        .await;
        assert_eq!(st, 200, "{v}");
        if v["written"].as_u64().unwrap_or(0) + v["dropped"].as_u64().unwrap_or(0) >= n {
            return v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{n} records not written: {v}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .map(|d| d.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planted_personal_data_never_reaches_capture_files_exports_or_logs() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("tiny");
    llmops::engine::synth::SynthSpec {
        seed: 9,
        ..llmops::engine::synth::SynthSpec::tiny_llama()
    }
    .write(&model, None)
    .unwrap();
    let data = tmp.path().join("registry");
    let log_path = tmp.path().join("server.log");
    let mut server = Served::spawn(&model, &data, &log_path, |cmd| {
        cmd.env("RUST_LOG", "debug");
    });
    server.ready().await;
    let base = server.url("");
    let c = reqwest::Client::new();
    let (st, v) = call(
        &c,
        reqwest::Method::PUT,
        format!("{base}/admin/v1/models/tiny/capture"),
        Some(json!({"redact": ["(?i)codename \\w+"], "reason": "collect for retraining"})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let planted = [
        (
            "write to jane.doe@example.com today",
            "jane.doe@example.com",
        ),
        ("my number is +1 415-555-0132", "415-555-0132"),
        ("card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111"),
        ("server at 10.20.30.40 is down", "10.20.30.40"),
        (
            "use key sk-live_4eC39HqLyjWDarjtT1zdp7dc",
            "4eC39HqLyjWDarjtT1zdp7dc",
        ),
        ("the codename Nightjar is secret", "Nightjar"),
        ("text me on +14155550132", "4155550132"),
        ("pay DE89370400440532013000 by friday", "370400440532013000"),
        ("write to josé.garcía@correo.es", "correo.es"),
        ("temp key ASIAIOSFODNN7EXAMPLE", "IOSFODNN7EXAMPLE"),
        ("my ssn is 078051120", "078051120"),
    ];
    for (i, (p, _)) in planted.iter().enumerate() {
        // Completions and chat, streamed and not.
        let (path, body) = if i % 2 == 0 {
            (
                "/v1/completions",
                json!({"model": "tiny", "prompt": p, "max_tokens": 8, "stream": i % 4 == 0}),
            )
        } else {
            (
                "/v1/chat/completions",
                json!({"model": "tiny", "messages": [{"role": "user", "content": p}], "max_tokens": 8, "stream": i % 3 == 0}),
            )
        };
        let r = c
            .post(format!("{base}{path}"))
            .bearer_auth(ADMIN)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap();
    }
    let status = until_written(&c, &base, planted.len() as u64).await;
    assert_eq!(status["written"], planted.len() as u64, "{status}");

    // Only the server's user can read what was captured.
    let mode = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    let dir = data.join("capture").join("tiny");
    assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    assert_eq!(mode(&data.join("capture")), 0o700);
    let segments = files(&dir);
    assert!(!segments.is_empty());
    for p in &segments {
        assert_eq!(mode(p), 0o600, "{}", p.display());
    }
    let on_disk: String = segments
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let resp = c
        .get(format!("{base}/admin/v1/models/tiny/capture/export"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let export = resp.text().await.unwrap();
    assert_eq!(export, on_disk, "the export is the segments, oldest first");
    assert_eq!(export.lines().count(), planted.len());
    for tag in [
        "[EMAIL]",
        "[PHONE]",
        "[CARD]",
        "[IP]",
        "[SECRET]",
        "[REDACTED]",
        "[IBAN]",
        "[SSN]",
    ] {
        assert!(export.contains(tag), "{tag} missing: {export}");
    }
    let logged = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        logged.contains("capture on"),
        "the server logged at debug: {logged}"
    );
    for (_, secret) in planted {
        assert!(!on_disk.contains(secret), "{secret} on disk");
        assert!(!export.contains(secret), "{secret} exported");
        assert!(!logged.contains(secret), "{secret} logged");
    }
    // The export is training data as `llmops train` reads it.
    let path = tmp.path().join("export.jsonl");
    std::fs::write(&path, &export).unwrap();
    let corpus = llmops::train::data::Corpus::load(&[path]).unwrap();
    assert_eq!(corpus.records.len(), planted.len());
    let kinds: Vec<bool> = corpus
        .records
        .iter()
        .map(|r| matches!(r, llmops::train::data::Record::Chat(_)))
        .collect();
    assert!(
        kinds.contains(&true) && kinds.contains(&false),
        "prompts and chats"
    );
    for line in export.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["model"], "tiny");
        assert_eq!(v["version"], "v1");
        assert!(v["finish_reason"].is_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotation_and_the_size_cap_hold_and_every_change_is_audited() {
    let s = TestServer::start(|a| a.api_keys = vec![format!("ops:admin:{ADMIN}")]).await;
    let base = s.url("");
    let c = reqwest::Client::new();
    let url = format!("{base}/admin/v1/models/tiny/capture");
    let (st, v) = call(&c, reqwest::Method::GET, url.clone(), None).await;
    assert_eq!((st, v["enabled"].clone()), (200, json!(false)), "{v}");
    let (st, v) = call(
        &c,
        reqwest::Method::PUT,
        url.clone(),
        Some(json!({"segment_bytes": 100})),
    )
    .await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("segment_bytes"),
        "{v}"
    );
    let (st, v) = call(
        &c,
        reqwest::Method::PUT,
        url.clone(),
        Some(json!({"segment_bytes": 2048, "max_bytes": 8192})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let (st, v) = call(
        &c,
        reqwest::Method::PUT,
        url.clone(),
        Some(json!({"segment_bytes": 1024, "max_bytes": 4096, "redact": ["x{3}"]})),
    )
    .await;
    assert_eq!(st, 200, "{v}");
    let n = 60u64;
    for i in 0..n {
        let r = c
            .post(s.url("/v1/completions"))
            .bearer_auth(ADMIN)
            .json(&json!({"model": "tiny", "prompt": format!("request number {i} {}", "pad ".repeat(20)), "max_tokens": 6}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let status = until_written(&c, &base, n).await;
    assert_eq!(status["written"], n, "{status}");
    let dir = s_data_dir(&status);
    let segs = files(&dir);
    let sizes: Vec<u64> = segs
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    assert!(sizes.iter().sum::<u64>() <= 4096, "{sizes:?}");
    assert!(sizes.iter().all(|&b| b <= 1024), "{sizes:?}");
    assert!(status["rotations"].as_u64().unwrap() >= 4, "{status}");
    assert!(
        status["deleted_segments"].as_u64().unwrap() >= 1,
        "{status}"
    );
    let text: String = segs
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert!(
        text.contains(&format!("request number {} ", n - 1)),
        "the newest is kept"
    );
    assert!(!text.contains("request number 0 "), "the oldest went first");

    let (st, v) = call(
        &c,
        reqwest::Method::DELETE,
        format!("{url}?purge=true&reason=done"),
        None,
    )
    .await;
    assert_eq!(st, 200, "{v}");
    assert!(!dir.exists(), "purged");
    let (st, _) = call(&c, reqwest::Method::DELETE, url.clone(), None).await;
    assert_eq!(st, 404, "already off");
    let (_, audit) = call(
        &c,
        reqwest::Method::GET,
        format!("{base}/admin/v1/audit"),
        None,
    )
    .await;
    let entries: Vec<&Value> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "capture")
        .collect();
    let results: Vec<&str> = entries
        .iter()
        .map(|e| e["result"].as_str().unwrap())
        .collect();
    assert_eq!(entries.len(), 5, "{entries:?}");
    assert!(
        results[0].contains("segment_bytes"),
        "the refused change is audited too"
    );
    assert_eq!(entries[1]["new"]["max_bytes"], 8192);
    assert_eq!(entries[2]["previous"]["max_bytes"], 8192);
    assert_eq!(entries[2]["new"]["redact"], json!(["x{3}"]));
    assert_eq!(entries[3]["new"]["purged"], true);
    assert_eq!(entries[3]["reason"], "done");
    assert_ne!(results[4], "ok");
    s.stop().await;
}

fn s_data_dir(status: &Value) -> std::path::PathBuf {
    std::path::PathBuf::from(status["dir"].as_str().unwrap())
}
