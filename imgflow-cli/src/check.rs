//! `imgflow check --plugin X.wasm`: a conformance battery for a plugin, in
//! the same sandbox and with the same limits as the worker.
//!
//! A plugin may refuse an input or a parameter combination cleanly (an
//! `invalid-params`, `unsupported-input` or `failed` error): that is a
//! warning. It must never crash, run past the time limit, exceed its memory
//! on an image within the limits, return a buffer that is not
//! `width * height * 4` bytes, or answer the same call differently twice:
//! those fail the check, and the command exits non-zero.
//!
//! The battery: the component loads (compiles, valid metadata); a 1x1
//! image; odd sizes (3x5, 17x1, 1x17); fully and partly transparent pixels;
//! the largest image the limits allow (`MAX_IMAGE_SIDE`,
//! `MAX_IMAGE_PIXELS`) within the time limit; every declared parameter at
//! its bounds (each end of a range, every allowed value, both booleans) and
//! at its default; the same call twice gives the same pixels; and every
//! output buffer has the right length.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Args;
use image::RgbaImage;
use imgflow_runtime::config::SandboxArgs;
use imgflow_runtime::metadata::{Constraint, ParamKind, ParamSpec, ParamValue};
use imgflow_runtime::params::Params;
use imgflow_runtime::{ErrorCode, Failure, Plugin, RunError, Runtime, RuntimeConfig};

/// Arguments of `imgflow check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The plugin, a WebAssembly component (.wasm).
    #[arg(long)]
    plugin: PathBuf,
    #[command(flatten)]
    sandbox: SandboxArgs,
}

/// A check's outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// As it should be.
    Pass,
    /// A clean refusal: allowed, but worth knowing.
    Warn(String),
    /// Misbehaviour: the plugin is not fit to run.
    Fail(String),
}

/// One row of the table.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// What was checked.
    pub name: String,
    /// How it went.
    pub verdict: Verdict,
    /// How long it took.
    pub took: Duration,
}

/// Deterministic noise: every channel varies, alpha included.
fn noise(width: u32, height: u32, seed: u32) -> RgbaImage {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    RgbaImage::from_fn(width, height, |_, _| {
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        };
        image::Rgba([next(), next(), next(), next()])
    })
}

fn opaque(mut image: RgbaImage) -> RgbaImage {
    for p in image.pixels_mut() {
        p[3] = 255;
    }
    image
}

/// The values to try a parameter at: the ends of its range (nudged inside
/// an open end), every allowed string, both booleans.
fn bounds(spec: &ParamSpec) -> Vec<ParamValue> {
    match (&spec.allowed, spec.kind) {
        (Constraint::OneOf { values }, _) => values.iter().cloned().map(ParamValue::Text).collect(),
        (_, ParamKind::Boolean) => vec![ParamValue::Boolean(false), ParamValue::Boolean(true)],
        (
            Constraint::Within {
                min,
                min_inclusive,
                max,
                max_inclusive,
            },
            kind,
        ) => {
            let mut ends = Vec::new();
            if let Some(min) = min {
                ends.push(match kind {
                    ParamKind::Integer if *min_inclusive => ParamValue::Integer(min.ceil() as i64),
                    ParamKind::Integer => ParamValue::Integer(min.floor() as i64 + 1),
                    _ if *min_inclusive => ParamValue::Float(*min),
                    _ => ParamValue::Float(min + (min.abs() * 1e-6).max(1e-6)),
                });
            }
            if let Some(max) = max {
                ends.push(match kind {
                    ParamKind::Integer if *max_inclusive => ParamValue::Integer(max.floor() as i64),
                    ParamKind::Integer => ParamValue::Integer(max.ceil() as i64 - 1),
                    _ if *max_inclusive => ParamValue::Float(*max),
                    _ => ParamValue::Float(max - (max.abs() * 1e-6).max(1e-6)),
                });
            }
            ends
        }
        (Constraint::Any, ParamKind::Text) => vec![ParamValue::Text(String::new())],
        (Constraint::Any, _) => Vec::new(),
    }
}

/// The battery's runner: one plugin, one runtime.
struct Battery<'a> {
    runtime: &'a Runtime,
    plugin: &'a Plugin,
    defaults: Params,
    outcomes: Vec<Outcome>,
}

impl Battery<'_> {
    /// Images of every awkward shape, and the largest the limits allow.
    async fn shapes(&mut self) {
        let defaults = self.defaults.clone();
        self.case(
            "1x1 image".into(),
            RgbaImage::from_pixel(1, 1, image::Rgba([200, 100, 50, 255])),
            &defaults,
            false,
        )
        .await;
        for (w, h) in [(3, 5), (17, 1), (1, 17)] {
            self.case(
                format!("odd size {w}x{h}"),
                opaque(noise(w, h, w * 31 + h)),
                &defaults,
                false,
            )
            .await;
        }
        self.case(
            "fully transparent pixels".into(),
            RgbaImage::from_pixel(7, 5, image::Rgba([0, 0, 0, 0])),
            &defaults,
            false,
        )
        .await;
        self.case(
            "partly transparent pixels".into(),
            noise(9, 9, 7),
            &defaults,
            false,
        )
        .await;

        // The largest image the limits allow, as square as they allow.
        let limits = self.runtime.config().image_limits;
        let side = (limits.max_pixels as f64).sqrt().floor() as u64;
        let side = side.min(u64::from(limits.max_side)).max(1) as u32;
        let largest = RgbaImage::from_fn(side, side, |x, y| {
            image::Rgba([(x % 256) as u8, (y % 256) as u8, ((x ^ y) % 256) as u8, 255])
        });
        self.case(
            format!(
                "largest allowed image {side}x{side} within {} ms",
                self.runtime.config().timeout.as_millis()
            ),
            largest,
            &defaults,
            false,
        )
        .await;
    }

    /// Every parameter at its default and at its bounds, the others at
    /// their defaults.
    async fn parameters(&mut self) {
        let defaults = self.defaults.clone();
        for spec in self.plugin.metadata().params.clone() {
            self.case(
                format!("{} at its default {}", spec.name, spec.default),
                opaque(noise(16, 16, 3)),
                &defaults,
                false,
            )
            .await;
            for value in bounds(&spec) {
                let mut given = serde_json::Map::new();
                given.insert(
                    spec.name.clone(),
                    serde_json::to_value(&value).unwrap_or_default(),
                );
                let name = format!("{} at its bound {value}", spec.name);
                match self
                    .plugin
                    .params_from_json(&serde_json::Value::Object(given))
                {
                    Ok(params) => self.case(name, noise(16, 16, 5), &params, true).await,
                    Err(e) => self.record(
                        name,
                        Verdict::Fail(format!(
                            "the declared bound is refused by the declaration itself: {e}"
                        )),
                        Duration::ZERO,
                    ),
                }
            }
        }
    }

    /// The same call twice: the same pixels.
    async fn deterministic(&mut self) {
        let defaults = self.defaults.clone();
        let started = Instant::now();
        let input = noise(31, 17, 11);
        let first = self.call(input.clone(), &defaults).await;
        let second = self.call(input, &defaults).await;
        let verdict = match (first, second) {
            (Ok(a), Ok(b)) if a == b => Verdict::Pass,
            (Ok(a), Ok(b)) => Verdict::Fail(format!(
                "two calls on the same image gave different results ({}x{} and {}x{}{})",
                a.width(),
                a.height(),
                b.width(),
                b.height(),
                if a.dimensions() == b.dimensions() {
                    ", pixels differ"
                } else {
                    ""
                }
            )),
            (a, b) => judge(a.and(b).map(|_| ()), false),
        };
        self.record(
            "deterministic (same call twice)",
            verdict,
            started.elapsed(),
        );
    }

    /// Every output buffer had the right length (the runtime checks each;
    /// a wrong one failed its case with `invalid_output`).
    fn buffer_lengths(&mut self) {
        let wrong: Vec<String> = self
            .outcomes
            .iter()
            .filter(|o| matches!(&o.verdict, Verdict::Fail(m) if m.contains("pixel buffer")))
            .map(|o| o.name.clone())
            .collect();
        let verdict = if wrong.is_empty() {
            Verdict::Pass
        } else {
            Verdict::Fail(format!(
                "the buffer was not width x height x 4 bytes in: {}",
                wrong.join("; ")
            ))
        };
        self.record("output buffer length", verdict, Duration::ZERO);
    }

    /// Runs the plugin on `image` with `params`; the output or the error.
    async fn call(&self, image: RgbaImage, params: &Params) -> Result<RgbaImage, RunError> {
        self.runtime
            .apply(self.plugin, image, params)
            .await
            .map(|applied| applied.image)
    }

    fn record(&mut self, name: impl Into<String>, verdict: Verdict, took: Duration) {
        self.outcomes.push(Outcome {
            name: name.into(),
            verdict,
            took,
        });
    }

    /// Runs one case and judges its error: clean refusals warn (and, at a
    /// parameter's bounds, so does running out of memory: a bound may
    /// legitimately ask for a large image); everything else fails.
    async fn case(&mut self, name: String, image: RgbaImage, params: &Params, at_bound: bool) {
        let started = Instant::now();
        let result = self.call(image, params).await;
        let verdict = judge(result.map(|_| ()), at_bound);
        self.record(name, verdict, started.elapsed());
    }
}

fn judge(result: Result<(), RunError>, at_bound: bool) -> Verdict {
    match result {
        Ok(()) => Verdict::Pass,
        Err(
            e
            @ (RunError::InvalidParams(_) | RunError::InvalidInput(_) | RunError::PluginFailed(_)),
        ) => Verdict::Warn(format!("refused cleanly: {e}")),
        Err(e @ RunError::OutOfMemory { .. }) if at_bound => {
            Verdict::Warn(format!("{e} (at a parameter's bound)"))
        }
        Err(e @ RunError::InvalidOutput(_)) if at_bound && !e.to_string().contains("buffer") => {
            Verdict::Warn(format!("{e} (at a parameter's bound)"))
        }
        Err(e) => Verdict::Fail(format!("{}: {e}", e.code())),
    }
}

/// Runs the whole battery and returns its rows.
pub async fn battery(runtime: &Runtime, plugin_path: &std::path::Path) -> Vec<Outcome> {
    let started = Instant::now();
    let plugin = match runtime.load_file(plugin_path).await {
        Ok(plugin) => plugin,
        Err(e) => {
            let message = e.to_string();
            return vec![Outcome {
                name: "loads (compiles, metadata valid)".into(),
                verdict: Verdict::Fail(format!("{}: {message}", Failure::from(e).code)),
                took: started.elapsed(),
            }];
        }
    };
    let mut outcomes = vec![Outcome {
        name: format!(
            "loads: {} {}, {} parameter(s)",
            plugin.metadata().name,
            plugin.metadata().version,
            plugin.metadata().params.len()
        ),
        verdict: Verdict::Pass,
        took: started.elapsed(),
    }];
    let defaults = match plugin.params_from_json(&serde_json::Value::Null) {
        Ok(params) => params,
        Err(e) => {
            outcomes.push(Outcome {
                name: "defaults are valid".into(),
                verdict: Verdict::Fail(e.to_string()),
                took: Duration::ZERO,
            });
            return outcomes;
        }
    };
    let mut battery = Battery {
        runtime,
        plugin: &plugin,
        defaults,
        outcomes,
    };
    battery.shapes().await;
    battery.parameters().await;
    battery.deterministic().await;
    battery.buffer_lengths();
    battery.outcomes
}

/// Prints the battery's table; fails (exit code 1) if any check failed.
pub async fn check(args: CheckArgs) -> Result<(), Failure> {
    let runtime = Runtime::new(RuntimeConfig::for_sandbox(&args.sandbox, 1))
        .map_err(|e| Failure::new(ErrorCode::RuntimeUnavailable, e.to_string()))?;
    let outcomes = battery(&runtime, &args.plugin).await;
    let width = outcomes
        .iter()
        .map(|o| o.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!("{:width$}  {:6}  {:>9}  DETAIL", "CHECK", "RESULT", "TIME");
    let (mut passed, mut warned, mut failed) = (0, 0, 0);
    for o in &outcomes {
        let (word, detail) = match &o.verdict {
            Verdict::Pass => {
                passed += 1;
                ("pass", "")
            }
            Verdict::Warn(m) => {
                warned += 1;
                ("warn", m.as_str())
            }
            Verdict::Fail(m) => {
                failed += 1;
                ("FAIL", m.as_str())
            }
        };
        println!(
            "{:width$}  {word:6}  {:>6.1} ms  {}",
            o.name,
            o.took.as_secs_f64() * 1e3,
            detail.replace('\n', " ")
        );
    }
    println!(
        "{} checks: {passed} passed, {warned} warned, {failed} failed",
        outcomes.len()
    );
    if failed > 0 {
        return Err(Failure::new(
            ErrorCode::PluginFailed,
            format!(
                "{} failed {failed} of {} checks",
                args.plugin.display(),
                outcomes.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: ParamKind, allowed: Constraint) -> ParamSpec {
        ParamSpec {
            name: "p".into(),
            kind,
            default: ParamValue::Integer(0),
            allowed,
            description: String::new(),
        }
    }

    #[test]
    fn bounds_stay_inside_open_ends() {
        let within = |min, min_inclusive, max, max_inclusive| Constraint::Within {
            min: Some(min),
            min_inclusive,
            max: Some(max),
            max_inclusive,
        };
        assert_eq!(
            bounds(&spec(ParamKind::Integer, within(0.0, true, 10.0, true))),
            vec![ParamValue::Integer(0), ParamValue::Integer(10)]
        );
        assert_eq!(
            bounds(&spec(ParamKind::Integer, within(0.0, false, 10.0, false))),
            vec![ParamValue::Integer(1), ParamValue::Integer(9)]
        );
        let floats = bounds(&spec(ParamKind::Float, within(0.0, false, 50.0, true)));
        assert!(matches!(floats[0], ParamValue::Float(v) if v > 0.0 && v < 1e-3));
        assert_eq!(floats[1], ParamValue::Float(50.0));
        assert_eq!(bounds(&spec(ParamKind::Boolean, Constraint::Any)).len(), 2);
        assert_eq!(
            bounds(&spec(
                ParamKind::Text,
                Constraint::OneOf {
                    values: vec!["a".into(), "b".into()]
                }
            )),
            vec![ParamValue::Text("a".into()), ParamValue::Text("b".into())]
        );
    }
}
