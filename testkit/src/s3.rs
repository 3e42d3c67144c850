//! A real S3 server for tests: `s3s-fs` (from crates.io;
//! `scripts/test-deps.sh` installs it) on a free local port, serving a
//! directory in which each folder is a bucket. Tests point the API and
//! workers at it with [`S3Server::env`] and look at its files to see what
//! is stored. It can be stopped and started again on the same port and
//! directory, as an outage would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::stack::free_port;

/// The access key the server accepts.
pub const ACCESS_KEY: &str = "imgflow-test";
/// Its secret key.
pub const SECRET_KEY: &str = "imgflow-test-secret-key";

/// A running `s3s-fs`, killed when dropped.
pub struct S3Server {
    child: Option<Child>,
    /// The directory it serves; each folder a bucket.
    pub root: PathBuf,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    /// Keeps a temporary root alive.
    _temp: Option<tempfile::TempDir>,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

impl S3Server {
    /// A server over a new temporary directory holding `bucket`.
    pub async fn start(bucket: &str) -> S3Server {
        let temp = tempfile::tempdir().expect("a temporary directory");
        let mut server = S3Server::start_in(temp.path(), bucket).await;
        server._temp = Some(temp);
        server
    }

    /// A server over `root` (created if missing) holding `bucket`.
    pub async fn start_in(root: &Path, bucket: &str) -> S3Server {
        std::fs::create_dir_all(root.join(bucket)).expect("the bucket's directory");
        let port = free_port();
        let mut server = S3Server {
            child: None,
            root: root.to_path_buf(),
            port,
            endpoint: format!("http://127.0.0.1:{port}"),
            _temp: None,
        };
        server.start_again().await;
        server
    }

    /// Starts the server (again, after [`S3Server::stop`]) on its port and
    /// directory; waits until it accepts connections.
    pub async fn start_again(&mut self) {
        let bin = std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".cargo/bin/s3s-fs"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("s3s-fs"));
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("s3s-fs (scripts/test-deps.sh installs it)");
        self.child = Some(child);
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "s3s-fs did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the server (SIGKILL, as a crash would).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The settings that point a service at `s3://<bucket_and_prefix>`
    /// on this server (`STORAGE_URL` and the standard AWS variables).
    pub fn env(&self, bucket_and_prefix: &str) -> Vec<(String, String)> {
        [
            ("STORAGE_URL", format!("s3://{bucket_and_prefix}")),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", "us-east-1".to_string()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The objects stored under `prefix` in `bucket`, as paths relative to
    /// the bucket (the server's own staging files left out).
    pub fn objects(&self, bucket: &str, prefix: &str) -> Vec<String> {
        fn walk(dir: &Path, base: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, base, out);
                } else if let Ok(rel) = path.strip_prefix(base) {
                    out.push(rel.display().to_string());
                }
            }
        }
        let base = self.root.join(bucket);
        let mut out = Vec::new();
        walk(&base.join(prefix), &base, &mut out);
        out.retain(|p| !p.contains(".s3s"));
        out.sort();
        out
    }
}
