//! The local runner: `imgflow run` and `imgflow plugin-info`.

use std::path::PathBuf;

use clap::Args;
use imgflow_runtime::codec::{self, ImageFormat, ImageLimits};
use imgflow_runtime::config::SandboxArgs;
use imgflow_runtime::{ErrorCode, Failure, Runtime, RuntimeConfig};

/// Arguments of `imgflow run`.
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

/// Arguments of `imgflow plugin-info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// The plugin, a WebAssembly component (.wasm).
    #[arg(long)]
    plugin: PathBuf,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

fn runtime(sandbox: &SandboxArgs) -> Result<Runtime, Failure> {
    Runtime::new(RuntimeConfig::for_sandbox(sandbox, 1))
        .map_err(|e| Failure::new(ErrorCode::RuntimeUnavailable, e.to_string()))
}

/// Runs the plugin on the input and writes the output.
pub async fn run(args: RunArgs) -> Result<(), Failure> {
    let format = match &args.format {
        Some(f) => Some(ImageFormat::parse(f).ok_or_else(|| {
            Failure::new(
                ErrorCode::InvalidFormat,
                format!("unknown output format {f:?}; use png, jpeg, webp or gif"),
            )
        })?),
        None => None,
    };
    let mut pairs = Vec::new();
    for p in &args.params {
        let (name, value) = p.split_once('=').ok_or_else(|| {
            Failure::new(
                ErrorCode::InvalidParams,
                format!("--param {p:?} is not NAME=VALUE"),
            )
        })?;
        pairs.push((name.trim(), value));
    }

    let runtime = runtime(&args.sandbox)?;
    let plugin = runtime.load_file(&args.plugin).await?;
    let params = plugin
        .params_from_pairs(pairs)
        .map_err(|e| Failure::new(ErrorCode::InvalidParams, e.to_string()))?;

    let bytes = std::fs::read(&args.input).map_err(|e| {
        Failure::new(
            ErrorCode::ReadFailed,
            format!("cannot read {}: {e}", args.input.display()),
        )
    })?;
    let (image, input_format) =
        codec::decode(&bytes, &ImageLimits::from(&args.sandbox)).map_err(Failure::from)?;
    let applied = runtime.apply(&plugin, image, &params).await?;
    let format = format.unwrap_or(input_format);
    let encoded = codec::encode_with(&applied.image, format, args.sandbox.png_compression, None)
        .map_err(Failure::from)?;
    std::fs::write(&args.output, encoded).map_err(|e| {
        Failure::new(
            ErrorCode::WriteFailed,
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
pub async fn info(args: InfoArgs) -> Result<(), Failure> {
    let runtime = runtime(&args.sandbox)?;
    let plugin = runtime.load_file(&args.plugin).await?;
    let json = serde_json::to_string_pretty(plugin.metadata())
        .map_err(|e| Failure::new(ErrorCode::Internal, e.to_string()))?;
    println!("{json}");
    Ok(())
}
