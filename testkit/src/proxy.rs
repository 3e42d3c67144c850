//! A TCP proxy in the test's process, put in front of PostgreSQL and of
//! Redis: it can close every connection through it ([`Proxy::reset`]),
//! also refuse new ones for a while ([`Proxy::cut`]), hold every chunk
//! of data for a delay ([`Proxy::set_delay`]), as a bad network would, or
//! lose the answer to one statement after the server has run it
//! ([`Proxy::lose_answer_to`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// A running proxy to one upstream address.
pub struct Proxy {
    /// Its port on 127.0.0.1.
    pub port: u16,
    down: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    cuts: tokio::sync::watch::Sender<u64>,
    lose: Lose,
}

/// The text of a statement whose answer the proxy is to lose, once.
type Lose = Arc<Mutex<Option<Vec<u8>>>>;

/// What one connection does with the armed [`Lose`]: watching the
/// client's data for the statement's text, then for the next chunk (with
/// PostgreSQL's extended protocol, `Bind`/`Execute`/`Sync` follow the
/// answer to `Parse`), after which nothing more reaches the client.
#[derive(Default)]
struct Losing {
    seen: AtomicBool,
    losing: AtomicBool,
}

impl Proxy {
    /// A proxy to `upstream` (`host:port`) on a free port.
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let lose = Lose::default();
        let (is_down, delay, cut_rx, armed) = (
            down.clone(),
            delay_ms.clone(),
            cuts.subscribe(),
            lose.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                if is_down.load(Ordering::SeqCst) {
                    let _ = client.shutdown().await;
                    continue;
                }
                let (upstream, delay, mut cut, armed) = (
                    upstream.clone(),
                    delay.clone(),
                    cut_rx.clone(),
                    armed.clone(),
                );
                cut.mark_unchanged();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = (client.set_nodelay(true), server.set_nodelay(true));
                    let (client_read, client_write) = client.into_split();
                    let (server_read, server_write) = server.into_split();
                    let losing = Arc::new(Losing::default());
                    let lost = async {
                        while !losing.losing.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        // Time for the server to run what it was sent.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    };
                    tokio::select! {
                        _ = async {
                            tokio::join!(
                                pipe(client_read, server_write, delay.clone(), &losing, Some(&armed)),
                                pipe(server_read, client_write, delay, &losing, None),
                            )
                        } => {}
                        _ = cut.changed() => {}
                        _ = lost => {}
                    }
                });
            }
        });
        Proxy {
            port,
            down,
            delay_ms,
            cuts,
            lose,
        }
    }

    /// Closes every connection through the proxy; new ones are accepted.
    pub fn reset(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }

    /// Closes every connection and refuses new ones for `down`.
    pub async fn cut(&self, down: Duration) {
        self.down.store(true, Ordering::SeqCst);
        self.reset();
        tokio::time::sleep(down).await;
        self.down.store(false, Ordering::SeqCst);
    }

    /// Arms the proxy to lose the answer to the next statement whose text
    /// contains `text`, once: the statement reaches the server, which runs
    /// it, but its answer never reaches the client, whose connection is
    /// closed half a second later, as when a network fails during a
    /// commit. (The statement must be prepared on that connection, so
    /// that its text passes: a fresh connection's first use of it.)
    pub fn lose_answer_to(&self, text: &[u8]) {
        *self.lose.lock().unwrap() = Some(text.to_vec());
    }

    /// Holds every chunk of data, each way, for `delay` (zero: none).
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }
}

/// Copies `from` to `to`, each chunk held for the proxy's delay. With
/// `armed` (the client's side), looks for the armed statement's text;
/// without (the server's side), drops what comes once the connection is
/// `losing`.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    delay_ms: Arc<AtomicU64>,
    losing: &Losing,
    armed: Option<&Lose>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if armed.is_none() && losing.losing.load(Ordering::SeqCst) {
            continue;
        }
        if let Some(armed) = armed {
            if losing.seen.load(Ordering::SeqCst) {
                losing.losing.store(true, Ordering::SeqCst);
            } else {
                let mut armed = armed.lock().unwrap();
                let found = armed
                    .as_deref()
                    .is_some_and(|text| buf[..n].windows(text.len()).any(|w| w == text));
                if found {
                    *armed = None;
                    losing.seen.store(true, Ordering::SeqCst);
                }
            }
        }
        let delay = delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// `url` with its host and port replaced by `127.0.0.1:<port>`; and the
/// `host:port` it had (`default_port` if it named none).
pub fn through(url: &str, port: u16, default_port: u16) -> (String, String) {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let (auth_host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (auth, host) = match auth_host.rsplit_once('@') {
        Some((a, h)) => (format!("{a}@"), h),
        None => (String::new(), auth_host),
    };
    let upstream = if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:{default_port}")
    };
    (
        format!("{scheme}://{auth}127.0.0.1:{port}/{path}"),
        upstream,
    )
}
