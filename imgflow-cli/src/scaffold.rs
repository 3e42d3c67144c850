//! `imgflow new NAME`: a new plugin crate, ready to build with
//! `cargo component build` or `cargo build --target wasm32-wasip2`.
//!
//! The crate's files are embedded in this binary, the WIT contract
//! included, so nothing is copied by hand and the contract is the one this
//! `imgflow` runs plugins by.

use std::path::{Path, PathBuf};

use clap::Args;
use imgflow_runtime::metadata::is_valid_plugin_name;
use imgflow_runtime::{ErrorCode, Failure};

/// The contract plugins export, as this build of imgflow speaks it.
const WIT: &str = include_str!("../../wit/filter.wit");
const CARGO_TOML: &str = include_str!("../scaffold/Cargo.toml.in");
const LIB_RS: &str = include_str!("../scaffold/lib.rs.in");
const GITIGNORE: &str = include_str!("../scaffold/gitignore.in");
const CARGO_CONFIG: &str = include_str!("../scaffold/cargo-config.toml.in");

/// Arguments of `imgflow new`.
#[derive(Debug, Args)]
pub struct NewArgs {
    /// The plugin's name, which is also its job action: `[a-z][a-z0-9_-]*`.
    name: String,
    /// Where to create it (default: `./NAME`); must not exist or be empty.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// The files of a new plugin called `name`, by path within its directory.
pub fn files(name: &str) -> Vec<(&'static str, String)> {
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{crate}}", &name.replace('-', "_"))
    };
    vec![
        ("Cargo.toml", fill(CARGO_TOML)),
        ("src/lib.rs", fill(LIB_RS)),
        ("wit/filter.wit", WIT.to_string()),
        (".gitignore", GITIGNORE.to_string()),
        (".cargo/config.toml", CARGO_CONFIG.to_string()),
    ]
}

/// Creates the plugin's directory and files, then says how to build it.
pub fn new(args: NewArgs) -> Result<(), Failure> {
    if !is_valid_plugin_name(&args.name) {
        return Err(Failure::new(
            ErrorCode::InvalidRequest,
            format!(
                "{:?} is not a plugin name: lowercase letters, digits, - and _, starting with a letter, at most 64",
                args.name
            ),
        ));
    }
    let dir = args.dir.unwrap_or_else(|| PathBuf::from(&args.name));
    let occupied = std::fs::read_dir(&dir).is_ok_and(|mut entries| entries.next().is_some());
    if occupied || dir.is_file() {
        return Err(Failure::new(
            ErrorCode::WriteFailed,
            format!(
                "{} exists and is not empty; choose another --dir",
                dir.display()
            ),
        ));
    }
    for (path, text) in files(&args.name) {
        write(&dir.join(path), &text)?;
    }
    let wasm = args.name.replace('-', "_");
    println!(
        "created {dir}: a plugin called {name}\n\
         \n\
         build it:  cd {dir} && cargo component build --release\n\
         \x20          (or: cargo build --release --target wasm32-wasip2)\n\
         check it:  imgflow check --plugin target/wasm32-wasip1/release/{wasm}.wasm\n\
         try it:    imgflow run --plugin target/wasm32-wasip1/release/{wasm}.wasm --input photo.png --output out.png --param factor=0.8",
        dir = dir.display(),
        name = args.name,
    );
    Ok(())
}

fn write(path: &Path, text: &str) -> Result<(), Failure> {
    let failed = |e: std::io::Error| {
        Failure::new(
            ErrorCode::WriteFailed,
            format!("cannot write {}: {e}", path.display()),
        )
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(failed)?;
    }
    std::fs::write(path, text).map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_is_filled() {
        for (path, text) in files("my-filter") {
            assert!(!text.contains("{{"), "{path} keeps a placeholder");
        }
        let files = files("my-filter");
        assert!(files[0].1.contains("name = \"my-filter\""));
        assert!(files[0].1.contains("my_filter.wasm"));
        assert!(files[1].1.contains("name: \"my-filter\".into()"));
        assert!(files[2].1.contains("world filter"));
        assert!(files[4].1.contains("+simd128"));
    }
}
