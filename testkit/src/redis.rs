//! A `redis-server` of a test's own, for tests that stop, restart or empty
//! Redis (the shared one at 127.0.0.1:6379 must stay up for the others).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::stack::free_port;

/// A `redis-server` with AOF (`appendfsync everysec`, as a production
/// Redis for a queue would run), its files in `dir`, killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    /// The port it listens on (127.0.0.1), the same after a restart.
    pub port: u16,
    dir: PathBuf,
}

impl RedisServer {
    /// Starts it on a free port; returns once it answers `PING`.
    pub async fn start(dir: &Path) -> RedisServer {
        std::fs::create_dir_all(dir).expect("a directory for Redis");
        let mut redis = RedisServer {
            child: None,
            port: free_port(),
            dir: dir.to_path_buf(),
        };
        redis.spawn().await;
        redis
    }

    /// Its URL (database 0).
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.log"))
            .expect("a log file for Redis");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .args(["--save", ""])
            .stdout(Stdio::from(log.try_clone().expect("a log file")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("redis-server runs (Debian package redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.answers().await {
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether it answers `PING` with `+PONG`.
    pub async fn answers(&self) -> bool {
        let Ok(mut conn) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        let mut answer = [0u8; 7];
        conn.write_all(b"PING\r\n").await.is_ok()
            && conn.read_exact(&mut answer).await.is_ok()
            && &answer == b"+PONG\r\n"
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Started again after [`RedisServer::kill`], from its AOF.
    pub async fn start_again(&mut self) {
        self.spawn().await;
    }

    /// Killed and started again after `down`: from its AOF, or (`empty`)
    /// with its files gone.
    pub async fn restart(&mut self, empty: bool, down: Duration) {
        self.kill();
        if empty {
            for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                if entry.file_name() != "redis.log" {
                    let path = entry.path();
                    let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
                }
            }
        }
        tokio::time::sleep(down).await;
        self.spawn().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
