//! The registry's log in etcd, shared by every replica of a fleet
//! (`--registry etcd://host:2379/prefix`).
//!
//! Entries are keys `{prefix}/log/{seq:020}` holding one audit entry's JSON.
//! An append is a transaction that creates the next key only if no replica
//! created it first (compare-and-set on its create revision), so the log has
//! one order whichever replica writes, and etcd's own fsync and quorum make
//! it durable. Every replica reads the keys after its last one when a watch
//! on the log fires (and once a second, in case a watch broke), and applies
//! them: the log is the fleet's desired state, each replica reconciles its
//! engines and router to it (`control::fleet`).
//!
//! One replica leads: it holds `{prefix}/leader` under a lease that it keeps
//! alive. When it dies its lease expires and another replica takes the key;
//! the leader runs what must run once per fleet (rollout analysis, the
//! drift loop).
//!
//! The registry is synchronous (a std mutex, appends that block on fsync),
//! so the client runs on a runtime thread of its own and [`Etcd::call`]
//! waits for its answer with a deadline: a caller on a tokio worker blocks
//! for one round trip, as it does for a local fsync, and never on a runtime
//! it is running on.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::etcdserverpb as pb;
use pb::compare::{CompareResult, CompareTarget, TargetUnion};

/// How to reach the shared registry.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// `etcd://[user@]host:port[,host:port…]/prefix[?ca=…&cert=…&key=…]`
    /// (see [`Target`]).
    pub url: String,
    /// The user's password (`LLMOPS_ETCD_PASSWORD`), when the URL names a
    /// user.
    pub password: Option<String>,
    /// This replica's name in the leader key and the audit log.
    pub replica_id: String,
    /// The leader lease's time to live: how long a dead leader keeps the
    /// role before another replica takes it.
    pub leader_ttl: Duration,
    /// Deadline of one request to etcd.
    pub timeout: Duration,
}

/// A leader's write refused because this replica no longer holds the
/// leader lease (another replica may lead by now): nothing was written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fenced;

impl std::fmt::Display for Fenced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("this replica no longer leads the fleet (its leader lease ended); the write was refused")
    }
}

impl std::error::Error for Fenced {}

/// What `/ready` and the admin API say about the shared store.
#[derive(Debug, Default)]
pub struct Health {
    connected: AtomicBool,
    leader: AtomicBool,
    /// The lease this replica holds the leader key under (0: none).
    lease: AtomicI64,
    last_error: Mutex<Option<String>>,
    leader_id: Mutex<Option<String>>,
}

impl Health {
    fn ok(&self) {
        self.connected.store(true, Ordering::Relaxed);
    }

    fn failed(&self, e: &str) {
        self.connected.store(false, Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    /// Whether the last request to etcd was answered.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Whether this replica holds the leader key.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// The replica that leads, as last seen.
    pub fn leader_id(&self) -> Option<String> {
        self.leader_id
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The lease of the leader key, while this replica holds it.
    pub fn lease(&self) -> Option<i64> {
        Some(self.lease.load(Ordering::Relaxed)).filter(|&l| l != 0)
    }

    /// The last error talking to etcd.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_leader(&self, me: bool, id: Option<String>) {
        let was = self.leader.swap(me, Ordering::Relaxed);
        if was != me {
            tracing::info!(leader = me, "fleet leadership changed");
        }
        *self.leader_id.lock().unwrap_or_else(|p| p.into_inner()) = id;
    }
}

/// Adds the auth token (when there is one) to every request.
#[derive(Clone, Default)]
struct Token(Arc<RwLock<Option<AsciiMetadataValue>>>);

impl Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = self.0.read().unwrap_or_else(|p| p.into_inner()).clone() {
            req.metadata_mut().insert("token", t);
        }
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, Token>;

/// The gRPC clients, cheap to clone (one channel).
#[derive(Clone)]
struct Clients {
    kv: pb::kv_client::KvClient<Svc>,
    watch: pb::watch_client::WatchClient<Svc>,
    lease: pb::lease_client::LeaseClient<Svc>,
}

/// A connection to the shared registry in etcd.
pub struct Etcd {
    runtime: tokio::runtime::Handle,
    clients: Clients,
    prefix: String,
    timeout: Duration,
    health: Arc<Health>,
    changed: Arc<tokio::sync::Notify>,
    url: String,
    /// This replica's name (the leader key's value, and each entry it
    /// appends names it).
    replica_id: String,
    /// Wakes the login task when etcd refused this replica's token (a
    /// restarted etcd forgets every token); `None` without a user.
    relogin: Option<Arc<tokio::sync::Notify>>,
}

/// How often a logged-in replica takes a fresh token even when nothing
/// failed: well inside etcd's default token TTL (`--auth-token-ttl`, 300 s).
const TOKEN_REFRESH: Duration = Duration::from_secs(60);

/// A user's login, kept fresh: the token every request carries is replaced
/// before it expires and at once when etcd refuses it.
struct Login {
    auth: pb::auth_client::AuthClient<Channel>,
    request: pb::AuthenticateRequest,
    token: Token,
}

impl Login {
    async fn login(&mut self) -> anyhow::Result<()> {
        let answer = self
            .auth
            .authenticate(self.request.clone())
            .await
            .map_err(status_msg)?;
        let value = AsciiMetadataValue::try_from(answer.into_inner().token)
            .map_err(|e| anyhow::anyhow!("etcd auth token: {e}"))?;
        *self.token.0.write().unwrap_or_else(|p| p.into_inner()) = Some(value);
        Ok(())
    }

    async fn keep(mut self, stale: Arc<tokio::sync::Notify>, timeout: Duration) {
        loop {
            tokio::select! {
                _ = stale.notified() => {}
                _ = tokio::time::sleep(TOKEN_REFRESH) => {}
            }
            match tokio::time::timeout(timeout, self.login()).await {
                Ok(Ok(())) => tracing::debug!("etcd token renewed"),
                Ok(Err(e)) => tracing::warn!("etcd login failed: {e:#}"),
                Err(_) => tracing::warn!("etcd login timed out"),
            }
            // At most one login a second, however many calls were refused.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Whether etcd refused the request's token (expired, or issued before a
/// restart), so that logging in again fixes it.
fn token_refused(e: &anyhow::Error) -> bool {
    let m = format!("{e:#}");
    m.contains("invalid auth token") || m.contains("Unauthenticated")
}

/// The key after every key that starts with `prefix` (etcd's range end).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Where the registry is, as `--registry` names it, like a PostgreSQL
/// connection URI: `etcd://[user@]h1:2379[,h2:2379…]/prefix` with, for TLS,
/// `?ca=CA.pem` (the servers' CA; turns TLS on) and `&cert=…&key=…` (a
/// client certificate for etcd's `--client-cert-auth`). The password of
/// `user` never goes in the URL: it is `LLMOPS_ETCD_PASSWORD`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Target {
    /// `host:port` of each member.
    pub hosts: Vec<String>,
    /// The key prefix, `/` + the URL's path (`/llmops` when empty).
    pub prefix: String,
    /// etcd user (role-based auth).
    pub user: Option<String>,
    /// CA certificate (PEM) of the servers.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM).
    pub cert: Option<PathBuf>,
    /// Its key (PEM).
    pub key: Option<PathBuf>,
}

/// Parses a `--registry` URL (see [`Target`]).
pub fn parse_url(url: &str) -> anyhow::Result<Target> {
    let rest = url.strip_prefix("etcd://").ok_or_else(|| {
        anyhow::anyhow!("`{url}`: a shared registry is etcd://[user@]host:port[,host:port…]/prefix")
    })?;
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, prefix) = rest.split_once('/').unwrap_or((rest, "llmops"));
    let (user, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) if !u.is_empty() => (Some(u.to_string()), h),
        Some((_, h)) => (None, h),
        None => (None, authority),
    };
    if user.as_deref().is_some_and(|u| u.contains(':')) {
        anyhow::bail!("`{url}`: the etcd password goes in LLMOPS_ETCD_PASSWORD, not the URL");
    }
    let hosts: Vec<String> = hosts
        .split(',')
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .collect();
    if hosts.is_empty() {
        anyhow::bail!("`{url}` names no etcd host");
    }
    let prefix = prefix.trim_matches('/');
    let prefix = if prefix.is_empty() { "llmops" } else { prefix };
    let mut t = Target {
        hosts,
        prefix: format!("/{prefix}"),
        user,
        ..Default::default()
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let path = Some(PathBuf::from(v)).filter(|_| !v.is_empty());
        match k {
            "ca" => t.ca = path,
            "cert" => t.cert = path,
            "key" => t.key = path,
            other => anyhow::bail!("`{url}`: unknown option `{other}` (ca, cert, key)"),
        }
    }
    if t.cert.is_some() != t.key.is_some() {
        anyhow::bail!("`{url}`: cert and key go together");
    }
    Ok(t)
}

fn pem(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn status_msg(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("etcd: {} ({:?})", s.message(), s.code())
}

impl Etcd {
    /// Connects (lazily: a down etcd shows in the first request's error),
    /// logs in when a user is given, and starts the log watch and the
    /// leader campaign.
    pub fn connect(opts: &EtcdOptions) -> anyhow::Result<Arc<Self>> {
        let target = parse_url(&opts.url)?;
        let tls = target.ca.is_some() || target.cert.is_some();
        let mut endpoints = vec![];
        for h in &target.hosts {
            let scheme = if tls { "https" } else { "http" };
            let mut ep = Endpoint::from_shared(format!("{scheme}://{h}"))?
                .connect_timeout(opts.timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(opts.timeout);
            if tls {
                let mut cfg = ClientTlsConfig::new().with_enabled_roots();
                if let Some(ca) = &target.ca {
                    cfg = cfg.ca_certificate(Certificate::from_pem(pem(ca)?));
                }
                if let (Some(c), Some(k)) = (&target.cert, &target.key) {
                    cfg = cfg.identity(Identity::from_pem(pem(c)?, pem(k)?));
                }
                ep = ep.tls_config(cfg)?;
            }
            endpoints.push(ep);
        }
        let runtime = spawn_runtime()?;
        let token = Token::default();
        let channel = {
            let _enter = runtime.enter();
            Channel::balance_list(endpoints.into_iter())
        };
        let limit = 64 << 20;
        let clients = Clients {
            kv: pb::kv_client::KvClient::with_interceptor(channel.clone(), token.clone())
                .max_decoding_message_size(limit),
            watch: pb::watch_client::WatchClient::with_interceptor(channel.clone(), token.clone())
                .max_decoding_message_size(limit),
            lease: pb::lease_client::LeaseClient::with_interceptor(channel.clone(), token.clone()),
        };
        let me = Arc::new(Self {
            runtime,
            clients,
            prefix: target.prefix.clone(),
            timeout: opts.timeout,
            health: Arc::new(Health::default()),
            changed: Arc::new(tokio::sync::Notify::new()),
            url: opts.url.clone(),
            replica_id: opts.replica_id.clone(),
            relogin: target
                .user
                .is_some()
                .then(|| Arc::new(tokio::sync::Notify::new())),
        });
        if let (Some(user), Some(stale)) = (&target.user, &me.relogin) {
            let login = Login {
                auth: pb::auth_client::AuthClient::new(channel),
                request: pb::AuthenticateRequest {
                    name: user.clone(),
                    password: opts.password.clone().unwrap_or_default(),
                },
                token,
            };
            // The first login decides whether the replica starts: a wrong
            // password is a startup error, not a replica that never syncs.
            let login = me
                .call(async move {
                    let mut login = login;
                    login.login().await.map(|()| login)
                })
                .map_err(|e| e.context(format!("logging in to etcd as `{user}`")))?;
            me.runtime.spawn(login.keep(stale.clone(), me.timeout));
        }
        me.runtime.spawn(watch_log(
            me.clients.clone(),
            me.log_prefix(),
            me.changed.clone(),
        ));
        me.runtime.spawn(campaign(
            me.clients.clone(),
            format!("{}/leader", me.prefix),
            opts.replica_id.clone(),
            opts.leader_ttl,
            me.timeout,
            me.health.clone(),
        ));
        Ok(me)
    }

    /// The URL it was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Connection and leadership, for `/ready` and the admin API.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Fires when the log may have grown (a watch event, or a watch that
    /// was re-established).
    pub fn changed(&self) -> &Arc<tokio::sync::Notify> {
        &self.changed
    }

    fn log_prefix(&self) -> String {
        format!("{}/log/", self.prefix)
    }

    fn log_key(&self, seq: u64) -> String {
        format!("{}/log/{seq:020}", self.prefix)
    }

    /// Runs `fut` on the client's runtime and waits for it, at most the
    /// request deadline; records the outcome in [`Health`].
    fn call<T: Send + 'static>(
        &self,
        fut: impl Future<Output = anyhow::Result<T>> + Send + 'static,
    ) -> anyhow::Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let timeout = self.timeout;
        let url = self.url.clone();
        self.runtime.spawn(async move {
            let r = match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!(
                    "etcd at {url} did not answer within {timeout:?}"
                )),
            };
            let _ = tx.send(r);
        });
        let r = rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the etcd client thread is gone"))
            .and_then(|r| r);
        match &r {
            Ok(_) => self.health.ok(),
            Err(e) => {
                self.health.failed(&format!("{e:#}"));
                if let Some(stale) = &self.relogin
                    && token_refused(e)
                {
                    stale.notify_one();
                }
            }
        }
        r
    }

    /// The log's entries from `seq` on, in order: `(seq, JSON)`.
    pub fn read_from(&self, seq: u64) -> anyhow::Result<Vec<(u64, Vec<u8>)>> {
        let mut out = vec![];
        let end = prefix_end(&self.log_prefix());
        let mut from = self.log_key(seq).into_bytes();
        loop {
            let mut kv = self.clients.kv.clone();
            let req = pb::RangeRequest {
                key: from.clone(),
                range_end: end.clone(),
                limit: 512,
                ..Default::default()
            };
            let r = self
                .call(async move { kv.range(req).await.map_err(status_msg) })?
                .into_inner();
            for item in &r.kvs {
                let key = String::from_utf8_lossy(&item.key);
                let n = key
                    .rsplit('/')
                    .next()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| anyhow::anyhow!("etcd: `{key}` is not a log key"))?;
                out.push((n, item.value.clone()));
            }
            match r.kvs.last() {
                Some(last) if r.more => {
                    from = last.key.clone();
                    from.push(0);
                }
                _ => return Ok(out),
            }
        }
    }

    /// This replica's name.
    pub fn replica_id(&self) -> &str {
        &self.replica_id
    }

    /// Creates entry `seq` unless a replica created it first; `false` then.
    /// A leader's write (`fenced`) also requires the leader key to be held
    /// under this replica's lease in the same transaction: once the lease
    /// ended (a pause longer than its TTL, a partition) the write is
    /// refused with [`Fenced`], even if this replica has not noticed yet.
    pub fn create(&self, seq: u64, value: Vec<u8>, fenced: bool) -> anyhow::Result<bool> {
        let key = self.log_key(seq).into_bytes();
        let leader_key = format!("{}/leader", self.prefix).into_bytes();
        let mut compare = vec![pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Create as i32,
            key: key.clone(),
            range_end: vec![],
            target_union: Some(TargetUnion::CreateRevision(0)),
        }];
        let mut failure = vec![];
        if fenced {
            let Some(lease) = self.health.lease() else {
                return Err(Fenced.into());
            };
            compare.push(pb::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Lease as i32,
                key: leader_key.clone(),
                range_end: vec![],
                target_union: Some(TargetUnion::Lease(lease)),
            });
            // On failure, the leader key says which compare failed.
            failure.push(pb::RequestOp {
                request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                    key: leader_key,
                    ..Default::default()
                })),
            });
        }
        let req = pb::TxnRequest {
            compare,
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key,
                    value,
                    ..Default::default()
                })),
            }],
            failure,
        };
        let mut kv = self.clients.kv.clone();
        let r = self
            .call(async move { kv.txn(req).await.map_err(status_msg) })?
            .into_inner();
        if r.succeeded {
            return Ok(true);
        }
        if fenced {
            let held = r.responses.iter().find_map(|op| match &op.response {
                Some(pb::response_op::Response::ResponseRange(range)) => {
                    Some(range.kvs.first().map_or(0, |kv| kv.lease))
                }
                _ => None,
            });
            if held != self.health.lease() {
                // Definitive: the key is not held under this replica's
                // lease. The campaign notices too and tries again.
                self.health.lease.store(0, Ordering::Relaxed);
                self.health.set_leader(false, None);
                tracing::warn!(
                    replica = %self.replica_id,
                    "a leader's write was refused: this replica no longer holds the leader lease"
                );
                return Err(Fenced.into());
            }
        }
        Ok(false)
    }

    /// A key under the prefix, for what replicas publish beside the log.
    pub fn put(&self, key: &str, value: Vec<u8>) -> anyhow::Result<()> {
        let req = pb::PutRequest {
            key: format!("{}/{key}", self.prefix).into_bytes(),
            value,
            ..Default::default()
        };
        let mut kv = self.clients.kv.clone();
        self.call(async move { kv.put(req).await.map_err(status_msg) })?;
        Ok(())
    }

    /// Every key under `{prefix}/{dir}/`, with its value.
    pub fn list(&self, dir: &str) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
        let from = format!("{}/{dir}/", self.prefix);
        let req = pb::RangeRequest {
            key: from.clone().into_bytes(),
            range_end: prefix_end(&from),
            ..Default::default()
        };
        let mut kv = self.clients.kv.clone();
        let r = self.call(async move { kv.range(req).await.map_err(status_msg) })?;
        Ok(r.into_inner()
            .kvs
            .into_iter()
            .map(|kv| {
                let k = String::from_utf8_lossy(&kv.key);
                (k[from.len()..].to_string(), kv.value)
            })
            .collect())
    }
}

/// A current-thread runtime on a thread of its own, for the client.
fn spawn_runtime() -> anyhow::Result<tokio::runtime::Handle> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("etcd-client".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => {
                    let _ = tx.send(Ok(rt.handle().clone()));
                    rt.block_on(std::future::pending::<()>());
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        })?;
    Ok(rx.recv()??)
}

/// Watches the log's keys; notifies `changed` on every event and whenever
/// the watch is (re)established, since entries may have come in between.
async fn watch_log(c: Clients, prefix: String, changed: Arc<tokio::sync::Notify>) {
    loop {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let create = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: prefix.clone().into_bytes(),
                    range_end: prefix_end(&prefix),
                    ..Default::default()
                },
            )),
        };
        if tx.send(create).await.is_ok() {
            let mut watch = c.watch.clone();
            if let Ok(stream) = watch
                .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
            {
                let mut stream = stream.into_inner();
                changed.notify_one();
                while let Ok(Some(m)) = stream.message().await {
                    if !m.events.is_empty() || m.canceled {
                        changed.notify_one();
                    }
                    if m.canceled {
                        break;
                    }
                }
            }
        }
        // Keep `tx` alive until here: dropping it would end the watch.
        drop(tx);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Campaigns for `key` forever: holds it under a kept-alive lease while it
/// can; otherwise looks every quarter of the TTL whether it is free.
async fn campaign(
    c: Clients,
    key: String,
    me: String,
    ttl: Duration,
    timeout: Duration,
    health: Arc<Health>,
) {
    let ttl_secs = ttl.as_secs().max(1) as i64;
    let tick = (ttl / 4).max(Duration::from_millis(200));
    loop {
        match tokio::time::timeout(timeout, try_lead(&c, &key, &me, ttl_secs)).await {
            Ok(Ok(Ok(lease))) => {
                health.ok();
                health.lease.store(lease, Ordering::Relaxed);
                health.set_leader(true, Some(me.clone()));
                let lost = keep_alive(&c, lease, ttl, timeout).await;
                health.set_leader(false, None);
                health.lease.store(0, Ordering::Relaxed);
                tracing::warn!(error = %lost, "fleet leadership lost");
                let mut lease_c = c.lease.clone();
                let _ = tokio::time::timeout(
                    timeout,
                    lease_c.lease_revoke(pb::LeaseRevokeRequest { id: lease }),
                )
                .await;
            }
            Ok(Ok(Err(holder))) => {
                health.ok();
                health.set_leader(false, holder);
            }
            Ok(Err(e)) => {
                health.failed(&format!("{e:#}"));
                health.set_leader(false, None);
            }
            Err(_) => {
                health.failed("etcd did not answer the leader campaign in time");
                health.set_leader(false, None);
            }
        }
        tokio::time::sleep(tick).await;
    }
}

/// One attempt: `Ok(lease)` when this replica now holds the key;
/// `Err(holder)` when another does.
async fn try_lead(
    c: &Clients,
    key: &str,
    me: &str,
    ttl: i64,
) -> anyhow::Result<Result<i64, Option<String>>> {
    let mut kv = c.kv.clone();
    // Cheap look first: no lease is granted while someone leads.
    let held = kv
        .range(pb::RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        })
        .await
        .map_err(status_msg)?
        .into_inner();
    if let Some(kv) = held.kvs.first() {
        let holder = String::from_utf8_lossy(&kv.value).to_string();
        if holder != me {
            return Ok(Err(Some(holder)));
        }
    }
    let mut lease_c = c.lease.clone();
    let lease = lease_c
        .lease_grant(pb::LeaseGrantRequest { ttl, id: 0 })
        .await
        .map_err(status_msg)?
        .into_inner()
        .id;
    let r = kv
        .txn(pb::TxnRequest {
            compare: vec![pb::Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Create as i32,
                key: key.as_bytes().to_vec(),
                range_end: vec![],
                target_union: Some(TargetUnion::CreateRevision(0)),
            }],
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: key.as_bytes().to_vec(),
                    value: me.as_bytes().to_vec(),
                    lease,
                    ..Default::default()
                })),
            }],
            failure: vec![],
        })
        .await
        .map_err(status_msg)?
        .into_inner();
    if r.succeeded {
        tracing::info!(replica = me, "this replica leads the fleet");
        Ok(Ok(lease))
    } else {
        let _ = lease_c
            .lease_revoke(pb::LeaseRevokeRequest { id: lease })
            .await;
        Ok(Err(None))
    }
}

/// Keeps `lease` alive until a renewal fails or etcd says it expired;
/// returns why it stopped.
async fn keep_alive(c: &Clients, lease: i64, ttl: Duration, timeout: Duration) -> String {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    // etcd answers the call once it has a first request to answer.
    if tx
        .send(pb::LeaseKeepAliveRequest { id: lease })
        .await
        .is_err()
    {
        return "keep-alive stream closed".into();
    }
    let mut lease_c = c.lease.clone();
    let stream = match tokio::time::timeout(
        timeout,
        lease_c.lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return format!("keep-alive: {}", e.message()),
        Err(_) => return "keep-alive: no answer".into(),
    };
    let mut stream = stream.into_inner();
    let every = ttl / 3;
    loop {
        match tokio::time::timeout(timeout.min(every * 2), stream.message()).await {
            Ok(Ok(Some(r))) if r.ttl > 0 => {}
            Ok(Ok(Some(_))) => return "the lease expired".into(),
            Ok(Ok(None)) => return "keep-alive stream ended".into(),
            Ok(Err(e)) => return format!("keep-alive: {}", e.message()),
            Err(_) => return "keep-alive: no answer in time".into(),
        }
        tokio::time::sleep(every).await;
        if tx
            .send(pb::LeaseKeepAliveRequest { id: lease })
            .await
            .is_err()
        {
            return "keep-alive stream closed".into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_hosts_a_prefix_a_user_and_tls_files() {
        let t = parse_url("etcd://a:2379,b:2379/fleet/one").unwrap();
        assert_eq!(t.hosts, ["a:2379", "b:2379"]);
        assert_eq!(t.prefix, "/fleet/one");
        assert_eq!((t.user, t.ca), (None, None));
        assert_eq!(parse_url("etcd://a:1").unwrap().prefix, "/llmops");
        let t = parse_url("etcd://ops@a:1/p?ca=/c/ca.pem&cert=/c/t.crt&key=/c/t.key").unwrap();
        assert_eq!(t.user.as_deref(), Some("ops"));
        assert_eq!(t.ca, Some(PathBuf::from("/c/ca.pem")));
        assert_eq!(t.key, Some(PathBuf::from("/c/t.key")));
        for bad in [
            "http://a:1/x",
            "etcd:///x",
            "etcd://ops:secret@a:1/p",
            "etcd://a:1/p?cert=/c/t.crt",
            "etcd://a:1/p?cafile=/c/ca.pem",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_range_end_of_a_prefix_follows_every_key_under_it() {
        assert_eq!(prefix_end("/a/log/"), b"/a/log0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
