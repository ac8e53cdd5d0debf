//! One event to one hook: the webhook POST (signed, with an idempotency
//! key) or the local command (argv, the event on stdin and in the
//! environment), each under a timeout, retried with exponential backoff and
//! jitter when the failure may pass.

use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::AsyncWriteExt;

use super::{Event, Target};

/// The header carrying the signature: `t=<unix seconds>,v1=<hex>`.
pub const SIGNATURE_HEADER: &str = "X-Llmops-Signature";
/// The header naming the event's type.
pub const EVENT_HEADER: &str = "X-Llmops-Event";
/// The header carrying the event's id, the same on every retry.
pub const IDEMPOTENCY_HEADER: &str = "Idempotency-Key";

/// Longest pause between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Hex HMAC-SHA256 of `"{timestamp}.{body}"` under `secret`: what
/// [`SIGNATURE_HEADER`]'s `v1` holds. A receiver recomputes it over the raw
/// body it got and the header's `t`, compares in constant time, and refuses
/// a `t` too far from its clock (a replayed request).
pub fn sign(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    // HMAC accepts keys of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => return String::new(),
    };
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    hex::encode(mac.finalize().into_bytes())
}

/// How one attempt ended.
#[derive(Debug)]
enum Attempt {
    Ok(String),
    /// Worth another try (5xx, 429, timeout, connection error, non-zero
    /// exit).
    Retry(String),
    /// Not worth another (4xx other than 429, a command that cannot start).
    Fail(String),
}

/// How a delivery ended, after every attempt.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Delivered.
    pub ok: bool,
    /// Attempts made.
    pub attempts: u32,
    /// The last attempt's status (`200`, `exit 0`) or error.
    pub detail: String,
    /// From the first attempt to the end.
    pub elapsed: Duration,
}

/// Delivers `event` to `target`, retrying up to `retries` times.
pub async fn deliver(
    target: &Target,
    client: &reqwest::Client,
    event: &Event,
    body: &[u8],
) -> Outcome {
    retrying(target.retries, target.backoff, |attempt, detail| {
        tracing::debug!(hook = %target.name, event = %event.id, attempt, detail, "hook delivery failed; retrying");
    }, || async {
        match &target.kind {
            super::Sink::Webhook { url, secret } => {
                post(client, url, secret.as_deref(), event, body, target.timeout).await
            }
            super::Sink::Command { argv } => run(argv, event, body, target.timeout).await,
        }
    })
    .await
}

/// Runs `attempt` until it succeeds, fails for good, or `retries` retries
/// are spent, sleeping [`backoff`] (on tokio's clock) after each failure
/// worth another try; `failed` hears of each such failure.
async fn retrying<F, Fut>(
    retries: u32,
    base: Duration,
    failed: impl Fn(u32, &str),
    mut attempt: F,
) -> Outcome
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Attempt>,
{
    let start = tokio::time::Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let (ok, detail, again) = match attempt().await {
            Attempt::Ok(d) => (true, d, false),
            Attempt::Retry(d) => (false, d, attempts <= retries),
            Attempt::Fail(d) => (false, d, false),
        };
        if !again {
            return Outcome {
                ok,
                attempts,
                detail,
                elapsed: start.elapsed(),
            };
        }
        failed(attempts, &detail);
        tokio::time::sleep(backoff(base, attempts)).await;
    }
}

/// The pause after the `attempt`th failure: `base · 2^(attempt-1)`, capped,
/// with "equal jitter" (half fixed, half random), so receivers recovering
/// from an outage are not hit by every sender at once.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let exp = base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    let half = exp / 2;
    half + half.mul_f64(rand::random::<f64>())
}

async fn post(
    client: &reqwest::Client,
    url: &str,
    secret: Option<&[u8]>,
    event: &Event,
    body: &[u8],
    timeout: Duration,
) -> Attempt {
    let mut req = client
        .post(url)
        .timeout(timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(EVENT_HEADER, event.kind_name())
        .header(IDEMPOTENCY_HEADER, &event.id)
        .body(body.to_vec());
    if let Some(s) = secret {
        // Signed at each attempt: the timestamp says when this request was
        // sent, so a receiver's replay window holds for retries too.
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        req = req.header(SIGNATURE_HEADER, format!("t={t},v1={}", sign(s, t, body)));
    }
    match req.send().await {
        Ok(r) => {
            let s = r.status();
            // The body is not read: nothing in it is used, and a large one
            // would cost memory.
            if s.is_success() {
                Attempt::Ok(format!("HTTP {}", s.as_u16()))
            } else if s.is_server_error() || s.as_u16() == 429 {
                Attempt::Retry(format!("HTTP {}", s.as_u16()))
            } else {
                Attempt::Fail(format!("HTTP {}", s.as_u16()))
            }
        }
        Err(e) if e.is_timeout() => Attempt::Retry(format!("timed out after {timeout:?}")),
        Err(e) if e.is_builder() => Attempt::Fail(format!("bad request: {e}")),
        Err(e) => Attempt::Retry(error_chain(&e)),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The variables a command hook's child inherits from the server: the
/// rest (API keys, the etcd password, hook secrets) is cleared.
const INHERITED_ENV: &[&str] = &["PATH", "LANG", "LC_ALL", "TZ"];
/// `PATH` when the server has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Runs the command with the event on stdin and in `LLMOPS_EVENT` (also
/// `LLMOPS_EVENT_TYPE`, `LLMOPS_EVENT_ID`); no shell. The child gets a
/// cleared environment (plus [`INHERITED_ENV`]) and a process group of its
/// own, killed whole when the timeout passes, so a forked helper does not
/// outlive its hook.
async fn run(argv: &[String], event: &Event, body: &[u8], timeout: Duration) -> Attempt {
    let Some((program, args)) = argv.split_first() else {
        return Attempt::Fail("empty command".into());
    };
    let json = String::from_utf8_lossy(body);
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).env_clear();
    for var in INHERITED_ENV {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    if std::env::var_os("PATH").is_none() {
        cmd.env("PATH", DEFAULT_PATH);
    }
    cmd.env("LLMOPS_EVENT", json.as_ref())
        .env("LLMOPS_EVENT_TYPE", event.kind_name())
        .env("LLMOPS_EVENT_ID", &event.id)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    #[cfg(unix)]
    cmd.process_group(0);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        // Not found, not executable: the next attempt would fail alike.
        Err(e) => return Attempt::Fail(format!("cannot start `{program}`: {e}")),
    };
    // The group's id is the child's pid (`process_group(0)`).
    let group = child.id();
    let work = async {
        if let Some(mut stdin) = child.stdin.take() {
            // A command that does not read its stdin closes the pipe: that
            // is its business, the exit status decides.
            let _ = stdin.write_all(body).await;
            drop(stdin);
        }
        child.wait().await
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(status)) if status.success() => Attempt::Ok("exit 0".into()),
        Ok(Ok(status)) => Attempt::Retry(match status.code() {
            Some(c) => format!("exit {c}"),
            None => format!("{status}"),
        }),
        Ok(Err(e)) => Attempt::Retry(format!("wait: {e}")),
        Err(_) => {
            kill_group(group);
            // `kill_on_drop` would also do it; kill and reap now so no
            // zombie is left for the runtime to collect.
            let _ = child.kill().await;
            Attempt::Retry(format!("timed out after {timeout:?} (killed)"))
        }
    }
}

/// SIGKILL to every process of the hook's group (the child and whatever it
/// forked).
fn kill_group(group: Option<u32>) {
    #[cfg(unix)]
    if let Some(pgid) = group.and_then(|g| libc::pid_t::try_from(g).ok())
        && pgid > 0
    {
        // SAFETY: killpg only sends a signal; the group is the one the
        // child leads (`process_group(0)`), never the server's own.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
    #[cfg(not(unix))]
    let _ = group;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_rfc_4231_hmac_sha256() {
        // RFC 4231 test case 2 pins the primitive; `sign` is that
        // primitive over `"{t}.{body}"`.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // sign() is HMAC over "t.body".
        let mut mac = Hmac::<Sha256>::new_from_slice(b"k").unwrap();
        mac.update(b"17.{}");
        assert_eq!(
            sign(b"k", 17, b"{}"),
            hex::encode(mac.finalize().into_bytes())
        );
    }

    /// An attempt that answers from a script, one entry a call.
    fn scripted(script: Vec<Attempt>) -> impl FnMut() -> std::future::Ready<Attempt> {
        let mut it = script.into_iter();
        move || std::future::ready(it.next().unwrap_or(Attempt::Fail("script ran out".into())))
    }

    #[tokio::test(start_paused = true)]
    async fn a_passing_failure_is_retried_after_each_backoff_until_it_succeeds() {
        let r = |d: &str| Attempt::Retry(d.into());
        let script = vec![r("503"), r("503"), r("timeout"), Attempt::Ok("200".into())];
        let base = Duration::from_secs(1);
        let t0 = tokio::time::Instant::now();
        let out = retrying(5, base, |_, _| {}, scripted(script)).await;
        assert!(out.ok, "{out:?}");
        assert_eq!((out.attempts, out.detail.as_str()), (4, "200"));
        // Three pauses of 1, 2 and 4 s, each between half and all of it.
        let slept = t0.elapsed();
        assert_eq!(out.elapsed, slept);
        assert!(
            slept >= Duration::from_millis(3500) && slept <= Duration::from_secs(7),
            "{slept:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retries_stop_at_the_limit_and_a_client_error_is_not_retried() {
        let retry = || Attempt::Retry("500".into());
        let heard = std::sync::Mutex::new(vec![]);
        let out = retrying(
            2,
            Duration::from_secs(10),
            |n, d| heard.lock().unwrap().push(format!("{n}:{d}")),
            scripted(vec![retry(), retry(), retry(), retry()]),
        )
        .await;
        assert!(!out.ok);
        assert_eq!(out.attempts, 3, "one try and two retries");
        assert_eq!(*heard.lock().unwrap(), ["1:500", "2:500"]);
        // 10 s then 20 s, jittered: the capped exponential, on a paused clock.
        assert!(out.elapsed >= Duration::from_secs(15) && out.elapsed <= Duration::from_secs(30));

        let out = retrying(
            5,
            Duration::from_secs(10),
            |_, _| {},
            scripted(vec![Attempt::Fail("404".into()), retry()]),
        )
        .await;
        assert_eq!((out.ok, out.attempts), (false, 1));
        assert_eq!(
            out.elapsed,
            Duration::ZERO,
            "no pause after a failure for good"
        );
    }

    #[test]
    fn backoff_doubles_within_its_jitter_and_is_capped() {
        let base = Duration::from_millis(100);
        for attempt in 1..=4u32 {
            let full = base * (1 << (attempt - 1));
            for _ in 0..50 {
                let d = backoff(base, attempt);
                assert!(d >= full / 2 && d <= full, "{attempt}: {d:?}");
            }
        }
        assert!(backoff(base, 40) <= MAX_BACKOFF);
    }
}
