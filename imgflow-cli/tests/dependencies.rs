//! The plugin author's command depends on the sandbox alone: no database,
//! queue or object-store client anywhere in its dependency tree (dev
//! dependencies included).

use std::process::Command;

#[test]
fn imgflow_has_no_platform_dependencies() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for package in ["imgflow-cli", "imgflow-runtime"] {
        let out = Command::new(&cargo)
            .args([
                "tree",
                "--offline",
                "--prefix",
                "none",
                "-e",
                "normal,build,dev",
                "-p",
                package,
            ])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("cargo tree runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let tree = String::from_utf8_lossy(&out.stdout);
        assert!(tree.contains("wasmtime"), "{tree}");
        for forbidden in ["sqlx", "redis", "object_store"] {
            let found: Vec<&str> = tree.lines().filter(|l| l.starts_with(forbidden)).collect();
            assert!(found.is_empty(), "{package} depends on {found:?}");
        }
    }
}
