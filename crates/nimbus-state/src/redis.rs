//! The Redis backend: a Redis server (`redis://`, `rediss://`), a Sentinel-managed master
//! (`redis+sentinel://`) or a Redis Cluster (`redis+cluster://`).
//!
//! Keys (every key of a bucket shares the hash tag `{function:scope}`, so a bucket lives in one
//! cluster slot and one script can change it atomically; the tag's parts are escaped, so no
//! two buckets share keys whatever their ids hold):
//! - `<prefix>:{fn_1:s:<session>}:k:<key>` (or `{fn_1:f}` for the function's bucket): a hash
//!   of `v` (the JSON), `ver` (its version) and `exp` (expiry, Unix ms, 0 for none), which
//!   also carries the expiry as a Redis TTL so that Redis reclaims it;
//! - `<prefix>:{…}:seq`: the bucket's version sequence (`INCR`), kept when keys go;
//! - `<prefix>:{…}:idx`: a sorted set of the bucket's keys scored by expiry (`+inf` for none),
//!   for `list`, `clear` and counting keys against `max_keys`;
//! - `<prefix>:{fn_1}:session:<session>`: a session's hash (`created`, `last`, `exp`, `inst`),
//!   with `<prefix>:{fn_1}:sessions` (sessions by last access) and
//!   `<prefix>:{fn_1}:session-expiry` (by expiry, to drop lapsed ones from both);
//! - `<prefix>:{fn_1}:buckets`: the function's buckets, for `purge_function`, which works one
//!   slot at a time (a cluster cannot run one script across slots).
//!
//! Every operation that reads and then writes is one Lua script (sent by `EVALSHA`, loaded
//! when the server lacks it) that reads the time from the server (`TIME`), so every client
//! judges expiry by the same clock. An entry is expired from its `exp` on, exactly as in the
//! embedded backend, even in the moment before Redis itself reclaims it.
//!
//! Failing fast: connecting and each reply are bounded by 1 s, and each step of an operation
//! (a round trip, with a reconnection if one is due) by 1.5 s; past that, or when the server
//! refuses the connection, the call fails with
//! [`StateError::Unavailable`] naming the server. [`RedisStore::connect`] does not need the
//! server to be up (it checks the URL, tries once and carries on): the first call after the
//! server is back connects again, with no restart.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::{ClusterClient, ClusterClientBuilder};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, ErrorKind, Pipeline,
    RedisConnectionInfo, RedisError, RedisFuture, RedisResult, Script, Value,
};

use crate::{
    datetime_ms, not_an_integer, ttl_ms, would_overflow, Bucket, KeyInfo, Limits, Scope, Session,
    StateError, StateResult, StateStore, Versioned,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Bounds one step of an operation, a reconnection included.
const STEP_TIMEOUT: Duration = Duration::from_millis(1500);

/// Buckets this process registered in their function's `buckets` set; past this many it
/// starts over (registering again is harmless).
const MAX_REGISTERED: usize = 10_000;

/// The state store on Redis. See the [module docs](self).
pub struct RedisStore {
    prefix: String,
    link: Link,
    /// Bucket key prefixes known to be in their function's `buckets` set. A purge by
    /// another process leaves entries here stale: a write racing the deletion of its
    /// function then fills a bucket the set no longer names, so `purge_function` clears the
    /// buckets named here too.
    registered: Mutex<HashSet<String>>,
}

impl RedisStore {
    /// A store on the Redis at `url` whose keys all start with `prefix` (e.g. `nimbus`):
    /// - `redis://[user:password@]host[:port][/db]`, `rediss://…` (TLS) or `redis+unix://…`:
    ///   one server;
    /// - `redis+sentinel://[user:password@]host:port[,host:port…]/<service>[/db]`: the master
    ///   that the Sentinels name for `<service>` (the credentials are the master's), found
    ///   again after a failover;
    /// - `redis+cluster://[user:password@]host:port[,host:port…]`: a Redis Cluster, found from
    ///   any of the nodes given.
    ///
    /// Fails only on a bad URL or prefix ([`StateError::InvalidArgument`]); if the server is
    /// down the store is returned all the same (with a warning) and connects on first use.
    pub async fn connect(url: &str, prefix: &str) -> StateResult<RedisStore> {
        if prefix.is_empty() || prefix.contains(['{', '}']) || prefix.chars().any(char::is_control)
        {
            return Err(StateError::InvalidArgument(format!(
                "invalid Redis key prefix {prefix:?}: it must be non-empty, without braces or control characters"
            )));
        }
        let store = RedisStore {
            prefix: prefix.to_owned(),
            link: Link::new(Target::parse(url)?),
            registered: Mutex::new(HashSet::new()),
        };
        if let Err(e) = store.run(|_| async { Ok(()) }).await {
            tracing::warn!(error = %e, "state: Redis is not reachable yet; connecting on first use");
        }
        Ok(store)
    }

    /// Runs one step of an operation on a connection, within [`STEP_TIMEOUT`].
    async fn run<T, F, Fut>(&self, step: F) -> StateResult<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let link = &self.link;
        let attempt = async {
            let (generation, conn) = link.conn().await?;
            step(conn).await.map_err(|e| link.failed(generation, &e))
        };
        tokio::time::timeout(STEP_TIMEOUT, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(StateError::Unavailable(format!(
                    "{} did not answer within {} ms",
                    link.server,
                    STEP_TIMEOUT.as_millis()
                )))
            })
    }

    /// Runs a script on a connection, within [`STEP_TIMEOUT`].
    async fn script<T: ::redis::FromRedisValue>(
        &self,
        invocation: ::redis::ScriptInvocation<'_>,
    ) -> StateResult<T> {
        self.run(|mut conn| async move { invocation.invoke_async(&mut conn).await })
            .await
    }

    /// `<prefix>:{fn:scope}:`, the start of every key of the bucket.
    fn bucket_base(&self, bucket: &Bucket) -> String {
        let function = escape(&bucket.function_id);
        match &bucket.scope {
            Scope::Function => format!("{}:{{{function}:f}}:", self.prefix),
            Scope::Session(key) => format!("{}:{{{function}:s:{}}}:", self.prefix, escape(key)),
        }
    }

    /// `<prefix>:{fn}:`, the start of the function's session keys.
    fn function_base(&self, function_id: &str) -> String {
        format!("{}:{{{}}}:", self.prefix, escape(function_id))
    }

    /// Makes sure the bucket is in its function's `buckets` set before it holds anything, so
    /// `purge_function` finds it.
    async fn register(&self, bucket: &Bucket, base: &str) -> StateResult<()> {
        if self.registered.lock().unwrap().contains(base) {
            return Ok(());
        }
        let set = format!("{}buckets", self.function_base(&bucket.function_id));
        self.run(|mut conn| async move {
            ::redis::cmd("SADD")
                .arg(&set)
                .arg(base)
                .query_async::<()>(&mut conn)
                .await
        })
        .await?;
        let mut registered = self.registered.lock().unwrap();
        if registered.len() >= MAX_REGISTERED {
            registered.clear();
        }
        registered.insert(base.to_owned());
        Ok(())
    }
}

#[async_trait::async_trait]
impl StateStore for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn get(&self, bucket: &Bucket, key: &str) -> StateResult<Option<Versioned>> {
        let entry = format!("{}k:{key}", self.bucket_base(bucket));
        let found: Option<(String, u64)> = self.script(GET.key(entry)).await?;
        Ok(found.map(|(value, version)| Versioned { value, version }))
    }

    async fn set(
        &self,
        bucket: &Bucket,
        key: &str,
        value: &str,
        ttl: Option<Duration>,
        expected: Option<u64>,
        limits: Limits,
    ) -> StateResult<u64> {
        let base = self.bucket_base(bucket);
        self.register(bucket, &base).await?;
        let mut invocation = SET.prepare_invoke();
        invocation
            .key(format!("{base}k:{key}"))
            .key(format!("{base}seq"))
            .key(format!("{base}idx"))
            .arg(key)
            .arg(value)
            .arg(ttl_ms(ttl))
            .arg(expected.map_or_else(|| "-1".to_owned(), |v| v.to_string()))
            .arg(limits.max_keys);
        let (status, n): (u8, u64) = self.script(invocation).await?;
        match status {
            0 => Ok(n),
            1 => Err(StateError::Conflict {
                expected: expected.unwrap_or_default(),
                current: n,
            }),
            _ => Err(too_many_keys(bucket, limits)),
        }
    }

    async fn incr(
        &self,
        bucket: &Bucket,
        key: &str,
        delta: i64,
        ttl: Option<Duration>,
        limits: Limits,
    ) -> StateResult<i64> {
        let base = self.bucket_base(bucket);
        self.register(bucket, &base).await?;
        let mut invocation = INCR.prepare_invoke();
        invocation
            .key(format!("{base}k:{key}"))
            .key(format!("{base}seq"))
            .key(format!("{base}idx"))
            .arg(key)
            .arg(delta)
            .arg(ttl_ms(ttl))
            .arg(limits.max_keys);
        // The result comes back as text: Lua numbers are doubles, exact only to 2^53.
        let (status, value): (u8, String) = self.script(invocation).await?;
        match status {
            0 => value.parse().map_err(|_| {
                StateError::Unavailable(format!("Redis returned {value:?} for an increment"))
            }),
            1 => Err(not_an_integer(key)),
            2 => Err(would_overflow(key, delta)),
            _ => Err(too_many_keys(bucket, limits)),
        }
    }

    async fn delete(&self, bucket: &Bucket, key: &str) -> StateResult<bool> {
        let base = self.bucket_base(bucket);
        let mut invocation = DELETE.prepare_invoke();
        invocation
            .key(format!("{base}k:{key}"))
            .key(format!("{base}idx"))
            .arg(key);
        self.script(invocation).await
    }

    async fn expire(&self, bucket: &Bucket, key: &str, ttl: Option<Duration>) -> StateResult<bool> {
        let base = self.bucket_base(bucket);
        let mut invocation = EXPIRE.prepare_invoke();
        invocation
            .key(format!("{base}k:{key}"))
            .key(format!("{base}idx"))
            .arg(key)
            .arg(ttl_ms(ttl));
        self.script(invocation).await
    }

    async fn list(&self, bucket: &Bucket) -> StateResult<Vec<KeyInfo>> {
        let base = self.bucket_base(bucket);
        let mut invocation = LIST.prepare_invoke();
        invocation
            .key(format!("{base}idx"))
            .arg(format!("{base}k:"));
        let rows: Vec<(String, usize, i64, u64)> = self.script(invocation).await?;
        let mut keys: Vec<KeyInfo> = rows
            .into_iter()
            .map(|(key, size, ttl, version)| KeyInfo {
                key,
                size,
                ttl_ms: u64::try_from(ttl).ok(),
                version,
            })
            .collect();
        keys.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(keys)
    }

    async fn clear(&self, bucket: &Bucket) -> StateResult<u64> {
        let base = self.bucket_base(bucket);
        self.script(clear_bucket(&base, false)).await
    }

    async fn touch_session(
        &self,
        function_id: &str,
        session_key: &str,
        instance_id: Option<&str>,
        timeout: Duration,
    ) -> StateResult<Session> {
        let base = self.function_base(function_id);
        let mut invocation = TOUCH_SESSION.prepare_invoke();
        invocation
            .key(format!("{base}session:{session_key}"))
            .key(format!("{base}sessions"))
            .key(format!("{base}session-expiry"))
            .arg(session_key)
            .arg(u8::from(instance_id.is_some()))
            .arg(instance_id.unwrap_or_default())
            .arg(crate::session_timeout_ms(timeout));
        let row: SessionRow = self.script(invocation).await?;
        Ok(session(function_id, session_key, row))
    }

    async fn session(&self, function_id: &str, session_key: &str) -> StateResult<Option<Session>> {
        let key = format!("{}session:{session_key}", self.function_base(function_id));
        let row: Option<SessionRow> = self.script(SESSION.key(key)).await?;
        Ok(row.map(|row| session(function_id, session_key, row)))
    }

    async fn sessions(&self, function_id: &str, limit: usize) -> StateResult<Vec<Session>> {
        let base = self.function_base(function_id);
        let mut invocation = SESSIONS.prepare_invoke();
        invocation
            .key(format!("{base}sessions"))
            .arg(format!("{base}session:"))
            .arg(limit);
        let rows: Vec<(String, u64, u64, u64, Option<String>)> = self.script(invocation).await?;
        Ok(rows
            .into_iter()
            .map(|(key, created, last, expires, instance)| {
                session(function_id, &key, (created, last, expires, instance))
            })
            .collect())
    }

    async fn delete_session(&self, function_id: &str, session_key: &str) -> StateResult<bool> {
        let base = self.function_base(function_id);
        let mut invocation = DELETE_SESSION.prepare_invoke();
        invocation
            .key(format!("{base}session:{session_key}"))
            .key(format!("{base}sessions"))
            .key(format!("{base}session-expiry"))
            .arg(session_key);
        self.script(invocation).await
    }

    async fn purge_function(&self, function_id: &str) -> StateResult<()> {
        let base = self.function_base(function_id);
        let set = &format!("{base}buckets");
        let mut buckets: Vec<String> = self
            .run(|mut conn| async move {
                ::redis::cmd("SMEMBERS")
                    .arg(set)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        // Buckets this process wrote to after another one purged them (see `registered`).
        let own = format!("{}:{{{}:", self.prefix, escape(function_id));
        for bucket in self.registered.lock().unwrap().iter() {
            if bucket.starts_with(&own) && !buckets.contains(bucket) {
                buckets.push(bucket.clone());
            }
        }
        // Each bucket is its own slot: clear them one by one, then forget each.
        for bucket in &buckets {
            self.script::<u64>(clear_bucket(bucket, true)).await?;
            self.run(|mut conn| async move {
                ::redis::cmd("SREM")
                    .arg(set)
                    .arg(bucket)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await?;
        }
        self.registered
            .lock()
            .unwrap()
            .retain(|b| !buckets.contains(b));
        let mut invocation = PURGE_SESSIONS.prepare_invoke();
        invocation
            .key(format!("{base}sessions"))
            .key(format!("{base}session-expiry"))
            .arg(format!("{base}session:"));
        self.script(invocation).await
    }
}

/// A session as the scripts return it: created, last access, expires at, instance.
type SessionRow = (u64, u64, u64, Option<String>);

fn session(function_id: &str, session_key: &str, row: SessionRow) -> Session {
    let (created, last_access, expires_at, instance_id) = row;
    Session {
        function_id: function_id.to_owned(),
        session_key: session_key.to_owned(),
        instance_id,
        created_at: datetime_ms(created),
        last_access: datetime_ms(last_access),
        expires_at: datetime_ms(expires_at),
    }
}

fn clear_bucket(base: &str, drop_sequence: bool) -> ::redis::ScriptInvocation<'static> {
    let mut invocation = CLEAR.prepare_invoke();
    invocation
        .key(format!("{base}idx"))
        .key(format!("{base}seq"))
        .arg(format!("{base}k:"))
        .arg(u8::from(drop_sequence));
    invocation
}

fn too_many_keys(bucket: &Bucket, limits: Limits) -> StateError {
    StateError::TooManyKeys {
        scope: bucket.scope.kind(),
        max: limits.max_keys,
    }
}

/// Escapes what would end a hash tag (`}`), or blur its parts (`:`), inside one.
fn escape(s: &str) -> String {
    let mut escaped = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => escaped.push_str("%25"),
            ':' => escaped.push_str("%3A"),
            '{' => escaped.push_str("%7B"),
            '}' => escaped.push_str("%7D"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// Where the data lives.
enum Target {
    /// One server, through a connection manager that reconnects by itself.
    Server(Client),
    /// The master that the Sentinels name.
    Sentinel {
        sentinels: Vec<(String, u16)>,
        service: String,
        master: RedisConnectionInfo,
    },
    Cluster(ClusterClient),
}

impl Target {
    /// Parses a URL (see [`RedisStore::connect`]) and names the server for messages.
    fn parse(url: &str) -> StateResult<(Target, String)> {
        let invalid = |why: &dyn std::fmt::Display| {
            // The URL may hold a password: show only its scheme.
            let scheme = url.split("://").next().unwrap_or_default();
            StateError::InvalidArgument(format!("invalid Redis URL ({scheme}://…): {why}"))
        };
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            let (credentials, nodes, path) =
                split_multi_host(rest, 26379).map_err(|e| invalid(&e))?;
            let mut path = path.split('/');
            let service = path.next().filter(|s| !s.is_empty()).ok_or_else(|| {
                invalid(&"the Sentinel URL needs the master's service name: redis+sentinel://host:port/<service>")
            })?;
            let db = match path.next().filter(|s| !s.is_empty()) {
                Some(db) => db
                    .parse()
                    .map_err(|_| invalid(&format!("bad database number {db:?}")))?,
                None => 0,
            };
            if path.next().is_some() {
                return Err(invalid(&"expected /<service>[/db] after the Sentinels"));
            }
            let server = format!("Redis (Sentinel service {service} via {})", join(&nodes));
            let (username, password) = credentials;
            return Ok((
                Target::Sentinel {
                    sentinels: nodes,
                    service: service.to_owned(),
                    master: RedisConnectionInfo {
                        db,
                        username,
                        password,
                        ..Default::default()
                    },
                },
                server,
            ));
        }
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let ((username, password), nodes, path) =
                split_multi_host(rest, 6379).map_err(|e| invalid(&e))?;
            if !path.is_empty() {
                return Err(invalid(&"a cluster has no database or other path"));
            }
            let server = format!("Redis Cluster at {}", join(&nodes));
            let mut builder =
                ClusterClientBuilder::new(nodes.into_iter().map(|(host, port)| ConnectionInfo {
                    addr: ConnectionAddr::Tcp(host, port),
                    redis: RedisConnectionInfo::default(),
                }))
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(RESPONSE_TIMEOUT)
                .retries(1);
            if let Some(username) = username {
                builder = builder.username(username);
            }
            if let Some(password) = password {
                builder = builder.password(password);
            }
            let client = builder.build().map_err(|e| invalid(&e))?;
            return Ok((Target::Cluster(client), server));
        }
        if url.starts_with("rediss://") {
            // rustls takes its crypto from the process-wide provider; another part of the
            // program may have installed one already, which is as good.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = Client::open(url).map_err(|e| invalid(&e))?;
        let server = format!("Redis at {}", client.get_connection_info().addr);
        Ok((Target::Server(client), server))
    }

    async fn connect(&self) -> RedisResult<Conn> {
        match self {
            Target::Server(client) => manager(client.clone()).await,
            Target::Sentinel {
                sentinels,
                service,
                master,
            } => {
                let mut last_error = None;
                for (host, port) in sentinels {
                    match master_addr(host, *port, service).await {
                        Ok((host, port)) => {
                            let client = Client::open(ConnectionInfo {
                                addr: ConnectionAddr::Tcp(host, port),
                                redis: master.clone(),
                            })?;
                            return manager(client).await;
                        }
                        Err(e) => last_error = Some(e),
                    }
                }
                Err(last_error.unwrap_or_else(|| {
                    RedisError::from((ErrorKind::EmptySentinelList, "no Sentinel given"))
                }))
            }
            Target::Cluster(client) => Ok(Conn::Cluster(client.get_async_connection().await?)),
        }
    }
}

async fn manager(client: Client) -> RedisResult<Conn> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(RESPONSE_TIMEOUT)
        // No retries in the background: a call that finds the connection gone tries once
        // to connect again, and fails at once if it cannot.
        .set_number_of_retries(0);
    Ok(Conn::Manager(
        ConnectionManager::new_with_config(client, config).await?,
    ))
}

/// Asks the Sentinel at `host:port` where the master of `service` is.
async fn master_addr(host: &str, port: u16, service: &str) -> RedisResult<(String, u16)> {
    let sentinel = Client::open(ConnectionInfo {
        addr: ConnectionAddr::Tcp(host.to_owned(), port),
        redis: RedisConnectionInfo::default(),
    })?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(RESPONSE_TIMEOUT);
    let mut conn = sentinel
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    let addr: Option<(String, u16)> = ::redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(service)
        .query_async(&mut conn)
        .await?;
    addr.ok_or_else(|| {
        RedisError::from((
            ErrorKind::MasterNameNotFoundBySentinel,
            "the Sentinel knows no master by that name",
            format!("{service} at {host}:{port}"),
        ))
    })
}

/// Splits `[user[:password]@]host:port[,host:port…][/path]` into the credentials, the hosts
/// and the path.
#[allow(clippy::type_complexity)]
fn split_multi_host(
    rest: &str,
    default_port: u16,
) -> Result<((Option<String>, Option<String>), Vec<(String, u16)>, &str), String> {
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    if path.contains('?') || authority.contains('?') {
        return Err("query parameters are not supported here".into());
    }
    let (credentials, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((user, password)) => (user, Some(password)),
                None => (userinfo, None),
            };
            let user = Some(percent_decode(user)?).filter(|u| !u.is_empty());
            ((user, password.map(percent_decode).transpose()?), hosts)
        }
        None => ((None, None), authority),
    };
    let nodes = hosts
        .split(',')
        .map(|node| {
            let (host, port) = match node.rsplit_once(':') {
                Some((host, port)) if !host.ends_with(':') => (
                    host,
                    port.parse().map_err(|_| format!("bad port in {node:?}"))?,
                ),
                _ => (node, default_port),
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(format!("missing host in {node:?}"));
            }
            Ok((host.to_owned(), port))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok((credentials, nodes, path.trim_end_matches('/')))
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bad = || "bad percent-encoding in the credentials".to_owned();
    let mut bytes = Vec::with_capacity(s.len());
    let mut rest = s.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if b == b'%' {
            let hex = tail.get(..2).ok_or_else(bad)?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            bytes.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            rest = &tail[2..];
        } else {
            bytes.push(b);
            rest = tail;
        }
    }
    String::from_utf8(bytes).map_err(|_| bad())
}

fn join(nodes: &[(String, u16)]) -> String {
    nodes
        .iter()
        .map(|(host, port)| format!("{host}:{port}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The connection to the target, made on first use and made again when lost.
struct Link {
    target: Target,
    /// Names the server in errors, never with credentials.
    server: String,
    /// The connection and its generation (so a failure forgets only the connection it
    /// happened on).
    current: Mutex<Option<(u64, Conn)>>,
    /// Held while connecting, so that concurrent calls wait for one attempt; counts them.
    connecting: tokio::sync::Mutex<u64>,
}

impl Link {
    fn new((target, server): (Target, String)) -> Link {
        Link {
            target,
            server,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(0),
        }
    }

    async fn conn(&self) -> StateResult<(u64, Conn)> {
        if let Some(current) = self.current.lock().unwrap().clone() {
            return Ok(current);
        }
        let mut generation = self.connecting.lock().await;
        if let Some(current) = self.current.lock().unwrap().clone() {
            return Ok(current);
        }
        let conn = self
            .target
            .connect()
            .await
            .map_err(|e| self.unavailable(&e))?;
        *generation += 1;
        *self.current.lock().unwrap() = Some((*generation, conn.clone()));
        Ok((*generation, conn))
    }

    /// Turns a failure into an error and, when it means the master may have moved, forgets
    /// the connection so that the next call asks the Sentinels again. (A server's connection
    /// manager and a cluster connection reconnect by themselves.)
    fn failed(&self, generation: u64, e: &RedisError) -> StateError {
        let moved = e.is_io_error()
            || e.is_unrecoverable_error()
            || matches!(e.kind(), ErrorKind::ReadOnly | ErrorKind::MasterDown);
        if moved && matches!(self.target, Target::Sentinel { .. }) {
            let mut current = self.current.lock().unwrap();
            if current.as_ref().is_some_and(|(g, _)| *g == generation) {
                *current = None;
            }
        }
        self.unavailable(e)
    }

    fn unavailable(&self, e: &RedisError) -> StateError {
        StateError::Unavailable(format!("{}: {e}", self.server))
    }
}

/// A connection of any of the topologies.
#[derive(Clone)]
enum Conn {
    Manager(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Manager(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Manager(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Manager(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// What every script starts with: the server's time, and the rules every script applies.
const PRELUDE: &str = r#"
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

-- An entry with expiry `exp` (Unix ms, 0 for none) is live until `exp`, exclusive.
local function live(exp)
  local e = tonumber(exp)
  return e == 0 or e > now
end

local function expiry(ttl)
  if ttl > 0 then return now + ttl end
  return 0
end

-- Sets an entry's expiry: in its hash, as its Redis TTL (so Redis reclaims it) and in the
-- bucket's index.
local function set_expiry(entry, idx, member, exp)
  redis.call('HSET', entry, 'exp', exp)
  if exp > 0 then
    redis.call('PEXPIREAT', entry, exp)
    redis.call('ZADD', idx, exp, member)
  else
    redis.call('PERSIST', entry)
    redis.call('ZADD', idx, '+inf', member)
  end
end

-- Whether the bucket holds `max` live keys already.
local function full(idx, max)
  redis.call('ZREMRANGEBYSCORE', idx, '-inf', now)
  return redis.call('ZCARD', idx) >= max
end
"#;

fn lua(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}{body}"))
}

/// KEYS: entry. Returns `{value, version}`, or nil.
static GET: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
local e = redis.call('HMGET', KEYS[1], 'v', 'ver', 'exp')
if e[1] and live(e[3]) then return {e[1], e[2]} end
return false
"#)
});

/// KEYS: entry, seq, idx. ARGV: key, value, ttl ms (0: none), expected version (-1: any),
/// max keys. Returns `{0, version}`, `{1, current version}` (conflict) or `{2, 0}` (full).
static SET: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
local e = redis.call('HMGET', KEYS[1], 'ver', 'exp')
local current = 0
if e[1] and live(e[2]) then current = tonumber(e[1]) end
local expected = tonumber(ARGV[4])
if expected >= 0 and expected ~= current then return {1, current} end
if current == 0 and full(KEYS[3], tonumber(ARGV[5])) then return {2, 0} end
local version = redis.call('INCR', KEYS[2])
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'ver', version)
set_expiry(KEYS[1], KEYS[3], ARGV[1], expiry(tonumber(ARGV[3])))
return {0, version}
"#)
});

/// KEYS: entry, seq, idx. ARGV: key, delta, ttl ms for a new key (0: none), max keys.
/// Returns `{0, result}`, `{1, ''}` (not an integer), `{2, ''}` (overflow) or `{3, ''}`
/// (full). `HINCRBY` does the sum: exact in 64 bits, refusing overflow and non-integers.
static INCR: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
local e = redis.call('HMGET', KEYS[1], 'ver', 'exp')
if e[1] and live(e[2]) then
  local r = redis.pcall('HINCRBY', KEYS[1], 'v', ARGV[2])
  if type(r) == 'table' and r.err then
    if string.find(r.err, 'overflow', 1, true) then return {2, ''} end
    return {1, ''}
  end
  redis.call('HSET', KEYS[1], 'ver', redis.call('INCR', KEYS[2]))
  return {0, redis.call('HGET', KEYS[1], 'v')}
end
if full(KEYS[3], tonumber(ARGV[4])) then return {3, ''} end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'ver', redis.call('INCR', KEYS[2]))
set_expiry(KEYS[1], KEYS[3], ARGV[1], expiry(tonumber(ARGV[3])))
return {0, ARGV[2]}
"#)
});

/// KEYS: entry, idx. ARGV: key. Returns whether a live entry was removed.
static DELETE: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
local exp = redis.call('HGET', KEYS[1], 'exp')
if not exp then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if live(exp) then return 1 end
return 0
"#)
});

/// KEYS: entry, idx. ARGV: key, ttl ms (0: none). Returns whether the entry was live.
static EXPIRE: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
local exp = redis.call('HGET', KEYS[1], 'exp')
if not exp or not live(exp) then return 0 end
set_expiry(KEYS[1], KEYS[2], ARGV[1], expiry(tonumber(ARGV[2])))
return 1
"#)
});

/// KEYS: idx. ARGV: entry key prefix. Returns `{key, size, ttl left ms (-1: none), version}`
/// for each live entry.
static LIST: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local keys = {}
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local entry = ARGV[1] .. member
  local e = redis.call('HMGET', entry, 'ver', 'exp')
  if e[1] and live(e[2]) then
    local ttl = -1
    if tonumber(e[2]) > 0 then ttl = tonumber(e[2]) - now end
    table.insert(keys, {member, redis.call('HSTRLEN', entry, 'v'), ttl, tonumber(e[1])})
  end
end
return keys
"#)
});

/// KEYS: idx, seq. ARGV: entry key prefix, 1 to drop the sequence too (the function is
/// gone). Returns how many live entries there were.
static CLEAR: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
local count = redis.call('ZCOUNT', KEYS[1], string.format('(%d', now), '+inf')
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  redis.call('DEL', ARGV[1] .. member)
end
redis.call('DEL', KEYS[1])
if ARGV[2] == '1' then redis.call('DEL', KEYS[2]) end
return count
"#)
});

/// KEYS: session, sessions, session-expiry. ARGV: session key, 1 to bind, instance, timeout
/// ms. Returns `{created, last access, expires at, instance}`.
static TOUCH_SESSION: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
-- Drop a few lapsed sessions from the indexes (Redis expires their hashes itself).
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', KEYS[2], member)
  redis.call('ZREM', KEYS[3], member)
end
local s = redis.call('HMGET', KEYS[1], 'created', 'exp', 'inst')
local created, instance = now, false
if s[2] and tonumber(s[2]) > now then
  created = tonumber(s[1])
  instance = s[3]
end
if ARGV[2] == '1' then instance = ARGV[3] end
local exp = now + tonumber(ARGV[4])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'created', created, 'last', now, 'exp', exp)
if instance then redis.call('HSET', KEYS[1], 'inst', instance) end
redis.call('PEXPIREAT', KEYS[1], exp)
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('ZADD', KEYS[3], exp, ARGV[1])
return {created, now, exp, instance}
"#)
});

/// KEYS: session. Returns `{created, last access, expires at, instance}`, or nil.
static SESSION: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
local s = redis.call('HMGET', KEYS[1], 'created', 'last', 'exp', 'inst')
if s[3] and tonumber(s[3]) > now then
  return {tonumber(s[1]), tonumber(s[2]), tonumber(s[3]), s[4]}
end
return false
"#)
});

/// KEYS: sessions. ARGV: session key prefix, limit. Returns `{key, created, last access,
/// expires at, instance}` for the live sessions, most recent first.
static SESSIONS: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
local found, limit, start = {}, tonumber(ARGV[2]), 0
while #found < limit do
  local page = redis.call('ZREVRANGE', KEYS[1], start, start + 99)
  if #page == 0 then break end
  for _, member in ipairs(page) do
    local s = redis.call('HMGET', ARGV[1] .. member, 'created', 'last', 'exp', 'inst')
    if #found < limit and s[3] and tonumber(s[3]) > now then
      table.insert(found, {member, tonumber(s[1]), tonumber(s[2]), tonumber(s[3]), s[4]})
    end
  end
  start = start + 100
end
return found
"#)
});

/// KEYS: session, sessions, session-expiry. ARGV: session key. Returns whether the session
/// was live.
static DELETE_SESSION: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
local exp = redis.call('HGET', KEYS[1], 'exp')
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
if exp and tonumber(exp) > now then return 1 end
return 0
"#)
});

/// KEYS: sessions, session-expiry. ARGV: session key prefix. Removes every session.
static PURGE_SESSIONS: LazyLock<Script> = LazyLock::new(|| {
    lua(r#"
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  redis.call('DEL', ARGV[1] .. member)
end
redis.call('DEL', KEYS[1], KEYS[2])
return 0
"#)
});

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> StateResult<String> {
        Target::parse(url).map(|(_, server)| server)
    }

    #[test]
    fn urls_of_every_topology_parse() {
        assert_eq!(
            parse("redis://127.0.0.1:6379/2").unwrap(),
            "Redis at 127.0.0.1:6379"
        );
        assert_eq!(
            parse("redis://localhost").unwrap(),
            "Redis at localhost:6379"
        );
        assert_eq!(
            parse("redis+sentinel://:secret@h1:26379,h2/mymaster/3").unwrap(),
            "Redis (Sentinel service mymaster via h1:26379,h2:26379)"
        );
        assert_eq!(
            parse("redis+cluster://u:p%40ss@[::1]:7000,h2:7001").unwrap(),
            "Redis Cluster at ::1:7000,h2:7001"
        );
        let Ok((Target::Sentinel { master, .. }, _)) =
            Target::parse("redis+sentinel://user:p%40ss@h1/svc/3")
        else {
            panic!("not a Sentinel target");
        };
        assert_eq!(master.db, 3);
        assert_eq!(master.username.as_deref(), Some("user"));
        assert_eq!(master.password.as_deref(), Some("p@ss"));
    }

    #[test]
    fn bad_urls_fail_clearly_without_showing_secrets() {
        for url in [
            "http://secret@localhost",
            "redis+sentinel://h1:26379",
            "redis+sentinel://h1:26379/svc/notadb",
            "redis+sentinel://h1:port/svc",
            "redis+cluster://h1:7000/0",
            "redis+cluster://:secret@",
            "not a url",
        ] {
            let e = parse(url).unwrap_err();
            assert_eq!(e.code().as_str(), "invalid_argument", "{url}: {e}");
            assert!(!e.to_string().contains("secret"), "{e}");
        }
    }

    #[test]
    fn escaped_ids_keep_buckets_apart() {
        assert_eq!(escape("a}:k:{b%"), "a%7D%3Ak%3A%7Bb%25");
        assert_ne!(escape("a:b"), escape("a%3Ab"));
    }
}
