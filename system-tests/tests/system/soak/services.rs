//! What the soak runs of its own besides Redis and S3 (the testkit's): a
//! size-limited filesystem for the storage that can be filled up.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

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
