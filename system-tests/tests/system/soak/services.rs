//! The services the soak runs of its own: a Redis with AOF that can be
//! killed and restarted from its files or empty, and a size-limited
//! filesystem for the storage that can be filled up.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imgflow_testkit::stack::free_port;

/// A `redis-server` of the soak's own, with AOF (`appendfsync everysec`,
/// as a production Redis for a queue would run), in `dir`.
pub struct Redis {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    pub async fn start(dir: &Path) -> Redis {
        std::fs::create_dir_all(dir).unwrap();
        let mut redis = Redis {
            child: None,
            port: free_port(),
            dir: dir.to_path_buf(),
        };
        redis.spawn().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("redis.log"))
            .unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--appendonly", "yes", "--appendfsync", "everysec"])
            .args(["--save", ""])
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("redis-server runs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                    let pong: redis::RedisResult<String> =
                        redis::cmd("PING").query_async(&mut conn).await;
                    if pong.is_ok() {
                        return;
                    }
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Killed and started again: from its AOF, or with its files gone.
    pub async fn restart(&mut self, empty: bool, down: Duration) {
        self.kill();
        if empty {
            for entry in std::fs::read_dir(&self.dir).unwrap().flatten() {
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

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `tmpfs` of a fixed size mounted for the soak's storage (it needs
/// root, as CI runs), unmounted when dropped. [`Tmpfs::fill`] writes a
/// file until the filesystem is full; [`Tmpfs::free`] deletes it.
pub struct Tmpfs {
    /// Where it is mounted.
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts `size_mb` MiB at `path`.
    pub fn mount(path: &Path, size_mb: u64) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(path)
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "cannot mount a tmpfs at {} (the soak fills its storage's filesystem: run it as root, as CI does)",
            path.display()
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    fn filler(&self) -> PathBuf {
        self.path.join("filler")
    }

    /// Writes a file until the filesystem is full; returns its size.
    pub fn fill(&self) -> u64 {
        let mut file = std::fs::File::create(self.filler()).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        let mut written = 0u64;
        while let Ok(n) = file.write(&chunk) {
            if n == 0 {
                break;
            }
            written += n as u64;
        }
        written
    }

    /// Deletes what [`Tmpfs::fill`] wrote.
    pub fn free(&self) {
        let _ = std::fs::remove_file(self.filler());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
