//! The work queue: a Redis stream with a consumer group, taken from in
//! fair order.
//!
//! - The API adds one entry per accepted job (`XADD`: the job's id, what a
//!   worker needs to run it, its owner, action and megapixels) and records
//!   the entry's id under the job's (`<prefix>:entries`), so a cancelled or
//!   deleted job leaves the stream at once. The entry also waits in its
//!   owner's queue (`<prefix>:wait:<owner>`, ordered by submission time
//!   plus its priority's handicap, [`Priority`]) and in the set of every
//!   waiting entry (`<prefix>:waiting`: what KEDA scales on).
//! - Workers take entries with [`Reader::next_batch`]: one script picks,
//!   for each free slot, the owner furthest behind in worker time (start-time
//!   fair queuing: each owner has a virtual time, `<prefix>:vtime`, that
//!   grows by the estimated cost of each job it is given, divided by the
//!   owner's share (`<prefix>:shares`, 1 unless set), and an owner that
//!   starts waiting again starts level with the waiting owner furthest
//!   behind, or with none waiting at the clock (`<prefix>:clock`, the
//!   virtual time of the last job taken), so idle time earns no credit;
//!   not at the clock while others wait: an owner whose estimates were
//!   corrected down is behind it, and a newcomer would wait for that
//!   owner to catch up), pops that owner's first entry and claims it
//!   for the worker (`XCLAIM ... FORCE`), so from then on it is pending,
//!   owned by its worker, exactly as a read through the group. A job's cost
//!   is estimated from what finished jobs of its action and size class (its
//!   pixel count's power of two) took, or before any has finished, from its
//!   megapixels and its action's learned costs (`<prefix>:costs`, biased
//!   low: [`ACCOUNT_SCRIPT`]), and corrected by its real worker time (the
//!   CPU time of its image work) when it is settled. An idle
//!   worker waits on a doorbell list (`<prefix>:bell`) that every enqueue
//!   rings.
//! - Each worker also has an arrival lane ([`Reader::next_arrival`]): an
//!   owner that starts waiting level with the owner furthest behind (while
//!   no action is capped) is announced on `<prefix>:arrivals`, and a lane
//!   takes its first job at once, with a slot of its own, if the owner
//!   still waits at that virtual time; so a newcomer's job is not left
//!   waiting until one of the jobs a worker holds (a flood's) ends.
//! - An action may be capped (`<prefix>:caps`, from the plugin's limits in
//!   PostgreSQL, [`Queue::set_caps`]): at most so many of its jobs running
//!   across every worker, and of one owner's. A take then passes over a job
//!   whose action is at its cap (it waits, it does not fail) and takes the
//!   owner's next one that is not; the jobs running under a cap are
//!   counted in `<prefix>:running:<action>[:<owner>]`.
//! - An entry stays pending until its worker acknowledges and deletes it
//!   (`XACK` + `XDEL`) after recording the outcome in PostgreSQL.
//! - A worker that dies leaves its entries pending; after the lease (idle
//!   time) another worker takes them over (`XAUTOCLAIM`). A worker running a
//!   long job renews its lease by re-claiming the entry for itself.
//! - The stream's length is therefore the number of unfinished jobs, which
//!   is what the API's admission limit counts.
//!
//! Redis is only the carrier: the sweeper re-queues from PostgreSQL any
//! unfinished job whose entry is missing, so even a Redis that lost its data
//! loses no job.
//!
//! This module is the only place that knows Redis: every key (all under the
//! deployment's prefix, `IMGFLOW_QUEUE`) and every command, including the
//! plugin-change notices (pub/sub on `<prefix>:plugins`), the job-change
//! notices that waiting clients hear (pub/sub on `<prefix>:job-changes`),
//! the workers' heartbeats (a sorted set, `<prefix>:workers`), failure
//! counters with a time window (`<prefix>:failures:<scope>`, console
//! sign-ins by address), each client's unfinished jobs (a set,
//! `<prefix>:unfinished:<owner>`, and the owners that hold any,
//! `<prefix>:unfinished-owners`: the per-key cap, checked and taken
//! atomically), each client's rate of submissions (`<prefix>:rate:<owner>`,
//! [`Queue::take_rate`]) and the locks of
//! the sweeper and the retention sweep (`<prefix>:sweeper`,
//! `<prefix>:retention`). No connection or key leaves it.

use std::time::Duration;

use futures::StreamExt as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::streams::StreamAutoClaimReply;
use redis::{AsyncCommands, RedisError, RedisResult};
use serde::{Deserialize, Serialize};

pub use redis::RedisError as QueueError;
use tokio::sync::OnceCell;
use uuid::Uuid;

/// The consumer group every worker joins.
pub const GROUP: &str = "workers";

/// How long a Redis call may take before it counts as "Redis is down".
const TIMEOUT: Duration = Duration::from_secs(3);

/// One job handed to a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The stream entry's id, used to acknowledge it.
    pub entry: String,
    /// The job.
    pub job: Uuid,
    /// What the worker needs to run it (`spec`, JSON), when the entry
    /// carries it (every entry made since it existed); else the worker
    /// reads the job's row.
    pub spec: Option<String>,
    /// The seconds of worker time its owner was charged when it was taken
    /// (an estimate; zero for an entry taken over from another worker),
    /// corrected by the real time when it is settled ([`Account`]).
    pub estimate: f64,
}

/// A job's priority among its owner's jobs. Each owner's jobs are taken in
/// the order of their submission time plus a handicap: none for `high`,
/// the queue's ageing (`PRIORITY_AGEING_MS`) for `normal`, twice that for
/// `low`. So a higher priority goes first, and a lower one waits behind a
/// continuous stream of higher ones of its owner for at most its handicap
/// (plus the run time of those submitted before its turn): it never
/// starves. Across owners, fair share decides ([`Reader::next_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// First among its owner's jobs.
    High,
    /// The default.
    #[default]
    Normal,
    /// After the others, but never starved.
    Low,
}

impl Priority {
    /// Every priority, highest first.
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// Its name, as the API reads and shows it.
    pub fn name(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }

    /// The priority named `name`.
    pub fn parse(name: &str) -> Option<Priority> {
        Priority::ALL.into_iter().find(|p| p.name() == name)
    }

    /// How many ageing periods later than its submission a job of this
    /// priority is ordered.
    fn handicap(self) -> u32 {
        match self {
            Priority::High => 0,
            Priority::Normal => 1,
            Priority::Low => 2,
        }
    }
}

/// What the queue needs of a job to put it on the queue.
#[derive(Debug, Clone, Copy)]
pub struct Ticket<'a> {
    /// The job.
    pub job: Uuid,
    /// What a worker needs to run it (JSON).
    pub spec: &'a str,
    /// Who submitted it: whose share it is taken in.
    pub owner: &'a str,
    /// Its action (the first step's, for a pipeline): whose learned cost
    /// estimates it.
    pub action: &'a str,
    /// Its input's megapixels (0 when not known).
    pub megapixels: f64,
    /// Its priority among its owner's jobs.
    pub priority: Priority,
    /// When it was submitted, in milliseconds since 1970.
    pub submitted_ms: i64,
}

/// A finished job's worker time, charged to its owner when it is settled
/// ([`Queue::settle`]): the estimate it was taken with is replaced by the
/// real time, and its action's learned cost moves towards it.
#[derive(Debug, Clone, Copy)]
pub struct Account<'a> {
    /// Whose share it ran in.
    pub owner: &'a str,
    /// Its action.
    pub action: &'a str,
    /// Its input's megapixels.
    pub megapixels: f64,
    /// The seconds it was charged when taken ([`Delivery::estimate`]).
    pub estimate: f64,
    /// The seconds of worker time it really took (the worker charges the
    /// CPU time of its image work).
    pub seconds: f64,
    /// Whether it completed: only completed jobs teach their action's
    /// cost (a job that failed at once, say on an image whose header
    /// claims a size its data does not have, would teach it too little).
    pub completed: bool,
}

/// An action's caps on running jobs ([`Queue::set_caps`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap<'a> {
    /// The action (a plugin's name).
    pub action: &'a str,
    /// The most of its jobs running at once across every worker (0: no
    /// cap).
    pub all: u32,
    /// The most of one owner's jobs of it running at once (0: no cap).
    pub per_owner: u32,
}

/// A worker, as its heartbeats tell ([`Queue::workers_seen`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerSeen {
    /// The worker's id (`WORKER_ID`, or its host name and process id).
    pub name: String,
    /// Jobs it has read and not finished.
    pub pending: u64,
    /// Time since its last heartbeat.
    pub last_seen: Duration,
}

/// A handle on the queue; cheap to clone.
#[derive(Clone)]
pub struct Queue {
    client: redis::Client,
    conn: std::sync::Arc<OnceCell<ConnectionManager>>,
    stream: String,
    prefix: String,
    ageing: Duration,
}

impl std::fmt::Debug for Queue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queue")
            .field("stream", &self.stream)
            .finish()
    }
}

impl Queue {
    /// A queue at `url` whose keys start with `prefix`. Connects lazily, so
    /// a process can start while Redis is down and serve "unavailable".
    pub fn new(url: &str, prefix: &str) -> RedisResult<Queue> {
        Ok(Queue {
            client: redis::Client::open(url)?,
            conn: std::sync::Arc::new(OnceCell::new()),
            stream: format!("{prefix}:jobs"),
            prefix: prefix.to_string(),
            ageing: Duration::from_secs(30),
        })
    }

    /// The queue the settings name (`REDIS_*`, `IMGFLOW_QUEUE`,
    /// `PRIORITY_AGEING_MS`).
    pub fn open(settings: &imgflow_settings::RedisArgs) -> RedisResult<Queue> {
        Ok(Queue::new(&settings.url(), &settings.queue)?
            .with_ageing(Duration::from_millis(settings.priority_ageing_ms)))
    }

    /// The same queue with `ageing` as the handicap of a `normal` job
    /// ([`Priority`]; `PRIORITY_AGEING_MS`, 30 s unless set).
    pub fn with_ageing(mut self, ageing: Duration) -> Queue {
        self.ageing = ageing;
        self
    }

    /// A key under this queue's prefix.
    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.prefix)
    }

    /// The shared, self-reconnecting connection.
    async fn conn(&self) -> RedisResult<ConnectionManager> {
        let manager = self
            .conn
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(TIMEOUT)
                    .set_response_timeout(TIMEOUT)
                    .set_number_of_retries(1);
                // Bound the first connection as a whole (the manager's own
                // retries back off), so callers learn quickly that Redis is down.
                bounded(self.client.get_connection_manager_with_config(config)).await
            })
            .await?;
        Ok(manager.clone())
    }

    /// Creates the stream and the consumer group if they do not exist. The
    /// group starts at the beginning of the stream, so entries added before
    /// it existed (after Redis lost its data) are not skipped.
    pub async fn ensure_group(&self) -> RedisResult<()> {
        let mut conn = self.conn().await?;
        let created: RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            other => other?,
        }
        self.upgrade().await
    }

    /// Once per Redis (`<prefix>:queue-version`): deletes the entries an
    /// earlier version queued for a plain group read (never delivered,
    /// waiting in no owner's queue, pending for no worker), so the sweeper
    /// queues their jobs again from PostgreSQL the fair way after
    /// `SWEEP_AFTER_MS`. Entries already delivered stay with their worker.
    async fn upgrade(&self) -> RedisResult<()> {
        let mut conn = self.conn().await?;
        let script = redis::Script::new(
            r"if redis.call('GET', KEYS[4]) == '2' then return 0 end
              local last = '0-0'
              for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
                local info = {}
                for j = 1, #g, 2 do info[g[j]] = g[j + 1] end
                if info['name'] == ARGV[1] then last = info['last-delivered-id'] end
              end
              local n = 0
              for _, e in ipairs(redis.call('XRANGE', KEYS[1], '(' .. last, '+')) do
                local id = e[1]
                if not redis.call('ZSCORE', KEYS[3], id)
                   and #redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1) == 0 then
                  local f = e[2]
                  for j = 1, #f, 2 do
                    if f[j] == 'job' then redis.call('HDEL', KEYS[2], f[j + 1]) end
                  end
                  redis.call('XDEL', KEYS[1], id)
                  n = n + 1
                end
              end
              redis.call('SET', KEYS[4], '2')
              return n",
        );
        let dropped: i64 = script
            .key(&self.stream)
            .key(self.key(ENTRIES))
            .key(self.key(WAITING))
            .key(self.key(VERSION))
            .arg(GROUP)
            .invoke_async(&mut conn)
            .await?;
        if dropped > 0 {
            tracing::warn!(
                entries = dropped,
                "the queue's entries from an earlier version were dropped; the sweeper queues their jobs again"
            );
        }
        Ok(())
    }

    /// Checks that Redis answers.
    pub async fn ping(&self) -> RedisResult<()> {
        let mut conn = self.conn().await?;
        redis::cmd("PING").query_async(&mut conn).await
    }

    /// `PING` on a connection of its own, opened for it: it fails at once
    /// when Redis is down, where [`Queue::ping`] may wait for the shared
    /// connection to reconnect (the dependency probe's way).
    pub async fn ping_fresh(&self) -> RedisResult<()> {
        let mut conn = self.client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async(&mut conn).await
    }

    /// Puts a job on the queue.
    pub async fn enqueue(&self, ticket: Ticket<'_>) -> RedisResult<()> {
        self.enqueue_many(&[ticket]).await
    }

    /// Puts jobs on the queue, in one round trip and at once: each an entry
    /// on the stream, whose id is recorded under the job's id (the
    /// `<prefix>:entries` hash), so a job can be taken off the queue by its
    /// id ([`Queue::take_off`]) and the sweeper can tell which are on it
    /// ([`Queue::entries_of`]); each waiting in its owner's queue, in the
    /// order of its priority ([`Priority`]); its owner, if it was not
    /// waiting, joins the owners to serve level with the one furthest
    /// behind among them (or at the clock, with none waiting) and is
    /// announced to the workers' arrival lanes ([`Reader::next_arrival`]),
    /// unless its own virtual time is further on (it then waits its turn);
    /// and the doorbell rings for idle workers.
    pub async fn enqueue_many(&self, tickets: &[Ticket<'_>]) -> RedisResult<()> {
        // A script unpacks at most about 8,000 values at once.
        for chunk in tickets.chunks(1_000) {
            self.enqueue_chunk(chunk).await?;
        }
        Ok(())
    }

    /// [`Queue::enqueue_many`] of at most 1,000 tickets, in one script.
    async fn enqueue_chunk(&self, tickets: &[Ticket<'_>]) -> RedisResult<()> {
        if tickets.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let script = redis::Script::new(
            r"local n = 0
              local fields, waiting, queues, owners = {}, {}, {}, {}
              for i = 2, #ARGV, 7 do
                local job, owner = ARGV[i], ARGV[i + 2]
                local entry = redis.call('XADD', KEYS[1], '*', 'job', job, 'spec', ARGV[i + 1],
                                         'owner', owner, 'action', ARGV[i + 3], 'mp', ARGV[i + 4])
                fields[#fields + 1] = job
                fields[#fields + 1] = entry
                waiting[#waiting + 1] = ARGV[i + 6]
                waiting[#waiting + 1] = entry
                if not queues[owner] then queues[owner] = {}; owners[#owners + 1] = owner end
                local q = queues[owner]
                q[#q + 1] = ARGV[i + 5]
                q[#q + 1] = entry
                n = n + 1
              end
              redis.call('HSET', KEYS[2], unpack(fields))
              redis.call('ZADD', KEYS[3], unpack(waiting))
              -- Where an owner that starts waiting starts: level with the
              -- owner furthest behind among those waiting (the next one
              -- served), or with none waiting, at the clock.
              local clock = nil
              for _, owner in ipairs(owners) do
                redis.call('ZADD', ARGV[1] .. owner, unpack(queues[owner]))
                if not redis.call('ZSCORE', KEYS[4], owner) then
                  if not clock then
                    local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
                    if #first == 2 then
                      clock = tonumber(first[2])
                    else
                      clock = tonumber(redis.call('GET', KEYS[6]) or '0')
                    end
                  end
                  local vt = tonumber(redis.call('HGET', KEYS[5], owner) or '0')
                  if vt <= clock then
                    -- Level with the furthest behind: an arrival for the
                    -- workers' arrival lanes (none while actions are
                    -- capped), oldest first, with the virtual time it
                    -- arrived at (a lane takes it only if the owner has
                    -- not been served or charged since).
                    vt = clock
                    redis.call('HSET', KEYS[5], owner, tostring(vt))
                    redis.call('ZADD', KEYS[4], vt, owner)
                    if redis.call('HLEN', KEYS[9]) == 0 then
                      -- The score as Redis holds it (tostring rounds).
                      local at = redis.call('ZSCORE', KEYS[4], owner)
                      redis.call('RPUSH', KEYS[8], at .. ':' .. owner)
                      redis.call('LTRIM', KEYS[8], -64, -1)
                    end
                  else
                    redis.call('ZADD', KEYS[4], vt, owner)
                  end
                end
              end
              local rings = {}
              for i = 1, math.min(n, 64) do rings[i] = 1 end
              redis.call('LPUSH', KEYS[7], unpack(rings))
              redis.call('LTRIM', KEYS[7], 0, 63)
              return n",
        );
        let mut invocation = script.key(&self.stream);
        invocation
            .key(self.key(ENTRIES))
            .key(self.key(WAITING))
            .key(self.key(READY))
            .key(self.key(VTIME))
            .key(self.key(CLOCK))
            .key(self.key(BELL))
            .key(self.key(ARRIVALS))
            .key(self.key(CAPS))
            .arg(self.key(&format!("{WAIT}:")));
        let ageing = self.ageing.as_millis() as i64;
        for t in tickets {
            let order = t.submitted_ms + ageing * i64::from(t.priority.handicap());
            invocation
                .arg(t.job.to_string())
                .arg(t.spec)
                .arg(t.owner)
                .arg(t.action)
                .arg(format!("{:.6}", t.megapixels.max(0.0)))
                .arg(order)
                .arg(t.submitted_ms);
        }
        let _: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }

    /// Takes job `id` off the queue (it was cancelled or deleted): its
    /// entry leaves its owner's queue, is acknowledged and deleted, so no
    /// worker starts it, and the queue's depth drops at once. Returns
    /// whether it was on the queue.
    pub async fn take_off(&self, id: Uuid) -> RedisResult<bool> {
        let mut conn = self.conn().await?;
        let script = redis::Script::new(
            r"local entry = redis.call('HGET', KEYS[2], ARGV[1])
              if not entry then return 0 end
              local found = redis.call('XRANGE', KEYS[1], entry, entry)
              if found[1] then
                local f = found[1][2]
                for j = 1, #f, 2 do
                  if f[j] == 'owner' then
                    local queue = ARGV[3] .. f[j + 1]
                    redis.call('ZREM', queue, entry)
                    if redis.call('ZCARD', queue) == 0 then
                      redis.call('ZREM', KEYS[4], f[j + 1])
                      redis.call('ZREM', KEYS[5], f[j + 1])
                    end
                  end
                end
              end
              redis.call('ZREM', KEYS[3], entry)
              redis.call('XACK', KEYS[1], ARGV[2], entry)
              redis.call('XDEL', KEYS[1], entry)
              redis.call('HDEL', KEYS[2], ARGV[1])
              return 1",
        );
        let taken: i64 = script
            .key(&self.stream)
            .key(self.key(ENTRIES))
            .key(self.key(WAITING))
            .key(self.key(READY))
            .key(self.key(PARKED))
            .arg(id.to_string())
            .arg(GROUP)
            .arg(self.key(&format!("{WAIT}:")))
            .invoke_async(&mut conn)
            .await?;
        Ok(taken == 1)
    }

    /// How many jobs wait to be taken by a worker (what KEDA scales the
    /// workers on: the size of `<prefix>:waiting`).
    pub async fn waiting(&self) -> RedisResult<u64> {
        let mut conn = self.conn().await?;
        conn.zcard(self.key(WAITING)).await
    }

    /// Replaces the actions' caps with `caps` (what
    /// `PUT /v1/plugins/{name}/limits` set, from PostgreSQL): each action
    /// with at most `Cap::all` jobs running across every worker and at most
    /// `Cap::per_owner` of one owner's (0: no cap), in one step
    /// ([`SET_CAPS_SCRIPT`]). The jobs workers hold now (taken before the
    /// cap was set, or before Redis lost it) are counted against it. A job
    /// over a cap waits ([`TAKE_SCRIPT`]); the doorbell rings, as a cap may
    /// have been raised.
    pub async fn set_caps(&self, caps: &[Cap<'_>]) -> RedisResult<()> {
        let mut conn = self.conn().await?;
        let script = redis::Script::new(SET_CAPS_SCRIPT);
        let mut invocation = script.key(self.key(CAPS));
        invocation
            .key(&self.stream)
            .key(self.key(BELL))
            .key(self.key(READY))
            .key(self.key(PARKED))
            .arg(self.key(&format!("{RUNNING}:")))
            .arg(GROUP);
        for c in caps.iter().filter(|c| c.all > 0 || c.per_owner > 0) {
            invocation
                .arg(c.action)
                .arg(format!("{}:{}", c.all, c.per_owner));
        }
        let _: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(())
    }

    /// Replaces the owners' shares of worker time with `shares` (owner,
    /// share; an owner not named has 1), in one step: with several owners
    /// waiting, each gets worker time in proportion to its share (its
    /// virtual time grows by a job's cost divided by its share).
    pub async fn set_shares(&self, shares: &[(String, f64)]) -> RedisResult<()> {
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        pipe.atomic().del(self.key(SHARES)).ignore();
        let fields: Vec<(&str, String)> = shares
            .iter()
            .filter(|(_, share)| share.is_finite() && *share > 0.0)
            .map(|(owner, share)| (owner.as_str(), format!("{share}")))
            .collect();
        if !fields.is_empty() {
            pipe.hset_multiple(self.key(SHARES), &fields).ignore();
        }
        pipe.query_async(&mut conn).await
    }

    /// How many jobs of each capped action run now, by the running sets
    /// (entries that left the stream are not counted): action, jobs.
    pub async fn running_capped(&self) -> RedisResult<Vec<(String, u64)>> {
        let mut conn = self.conn().await?;
        let script = redis::Script::new(
            r"local out = {}
              local fields = redis.call('HKEYS', KEYS[1])
              for _, a in ipairs(fields) do
                local n = 0
                for _, id in ipairs(redis.call('ZRANGE', ARGV[1] .. a, 0, -1)) do
                  if #redis.call('XRANGE', KEYS[2], id, id) > 0 then n = n + 1 end
                end
                out[#out + 1] = {a, n}
              end
              return out",
        );
        script
            .key(self.key(CAPS))
            .key(&self.stream)
            .arg(self.key(&format!("{RUNNING}:")))
            .invoke_async(&mut conn)
            .await
    }

    /// For each of `jobs`, whether it has an entry on the queue.
    pub async fn entries_of(&self, jobs: &[Uuid]) -> RedisResult<Vec<bool>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let ids: Vec<String> = jobs.iter().map(Uuid::to_string).collect();
        let entries: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(self.key(ENTRIES))
            .arg(&ids)
            .query_async(&mut conn)
            .await?;
        Ok(entries.iter().map(Option::is_some).collect())
    }

    /// Settles finished jobs in one round trip: acknowledges and deletes
    /// their `entries` (job, entry), announces their `changes` (job, what it
    /// became), gives back their owners' shares (`releases`: owner, job) and
    /// charges their owners the worker time they really took (`accounts`).
    pub async fn settle(
        &self,
        entries: &[(Uuid, &str)],
        changes: &[(Uuid, &str)],
        releases: &[(&str, Uuid)],
        accounts: &[Account<'_>],
    ) -> RedisResult<()> {
        if entries.is_empty() && changes.is_empty() && releases.is_empty() && accounts.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let mut pipe = redis::pipe();
        pipe.atomic();
        let ids: Vec<&str> = entries
            .iter()
            .map(|(_, e)| *e)
            .filter(|e| !e.is_empty())
            .collect();
        if !ids.is_empty() {
            pipe.xack(&self.stream, GROUP, &ids)
                .ignore()
                .xdel(&self.stream, &ids)
                .ignore();
        }
        if !entries.is_empty() {
            let jobs: Vec<String> = entries.iter().map(|(j, _)| j.to_string()).collect();
            pipe.hdel(self.key(ENTRIES), jobs).ignore();
        }
        for (id, what) in changes {
            pipe.publish(self.key(JOB_NOTICES), format!("{id} {what}"))
                .ignore();
        }
        for (owner, id) in releases {
            pipe.srem(self.held_key(owner), id.to_string()).ignore();
        }
        if !accounts.is_empty() {
            let charge = pipe
                .cmd("EVAL")
                .arg(ACCOUNT_SCRIPT)
                .arg(7)
                .arg(self.key(VTIME))
                .arg(self.key(READY))
                .arg(self.key(COSTS))
                .arg(self.key(CAPS))
                .arg(self.key(BELL))
                .arg(self.key(SHARES))
                .arg(self.key(PARKED));
            for a in accounts {
                charge
                    .arg(a.owner)
                    .arg(a.action)
                    .arg(format!("{:.6}", a.megapixels.max(0.0)))
                    .arg(format!("{:.6}", a.estimate.max(0.0)))
                    .arg(format!("{:.6}", a.seconds.max(0.0)))
                    .arg(u8::from(a.completed));
            }
            charge.ignore();
        }
        pipe.query_async(&mut conn).await
    }

    /// Announces several job changes (job, what it became) in one round
    /// trip.
    pub async fn announce_job_changes(&self, changes: &[(Uuid, &str)]) -> RedisResult<()> {
        self.settle(&[], changes, &[], &[]).await
    }

    /// How many jobs are on the queue (waiting or being run).
    pub async fn depth(&self) -> RedisResult<u64> {
        let mut conn = self.conn().await?;
        conn.xlen(&self.stream).await
    }

    /// Whether the entry is still on the stream.
    pub async fn contains(&self, entry: &str) -> RedisResult<bool> {
        let mut conn = self.conn().await?;
        let found: redis::streams::StreamRangeReply =
            conn.xrange(&self.stream, entry, entry).await?;
        Ok(!found.ids.is_empty())
    }

    /// Acknowledges and deletes job `job`'s entry: the job's outcome is
    /// recorded (or it needs nothing more).
    pub async fn finish(&self, job: Uuid, entry: &str) -> RedisResult<()> {
        self.settle(&[(job, entry)], &[], &[], &[]).await
    }

    /// Renews `consumer`'s lease on an entry (resets its idle time).
    pub async fn renew(&self, consumer: &str, entry: &str) -> RedisResult<()> {
        let mut conn = self.conn().await?;
        redis::cmd("XCLAIM")
            .arg(&self.stream)
            .arg(GROUP)
            .arg(consumer)
            .arg(0)
            .arg(entry)
            .arg("JUSTID")
            .query_async::<redis::Value>(&mut conn)
            .await
            .map(|_| ())
    }

    /// Takes over up to `count` entries idle for longer than `lease` (their
    /// worker died or hung) for `consumer`.
    pub async fn reclaim(
        &self,
        consumer: &str,
        lease: Duration,
        count: usize,
    ) -> RedisResult<Vec<Delivery>> {
        let mut conn = self.conn().await?;
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(GROUP)
            .arg(consumer)
            .arg(lease.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await?;
        Ok(deliveries(reply.claimed))
    }

    /// Records that `worker` is alive now. Workers call it every few
    /// seconds; the API's overview counts the workers seen recently.
    pub async fn heartbeat(&self, worker: &str) -> RedisResult<()> {
        let mut conn = self.conn().await?;
        conn.zadd(self.key(WORKERS), worker, now_millis()).await
    }

    /// Forgets `worker` (it stopped), so it is no longer counted as seen.
    pub async fn forget_worker(&self, worker: &str) -> RedisResult<()> {
        let mut conn = self.conn().await?;
        conn.zrem(self.key(WORKERS), worker).await
    }

    /// The workers whose last heartbeat is within `within`, with the time
    /// since it and the jobs each holds, most recently seen first. Workers
    /// not heard of for an hour are forgotten.
    pub async fn workers_seen(&self, within: Duration) -> RedisResult<Vec<WorkerSeen>> {
        let mut conn = self.conn().await?;
        let now = now_millis();
        let key = self.key(WORKERS);
        let _: () = conn
            .zrembyscore(&key, "-inf", now.saturating_sub(3_600_000))
            .await?;
        let beats: Vec<(String, u64)> = conn
            .zrevrangebyscore_withscores(
                &key,
                "+inf",
                now.saturating_sub(within.as_millis() as u64),
            )
            .await?;
        // The jobs each holds, as the consumer group has it (none yet, before
        // the group exists).
        let consumers: Vec<redis::streams::StreamInfoConsumer> = match conn
            .xinfo_consumers::<_, _, redis::streams::StreamInfoConsumersReply>(&self.stream, GROUP)
            .await
        {
            Ok(reply) => reply.consumers,
            Err(e) if e.code() == Some("NOGROUP") => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok(beats
            .into_iter()
            .map(|(name, at)| WorkerSeen {
                pending: consumers
                    .iter()
                    .find(|c| c.name == name)
                    .map_or(0, |c| c.pending as u64),
                last_seen: Duration::from_millis(now.saturating_sub(at)),
                name,
            })
            .collect())
    }

    /// A dedicated connection for blocking reads by `consumer`.
    pub async fn reader(&self, consumer: &str) -> RedisResult<Reader> {
        let conn = self.reader_connection().await?;
        Ok(Reader {
            conn,
            queue: self.clone(),
            consumer: consumer.to_string(),
            drained: false,
            abandoned: false,
        })
    }

    /// A connection of a [`Reader`]'s own (its blocking wait holds it).
    async fn reader_connection(&self) -> RedisResult<redis::aio::MultiplexedConnection> {
        bounded(self.client.get_multiplexed_async_connection()).await
    }

    /// The age of the oldest entry on the stream (entry ids start with their
    /// creation time in milliseconds), or zero if it is empty.
    pub async fn oldest_age(&self) -> RedisResult<Duration> {
        let mut conn = self.conn().await?;
        let first: redis::streams::StreamRangeReply =
            conn.xrange_count(&self.stream, "-", "+", 1).await?;
        let Some(entry) = first.ids.first() else {
            return Ok(Duration::ZERO);
        };
        let millis: u64 = entry
            .id
            .split('-')
            .next()
            .and_then(|m| m.parse().ok())
            .unwrap_or(0);
        Ok(Duration::from_millis(now_millis().saturating_sub(millis)))
    }

    /// Tells every worker that plugin `name` changed (uploaded, activated
    /// or deleted), so they load it now rather than at their next
    /// reconciliation. Returns how many subscribers heard it.
    pub async fn announce_plugin_change(&self, name: &str) -> RedisResult<i64> {
        let mut conn = self.conn().await?;
        conn.publish(self.key(PLUGIN_NOTICES), name).await
    }

    /// Subscribes to plugin-change notices on a connection of its own: a
    /// stream of plugin names that ends when the connection drops.
    pub async fn plugin_changes(&self) -> RedisResult<PluginChanges> {
        let mut pubsub = bounded(self.client.get_async_pubsub()).await?;
        pubsub.subscribe(self.key(PLUGIN_NOTICES)).await?;
        Ok(Box::pin(pubsub.into_on_message().filter_map(|m| {
            futures::future::ready(m.get_payload::<String>().ok())
        })))
    }

    /// Tells every process watching jobs ([`crate::events`]) that job `id`
    /// changed: `what` it became (a status, or `deleted`). Returns how many
    /// subscribers heard it.
    pub async fn announce_job_change(&self, id: Uuid, what: &str) -> RedisResult<i64> {
        let mut conn = self.conn().await?;
        conn.publish(self.key(JOB_NOTICES), format!("{id} {what}"))
            .await
    }

    /// Subscribes to job-change notices on a connection of its own: a
    /// stream of (job id, what it became) that ends when the connection
    /// drops.
    pub async fn job_changes(&self) -> RedisResult<JobChanges> {
        let mut pubsub = bounded(self.client.get_async_pubsub()).await?;
        pubsub.subscribe(self.key(JOB_NOTICES)).await?;
        Ok(Box::pin(pubsub.into_on_message().filter_map(|m| {
            let change = m.get_payload::<String>().ok().and_then(|text| {
                let (id, what) = text.split_once(' ')?;
                Some((Uuid::parse_str(id).ok()?, what.to_string()))
            });
            futures::future::ready(change)
        })))
    }

    /// Takes `lock` for `holder` for `ttl`, unless another holder has it:
    /// `true` if `holder` has it now (taken, or already its own: then its
    /// `ttl` starts again, so a holder with more work goes on). The lock
    /// expires by itself, so a holder that dies never blocks the others
    /// for longer than `ttl`.
    pub async fn try_lock(&self, lock: Lock, holder: &str, ttl: Duration) -> RedisResult<bool> {
        let mut conn = self.conn().await?;
        let script = redis::Script::new(
            r"if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
              if redis.call('GET', KEYS[1]) == ARGV[1] then
                redis.call('PEXPIRE', KEYS[1], ARGV[2])
                return 1
              end
              return 0",
        );
        let held: i64 = script
            .key(self.key(lock.key()))
            .arg(holder)
            .arg(ttl.as_millis() as u64)
            .invoke_async(&mut conn)
            .await?;
        Ok(held == 1)
    }

    /// Adds `jobs` to `owner`'s unfinished jobs, unless that would make
    /// more than `cap` of them (with `Some(cap)`): atomically, so
    /// concurrent submissions of one client cannot pass the cap together.
    /// Returns `Ok(())` when added, `Err(held)` (how many it holds) when
    /// refused. Every job held is given back by [`Queue::release`] when it
    /// finishes (or is not made after all).
    pub async fn hold(
        &self,
        owner: &str,
        jobs: &[Uuid],
        cap: Option<u64>,
    ) -> RedisResult<Result<(), u64>> {
        let mut conn = self.conn().await?;
        let script = redis::Script::new(
            r"local held = redis.call('SCARD', KEYS[1])
              local cap = tonumber(ARGV[1])
              if cap >= 0 and held + #ARGV - 2 > cap then return held end
              for i = 3, #ARGV do redis.call('SADD', KEYS[1], ARGV[i]) end
              redis.call('SADD', KEYS[2], ARGV[2])
              return -1",
        );
        let mut invocation = script.key(self.held_key(owner));
        invocation
            .key(self.key(HOLDERS))
            .arg(cap.map_or(-1, |c| c.min(i64::MAX as u64) as i64))
            .arg(owner);
        for job in jobs {
            invocation.arg(job.to_string());
        }
        let held: i64 = invocation.invoke_async(&mut conn).await?;
        Ok(if held < 0 { Ok(()) } else { Err(held as u64) })
    }

    /// Gives back `jobs` of `owner` ([`Queue::hold`]): they finished, or
    /// were never made. Giving back a job not held changes nothing.
    pub async fn release(&self, owner: &str, jobs: &[Uuid]) -> RedisResult<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let ids: Vec<String> = jobs.iter().map(Uuid::to_string).collect();
        conn.srem(self.held_key(owner), ids).await
    }

    /// The queue's depth and, with an `owner`, how many unfinished jobs it
    /// holds, in one round trip (a submission's admission check).
    pub async fn room(&self, owner: Option<&str>) -> RedisResult<(u64, u64)> {
        let mut conn = self.conn().await?;
        match owner {
            None => Ok((conn.xlen(&self.stream).await?, 0)),
            Some(owner) => {
                redis::pipe()
                    .xlen(&self.stream)
                    .scard(self.held_key(owner))
                    .query_async(&mut conn)
                    .await
            }
        }
    }

    /// How many unfinished jobs `owner` holds.
    pub async fn held(&self, owner: &str) -> RedisResult<u64> {
        let mut conn = self.conn().await?;
        conn.scard(self.held_key(owner)).await
    }

    /// The unfinished jobs `owner` holds.
    pub async fn held_jobs(&self, owner: &str) -> RedisResult<Vec<Uuid>> {
        let mut conn = self.conn().await?;
        let ids: Vec<String> = conn.smembers(self.held_key(owner)).await?;
        Ok(ids
            .iter()
            .filter_map(|id| Uuid::parse_str(id).ok())
            .collect())
    }

    /// Every owner that has held jobs, and the jobs each holds, for the
    /// sweeper's reconciliation; owners holding none are forgotten.
    pub async fn holdings(&self) -> RedisResult<Vec<(String, Vec<Uuid>)>> {
        let mut conn = self.conn().await?;
        let owners: Vec<String> = conn.smembers(self.key(HOLDERS)).await?;
        let mut holdings = Vec::with_capacity(owners.len());
        for owner in owners {
            let ids: Vec<String> = conn.smembers(self.held_key(&owner)).await?;
            if ids.is_empty() {
                let _: () = conn.srem(self.key(HOLDERS), &owner).await?;
                continue;
            }
            let ids = ids
                .iter()
                .filter_map(|id| Uuid::parse_str(id).ok())
                .collect();
            holdings.push((owner, ids));
        }
        Ok(holdings)
    }

    fn held_key(&self, owner: &str) -> String {
        self.key(&format!("{HELD}:{owner}"))
    }

    /// Counts a failure of `scope` (such as a sign-in from one address) in a
    /// window of `window` that starts at its first failure. Returns the
    /// count so far and the time left in the window.
    pub async fn count_failure(
        &self,
        scope: &str,
        window: Duration,
    ) -> RedisResult<(u64, Duration)> {
        let mut conn = self.conn().await?;
        let key = self.key(&format!("{FAILURES}:{scope}"));
        let (count, left): (u64, i64) = redis::pipe()
            .atomic()
            .incr(&key, 1)
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(window.as_millis() as u64)
            .arg("NX")
            .ignore()
            .cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await?;
        Ok((count, Duration::from_millis(left.max(0) as u64)))
    }

    /// Takes `cost` submissions from `owner`'s rate: at most `burst` at
    /// once, refilled at `per_second` (the generic cell rate algorithm,
    /// with Redis's clock, so every API instance shares one account per
    /// owner and one time). Nothing is taken when refused. An account is
    /// never further ahead than its current burst, so a rate or burst
    /// lowered meanwhile delays its client by at most one burst's refill.
    pub async fn take_rate(
        &self,
        owner: &str,
        per_second: f64,
        burst: u32,
        cost: u32,
    ) -> RedisResult<RateTaken> {
        let mut conn = self.conn().await?;
        // `tat`: when the account is full again (the theoretical arrival
        // time of the next submission), in milliseconds of Redis's clock.
        let script = redis::Script::new(
            r"local t = redis.call('TIME')
              local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
              local interval = tonumber(ARGV[1])
              local tolerance = interval * tonumber(ARGV[2])
              local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
              if tat < now then tat = now end
              if tat > now + tolerance then tat = now + tolerance end
              local next_tat = tat + interval * tonumber(ARGV[3])
              local allowed = next_tat - tolerance <= now
              if allowed then
                redis.call('SET', KEYS[1], string.format('%.3f', next_tat),
                           'PX', math.ceil(next_tat - now) + 1)
                tat = next_tat
              end
              local wait = 0
              if not allowed then wait = next_tat - tolerance - now end
              return {allowed and 1 or 0, math.ceil(wait), math.ceil(tat - now),
                      math.floor((now + tolerance - tat) / interval)}",
        );
        let interval = 1000.0 / per_second.max(f64::MIN_POSITIVE);
        let (allowed, wait, full_in, left): (i64, i64, i64, i64) = script
            .key(self.key(&format!("{RATE}:{owner}")))
            .arg(interval)
            .arg(burst)
            .arg(cost)
            .invoke_async(&mut conn)
            .await?;
        Ok(RateTaken {
            allowed: allowed == 1,
            remaining: left.max(0) as u64,
            retry_after: Duration::from_millis(wait.max(0) as u64),
            full_in: Duration::from_millis(full_in.max(0) as u64),
        })
    }

    /// Adds `amount` to `owner`'s use of its quota for `day` (a UTC date,
    /// `2026-12-06`) if that stays within `quota`; returns whether it did,
    /// and the use then. A day's count expires a day after it ends.
    pub async fn charge_quota(
        &self,
        owner: &str,
        day: &str,
        amount: f64,
        quota: f64,
    ) -> RedisResult<(bool, f64)> {
        let mut conn = self.conn().await?;
        let script = redis::Script::new(
            r"local used = tonumber(redis.call('GET', KEYS[1]) or '0')
              local amount = tonumber(ARGV[1])
              if used + amount > tonumber(ARGV[2]) then return {0, tostring(used)} end
              local now = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
              redis.call('EXPIRE', KEYS[1], 172800)
              return {1, now}",
        );
        let (charged, used): (i64, String) = script
            .key(self.quota_key(owner, day))
            .arg(amount)
            .arg(quota)
            .invoke_async(&mut conn)
            .await?;
        Ok((charged == 1, used.parse().unwrap_or(0.0)))
    }

    /// Gives back `amount` of `owner`'s quota for `day` (a submission
    /// charged for that was not recorded after all).
    pub async fn refund_quota(&self, owner: &str, day: &str, amount: f64) -> RedisResult<()> {
        let mut conn = self.conn().await?;
        let key = self.quota_key(owner, day);
        redis::pipe()
            .atomic()
            .cmd("INCRBYFLOAT")
            .arg(&key)
            .arg(-amount)
            .ignore()
            .expire(&key, 172_800)
            .ignore()
            .query_async(&mut conn)
            .await
    }

    /// How much of its quota `owner` used on `day`.
    pub async fn quota_used(&self, owner: &str, day: &str) -> RedisResult<f64> {
        let mut conn = self.conn().await?;
        let used: Option<String> = conn.get(self.quota_key(owner, day)).await?;
        Ok(used.and_then(|u| u.parse().ok()).unwrap_or(0.0))
    }

    fn quota_key(&self, owner: &str, day: &str) -> String {
        self.key(&format!("{QUOTA}:{owner}:{day}"))
    }

    /// The failures of `scope` counted in its current window, and the time
    /// left in it (zero and zero when none).
    pub async fn failures(&self, scope: &str) -> RedisResult<(u64, Duration)> {
        let mut conn = self.conn().await?;
        let key = self.key(&format!("{FAILURES}:{scope}"));
        let (count, left): (Option<u64>, i64) = redis::pipe()
            .get(&key)
            .cmd("PTTL")
            .arg(&key)
            .query_async(&mut conn)
            .await?;
        Ok((
            count.unwrap_or(0),
            Duration::from_millis(left.max(0) as u64),
        ))
    }

    /// Deletes every key of this queue: the stream (and so every queued
    /// entry), the owners' queues and accounts, the actions' caps and
    /// running sets, and the locks. For tests and for tearing a deployment
    /// down; PostgreSQL still knows every unfinished job (the sweeper
    /// queues them again) and every plugin's limits (the workers set the
    /// caps again at their next reconciliation).
    pub async fn purge(&self) -> RedisResult<()> {
        let mut conn = self.conn().await?;
        let mut keys = vec![
            self.stream.clone(),
            self.key(ENTRIES),
            self.key(WAITING),
            self.key(READY),
            self.key(VTIME),
            self.key(CLOCK),
            self.key(COSTS),
            self.key(BELL),
            self.key(ARRIVALS),
            self.key(VERSION),
            self.key(CAPS),
            self.key(SHARES),
            self.key(PARKED),
            self.key(Lock::Sweeper.key()),
            self.key(Lock::Retention.key()),
        ];
        for under in [WAIT, RUNNING] {
            let pattern = self.key(&format!("{under}:*"));
            let mut cursor: u64 = 0;
            loop {
                let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await?;
                keys.extend(found);
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
        }
        conn.del(&keys).await
    }
}

/// The channel of plugin-change notices, under the prefix.
const PLUGIN_NOTICES: &str = "plugins";

/// Each queued job's entry id, by job id (a hash), under the prefix.
const ENTRIES: &str = "entries";

/// Every waiting entry (a sorted set scored by submission time), under the
/// prefix: what KEDA's `redis` scaler counts (`ZCARD`).
const WAITING: &str = "waiting";

/// Each owner's waiting entries (a sorted set ordered by [`Priority`]),
/// under the prefix and followed by the owner.
const WAIT: &str = "wait";

/// The owners with waiting entries, scored by their virtual time (a
/// sorted set), under the prefix.
const READY: &str = "ready";

/// Each owner's virtual time: the worker seconds it was given (a hash),
/// under the prefix.
const VTIME: &str = "vtime";

/// The virtual time of the last job taken: where an owner that starts
/// waiting again starts when no other owner waits, under the prefix.
const CLOCK: &str = "clock";

/// Each action's learned cost (a hash: `<action>:base`, seconds a job, and
/// `<action>:mp`, seconds a megapixel), under the prefix.
const COSTS: &str = "costs";

/// The version of the queue's layout in this Redis, under the prefix
/// ([`Queue::upgrade`]).
const VERSION: &str = "queue-version";

/// The doorbell idle workers wait on (a list), under the prefix.
const BELL: &str = "bell";

/// The owners that started waiting level with the owner furthest behind
/// while no action was capped (a list of `<virtual time>:<owner>`, the
/// oldest first, the newest 64), which the workers' arrival lanes wait on
/// ([`Reader::next_arrival`]), under the prefix.
const ARRIVALS: &str = "arrivals";

/// The owners none of whose first waiting jobs may run under the caps
/// (a sorted set scored by virtual time, like the ready set), under the
/// prefix: parked until a job of a capped action ends or the caps change.
const PARKED: &str = "parked";

/// Each owner's share of worker time, where it is not 1 (a hash: owner ->
/// share), under the prefix ([`Queue::set_shares`]).
const SHARES: &str = "shares";

/// Each capped action's caps (a hash: action -> `<cap>:<cap per owner>`,
/// 0 for none), under the prefix ([`Queue::set_caps`]).
const CAPS: &str = "caps";

/// The entries running under an action's cap (sorted sets), under the
/// prefix and followed by the action (across owners) or by the action and
/// the owner.
const RUNNING: &str = "running";

/// How many of an owner's first waiting entries a take looks at for one
/// under its actions' caps: an owner whose first 64 are all held back by
/// caps waits until one of them may run, even if a later one could.
pub const CAP_WINDOW: usize = 64;

/// The most waiting entries one take looks at while actions are capped
/// (about 20 ms of Redis): past it the take ends with what it has, and the
/// next take goes on (the doorbell is left ringing).
pub const CAP_LOOKS: usize = 10_000;

/// What a job is estimated to cost before its action's cost is learned:
/// seconds a job, seconds a megapixel.
const DEFAULT_COST: (f64, f64) = (0.002, 0.05);

/// Lua shared by [`ACCOUNT_SCRIPT`], which learns each action's cost by
/// the size of its jobs, and [`TAKE_SCRIPT`], which estimates a job's cost
/// from it: a job's size class is the power of two of its pixel count.
macro_rules! size_class_lua {
    () => {
        r"
local function size_class(mp)
  return math.floor(math.log(mp * 1000000 + 1) / math.log(2))
end
"
    };
}

/// Charges owners the real worker time of their finished jobs (divided by
/// their shares) and learns each action's cost from them (KEYS: vtime,
/// ready, costs, caps, bell, shares, parked; ARGV: owner, action,
/// megapixels, estimate, seconds, and 1 if it completed, for each job).
///
/// Only completed jobs teach: by size class (its pixel count's power of
/// two, the estimate [`TAKE_SCRIPT`] reads first), and for the fallback
/// model, jobs of under a quarter of a megapixel the cost a job, larger
/// ones the cost a megapixel (beyond the cost a job). Each is a moving
/// average that follows a job cheaper than it at once (30% of the way)
/// and a dearer one slowly (5% of the way, a job counting at most
/// `LEARN_CAP`, 4, times the cost learned so far, or 1 ms); a size
/// class's first job starts from the fallback model's estimate once that
/// is learned. The estimates are biased low on purpose: a job's estimate
/// stays in its owner's virtual time until the job is settled, often a
/// hundred jobs later when outcomes are recorded in batches, and an owner
/// that starts waiting starts level with that virtual time, then waits
/// while an over-estimate is corrected down (a hundred jobs 3 ms over:
/// 300 ms). An under-estimate lets its owner's jobs be taken a little
/// early, as many as it has in flight, until they are settled and
/// charged in full. A job slowed by the machine (a stall of its virtual
/// CPU is charged to the thread that ran) raises an estimate by at most
/// 15%, while a cost that really rose tenfold is estimated at half of it
/// after twenty jobs and 90% after fifty. At most `MAX_COSTS` (10,000)
/// learned costs are kept: pipelines and sizes are the clients' to
/// choose, and past that only those already learned are updated.
///
/// While actions are capped, a job of a capped action that ended puts the
/// parked owners back among the ready ones, and with jobs waiting it
/// rings the doorbell: a job that ended may have freed a cap that held
/// one back.
const ACCOUNT_SCRIPT: &str = concat!(
    size_class_lua!(),
    r"
-- A cost learned so far (`old`, negative: none yet) moved towards one
-- job's `sample`: down quickly, up slowly and by at most LEARN_CAP times.
local LEARN_CAP, UP, DOWN, MAX_COSTS = 4, 0.05, 0.3, 10000
local function learn(old, sample)
  if old < 0 then return sample end
  if sample <= old then return old + (sample - old) * DOWN end
  return old + (math.min(sample, math.max(old * LEARN_CAP, 0.001)) - old) * UP
end
local delta, owners, learned, sized = {}, {}, {}, {}
for i = 1, #ARGV, 6 do
  local owner, action = ARGV[i], ARGV[i + 1]
  local mp, est, secs = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  if not delta[owner] then delta[owner] = 0; owners[#owners + 1] = owner end
  delta[owner] = delta[owner] + secs - est
  local l = learned[action]
  if not l then
    l = {tonumber(redis.call('HGET', KEYS[3], action .. ':base') or '-1'),
         tonumber(redis.call('HGET', KEYS[3], action .. ':mp') or '-1'), false, false}
    learned[action] = l
  end
  if ARGV[i + 5] == '1' then
    -- A size class's first job starts from what the action's costs
    -- estimate for it (once they are learned for a job of its size), so
    -- that it too counts at most four times that.
    local sk = action .. ':s' .. size_class(mp)
    local sv = sized[sk]
    if not sv then sv = tonumber(redis.call('HGET', KEYS[3], sk) or '-1') or -1 end
    if sv < 0 and l[1] >= 0 and (mp < 0.25 or l[2] >= 0) then
      sv = l[1] + mp * math.max(l[2], 0)
    end
    sized[sk] = learn(sv, secs)
    if mp < 0.25 then
      l[1] = learn(l[1], secs)
      l[3] = true
    else
      local per = (secs - math.max(l[1], 0)) / mp
      if per < 0 then per = 0 end
      l[2] = learn(l[2], per)
      l[4] = true
    end
  end
end
for _, owner in ipairs(owners) do
  local share = tonumber(redis.call('HGET', KEYS[6], owner) or '1') or 1
  if share ~= share then share = 1 end
  share = math.min(math.max(share, 0.001), 1000)
  local vt = redis.call('HINCRBYFLOAT', KEYS[1], owner, tostring(delta[owner] / share))
  if redis.call('ZSCORE', KEYS[2], owner) then redis.call('ZADD', KEYS[2], vt, owner) end
end
-- At most MAX_COSTS fields: past them, costs already learned are kept up
-- to date and no new one is added (pipelines and sizes are the client's to
-- choose).
local room = redis.call('HLEN', KEYS[3]) < MAX_COSTS
local function keep(field, v)
  if room or redis.call('HEXISTS', KEYS[3], field) == 1 then
    redis.call('HSET', KEYS[3], field, tostring(v))
  end
end
for sk, v in pairs(sized) do keep(sk, v) end
for action, l in pairs(learned) do
  if l[3] then keep(action .. ':base', l[1]) end
  if l[4] then keep(action .. ':mp', l[2]) end
end
if redis.call('HLEN', KEYS[4]) > 0 then
  local freed = false
  for action, _ in pairs(learned) do
    for a in string.gmatch(action, '[^,]+') do
      if redis.call('HEXISTS', KEYS[4], a) == 1 then freed = true end
    end
  end
  if freed and redis.call('ZCARD', KEYS[7]) > 0 then
    redis.call('ZUNIONSTORE', KEYS[2], 2, KEYS[2], KEYS[7], 'AGGREGATE', 'MIN')
    redis.call('DEL', KEYS[7])
  end
  if redis.call('ZCARD', KEYS[2]) > 0 then
    redis.call('LPUSH', KEYS[5], 1)
    redis.call('LTRIM', KEYS[5], 0, 63)
  end
end
return 0"
);

/// Replaces the caps (KEYS: caps, stream, bell, ready, parked; ARGV[1]: the running sets'
/// prefix; ARGV[2]: the group; then action and `<cap>:<cap per owner>` for
/// each capped action) and counts every entry pending for a worker in the
/// running sets of its capped actions, so jobs taken while no cap was set
/// (or before Redis lost the caps) count against it. Puts the parked owners
/// back among the ready ones and rings the doorbell.
const SET_CAPS_SCRIPT: &str = r"
redis.call('DEL', KEYS[1])
local capped, any = {}, false
for i = 3, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  local all, per = string.match(ARGV[i + 1], '^(%d+):(%d+)$')
  capped[ARGV[i]] = {tonumber(all) or 0, tonumber(per) or 0}
  any = true
end
if any then
  local stamp = redis.call('TIME')[1]
  local pending = redis.pcall('XPENDING', KEYS[2], ARGV[2], '-', '+', 100000)
  if type(pending) == 'table' and not pending['err'] then
    for _, p in ipairs(pending) do
      local found = redis.call('XRANGE', KEYS[2], p[1], p[1])
      if #found > 0 then
        local action, owner = '', ''
        local f = found[1][2]
        for j = 1, #f, 2 do
          if f[j] == 'action' then action = f[j + 1] elseif f[j] == 'owner' then owner = f[j + 1] end
        end
        for a in string.gmatch(action, '[^,]+') do
          local c = capped[a]
          if c then
            local sets = {}
            if c[1] > 0 then sets[#sets + 1] = ARGV[1] .. a end
            if c[2] > 0 then sets[#sets + 1] = ARGV[1] .. a .. ':' .. owner end
            for _, key in ipairs(sets) do
              redis.call('ZADD', key, 'NX', stamp, p[1])
              redis.call('EXPIRE', key, 86400)
            end
          end
        end
      end
    end
  end
end
if redis.call('ZCARD', KEYS[5]) > 0 then
  redis.call('ZUNIONSTORE', KEYS[4], 2, KEYS[4], KEYS[5], 'AGGREGATE', 'MIN')
  redis.call('DEL', KEYS[5])
end
redis.call('LPUSH', KEYS[3], 1)
redis.call('LTRIM', KEYS[3], 0, 63)
return 0";

/// Takes up to ARGV[3] waiting entries for consumer ARGV[2] of group
/// ARGV[1], each from the owner with the least virtual time, or one
/// arrival's first entry (below) (KEYS: stream,
/// waiting, ready, vtime, clock, costs, bell, caps, shares, parked; ARGV[4]: the owners'
/// queues' prefix; ARGV[5], ARGV[6]: the default costs; ARGV[7]: the
/// running sets' prefix; ARGV[8]: how many of an owner's first entries are
/// looked at when actions are capped; ARGV[9]: how many entries in all;
/// ARGV[10], ARGV[11]: an arrival's owner and virtual time, or empty).
/// Returns, for each, its entry id,
/// job, spec and estimated seconds. With nothing left waiting, the
/// doorbell is silenced (its rings are for jobs taken now).
///
/// For an arrival (ARGV[10], [`Reader::next_arrival`]): that owner's first
/// entry, if no action is capped and the owner still waits at the virtual
/// time it arrived at (ARGV[11]); else nothing.
///
/// With no action capped (`<prefix>:caps` empty): while only one owner
/// waits, its jobs are taken together (a few commands for the whole take);
/// while several do, one at a time, each from the owner furthest behind.
/// With caps ([`Queue::set_caps`]), one job at a time: the owner furthest
/// behind gives its first job whose every action is under its caps (the
/// running sets `<prefix>:running:<action>` and
/// `<prefix>:running:<action>:<owner>`, whose entries that left the stream
/// are forgotten when a set looks full); an owner with none among its
/// first ARGV[8] is parked (`<prefix>:parked`) until a job of a capped
/// action ends ([`ACCOUNT_SCRIPT`] puts the parked owners back and rings
/// the doorbell), the caps change, or no other owner is ready. A take that
/// finds nothing it may take silences the doorbell too.
const TAKE_SCRIPT: &str = concat!(
    size_class_lua!(),
    r"
local taken = {}
local want = tonumber(ARGV[3])
local costs, sizes, caps, full, shares = {}, {}, {}, {}, {}
local rounds = 0
local stamp = redis.call('TIME')[1]
-- Claims entries `ids` of `owner` (virtual time `vt`) for the consumer,
-- charges their estimated costs and, when `running` is true, counts them
-- as running under each of their actions' caps (`caps`, as `admits` read
-- them). Returns the new vt.
local function claim(ids, owner, vt, running)
  redis.call('ZREM', KEYS[2], unpack(ids))
  local cmd = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], '999999999999'}
  for _, id in ipairs(ids) do cmd[#cmd + 1] = id end
  cmd[#cmd + 1] = 'FORCE'
  local claimed = redis.pcall(unpack(cmd))
  if type(claimed) == 'table' and claimed['err'] then
    redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
    claimed = redis.call(unpack(cmd))
  end
  local share = shares[owner]
  if not share then
    share = tonumber(redis.call('HGET', KEYS[9], owner) or '1') or 1
    if share ~= share then share = 1 end
    share = math.min(math.max(share, 0.001), 1000)
    shares[owner] = share
  end
  local start = vt
  for _, e in ipairs(claimed) do
    if e then
      local f = {}
      for j = 1, #e[2], 2 do f[e[2][j]] = e[2][j + 1] end
      local action = f['action'] or ''
      local mp = tonumber(f['mp'] or '0') or 0
      -- What jobs of its action and size class took, or before any has
      -- finished, a job's cost plus its megapixels' learned cost.
      local sk = action .. ':s' .. size_class(mp)
      local cost = sizes[sk]
      if not cost then
        cost = tonumber(redis.call('HGET', KEYS[6], sk) or '-1') or -1
        sizes[sk] = cost
      end
      if cost < 0 then
        local c = costs[action]
        if not c then
          c = {tonumber(redis.call('HGET', KEYS[6], action .. ':base') or ARGV[5]),
               tonumber(redis.call('HGET', KEYS[6], action .. ':mp') or ARGV[6])}
          costs[action] = c
        end
        cost = c[1] + mp * c[2]
      end
      -- Never nothing: a job taken always moves its owner on.
      cost = math.max(cost, 0.00001)
      start = vt
      vt = vt + cost / share
      taken[#taken + 1] = {e[1], f['job'] or '', f['spec'] or '', tostring(cost)}
      if running then
        for a in string.gmatch(action, '[^,]+') do
          local c = caps[a] or {0, 0}
          local sets = {}
          if c[1] > 0 then sets[#sets + 1] = ARGV[7] .. a end
          if c[2] > 0 then sets[#sets + 1] = ARGV[7] .. a .. ':' .. owner end
          for _, key in ipairs(sets) do
            redis.call('ZADD', key, stamp, e[1])
            redis.call('EXPIRE', key, 86400)
          end
        end
      end
    end
  end
  -- The clock only moves forward (an owner passed over for a while, or
  -- one whose estimates were corrected down, is behind it).
  if start > (tonumber(redis.call('GET', KEYS[5]) or '0') or 0) then
    redis.call('SET', KEYS[5], tostring(start))
  end
  redis.call('HSET', KEYS[4], owner, tostring(vt))
  return vt
end
-- Puts `owner` back among the owners to serve at `vt`, or takes it off
-- when its queue is empty.
local function requeue(owner, vt)
  if redis.call('ZCARD', ARGV[4] .. owner) > 0 then
    redis.call('ZADD', KEYS[3], vt, owner)
    return true
  end
  redis.call('ZREM', KEYS[3], owner)
  return false
end
-- A take for one owner (ARGV[10], an arrival: an owner that started
-- waiting level with the owner furthest behind, at virtual time ARGV[11],
-- for a worker's arrival lane): its first job, if no action is capped and
-- it still waits at that virtual time (not served or charged since: an
-- arrival that is stale, or repeated by a submission cancelled and made
-- again, takes nothing); else nothing.
if ARGV[10] ~= '' then
  local owner = ARGV[10]
  if redis.call('HLEN', KEYS[8]) > 0 then return taken end
  local score = redis.call('ZSCORE', KEYS[3], owner)
  if not score or tonumber(score) ~= tonumber(ARGV[11]) then return taken end
  local vt = tonumber(score)
  local heads = redis.call('ZPOPMIN', ARGV[4] .. owner, 1)
  if #heads > 0 then vt = claim({heads[1]}, owner, vt, false) end
  requeue(owner, vt)
  if redis.call('ZCARD', KEYS[3]) == 0 then redis.call('DEL', KEYS[7]) end
  return taken
end
if redis.call('HLEN', KEYS[8]) == 0 then
  while #taken < want and rounds < want * 4 + 16 do
    rounds = rounds + 1
    local top = redis.call('ZRANGE', KEYS[3], 0, 1, 'WITHSCORES')
    if #top == 0 then break end
    local owner, vt = top[1], tonumber(top[2])
    local n = 1
    if #top == 2 then n = want - #taken end
    local heads = redis.call('ZPOPMIN', ARGV[4] .. owner, n)
    if #heads > 0 then
      local ids = {}
      for j = 1, #heads, 2 do ids[#ids + 1] = heads[j] end
      vt = claim(ids, owner, vt, false)
    end
    requeue(owner, vt)
  end
  if redis.call('ZCARD', KEYS[3]) == 0 then redis.call('DEL', KEYS[7]) end
  return taken
end
-- Some actions are capped: each owner's first entries (up to ARGV[8]) are
-- looked at in order, and the first whose every action is under its caps
-- is taken; an owner with none is parked (below).
-- How many entries of the running set `key` are still on the stream
-- (those that left it, finished or cancelled, are forgotten), counted
-- again only when it looks full.
local function live(key, cap)
  if full[key] then return cap end
  local n = redis.call('ZCARD', key)
  if n < cap then return n end
  for _, id in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    if #redis.call('XRANGE', KEYS[1], id, id) == 0 then redis.call('ZREM', key, id) end
  end
  n = redis.call('ZCARD', key)
  if n >= cap then full[key] = true end
  return n
end
local function admits(action, owner)
  for a in string.gmatch(action, '[^,]+') do
    local c = caps[a]
    if not c then
      c = {0, 0}
      local v = redis.call('HGET', KEYS[8], a)
      if v then
        local all, per = string.match(v, '^(%d+):(%d+)$')
        c = {tonumber(all) or 0, tonumber(per) or 0}
      end
      caps[a] = c
    end
    if c[1] > 0 and live(ARGV[7] .. a, c[1]) >= c[1] then return false end
    if c[2] > 0 and live(ARGV[7] .. a .. ':' .. owner, c[2]) >= c[2] then return false end
  end
  return true
end
-- An owner none of whose first entries may run is parked (moved from the
-- ready set to KEYS[10], with its virtual time) until a job of a capped
-- action ends or the caps change, so the next takes do not look at it
-- again. With nothing else ready, the parked owners are looked at again.
-- Each round takes a job, parks an owner or drops an owner whose queue
-- held only entries gone from the stream, so the loop ends; the entries
-- looked at are bounded by ARGV[9] (the take ends there, and the doorbell
-- is left ringing for the next).
if redis.call('ZCARD', KEYS[3]) == 0 and redis.call('ZCARD', KEYS[10]) > 0 then
  redis.call('ZUNIONSTORE', KEYS[3], 2, KEYS[3], KEYS[10], 'AGGREGATE', 'MIN')
  redis.call('DEL', KEYS[10])
end
local looked, exhausted = 0, false
while #taken < want and not exhausted do
  local top = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if #top == 0 then break end
  local owner, vt = top[1], tonumber(top[2])
  local queue = ARGV[4] .. owner
  local pick = nil
  for _, id in ipairs(redis.call('ZRANGE', queue, 0, tonumber(ARGV[8]) - 1)) do
    looked = looked + 1
    if looked > tonumber(ARGV[9]) then exhausted = true; break end
    local found = redis.call('XRANGE', KEYS[1], id, id)
    if #found == 0 then
      redis.call('ZREM', queue, id)
      redis.call('ZREM', KEYS[2], id)
    else
      local action = ''
      local f = found[1][2]
      for j = 1, #f, 2 do if f[j] == 'action' then action = f[j + 1] end end
      if admits(action, owner) then pick = id; break end
    end
  end
  if pick then
    redis.call('ZREM', queue, pick)
    vt = claim({pick}, owner, vt, true)
    requeue(owner, vt)
  elseif exhausted then
    break
  elseif requeue(owner, vt) then
    redis.call('ZREM', KEYS[3], owner)
    redis.call('ZADD', KEYS[10], vt, owner)
  end
end
if (#taken == 0 and not exhausted) or redis.call('ZCARD', KEYS[3]) == 0 then
  redis.call('DEL', KEYS[7])
end
return taken
"
);

/// Failure counters ([`Queue::count_failure`]), under the prefix.
const FAILURES: &str = "failures";

/// Each owner's rate account ([`Queue::take_rate`]), under the prefix and
/// followed by the owner.
const RATE: &str = "rate";

/// Each owner's use of its daily quota ([`Queue::charge_quota`]), under
/// the prefix and followed by the owner and the UTC day.
const QUOTA: &str = "quota";

/// What [`Queue::take_rate`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateTaken {
    /// Whether the submissions were taken.
    pub allowed: bool,
    /// How many more could be taken now.
    pub remaining: u64,
    /// When refused: how long until they would be allowed.
    pub retry_after: Duration,
    /// How long until the account is full again (its whole burst free).
    pub full_in: Duration,
}

/// Each owner's unfinished jobs (a set of job ids, [`Queue::hold`]), under
/// the prefix and followed by the owner.
const HELD: &str = "unfinished";

/// The owners that hold unfinished jobs (a set), under the prefix.
const HOLDERS: &str = "unfinished-owners";

/// The sorted set of worker heartbeats (score: milliseconds since 1970),
/// under the prefix.
const WORKERS: &str = "workers";

/// Milliseconds since 1970.
fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// The channel of job-change notices, under the prefix.
const JOB_NOTICES: &str = "job-changes";

/// Job ids and what each became, as [`Queue::job_changes`] hears them.
pub type JobChanges = std::pin::Pin<Box<dyn futures::Stream<Item = (Uuid, String)> + Send>>;

/// Plugin names, as [`Queue::plugin_changes`] hears them.
pub type PluginChanges = std::pin::Pin<Box<dyn futures::Stream<Item = String> + Send>>;

/// A lock shared by every process of a deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lock {
    /// Held by the one process that sweeps for jobs missing from the queue.
    Sweeper,
    /// Held by the one process that deletes jobs past `JOB_RETENTION`.
    Retention,
    /// Held by the one process that deletes files no job needs.
    Orphans,
}

impl Lock {
    fn key(self) -> &'static str {
        match self {
            Lock::Sweeper => "sweeper",
            Lock::Retention => "retention",
            Lock::Orphans => "orphans",
        }
    }
}

/// Bounds a connection attempt, so callers learn quickly that Redis is down.
async fn bounded<T>(connect: impl std::future::Future<Output = RedisResult<T>>) -> RedisResult<T> {
    tokio::time::timeout(TIMEOUT, connect).await.map_err(|_| {
        RedisError::from((redis::ErrorKind::IoError, "timed out connecting to Redis"))
    })?
}

/// How a wait on one of the queue's lists ended.
enum Wait {
    /// A value came (a ring, an owner).
    Popped(String),
    /// None came in time.
    TimedOut,
    /// The caller said stop; the wait was abandoned.
    Stopped,
}

/// Reads new entries for one consumer on its own connection (a blocking
/// read holds its connection).
pub struct Reader {
    conn: redis::aio::MultiplexedConnection,
    queue: Queue,
    consumer: String,
    /// Whether its last take left nothing waiting: the next one waits for
    /// the doorbell first.
    drained: bool,
    /// Whether it abandoned a wait for the doorbell: Redis holds its
    /// connection until that wait ends, so the next read connects anew.
    abandoned: bool,
}

impl Reader {
    /// Waits up to `block` for one new entry.
    pub async fn next(&mut self, block: Duration) -> RedisResult<Option<Delivery>> {
        Ok(self.next_batch(1, block).await?.into_iter().next())
    }

    /// Takes up to `count` waiting jobs in fair order ([`TAKE_SCRIPT`]:
    /// for each, the owner with the least worker time given, that owner's
    /// first job by [`Priority`]), claimed for this consumer; if none
    /// waits, waits up to `block` for the doorbell and tries once more.
    /// Returns at most `count` (none if the wait ended with none). After a
    /// take that left nothing waiting, it waits for the doorbell first (a
    /// job queued meanwhile has rung it), so an idle worker costs Redis
    /// one wait and one take per wake.
    pub async fn next_batch(
        &mut self,
        count: usize,
        block: Duration,
    ) -> RedisResult<Vec<Delivery>> {
        self.next_batch_until(count, block, std::future::pending())
            .await
    }

    /// [`Reader::next_batch`], except that the wait for the doorbell ends
    /// at once, with nothing taken, when `until` resolves: a worker told to
    /// stop takes no job after that, and does not wait out `block` first.
    /// Only the wait is cut short, never a take (whose script claims the
    /// jobs it returns). A ring that comes as the wait is abandoned may be
    /// lost to the other workers, who then find its job at the end of
    /// their own wait; the reader's next call connects anew (Redis holds
    /// the old connection until the abandoned wait ends) and takes before
    /// it waits (the old wait may take the ring of a job queued since).
    pub async fn next_batch_until(
        &mut self,
        count: usize,
        block: Duration,
        until: impl std::future::Future<Output = ()>,
    ) -> RedisResult<Vec<Delivery>> {
        self.reconnect_if_abandoned().await?;
        if !self.drained {
            let taken = self.take(count, None).await?;
            if !taken.is_empty() {
                return Ok(taken);
            }
        }
        match self.wait_on(BELL, block, until).await? {
            Wait::Stopped => Ok(Vec::new()),
            Wait::Popped(_) | Wait::TimedOut => self.take(count, None).await,
        }
    }

    /// Waits up to `block` for an arrival (an owner whose first job was
    /// queued while none of its jobs waited, and which then stood level
    /// with the owner furthest behind: a newcomer, or a light key that
    /// submits one job at a time) and takes that owner's first job if it
    /// still waits and no action is capped; else nothing. A worker's
    /// arrival lane: with a slot of its own beyond those its main reads
    /// fill, it takes a newcomer's job at once, where the main reads would
    /// take it only once one of the jobs they hold had ended (the worker's
    /// slots then give it the next image-work slot). The fair order holds:
    /// an owner ahead of the others in worker time is no arrival, and
    /// waits its turn in the main reads. `until` cuts the wait short as in
    /// [`Reader::next_batch_until`].
    pub async fn next_arrival(
        &mut self,
        block: Duration,
        until: impl std::future::Future<Output = ()>,
    ) -> RedisResult<Vec<Delivery>> {
        self.reconnect_if_abandoned().await?;
        match self.wait_on(ARRIVALS, block, until).await? {
            Wait::Popped(arrival) => match arrival.split_once(':') {
                Some((vt, owner)) => self.take(1, Some((owner, vt))).await,
                None => Ok(Vec::new()),
            },
            Wait::Stopped | Wait::TimedOut => Ok(Vec::new()),
        }
    }

    /// After an abandoned wait, a new connection (Redis holds the old one
    /// until that wait ends), and a take before the next wait (the old
    /// wait may yet take a ring meant for this take).
    async fn reconnect_if_abandoned(&mut self) -> RedisResult<()> {
        if self.abandoned {
            self.conn = self.queue.reader_connection().await?;
            self.abandoned = false;
            self.drained = false;
        }
        Ok(())
    }

    /// Waits up to `block` for a value on the list `list` (under the
    /// prefix), or until `until` resolves (the wait is then abandoned).
    async fn wait_on(
        &mut self,
        list: &str,
        block: Duration,
        until: impl std::future::Future<Output = ()>,
    ) -> RedisResult<Wait> {
        let mut command = redis::cmd("BLPOP");
        command
            .arg(self.queue.key(list))
            .arg(block.as_secs_f64().max(0.01));
        let popped = command.query_async::<Option<(String, String)>>(&mut self.conn);
        let popped = tokio::select! {
            biased;
            () = until => {
                self.abandoned = true;
                return Ok(Wait::Stopped);
            }
            popped = tokio::time::timeout(block + TIMEOUT, popped) => popped,
        };
        match popped {
            Ok(Ok(Some((_, value)))) => Ok(Wait::Popped(value)),
            Ok(Ok(None)) => Ok(Wait::TimedOut),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(RedisError::from((
                redis::ErrorKind::IoError,
                "waiting on the queue's doorbell timed out",
            ))),
        }
    }

    /// One round of [`TAKE_SCRIPT`]: up to `count` jobs in fair order, or
    /// for an `arrival` (owner, the virtual time it arrived at) that
    /// owner's first job if it still waits there.
    async fn take(
        &mut self,
        count: usize,
        arrival: Option<(&str, &str)>,
    ) -> RedisResult<Vec<Delivery>> {
        let q = &self.queue;
        let script = redis::Script::new(TAKE_SCRIPT);
        let mut command = script.key(&q.stream);
        command
            .key(q.key(WAITING))
            .key(q.key(READY))
            .key(q.key(VTIME))
            .key(q.key(CLOCK))
            .key(q.key(COSTS))
            .key(q.key(BELL))
            .key(q.key(CAPS))
            .key(q.key(SHARES))
            .key(q.key(PARKED))
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(count.max(1))
            .arg(q.key(&format!("{WAIT}:")))
            .arg(DEFAULT_COST.0)
            .arg(DEFAULT_COST.1)
            .arg(q.key(&format!("{RUNNING}:")))
            .arg(CAP_WINDOW)
            .arg(CAP_LOOKS)
            .arg(arrival.map_or("", |a| a.0))
            .arg(arrival.map_or("", |a| a.1));
        let read = command.invoke_async::<Vec<(String, String, String, String)>>(&mut self.conn);
        let taken = match tokio::time::timeout(TIMEOUT, read).await {
            Ok(reply) => reply?,
            Err(_) => {
                return Err(RedisError::from((
                    redis::ErrorKind::IoError,
                    "taking jobs from the queue timed out",
                )))
            }
        };
        if arrival.is_none() {
            self.drained = taken.len() < count.max(1);
        }
        Ok(taken
            .into_iter()
            .filter_map(|(entry, job, spec, estimate)| match Uuid::parse_str(&job) {
                Ok(job) => Some(Delivery {
                    entry,
                    job,
                    spec: (!spec.is_empty()).then_some(spec),
                    estimate: estimate.parse().unwrap_or(0.0),
                }),
                Err(_) => {
                    tracing::warn!(%entry, "ignoring a queue entry without a valid job id");
                    None
                }
            })
            .collect())
    }
}

fn deliveries(ids: Vec<redis::streams::StreamId>) -> Vec<Delivery> {
    ids.into_iter()
        .filter_map(|e| {
            let job = e
                .get::<String>("job")
                .and_then(|j| Uuid::parse_str(&j).ok());
            match job {
                Some(job) => Some(Delivery {
                    spec: e.get::<String>("spec"),
                    entry: e.id,
                    job,
                    estimate: 0.0,
                }),
                None => {
                    tracing::warn!(entry = %e.id, "ignoring a queue entry without a valid job id");
                    None
                }
            }
        })
        .collect()
}
