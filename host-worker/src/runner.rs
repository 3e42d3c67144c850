//! The local runner: `host-worker run` and `host-worker plugin-info`.

use std::path::PathBuf;

use clap::Args;
use imgflow_core::codec::{self, ImageFormat};
use imgflow_core::config::SandboxArgs;
use imgflow_core::runtime::Runtime;

/// Arguments of `host-worker run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The plugin, a WebAssembly component (.wasm).
    #[arg(long)]
    plugin: PathBuf,
    /// The input image (PNG, JPEG, WebP or GIF).
    #[arg(long)]
    input: PathBuf,
    /// Where to write the result.
    #[arg(long)]
    output: PathBuf,
    /// A plugin parameter as NAME=VALUE; repeat for several.
    #[arg(long = "param", value_name = "NAME=VALUE")]
    params: Vec<String>,
    /// Output format (png, jpeg, webp or gif). Default: the input's format.
    #[arg(long)]
    format: Option<String>,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

/// Arguments of `host-worker plugin-info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The plugin, a WebAssembly component (.wasm).
    #[arg(long)]
    plugin: PathBuf,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

/// Why a command failed: a stable code and a message for humans.
#[derive(Debug)]
pub struct Failure {
    /// A stable code, such as `timeout` or `corrupt_image`.
    pub code: &'static str,
    /// What went wrong.
    pub message: String,
}

impl Failure {
    fn new(code: &'static str, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

fn runtime(sandbox: &SandboxArgs) -> Result<Runtime, Failure> {
    Runtime::new(sandbox.runtime_config(1)).map_err(|e| Failure::new("runtime", e.to_string()))
}

/// Runs the plugin on the input and writes the output.
pub fn run(args: RunArgs) -> Result<(), Failure> {
    let format = match &args.format {
        Some(f) => Some(ImageFormat::parse(f).ok_or_else(|| {
            Failure::new(
                "invalid_format",
                format!("unknown output format {f:?}; use png, jpeg, webp or gif"),
            )
        })?),
        None => None,
    };
    let mut pairs = Vec::new();
    for p in &args.params {
        let (name, value) = p.split_once('=').ok_or_else(|| {
            Failure::new("invalid_params", format!("--param {p:?} is not NAME=VALUE"))
        })?;
        pairs.push((name.trim(), value));
    }

    let runtime = runtime(&args.sandbox)?;
    let plugin = runtime
        .load_file(&args.plugin)
        .map_err(|e| Failure::new(e.code(), e.to_string()))?;
    let params = plugin
        .params_from_pairs(pairs)
        .map_err(|e| Failure::new("invalid_params", e.to_string()))?;

    let bytes = std::fs::read(&args.input).map_err(|e| {
        Failure::new(
            "read_failed",
            format!("cannot read {}: {e}", args.input.display()),
        )
    })?;
    let (image, input_format) = codec::decode(&bytes, &args.sandbox.image_limits())
        .map_err(|e| Failure::new(e.code(), e.to_string()))?;
    let applied = runtime
        .apply(&plugin, image, &params)
        .map_err(|e| Failure::new(e.code(), e.to_string()))?;
    let format = format.unwrap_or(input_format);
    let encoded =
        codec::encode(&applied.image, format).map_err(|e| Failure::new(e.code(), e.to_string()))?;
    std::fs::write(&args.output, encoded).map_err(|e| {
        Failure::new(
            "write_failed",
            format!("cannot write {}: {e}", args.output.display()),
        )
    })?;
    tracing::info!(
        plugin = %plugin.metadata().name,
        instantiate_ms = applied.instantiate_time.as_secs_f64() * 1e3,
        run_ms = applied.run_time.as_secs_f64() * 1e3,
        "done"
    );
    Ok(())
}

/// Prints the plugin's metadata as JSON on stdout.
pub fn info(args: InfoArgs) -> Result<(), Failure> {
    let runtime = runtime(&args.sandbox)?;
    let plugin = runtime
        .load_file(&args.plugin)
        .map_err(|e| Failure::new(e.code(), e.to_string()))?;
    let json = serde_json::to_string_pretty(plugin.metadata())
        .map_err(|e| Failure::new("internal", e.to_string()))?;
    println!("{json}");
    Ok(())
}
